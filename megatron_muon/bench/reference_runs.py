"""The shipped CPU configs trained in full, each against the unigram entropy of its validation documents (issue #23
item 5: the tables "The default run" and "The Moonlight proxy" of docs/benchmarks.md, written from raw results):

    .venv/bin/python tools/reference_runs.py --markdown docs/benchmarks.md

Each run is ``launch/pretrain_muon.sh CONFIG`` as a user runs it (its checkpoints and TensorBoard files in a
temporary directory), with ``logging.log_interval`` set to the run's evaluation interval so the training loss is
logged where the validation loss is. Every evaluation and every logged training loss is appended to ``--results``
(one row each) with the run's key: the config's path and SHA-256 and the code version (``launcher_runs.py:
code_version``). A rerun trains only the runs whose key is not there; ``--publish-only`` trains nothing.

The unigram entropy is computed after the run from the config's first data prefix and split (recorded as a row of
kind ``unigram``; :func:`~megatron_muon.bench.unigram_entropy.validation_unigram_nats`): the loss of a model that ignores context,
trained on the training documents and scored on the validation documents, which a language model should end
clearly below. Per run the section gives that entropy, the validation loss at every evaluation and the training loss
at the first and last logged iteration (nats/token and perplexity), and the gap at the end.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_muon.bench.launcher_runs import (
    REPO,
    append_rows,
    code_version,
    file_sha,
    iteration_values,
    read_rows,
    run_training,
)
from megatron_muon.bench.report import cpu_description, load_average, publish, rerun_command
from megatron_muon.bench.unigram_entropy import validation_unigram_nats
from megatron_muon.config.loading import load_config

RUNS = {  # name -> config, in the order the section gives them
    "default": "launch/configs/tiny_cpu.yaml",
    "moonlight_proxy": "launch/configs/moonlight_proxy_cpu.yaml",
}
TITLES = {
    "default": "The default run (README command 1)",
    "moonlight_proxy": "The Moonlight proxy (MLA + MoE)",
}
KEY_FIELDS = ("name", "config", "config_sha", "code_version")
FIELDS = [*KEY_FIELDS, "train_iters", "tokens_per_step", "kind", "iteration", "loss", "wall_s", "load_before",
          "load_after"]  # fmt: skip
START, END = "<!-- reference_runs:start -->", "<!-- reference_runs:end -->"


def run_key(row: dict[str, str]) -> tuple[str, ...]:
    """What identifies a run in the results: its name, config (path and content) and code version."""
    return tuple(row[field] for field in KEY_FIELDS)


def training_losses(stdout: str) -> list[tuple[int, float]]:
    """(iteration, training loss) of every iteration the launcher logged, in order."""
    return iteration_values(stdout, "lm loss")


def run_rows(name: str, config: str, key: dict[str, str]) -> list[dict[str, object]]:
    """Train ``config`` once through the launcher; its rows (validation and training losses, then the unigram
    entropy of its validation documents)."""
    cfg = load_config(REPO / config)
    before = load_average()
    run = run_training(config, [f"logging.log_interval={cfg.training.eval_interval}"])
    after = load_average()
    common = {**key, "train_iters": cfg.training.train_iters,
              "tokens_per_step": cfg.training.global_batch_size * cfg.model.seq_length,
              "wall_s": f"{run.wall_s:.1f}", "load_before": before, "load_after": after}  # fmt: skip
    rows: list[dict[str, object]] = [
        {**common, "kind": "validation", "iteration": i, "loss": loss} for i, loss in run.validation
    ]
    rows += [
        {**common, "kind": "training", "iteration": i, "loss": loss}
        for i, loss in training_losses(run.stdout)
    ]
    unigram = validation_unigram_nats(
        REPO / cfg.data.blend[0].prefix, cfg.data.split
    )  # the launcher made the data
    rows.append({**common, "kind": "unigram", "iteration": 0, "loss": f"{unigram:.6f}"})
    return rows


def ensure_runs(names: Sequence[str], results: Path, publish_only: bool) -> dict[str, list[dict[str, str]]]:
    """name -> the rows of its run in this code version and config, trained here unless there; with
    ``publish_only`` nothing is trained and a name without such rows gets its latest run in the file (the section
    names its code version). A name without rows is left out."""
    version = code_version()
    found: dict[str, list[dict[str, str]]] = {}
    for name in names:
        config = RUNS[name]
        key = {"name": name, "config": config, "config_sha": file_sha(REPO / config), "code_version": version}
        rows = [row for row in read_rows(results) if run_key(row) == tuple(key.values())]
        if not rows and publish_only:  # the latest run of this name, whatever its code: the section names it
            earlier = [row for row in read_rows(results) if row["name"] == name]
            rows = [row for row in earlier if run_key(row) == run_key(earlier[-1])] if earlier else []
        if not rows and not publish_only:
            print(f"[reference_runs] training {name}: {config}", file=sys.stderr, flush=True)
            append_rows(results, run_rows(name, config, key), FIELDS)
            rows = [row for row in read_rows(results) if run_key(row) == tuple(key.values())]
        if rows:
            found[name] = rows
    return found


def _losses(rows: list[dict[str, str]], kind: str) -> list[tuple[int, float]]:
    return sorted((int(row["iteration"]), float(row["loss"])) for row in rows if row["kind"] == kind)


def run_section(name: str, rows: list[dict[str, str]]) -> list[str]:
    """The table and reading of one run, from its rows alone."""
    validation, training = _losses(rows, "validation"), _losses(rows, "training")
    (unigram,) = (loss for _, loss in _losses(rows, "unigram"))
    tokens_per_step, iterations = int(rows[0]["tokens_per_step"]), int(rows[0]["train_iters"])
    final = validation[-1][1]
    first_row = rows[0]
    slash = " / ".join
    return [
        f"### {TITLES[name]}: `{first_row['config']}`",
        "",
        f"{iterations} iterations × {tokens_per_step:,} tokens; wall {float(first_row['wall_s']) / 60:.1f} min "
        f"including start-up and evaluations (load average {first_row['load_before']} before, "
        f"{first_row['load_after']} after); code version `{first_row['code_version']}`"
        + (
            "."
            if (REPO / first_row["config"]).is_file()
            and file_sha(REPO / first_row["config"]) == first_row["config_sha"]
            else f", config SHA-256 `{first_row['config_sha']}` (the file has changed or gone since)."
        )
        + "",
        "",
        "| | nats/token | perplexity |",
        "|---|---:|---:|",
        f"| unigram model of the training documents, on the validation documents | {unigram:.4f} | "
        f"{math.exp(unigram):.1f} |",
        f"| validation loss at iteration {slash(str(i) for i, _ in validation)} | "
        f"{slash(f'{loss:.3f}' for _, loss in validation[:-1])}{' / ' if len(validation) > 1 else ''}"
        f"**{final:.3f}** | {slash(f'{math.exp(loss):.0f}' for _, loss in validation[:-1])}"
        f"{' / ' if len(validation) > 1 else ''}**{math.exp(final):.0f}** |",
        (
            f"| training loss at iteration {training[0][0]} / {training[-1][0]} | {training[0][1]:.3f} / "
            f"{training[-1][1]:.3f} | |"
            if training
            else "| training loss | — (none logged) | |"
        ),
        "",
        f"The run ends **{unigram - final:.2f} nats/token below the unigram entropy** "
        f"({iterations * tokens_per_step:,} training tokens).",
        "",
    ]


def markdown(found: dict[str, list[dict[str, str]]], results: str, argv: Sequence[str] | None) -> str:
    """The section: one table per run found."""
    lines = [
        START,
        "## The shipped CPU configs trained in full, against the unigram entropy",
        "",
        f"Written by `tools/reference_runs.py` from `{results}`; rerun it to refresh this section (it trains only "
        "what the file lacks for this code version; `--publish-only` trains nothing):",
        "",
        f"```bash\n{rerun_command('reference_runs.py', None if argv is None else list(argv))}\n```",
        "",
        f"- CPU: {cpu_description()}; each run as README command 1 starts it (4 processes, gloo).",
        "",
    ]
    for name, rows in found.items():
        lines += run_section(name, rows)
    missing = [name for name in RUNS if name not in found]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Train what is missing, then print or write the section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", default=list(RUNS), help=f"which runs (valid: {', '.join(RUNS)})"
    )
    parser.add_argument("--results", default="docs/reference_runs/evaluations.csv")
    parser.add_argument("--publish-only", action="store_true", help="train nothing: write the finished runs")
    parser.add_argument(
        "--markdown", default=None, help="write the section into this file (default: print it)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.runs if name not in RUNS]
    if unknown:
        parser.error(f"--runs {' '.join(unknown)}: unknown; valid: {', '.join(RUNS)}")
    results = REPO / args.results
    if results.exists() and read_rows(results) and list(read_rows(results)[0]) != FIELDS:
        parser.error(f"--results {args.results}: its columns are not {FIELDS}; use another file")
    trained = ensure_runs(args.runs, results, args.publish_only)
    others = ensure_runs([name for name in RUNS if name not in args.runs], results, publish_only=True)
    found = {
        name: {**trained, **others}[name] for name in RUNS if name in {**trained, **others}
    }  # section order
    if not trained:
        parser.error(
            f"--results {args.results}: no finished run of {' '.join(args.runs)} (drop --publish-only)"
        )
    publish(markdown(found, args.results, argv), args.markdown, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
