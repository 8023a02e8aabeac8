"""Training throughput of the tiny config with Muon and with AdamW, at several layouts, in one run.

    .venv/bin/python tools/bench_pretrain.py --iters 16 --out docs/benchmarks.md

Each (layout, optimizer) pair is one run of ``launch/pretrain_muon.sh`` (4 CPU processes) with the same data,
model and batch; ms/iteration and tokens/s are medians over the iterations after ``--warmup``. Writes its section
of ``docs/benchmarks.md`` between ``<!-- bench_pretrain:start -->`` and ``<!-- bench_pretrain:end -->``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatron_muon.bench.launcher_runs import iteration_values
from megatron_muon.bench.report import cpu_description, write_section

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = {
    "TP2·PP2·EP2": ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.etp=1"],
    "TP2·EP2·DP2": ["parallel.tp=2", "parallel.pp=1", "parallel.ep=2", "parallel.etp=1"],
    "DP4·EP4": ["parallel.tp=1", "parallel.pp=1", "parallel.ep=4", "parallel.etp=1"],
}
START, END = "<!-- bench_pretrain:start -->", "<!-- bench_pretrain:end -->"


def _run(layout: list[str], use_muon: bool, iters: int, workdir: str) -> tuple[list[float], list[float]]:
    overrides = layout + [
        f"optimizer.use_muon={str(use_muon).lower()}",
        f"training.train_iters={iters}",
        "optimizer.warmup_iters=1",
        "training.eval_interval=0",
        "logging.log_interval=1",
        f"checkpoint.save_dir={workdir}/ckpt",
        "checkpoint.resume=none",
        f"logging.tensorboard_dir={workdir}/tb",
    ]
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain_muon.sh"), "launch/configs/tiny_cpu.yaml", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({result.returncode}): {result.stderr[-2000:]}")
    ms_per_iter = dict(iteration_values(result.stdout, "ms/iter"))
    tokens_per_s = dict(iteration_values(result.stdout, "tokens/s"))
    both = [iteration for iteration in ms_per_iter if iteration in tokens_per_s]
    return [ms_per_iter[i] for i in both], [tokens_per_s[i] for i in both]


def main(argv: list[str] | None = None) -> int:
    """Time the launcher's iterations with Muon and with AdamW at each layout and write the section; the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=4, help="iterations left out of the medians")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--out", default=None, help="markdown file whose bench_pretrain section is rewritten")
    args = parser.parse_args(argv)
    if args.iters <= args.warmup:
        parser.error(f"--iters={args.iters} must exceed --warmup={args.warmup}")

    load_before = os.getloadavg()
    rows = []
    for name in args.layouts:
        medians = {}
        for use_muon in (True, False):
            with tempfile.TemporaryDirectory() as workdir:
                ms, tps = _run(LAYOUTS[name], use_muon, args.iters, workdir)
            ms, tps = ms[args.warmup :], tps[args.warmup :]
            medians[use_muon] = (statistics.median(ms), statistics.median(tps))
            print(f"{name} {'Muon' if use_muon else 'AdamW'}: {medians[use_muon][0]:.0f} ms/iter", flush=True)
        ratio = medians[True][0] / medians[False][0]
        rows.append(
            f"| {name} | {medians[True][0]:.0f} | {medians[True][1]:.0f} | {medians[False][0]:.0f} | "
            f"{medians[False][1]:.0f} | {ratio:.2f} |"
        )
    load_after = os.getloadavg()
    command = "python tools/bench_pretrain.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = "\n".join(
        [
            START,
            "## Pretraining throughput: Muon vs AdamW (tiny config, 4 CPU processes)",
            "",
            "Written by `tools/bench_pretrain.py`; rerun it to refresh this section:",
            "",
            f"```bash\n{command.strip()}\n```",
            "",
            f"- CPU: {cpu_description()}; 4 gloo ranks (1 thread each) share these cores; Python {platform.python_version()}",
            "- `launch/configs/tiny_cpu.yaml` (hidden 128, 4 layers, 8 experts top-2, 16 × 128 tokens per step, "
            "fp32) at each layout; Muon = ours (`tp_mode=auto`) for hidden matrices + megatron AdamW for the rest; "
            "AdamW = megatron's optimizer for everything (`optimizer.use_muon=false`).",
            f"- Median over iterations {args.warmup + 1}–{args.iters} of each run; load average before "
            f"{load_before[0]:.2f}, after {load_after[0]:.2f} (other work on the machine shows up in both columns).",
            "",
            "| layout | Muon ms/iter | Muon tokens/s | AdamW ms/iter | AdamW tokens/s | Muon ÷ AdamW step time |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            "Goal: Muon ÷ AdamW ≤ 1.1 at the tiny config.",
            END,
        ]
    )
    print(section)
    if args.out:
        write_section(Path(args.out), section, START, END)
    return 0


def timed_main(argv: list[str] | None = None) -> int:
    """``main`` with its wall time printed to stderr at the end (the command line's entry point)."""
    start = time.time()
    code = main(argv)
    print(f"bench_pretrain: {time.time() - start:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(timed_main())
