"""Training quality of Newton–Schulz's per-matrix algorithm choice: ``ns_algorithm=auto`` against ``standard``.

    .venv/bin/python tools/ns_algorithm_quality.py --seeds 1234 1235 \\
        --results docs/ns_algorithm_quality/evaluations.csv --markdown docs/benchmarks.md

Every (config, algorithm, seed) is one full run of ``launch/pretrain_muon.sh`` on the config as shipped (the default
``tiny_cpu.yaml`` and the ``moonlight_proxy_cpu.yaml`` MLA + fine-grained MoE proxy), with
``optimizer.muon.ns_algorithm`` and ``training.seed`` set and ``--override`` added to every run. The validation
losses the launcher prints are appended to ``--results`` one row per evaluation. A rerun skips every run whose key is
already there; the key is everything that changes a run: the config's path and SHA-256, the overrides, the algorithm,
the seed and the code version (SHA-256 of the tracked files a training run executes: the launcher and the package
without ``bench/`` and ``testing/``, which no run imports), so an edit of the code reruns the study instead of mixing
versions. ``--same-numerics-as VERSION`` lets the runs of an earlier code version count as this tree's, for an edit
you have checked trains identically (a refactor: compare the two versions' per-iteration losses); the section names
every code version its rows come from.

The bound is Dao lab's for Gram Newton–Schulz: the final validation loss of ``auto`` within 0.01 nats of
``standard`` (per seed, and in the mean over seeds). ``auto`` picks Gram NS for the matrices where it costs fewer
FLOPs; how many is read from the launcher's ``--dry-run`` plan of each config (``gram N (P% of FLOPs)`` per plan
group).
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_muon.bench.launcher_runs import (
    LAUNCHER,
    REPO,
    append_rows,
    code_version,
    file_sha,
    launcher_environment,
    read_rows,
    run_training,
)
from megatron_muon.bench.report import cpu_description, load_average, publish, rerun_command

CONFIGS = ["launch/configs/tiny_cpu.yaml", "launch/configs/moonlight_proxy_cpu.yaml"]
PLAN_GROUP = re.compile(r"plan (\S+): (\d+) matrices, .*?NS algorithms (.*?), NS FLOPs")
ALGORITHM_SHARE = re.compile(r"(\w+) (\d+) \((\d+)% of FLOPs\)")
FIELDS = ["config", "config_sha", "overrides", "code_version", "algorithm", "seed", "iteration", "val_loss",
          "gram_matrices", "matrices", "wall_s"]  # fmt: skip
START, END = "<!-- ns_algorithm_quality:start -->", "<!-- ns_algorithm_quality:end -->"
BOUND = 0.01  # nats: Dao lab's bound on the final loss of Gram Newton–Schulz against standard


def run_key(row: dict[str, str]) -> tuple[str, ...]:
    """What identifies a run in the results: everything that changes it."""
    return tuple(
        row[field] for field in ("config", "config_sha", "overrides", "code_version", "algorithm", "seed")
    )


def gram_matrices(stdout: str) -> tuple[int, int]:
    """(matrices on Gram NS, matrices) summed over the plan groups the launcher prints (each group counted once)."""
    gram = total = 0
    seen: set[str] = set()
    for match in PLAN_GROUP.finditer(stdout):
        if match[1] in seen:
            continue
        seen.add(match[1])
        total += int(match[2])
        counts = {name: int(count) for name, count, _ in ALGORITHM_SHARE.findall(match[3])}
        gram += counts.get("gram", 0)
    return gram, total


def planned_gram_matrices(config: str, overrides: list[str]) -> tuple[int, int]:
    """(matrices on Gram NS, matrices) of the run's plan, from the launcher's ``--dry-run`` (nothing is trained)."""
    command = ["bash", str(LAUNCHER), config, *overrides, "--dry-run"]
    result = subprocess.run(
        command, cwd=REPO, env=launcher_environment(), capture_output=True, text=True, timeout=900
    )
    counts = gram_matrices(result.stdout)
    if result.returncode != 0 or counts[1] == 0:
        raise RuntimeError(
            f"no plan in the dry run of {config} {' '.join(overrides)}:\n{result.stderr[-1500:]}"
        )
    return counts


def ensure_runs(args: argparse.Namespace) -> list[dict[str, str]]:
    """Run every (config, algorithm, seed) not yet in the results; return the rows of this study's keys."""
    results = REPO / args.results
    version, overrides = args.code_version, " ".join(args.override)
    accepted = [version, *args.same_numerics_as]  # this tree's first
    wanted: list[tuple[str, ...]] = []
    missing: list[str] = args.missing
    for config in args.configs:
        sha = file_sha(REPO / config)
        for seed in args.seeds:
            for algorithm in args.algorithms:
                keys = [(config, sha, overrides, v, algorithm, str(seed)) for v in accepted]
                done = {run_key(row) for row in read_rows(results)}
                found = next((key for key in keys if key in done), None)
                if found is not None:
                    wanted.append(found)
                    continue
                key = keys[0]
                wanted.append(key)
                if args.publish_only:
                    missing.append(f"`{Path(config).name}` {algorithm} seed {seed}")
                    continue
                print(
                    f"run {config} ns_algorithm={algorithm} seed={seed} ({time.strftime('%H:%M:%S')})",
                    flush=True,
                )
                run_overrides = [
                    f"optimizer.muon.ns_algorithm={algorithm}",
                    f"training.seed={seed}",
                    *args.override,
                ]
                run = run_training(config, run_overrides)
                points, wall = run.validation, run.wall_s
                gram, total = planned_gram_matrices(config, run_overrides)
                fields = dict(
                    zip(
                        ("config", "config_sha", "overrides", "code_version", "algorithm", "seed"),
                        key,
                        strict=True,
                    )
                )
                append_rows(results, [{**fields, "iteration": it, "val_loss": f"{loss:.5f}", "gram_matrices": gram,
                                       "matrices": total, "wall_s": f"{wall:.0f}"} for it, loss in points], FIELDS)  # fmt: skip
                print(
                    f"  final validation loss {points[-1][1]:.4f}, Gram on {gram} of {total} matrices, {wall:.0f} s"
                )
    return [row for row in read_rows(results) if run_key(row) in set(wanted)]


def summarize(rows: list[dict[str, str]], algorithms: list[str]) -> list[dict[str, object]]:
    """Per config: final validation loss per algorithm and seed, and each seed's difference to the first algorithm."""
    final: dict[tuple[str, str, str], tuple[int, float]] = {}
    gram: dict[tuple[str, str], tuple[int, int]] = {}
    for row in rows:
        key = (row["config"], row["algorithm"], row["seed"])
        point = (int(row["iteration"]), float(row["val_loss"]))
        final[key] = max(final.get(key, point), point)
        gram[(row["config"], row["algorithm"])] = (int(row["gram_matrices"]), int(row["matrices"]))
    summary: list[dict[str, object]] = []
    base = algorithms[-1]  # the reference, `standard` by default
    for config in dict.fromkeys(row["config"] for row in rows):
        seeds = sorted({seed for (c, _, seed) in final if c == config})
        for algorithm in algorithms:
            losses = [
                final[(config, algorithm, seed)][1] for seed in seeds if (config, algorithm, seed) in final
            ]
            diffs = [final[(config, algorithm, s)][1] - final[(config, base, s)][1]
                     for s in seeds if (config, algorithm, s) in final and (config, base, s) in final]  # fmt: skip
            summary.append({
                "config": config, "algorithm": algorithm, "losses": losses, "seeds": seeds,
                "iteration": max((final[(config, algorithm, s)][0] for s in seeds if (config, algorithm, s) in final),
                                 default=0),
                "mean": statistics.fmean(losses) if losses else float("nan"),
                "diffs": diffs if algorithm != base else [],
                "gram": gram.get((config, algorithm), (0, 0)),
            })  # fmt: skip
    return summary


def code_versions_line(rows: list[dict[str, str]], version: str) -> str:
    """The bullet naming the code versions the rows come from: this tree's and any accepted earlier one."""
    used = sorted({row["code_version"] for row in rows}, key=lambda v: (v != version, v))
    named = [
        f"`{v}` (this tree)"
        if v == version
        else f"`{v}` (an earlier version, counted with `--same-numerics-as`)"
        for v in used
    ]
    return "- Code version of the runs (SHA-256 of the tracked files a training run executes): " + (
        ", ".join(named) if named else "none yet"
    )


def markdown(
    summary: list[dict[str, object]], argv: list[str] | None, base: str, missing: list[str], versions: str
) -> str:
    """The section of docs/benchmarks.md: the command, the setting and one row per config and algorithm."""
    lines = [
        START,
        "## Newton–Schulz algorithm per matrix: training quality of `auto` against `standard` (issue #22 item 6)",
        "",
        "Written by `tools/ns_algorithm_quality.py` from the raw evaluations beside it; rerun to refresh:",
        "",
        "```bash",
        rerun_command("ns_algorithm_quality.py", argv),
        "```",
        "",
        f"- CPU: {cpu_description()}; load average at writing {load_average()} (losses do not depend on load)",
        "- Each row: the shipped config trained in full through `launch/pretrain_muon.sh` (4 CPU processes,"
        " Shakespeare), `optimizer.muon.ns_algorithm` and `training.seed` set; both configs run NS in fp32"
        " (`compute_dtype: float32`, CPU)",
        versions,
        f"- Bound: |final validation loss of `auto` − `{base}`| ≤ {BOUND} nats (Dao lab's for Gram NS)",
        "",
        f"| config | NS algorithm | matrices on Gram NS (the plan's groups) | final validation loss per seed | mean |"
        f" difference to `{base}` per seed (mean) | within {BOUND} per seed / in the mean | spread over seeds |",
        "|---|---|---:|---|---:|---|---|---:|",
    ]
    for entry in summary:
        gram, total = entry["gram"]  # type: ignore[misc]
        losses = " / ".join(f"{loss:.4f}" for loss in entry["losses"])  # type: ignore[attr-defined]
        diffs: list[float] = entry["diffs"]  # type: ignore[assignment]
        mean_diff = statistics.fmean(diffs) if diffs else 0.0
        within = (
            ("yes" if all(abs(d) <= BOUND for d in diffs) else "**no**")
            + " / "
            + ("yes" if abs(mean_diff) <= BOUND else "**no**")
            if diffs
            else ""
        )
        diff_cell = " / ".join(f"{d:+.4f}" for d in diffs) + (f" ({mean_diff:+.4f})" if diffs else "")
        spread = max(entry["losses"]) - min(entry["losses"])  # type: ignore[call-overload]
        lines.append(
            f"| `{Path(str(entry['config'])).name}` (iteration {entry['iteration']}) | `{entry['algorithm']}` |"
            f" {gram} of {total} | {losses} (seeds {', '.join(entry['seeds'])}) | {entry['mean']:.4f} |"  # type: ignore[arg-type]
            f" {diff_cell} | {within} | {spread:.4f} |"
        )
    if missing:
        lines += ["", f"Not run yet (rerun the command without `--publish-only`): {', '.join(missing)}."]
    lines.append(END)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run what is missing, then print or write the section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--algorithms", nargs="+", default=["auto", "standard"],
                        help="the last one is the reference the others are compared to")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234, 1235])
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE added to every run")
    parser.add_argument("--results", default="docs/ns_algorithm_quality/evaluations.csv")
    parser.add_argument("--same-numerics-as", action="append", default=[], metavar="VERSION",
                        help="an earlier code version (16 hex digits, as in the results) whose runs count as this"
                             " tree's: for an edit checked to train identically")  # fmt: skip
    parser.add_argument(
        "--publish-only", action="store_true", help="run nothing: write the section from the finished runs"
    )
    parser.add_argument(
        "--markdown", default=None, help="write the section into this file (default: print it)"
    )
    args = parser.parse_args(argv)
    for config in args.configs:
        if not (REPO / config).is_file():
            parser.error(f"--configs: {config} is not a file under {REPO}")
    unknown = sorted(set(args.algorithms) - {"auto", "standard", "gram"})
    if unknown:
        parser.error(f"--algorithms: {', '.join(unknown)} unknown; valid: auto, standard, gram")
    bad = [v for v in args.same_numerics_as if not re.fullmatch(r"[0-9a-f]{16}", v)]
    if bad:
        parser.error(
            f"--same-numerics-as {bad[0]!r}: a code version is 16 lowercase hex digits, as in the results"
        )
    args.missing = []
    args.code_version = code_version()  # hashed once: the runs' keys and the section's versions line
    rows = ensure_runs(args)
    publish(
        markdown(
            summarize(rows, args.algorithms),
            argv,
            args.algorithms[-1],
            args.missing,
            code_versions_line(rows, args.code_version),
        ),
        args.markdown,
        START,
        END,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
