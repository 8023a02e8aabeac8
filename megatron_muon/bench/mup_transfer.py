"""Do the best learning rates transfer across width under muP, and not without it? The experiment of docs/mup.md,
its tables written into ``docs/benchmarks.md`` (between ``<!-- bench_mup_transfer:start -->`` and ``...:end -->``).

Runs ``tools/mup_sweep.py`` on ``launch/configs/mup_shakespeare.yaml`` (a 2-layer MoE GPT on Shakespeare, one CPU
process per trial run in-process):

1. muP, telescoping: the full grid at the base width, narrower windows at each doubling (the sweep a user runs);
2. muP, the full grid at the base and the target width (reusing the trials the telescoping sweep already ran):
   where the optimum really is at the target width;
3. standard parametrization (``coord_check.STANDARD_OVERRIDES``: megatron's default init, 1/√d_head, no logit
   multiplier, Muon's Moonlight update scale), the full grid at the base and the target width;
4. the AdamW LR (embeddings, output layer, norms, router) at both widths, with and without muP, the Muon LR fixed
   at each parametrization's base-width optimum.

Trials already in ``--runs`` are reused (``mup_sweep.py`` keys them by a hash of the resolved config), so a rerun only writes
the section.

    .venv/bin/python tools/bench_mup_transfer.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from megatron_muon.bench.coord_check import STANDARD_OVERRIDES
from megatron_muon.bench.report import cpu_description, load_average, write_section

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"

START, END = "<!-- bench_mup_transfer:start -->", "<!-- bench_mup_transfer:end -->"
CONFIG = "launch/configs/mup_shakespeare.yaml"
MUON_LR, ADAMW_LR = "optimizer.muon.lr", "optimizer.lr"


def _sweep(
    out: Path,
    overrides: list[str],
    *,
    widths: list[int],
    center: float,
    radius: int,
    telescope: bool,
    param: str = MUON_LR,
    factor: float = 2.0,
) -> dict[str, Any]:
    command = [sys.executable, str(TOOLS / "mup_sweep.py"), CONFIG, *overrides, "--widths", *map(str, widths)]
    command += ["--param", f"{param}={center}", "--factor", f"{factor:g}", "--radius", str(radius)]
    command += ["--out", str(out)] + ([] if telescope else ["--no-telescope"])
    print("$", shlex.join(command), flush=True)
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as child:
        try:
            stdout, stderr = child.communicate()
        finally:  # the driver stopped (Ctrl-C, SIGTERM): do not leave the sweep running
            if child.poll() is None:
                child.terminate()
    if child.returncode != 0:
        raise SystemExit(f"sweep failed ({child.returncode}):\n{stderr[-3000:]}")
    for line in stdout.splitlines():
        if line.startswith("[sweep] ") and "trial " not in line:
            print(line, flush=True)
    best: dict[str, Any] = json.loads((out / "best.json").read_text())
    return best


def _losses(summary: dict[str, Any], out: Path, param: str) -> dict[int, dict[float, float]]:
    """Per width of ``summary``: value of ``param`` -> validation loss of its trials."""
    with open(out / "trials.csv", newline="") as handle:
        rows = {row["key"]: row for row in csv.DictReader(handle)}
    return {
        width["width"]: {
            float(rows[key][param]): float(rows[key]["validation_loss"]) for key in width["trials"]
        }
        for width in summary["widths"]
    }


def _trial_seconds(out: Path) -> float:
    with open(out / "trials.csv", newline="") as handle:
        return sum(float(row["seconds"]) for row in csv.DictReader(handle))


def _transfer_tables(
    label: str, param: str, runs: dict[str, tuple[dict[str, Any], Path]], base: int, target: int
) -> list[str]:
    """Best ``param`` per width and parametrization, then the loss of every grid point."""
    lines = [
        f"| parametrization | best {label} at {base} | best {label} at {target} | apart (grid steps) | within one step |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (summary, _) in runs.items():
        low, high = summary["widths"][0], summary["widths"][-1]
        factor = summary["params"][0]["factor"]
        apart = abs(math.log(high["best"][param] / low["best"][param]) / math.log(factor))
        edge = [w["width"] for w in (low, high) if w["best_on_grid_edge"]]
        note = f" (best on the grid's edge at width {', '.join(map(str, edge))})" if edge else ""
        lines.append(
            f"| {name} | {low['best'][param]:.4g} | {high['best'][param]:.4g} | {apart:.0f} (× {factor:g}) | "
            f"{'yes' if apart <= 1 else 'no'}{note} |"
        )
    columns = [
        (name, w, _losses(summary, out, param))
        for name, (summary, out) in runs.items()
        for w in (base, target)
    ]
    values = sorted({value for _, w, losses in columns for value in losses[w]})
    lines += ["", f"Validation loss per {label} (bold: best in its column; —: not in that grid):", ""]
    lines.append(f"| {label} | " + " | ".join(f"{name} w{w}" for name, w, _ in columns) + " |")
    lines.append("|---:|" + "---:|" * len(columns))
    for value in values:
        cells = []
        for _, w, losses in columns:
            loss = losses[w].get(value)
            bold = "**" if loss is not None and loss == min(losses[w].values()) else ""
            cells.append("—" if loss is None else f"{bold}{loss:.4f}{bold}")
        lines.append(f"| {value:.4g} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the muP transfer sweeps ``argv`` asks for and write their section; the exit status."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[64, 128, 256], help="base first, target last"
    )
    parser.add_argument("--mup-center", type=float, default=0.02, help="muP Muon LR grid centre")
    parser.add_argument(
        "--standard-center", type=float, default=0.005, help="standard-parametrization centre"
    )
    parser.add_argument(
        "--radius", type=int, default=3, help="telescoping sweep's base grid: 2·radius+1 points"
    )
    parser.add_argument(
        "--full-radius", type=int, default=2, help="radius of the full grids at base and target"
    )
    parser.add_argument("--adamw-center", type=float, default=0.048, help="AdamW LR grid centre (× 4 apart)")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "mup_transfer", help="sweep directories")
    parser.add_argument("--out", type=Path, default=None, help="docs/benchmarks.md to write the section into")
    parser.add_argument("overrides", nargs="*", help="extra overrides for every trial")
    args = parser.parse_args(argv)
    base, target = args.widths[0], args.widths[-1]
    from megatron_muon.config import load_config

    cfg = load_config(REPO / CONFIG, args.overrides)
    model, train = cfg.model, cfg.training
    load_before = load_average()
    mup_overrides = list(args.overrides)
    standard_overrides = [*args.overrides, *shlex.split(STANDARD_OVERRIDES)]
    dirs = {name: args.runs / name for name in ("mup", "standard", "mup_adamw_lr", "standard_adamw_lr")}

    # 1. The telescoping sweep a user runs. 2-3. Full grids at the base and target widths, with and without muP.
    telescoping = _sweep(
        dirs["mup"],
        mup_overrides,
        widths=args.widths,
        center=args.mup_center,
        radius=args.radius,
        telescope=True,
    )
    (dirs["mup"] / "telescoping.md").write_text((dirs["mup"] / "summary.md").read_text())
    full = dict(widths=[base, target], radius=args.full_radius, telescope=False)
    mup_full = _sweep(dirs["mup"], mup_overrides, center=telescoping["widths"][0]["best"][MUON_LR], **full)
    standard_full = _sweep(dirs["standard"], standard_overrides, center=args.standard_center, **full)
    # 4. The AdamW LR (embeddings, output layer, norms, router), Muon LR fixed at each one's base optimum.
    adamw = dict(
        widths=[base, target], radius=1, telescope=False, param=ADAMW_LR, factor=4.0, center=args.adamw_center
    )
    mup_muon_lr = mup_full["widths"][0]["best"][MUON_LR]
    standard_muon_lr = standard_full["widths"][0]["best"][MUON_LR]
    mup_adamw = _sweep(dirs["mup_adamw_lr"], [*mup_overrides, f"{MUON_LR}={mup_muon_lr}"], **adamw)
    standard_adamw = _sweep(
        dirs["standard_adamw_lr"], [*standard_overrides, f"{MUON_LR}={standard_muon_lr}"], **adamw
    )
    trial_seconds = sum(_trial_seconds(d) for d in dirs.values())

    tokens = train.global_batch_size * model.seq_length
    compute = telescoping["compute"]
    lines = [
        START,
        f"## muP: does the best LR transfer from width {base} to {target}? (Shakespeare MoE, CPU)",
        "",
        "Written by `tools/bench_mup_transfer.py`; rerun it to refresh this section (docs/mup.md explains the setup):",
        "",
        "```bash",
        shlex.join(["python", "tools/bench_mup_transfer.py", *(sys.argv[1:] if argv is None else argv)]),
        "```",
        "",
        f"- CPU: {cpu_description()}; one process, 1 thread, shared with other jobs (load average at the last "
        f"run: {load_before} before, {load_average()} after); {trial_seconds / 60:.1f} min of trials in all "
        "(trials already in `--runs` are reused, not rerun).",
        f"- `{CONFIG}`{' + ' + shlex.join(args.overrides) if args.overrides else ''}: {model.num_layers} layers "
        f"(dense, then MoE with {model.num_moe_experts} experts top-{model.moe_router_topk}), "
        f"{model.num_attention_heads} heads, ffn {model.ffn_hidden_size // model.hidden_size}·d, experts "
        f"{model.moe_ffn_hidden_size // model.hidden_size}·d, Shakespeare BPE 4000 (vocab {model.vocab_size}); "
        f"{train.train_iters} steps × {tokens:,} tokens, {cfg.optimizer.decay_style} LR with "
        f"{cfg.optimizer.warmup_iters} warm-up steps. Score: validation loss (nats/token) on {train.eval_iters} × "
        f"{tokens:,} held-out tokens after the last step, the same tokens for every trial; one seed.",
        f"- Standard parametrization (SP): `{STANDARD_OVERRIDES}` — megatron's default init, 1/√d_head, no logit "
        "multiplier, Muon scaled to AdamW's update RMS; muP: the config as is (base width "
        f"{model.mup_base_hidden_size}).",
        "",
        f"### Muon LR (AdamW LR {cfg.optimizer.lr:g}), full grids of {2 * args.full_radius + 1} points × 2 apart,"
        f" centred on the base optimum (muP: {mup_full['widths'][0]['best'][MUON_LR]:g}, from the telescoping"
        f" sweep; SP: the {target}-wide grid on SP's {base}-wide optimum)",
        "",
        *_transfer_tables(
            "Muon LR",
            MUON_LR,
            {"muP": (mup_full, dirs["mup"]), "SP": (standard_full, dirs["standard"])},
            base,
            target,
        ),
        "",
        f"### AdamW LR (embeddings, output layer, norms, router; Muon LR fixed at the {base}-wide optimum: muP "
        f"{mup_muon_lr:g}, SP {standard_muon_lr:g}), 3 points × 4 apart",
        "",
        *_transfer_tables(
            "AdamW LR",
            ADAMW_LR,
            {"muP": (mup_adamw, dirs["mup_adamw_lr"]), "SP": (standard_adamw, dirs["standard_adamw_lr"])},
            base,
            target,
        ),
        "",
        f"### The telescoping muP sweep ({' → '.join(map(str, args.widths))}, Muon LR; radius "
        f"{args.radius} at {base}, then ±2 points at half the log spacing per doubling, re-centred on an edge)",
        "",
        (dirs["mup"] / "telescoping.md").read_text().rstrip(),
        "",
        f"Compute: {compute['sweep_in_final_runs']:.2f} runs at width {target} ({compute['trials']} trials) against "
        f"{compute['full_grid_at_target_in_final_runs']:.0f} for the same {2 * args.radius + 1}-point grid at width "
        f"{target} alone (ratio {compute['sweep_in_final_runs'] / compute['full_grid_at_target_in_final_runs']:.2f}). "
        "FLOPs per token = 6 · active matrix parameters + attention (`local_run.trial_flops`).",
        END,
    ]
    section = "\n".join(lines)
    print(section)
    if args.out:
        write_section(args.out, section, START, END)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
