"""Muon vs AdamW data efficiency on the Shakespeare MoE: Essential AI's token ratio at several batch sizes.

    .venv/bin/python tools/compare_optimizers.py --batch-sizes 8 16 32 --tokens 262144 \\
        --out-dir results/compare_optimizers --markdown docs/benchmarks.md

For every global batch size B and optimizer (AdamW for everything; Muon for the hidden matrices + AdamW for the
rest), a small learning-rate sweep (the same number of points for both: equal tuning effort) trains the same
model on the same token budget, each run one process through ``launch/pretrain_muon.sh``. Every run evaluates
the same validation samples (``eval_samples`` sequences) at ``--evals`` points, so losses are comparable across
runs. Per batch size:

* AdamW's reference loss L_A = the best final validation loss over its sweep, reached with the whole budget T;
* Muon's tokens T_M = the fewest tokens at which any Muon run of the sweep reaches L_A (linear interpolation
  between evaluations);
* token ratio = T_M / T (Essential AI, "Practical Efficiency of Muon for Pretraining", 2025: < 1 means Muon needs
  fewer tokens). Empty when no Muon run reaches L_A within T.

Conservative by construction: every run follows its own warm-up + cosine schedule over the whole budget, so a
Muon run is measured mid-schedule, before its learning rate has decayed, against AdamW's annealed end point.

Results: ``<out-dir>/evaluations.csv`` (one row per evaluation of every run; a rerun skips finished runs),
``summary.csv``, ``loss_vs_tokens.png``, ``token_ratio.png``, and a section of ``--markdown``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_muon.bench.report import cpu_description, load_average, rerun_command, write_section

REPO = Path(__file__).resolve().parents[2]
VALIDATION = re.compile(r"validation at iteration\s+(\d+) \| lm loss ([\d.]+|nan|inf)")
START, END = "<!-- compare_optimizers:start -->", "<!-- compare_optimizers:end -->"
FIELDS = ["optimizer", "batch_size", "lr", "iteration", "tokens", "val_loss"]
# A smaller MoE than tiny_cpu.yaml (hidden 64, 2 layers: 1 dense + 1 MoE with 4 experts top-2), one process.
MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=256",
    "model.moe_ffn_hidden_size=128",
    "model.num_moe_experts=4",
    "model.moe_layer_freq=1",
    "model.first_k_dense_layers=1",
    "parallel.world_size=1",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.ep=1",
    "parallel.etp=1",
]


def trial_overrides(optimizer: str, batch: int, lr: float, args) -> list[str]:
    """The launcher overrides of one run."""
    seq = args.seq_length
    iters = args.tokens // (batch * seq)
    micro = min(batch, args.micro_batch_size)
    overrides = MODEL + [
        f"model.seq_length={seq}",
        f"training.global_batch_size={batch}",
        f"training.micro_batch_size={micro}",
        f"training.train_iters={iters}",
        f"training.eval_interval={max(1, iters // args.evals)}",
        f"training.eval_iters={max(1, args.eval_samples // batch)}",
        f"optimizer.warmup_iters={max(1, iters // 20)}",
        "optimizer.decay_style=cosine",
        "logging.log_interval=1000000",
        "checkpoint.resume=none",
        "checkpoint.save_interval=0",
    ]
    if optimizer == "adamw":
        overrides += ["optimizer.use_muon=false", f"optimizer.lr={lr}", f"optimizer.min_lr={lr / 10}"]
    else:
        overrides += [f"optimizer.muon.lr={lr}", f"optimizer.muon.min_lr={lr / 10}"]
    return overrides


def run_trial(overrides: list[str], config: str) -> list[tuple[int, float]]:
    """One training run through the launcher; its (iteration, validation loss) points."""
    with tempfile.TemporaryDirectory() as workdir:
        command = [
            "bash",
            str(REPO / "launch" / "pretrain_muon.sh"),
            config,
            *overrides,
            f"checkpoint.save_dir={workdir}/checkpoints",
            f"logging.tensorboard_dir={workdir}/tensorboard",
        ]
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(
            f"run failed (exit {result.returncode}): {' '.join(overrides)}\n{result.stderr[-2000:]}"
        )
    points = [(int(m[1]), float(m[2])) for m in VALIDATION.finditer(result.stdout)]
    if not points:
        raise RuntimeError(f"no validation loss in the output of: {' '.join(overrides)}")
    return points


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Fewest tokens at which the (tokens, loss) curve reaches ``target``, interpolating linearly between
    evaluations (from the start when the first evaluation already reaches it); None when it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0), (t1, l1) = previous, (tokens, loss)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        previous = (tokens, loss)
    return None


def summarize(rows: list[dict], batch_sizes: list[int], budget: int) -> list[dict]:
    """Per batch size: AdamW's best final loss, Muon's tokens to reach it, and the ratio."""
    summary = []
    for batch in batch_sizes:
        curves: dict[tuple[str, float], list[tuple[int, float]]] = {}
        for row in rows:
            if int(row["batch_size"]) == batch:
                key = (row["optimizer"], float(row["lr"]))
                curves.setdefault(key, []).append((int(row["tokens"]), float(row["val_loss"])))
        for curve in curves.values():
            curve.sort()
        finals = {key: curve[-1][1] for key, curve in curves.items()}
        adamw = {k: v for k, v in finals.items() if k[0] == "adamw" and math.isfinite(v)}
        muon = {k: v for k, v in finals.items() if k[0] == "muon" and math.isfinite(v)}
        if not adamw or not muon:
            continue
        best_adamw = min(adamw, key=adamw.get)
        target = adamw[best_adamw]
        reach = {k: tokens_to_reach(curves[k], target) for k in muon}
        reached = {k: t for k, t in reach.items() if t is not None}
        best_muon = min(reached, key=reached.get) if reached else min(muon, key=muon.get)
        muon_tokens = reached.get(best_muon)
        summary.append(
            dict(
                batch_size=batch,
                adamw_lr=best_adamw[1],
                adamw_final_loss=target,
                adamw_tokens=curves[best_adamw][-1][0],
                muon_lr=best_muon[1],
                muon_final_loss=muon[best_muon],
                muon_tokens_to_adamw_loss=muon_tokens,
                token_ratio=None if muon_tokens is None else muon_tokens / curves[best_adamw][-1][0],
                budget=budget,
            )
        )
    return summary


def plot(rows: list[dict], summary: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, entry in zip(axes[0], summary, strict=True):
        for optimizer, lr, style in (("adamw", entry["adamw_lr"], "-"), ("muon", entry["muon_lr"], "--")):
            points = sorted(
                (int(r["tokens"]), float(r["val_loss"]))
                for r in rows
                if r["optimizer"] == optimizer
                and int(r["batch_size"]) == entry["batch_size"]
                and float(r["lr"]) == lr
            )
            ax.plot(*zip(*points, strict=True), style, marker="o", label=f"{optimizer} lr={lr:g}")
        ax.axhline(entry["adamw_final_loss"], color="gray", linewidth=0.8)
        ax.set(title=f"global batch {entry['batch_size']}", xlabel="tokens", ylabel="validation loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_tokens.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    measured = [e for e in summary if e["token_ratio"] is not None]
    ax.plot([e["batch_size"] for e in measured], [e["token_ratio"] for e in measured], marker="o")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="global batch size (sequences)", ylabel="Muon tokens ÷ AdamW tokens")
    if measured:
        ax.set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(out_dir / "token_ratio.png", dpi=120)
    plt.close(fig)


def markdown(
    summary: list[dict], args, command: str, runs: tuple[int, int], seconds: float, load: tuple[str, str]
) -> str:
    lines = [
        START,
        "## Data efficiency: Muon vs AdamW token ratio (Shakespeare MoE, CPU)",
        "",
        "Written by `tools/compare_optimizers.py`; rerun it to refresh this section:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"- CPU: {cpu_description()}; one process per run (~1–2 min each); the last invocation made {runs[0]} "
        f"runs in {seconds / 60:.0f} min and reused {runs[1]} from `evaluations.csv`; load average {load[0]} "
        f"before, {load[1]} after (other work shared the machine: no timings here).",
        f"- Model: `tiny_cpu.yaml` with hidden 64, 2 layers (1 dense, 1 MoE: 4 experts top-2), sequence "
        f"{args.seq_length}; budget {args.tokens:,} tokens per run; warm-up 5 % + cosine to lr/10; "
        f"{args.evals} evaluations on the same {args.eval_samples} validation sequences.",
        f"- Sweeps: AdamW lr {args.adamw_lrs}; Muon lr {args.muon_lrs} (its AdamW part at the config's 3e-3).",
        "- Token ratio = tokens the best Muon run needs to reach the best AdamW run's final validation loss ÷ the "
        "AdamW budget (conservative: Muon is measured mid-schedule). Empty: Muon did not reach it.",
        "",
        "| global batch | AdamW best lr | AdamW final loss | Muon best lr | Muon final loss | Muon tokens to AdamW loss | token ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def lr_cell(lr: float, grid: list[float]) -> str:  # an optimum on the grid's edge may lie beyond it
        return f"{lr:g} (edge)" if lr in (min(grid), max(grid)) else f"{lr:g}"

    for e in summary:
        reached = e["muon_tokens_to_adamw_loss"]
        adamw_lr, muon_lr = lr_cell(e["adamw_lr"], args.adamw_lrs), lr_cell(e["muon_lr"], args.muon_lrs)
        lines.append(
            f"| {e['batch_size']} | {adamw_lr} | {e['adamw_final_loss']:.4f} | {muon_lr} | "
            f"{e['muon_final_loss']:.4f} | {'—' if reached is None else f'{reached:,.0f}'} | "
            f"{'—' if e['token_ratio'] is None else f'{e["token_ratio"]:.2f}'} |"
        )
    lines += [
        "",
        "(edge): the best learning rate is the smallest or largest of its sweep, so the optimum may lie outside it.",
        "Goal (issue #8): ratio ≤ 0.6, and not worse at 4× the smallest batch.",
        END,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="launch/configs/tiny_cpu.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--tokens", type=int, default=262_144, help="training tokens per run")
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval-samples", type=int, default=64, help="validation sequences per evaluation")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--out-dir", default="results/compare_optimizers")
    parser.add_argument(
        "--markdown", default=None, help="markdown file whose compare_optimizers section is rewritten"
    )
    args = parser.parse_args(argv)
    for batch in args.batch_sizes:
        if batch < 1 or args.tokens < batch * args.seq_length * args.evals:
            parser.error(
                f"--batch-sizes {batch}: the budget --tokens={args.tokens} must hold at least --evals={args.evals} "
                f"steps of {batch} x {args.seq_length} tokens"
            )
        if batch > args.micro_batch_size and batch % args.micro_batch_size:
            parser.error(
                f"--batch-sizes {batch} is not a multiple of --micro-batch-size={args.micro_batch_size}"
            )
    if len(args.adamw_lrs) != len(args.muon_lrs):
        parser.error("equal tuning effort: --adamw-lrs and --muon-lrs need the same number of points")

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "evaluations.csv"
    rows = list(csv.DictReader(results.open())) if results.exists() else []
    done = {(r["optimizer"], int(r["batch_size"]), float(r["lr"])) for r in rows}
    if not results.exists():
        with results.open("w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    start, load_before = time.time(), load_average()
    trials = [
        (optimizer, batch, lr)
        for batch in args.batch_sizes
        for optimizer, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs))
        for lr in lrs
    ]
    made = 0
    for index, (optimizer, batch, lr) in enumerate(trials, 1):
        if (optimizer, batch, lr) in done:
            print(
                f"[{index}/{len(trials)}] {optimizer} batch {batch} lr {lr:g}: done before, skipped",
                flush=True,
            )
            continue
        began, made = time.time(), made + 1
        points = run_trial(trial_overrides(optimizer, batch, lr, args), args.config)
        new = [
            dict(
                optimizer=optimizer,
                batch_size=batch,
                lr=lr,
                iteration=i,
                tokens=i * batch * args.seq_length,
                val_loss=loss,
            )
            for i, loss in points
        ]
        with results.open("a", newline="") as f:  # one run's rows at once: a killed sweep resumes cleanly
            csv.DictWriter(f, FIELDS).writerows(new)
        rows += [{k: str(v) for k, v in row.items()} for row in new]
        print(
            f"[{index}/{len(trials)}] {optimizer} batch {batch} lr {lr:g}: final validation loss "
            f"{points[-1][1]:.4f} ({time.time() - began:.0f} s)",
            flush=True,
        )
    summary = summarize(rows, args.batch_sizes, args.tokens)
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(summary[0]) if summary else ["batch_size"])
        writer.writeheader()
        writer.writerows(summary)
    plot(rows, summary, out_dir)
    command = rerun_command("compare_optimizers.py", argv)
    runs = (made, len(trials) - made)
    section = markdown(
        summary, args, command.strip(), runs, time.time() - start, (load_before, load_average())
    )
    print(section)
    if args.markdown:
        write_section(Path(args.markdown), section, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
