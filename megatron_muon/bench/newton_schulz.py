"""Benchmark ``megatron_muon.ops.newton_schulz`` on the CPU and write the table into docs/benchmarks.md.

Two measurements:

(a) Achieved FLOP/s of one ``newton_schulz`` call on an m × n matrix, against the same GEMM sequence issued as
    plain ``torch.matmul`` calls: per step, with k = min(m, n) and K = max(m, n),
    ``A = X @ X.mT`` (k×K · K×k), ``A @ A`` (k×k · k×k) and ``B @ X`` (k×k · k×K), on preallocated operands of
    the compute dtype. Both do ``newton_schulz_flops(m, n, steps)`` FLOPs, so
    ratio = matmul time / newton_schulz time = achieved FLOP/s of NS / achieved FLOP/s of the bare GEMMs;
    1.0 means NS adds nothing around its GEMMs (casts, normalization, the a·X and b·A terms).
(b) A stack of expert matrices (64 × 128 × 256 by default) orthogonalized in one batched call versus a Python
    loop of one call per matrix.

Each timing is the median of ``--repeats`` runs after ``--warmup`` runs; the two sides of a comparison are
interleaved run by run, so load from other processes on a shared machine hits both alike. The thread count is
fixed with ``torch.set_num_threads``. ``--clock cpu`` times CPU seconds of this process instead of wall time:
on a machine shared with other jobs, with ``--threads 1``, it measures the work rather than the wait for a core
(with several threads it would also count OpenMP spin-waiting).

Usage::

    python tools/bench_newton_schulz.py --out docs/benchmarks.md
    python tools/bench_newton_schulz.py --compare --out docs/benchmarks.md   # newton_schulz_compare.py
    python tools/bench_newton_schulz.py --stacks --out docs/benchmarks.md    # newton_schulz_stack.py

``--out`` rewrites only the text between ``<!-- bench_newton_schulz:start -->`` and
``<!-- bench_newton_schulz:end -->`` (appending the section, or creating the file with a ``# Benchmarks``
heading, when absent). Without ``--out`` the section is printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_muon.bench import newton_schulz_compare as compare
from megatron_muon.bench import newton_schulz_stack as stacks
from megatron_muon.bench.report import (
    clock_timer,
    cpu_description,
    interleaved_medians,
    load_average,
    publish,
    rerun_command,
)
from megatron_muon.ops.newton_schulz import newton_schulz, newton_schulz_flops, resolve_coefficients

START_MARKER = "<!-- bench_newton_schulz:start -->"
END_MARKER = "<!-- bench_newton_schulz:end -->"
DEFAULT_SHAPES = ("256x256", "512x512", "1024x1024", "1024x4096", "2048x2048")
CLOCK_NAMES = {
    "wall": "wall time (`time.perf_counter`)",
    "cpu": "CPU time of the process (`time.process_time`)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_sizes(text: str, what: str, form: str, example: str) -> tuple[int, ...]:
    """``text`` as positive sizes joined by ``x``, as many as ``form`` (e.g. ``ROWSxCOLS``) names."""
    try:
        sizes = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) != len(form.split("x")):
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not {form}, e.g. {example}")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{what} {text!r} needs positive sizes")
    return sizes


def parse_shape(text: str) -> tuple[int, ...]:
    return parse_sizes(text, "shape", "ROWSxCOLS", "1024x4096")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def gemm_operands(
    shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random operands of NS's GEMMs on a ``shape`` input (``(count, rows, cols)`` for a stack): the iterate X,
    k × K, and a k × k Gram matrix, k = min(rows, cols), K = max(rows, cols)."""
    *batch, rows, cols = shape
    small, large = min(rows, cols), max(rows, cols)
    x = torch.randn(*batch, small, large, device=device, dtype=dtype)
    return x, torch.randn(*batch, small, small, device=device, dtype=dtype)


def plain_gemm_sequence(
    shape: tuple[int, ...], steps: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> Callable[[], None]:
    """The GEMMs of ``steps`` NS iterations as bare ``torch.matmul`` calls on random operands (batched for a
    stack): per step X·Xᵀ, A·A and B·X."""
    x, gram = gemm_operands(shape, dtype, device)

    def run() -> None:
        for _ in range(steps):
            torch.matmul(x, x.mT)
            torch.matmul(gram, gram)
            torch.matmul(gram, x)

    return run


def measure_flops_table(
    args: argparse.Namespace,
) -> tuple[list[str], list[tuple[int, int, str, float, float]]]:
    """Table (a) as markdown rows, and (rows, cols, dtype name, ratio, matmul FLOP/s) per measurement."""
    table = [
        "| shape | compute dtype | newton_schulz (ms) | NS GFLOP/s | plain matmuls (ms) | matmul GFLOP/s "
        "| ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for rows, cols in args.shapes:
        flops = newton_schulz_flops(rows, cols, args.steps)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            x = torch.randn(rows, cols)  # fp32 momentum, as Muon keeps it

            def orthogonalize(x=x, dtype=dtype):
                return newton_schulz(x, args.steps, args.coefficients, dtype)

            medians = interleaved_medians(
                {"ns": orthogonalize, "gemm": plain_gemm_sequence((rows, cols), args.steps, dtype)},
                args.warmup,
                args.repeats,
                clock_timer(CLOCKS[args.clock]),
            )
            ratio = medians["gemm"] / medians["ns"]
            ratios.append((rows, cols, dtype_name, ratio, flops / medians["gemm"]))
            table.append(
                f"| {rows}×{cols} | {dtype_name} | {medians['ns'] * 1e3:.1f} "
                f"| {flops / medians['ns'] / 1e9:.1f} | {medians['gemm'] * 1e3:.1f} "
                f"| {flops / medians['gemm'] / 1e9:.1f} | {ratio:.2f} |"
            )
            print(table[-1], file=sys.stderr, flush=True)
    return table, ratios


def measure_stack_table(args: argparse.Namespace) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """Table (b) as markdown rows, and (batched / loop time, loop FLOP/s) per dtype name."""
    count, rows, cols = args.experts, *args.expert_shape
    flops = count * newton_schulz_flops(rows, cols, args.steps)
    table = [
        "| stack | compute dtype | batched (ms) | batched GFLOP/s | loop (ms) | loop GFLOP/s | batched / loop |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    fractions = {}
    stack = torch.randn(count, rows, cols)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]

        def batched(dtype=dtype):
            return newton_schulz(stack, args.steps, args.coefficients, dtype)

        def loop(dtype=dtype):
            return [newton_schulz(matrix, args.steps, args.coefficients, dtype) for matrix in stack]

        medians = interleaved_medians(
            {"batched": batched, "loop": loop}, args.warmup, args.repeats, clock_timer(CLOCKS[args.clock])
        )
        fractions[dtype_name] = (medians["batched"] / medians["loop"], flops / medians["loop"])
        table.append(
            f"| {count}×{rows}×{cols} | {dtype_name} | {medians['batched'] * 1e3:.1f} "
            f"| {flops / medians['batched'] / 1e9:.1f} | {medians['loop'] * 1e3:.1f} "
            f"| {flops / medians['loop'] / 1e9:.1f} | {fractions[dtype_name][0]:.2f} |"
        )
        print(table[-1], file=sys.stderr, flush=True)
    return table, fractions


def goal_lines(
    ratios: list[tuple[int, int, str, float, float]], fractions: dict[str, tuple[float, float]]
) -> list[str]:
    """Check the two targets: ratio >= 0.8 from 512×512 up, batched <= 1/3 of the loop.

    A loop that already runs near the plain-GEMM rate of table (a) has little overhead for batching to
    remove; the line says so, since batched <= 1/3 needs the loop to spend >= 2/3 of its time off the GEMMs.
    """
    lines = []
    large = [entry for entry in ratios if min(entry[0], entry[1]) >= 512]
    if large:
        rows, cols, dtype_name, worst, _ = min(large, key=lambda entry: entry[3])
        verdict = "met" if worst >= 0.8 else "**not met**"
        lines.append(
            f"- Goal (a), ratio ≥ 0.8 for 512×512 and larger: lowest {worst:.2f} ({rows}×{cols}, {dtype_name}): "
            f"{verdict}"
        )
    for dtype_name, (fraction, loop_flops_per_s) in fractions.items():
        verdict = "met" if fraction <= 1 / 3 else "**not met**"
        line = f"- Goal (b), batched ≤ 1/3 of the loop, {dtype_name}: {fraction:.2f}: {verdict}"
        gemm_rates = [entry[4] for entry in ratios if entry[2] == dtype_name]
        if gemm_rates:
            share = loop_flops_per_s / max(gemm_rates)
            line += (
                f" (the loop already runs at {loop_flops_per_s / 1e9:.0f} GFLOP/s, {share:.0%} of the best "
                f"plain-matmul rate in (a); a 1/3 bound needs it below 33%)"
            )
        lines.append(line)
    return lines


def render_section(args: argparse.Namespace, command: str) -> str:
    load_before = load_average()
    flops_table, ratios = measure_flops_table(args)
    stack_table, fractions = measure_stack_table(args)
    load_after = load_average()
    lines = [
        START_MARKER,
        "## Newton–Schulz (CPU)",
        "",
        "Written by `tools/bench_newton_schulz.py`; rerun it to refresh this section:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- CPU: {cpu_description()}; `torch.set_num_threads({args.threads})`",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- {args.steps} steps of the `{args.coefficients}` schedule; median of {args.repeats} runs after "
        f"{args.warmup} warm-up runs, the two sides of each comparison interleaved run by run; "
        f"clock: {CLOCK_NAMES[args.clock]}",
        f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
        *goal_lines(ratios, fractions),
        "",
        "### (a) Achieved FLOP/s: `newton_schulz` vs the same GEMMs as plain `torch.matmul`",
        "",
        "FLOPs per call are `newton_schulz_flops(m, n, steps)` = steps·(4·k²·K + 2·k³), k = min(m, n), "
        "K = max(m, n). The baseline issues exactly those GEMMs (X·Xᵀ, A·A, B·X per step) as bare "
        "`torch.matmul` calls in the compute dtype; ratio = baseline time / `newton_schulz` time (1.0: no "
        "overhead around the GEMMs). The input is a float32 matrix, as Muon's momentum is, so the bf16 rows "
        "include the cast. bfloat16 is the library default (Muon's choice on GPUs); float32 is listed "
        "because it is the accurate option and because bf16 GEMM speed on a CPU depends on AVX512-BF16/AMX "
        "support.",
        "",
        *flops_table,
        "",
        f"### (b) Expert stack: one batched call vs a Python loop over the {args.experts} matrices",
        "",
        *stack_table,
        END_MARKER,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", help=f"default {DEFAULT_SHAPES}; --compare: {compare.SHAPES}"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="instead of (a) and (b): ours standard / gram / auto, DeepSpeed's Gram and Emerging-Optimizers side "
        "by side (megatron_muon/bench/newton_schulz_compare.py)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="--compare's compute dtype"
    )
    compare.add_arguments(parser)
    stacks.add_arguments(parser)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--coefficients", default="quintic")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--experts", type=int, default=64, help="matrices in the stack of (b)")
    parser.add_argument("--expert-shape", type=parse_shape, default=(128, 256), help="ROWSxCOLS of (b)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter; cpu: time.process_time, the CPU seconds of this process (all its "
        "threads), less disturbed by other processes on a shared machine; use it with --threads 1",
    )
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite")
    args = parser.parse_args(argv)
    resolve_coefficients(args.coefficients, args.steps)  # fail early on a bad schedule
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    command = rerun_command("bench_newton_schulz.py", argv)
    if args.compare:
        args.shapes = args.shapes or list(compare.SHAPES)
        publish(compare.render(args, command.strip()), args.out, compare.START_MARKER, compare.END_MARKER)
        return
    if args.stacks:
        section = stacks.render(args, command.strip(), CLOCK_NAMES[args.clock], CLOCKS[args.clock], DTYPES)
        publish(section, args.out, stacks.START_MARKER, stacks.END_MARKER)
        return
    args.shapes = args.shapes or [parse_shape(s) for s in DEFAULT_SHAPES]
    section = render_section(args, command.strip())
    publish(section, args.out, START_MARKER, END_MARKER)


if __name__ == "__main__":
    main()
