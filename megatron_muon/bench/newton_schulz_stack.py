"""Expert stacks of several MoE layers: one batched Newton–Schulz call across the layers, one per layer, or one
per matrix (``tools/bench_newton_schulz.py --stacks``; issue #22 item 3).

The Muon step batches whole matrices by (shape, algorithm) within an exchange bucket, and buckets hold runs of
same-shape matrices (``optim/plan.py`` ``_assign_buckets``), so the experts of every layer a rank orthogonalizes
run as one call; before, buckets followed the key order and each layer's experts ran as their own call. The three
contenders reproduce those shapes of work on ``layers`` × ``experts`` random fp32 matrices (momentum is fp32):

* ``across layers``: ``newton_schulz`` on the (layers·experts, m, n) stack — the step now;
* ``per layer``: ``layers`` calls on (experts, m, n) stacks — one call per bucket a class spread over;
* ``loop``: one call per matrix.

Each for ``standard`` and ``auto`` (what the optimizer's plan picks per shape: Gram for m × n with
max/min > 1.5, ``ops/newton_schulz.py`` ``choose_ns_algorithm``). Timings are medians, interleaved run by run
(``report.interleaved_medians``).
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable

import torch

from megatron_muon.bench.report import clock_timer, cpu_description, interleaved_medians, load_average
from megatron_muon.ops.newton_schulz import choose_ns_algorithm, newton_schulz, ns_algorithm_flops

START_MARKER = "<!-- bench_newton_schulz_stacks:start -->"
END_MARKER = "<!-- bench_newton_schulz_stacks:end -->"
ALGORITHMS = ("standard", "auto")
GOAL = 0.4
"""Issue #22 item 3: batched expert stacks at ≤ 0.4× the per-matrix loop in bf16 on CPU."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the expert-stack options (``--stacks`` and the stack's shape) to the Newton–Schulz tool's parser."""
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="instead of (a) and (b): expert stacks of --stack-layers layers, batched across layers vs per layer "
        "vs per matrix (megatron_muon/bench/newton_schulz_stack.py)",
    )
    parser.add_argument("--stack-layers", type=int, default=4, help="--stacks: MoE layers")
    parser.add_argument("--stack-experts", type=int, default=16, help="--stacks: experts per layer")


def measure(
    args: argparse.Namespace,
    clock: Callable[[Callable[[], object]], float],
    dtypes: dict[str, torch.dtype],
) -> tuple[list[str], dict[tuple[str, str], dict[str, float]]]:
    """Markdown rows and the medians (seconds) per (dtype name, algorithm) and contender."""
    layers, experts = args.stack_layers, args.stack_experts
    rows, cols = args.expert_shape
    stack = torch.randn(layers, experts, rows, cols)
    by_layer = list(stack.unbind(0))
    matrices = list(stack.reshape(-1, rows, cols).unbind(0))
    table = [
        "| compute dtype | algorithm (runs) | across layers (ms) | per layer (ms) | loop (ms) "
        "| across ÷ per layer | across ÷ loop | loop GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    medians_by_case: dict[tuple[str, str], dict[str, float]] = {}
    for dtype_name in args.dtypes:
        dtype = dtypes[dtype_name]
        for algorithm in ALGORITHMS:
            runs = choose_ns_algorithm(rows, cols, args.steps, algorithm)
            flops = layers * experts * ns_algorithm_flops(rows, cols, args.steps, runs)

            def call(x: torch.Tensor, dtype: torch.dtype = dtype, algorithm: str = algorithm) -> torch.Tensor:
                return newton_schulz(x, args.steps, args.coefficients, dtype, algorithm=algorithm)

            def across(call: Callable[[torch.Tensor], torch.Tensor] = call) -> object:
                return call(stack.reshape(-1, rows, cols))

            def per_layer(call: Callable[[torch.Tensor], torch.Tensor] = call) -> object:
                return [call(layer) for layer in by_layer]

            def loop(call: Callable[[torch.Tensor], torch.Tensor] = call) -> object:
                return [call(matrix) for matrix in matrices]

            contenders: dict[str, Callable[[], object]] = {
                "across": across,
                "per_layer": per_layer,
                "loop": loop,
            }
            medians = interleaved_medians(contenders, args.warmup, args.repeats, clock)
            medians_by_case[(dtype_name, algorithm)] = medians
            table.append(
                f"| {dtype_name} | {algorithm} ({runs}) | {medians['across'] * 1e3:.1f} "
                f"| {medians['per_layer'] * 1e3:.1f} | {medians['loop'] * 1e3:.1f} "
                f"| {medians['across'] / medians['per_layer']:.2f} | {medians['across'] / medians['loop']:.2f} "
                f"| {flops / medians['loop'] / 1e9:.1f} |"
            )
            print(table[-1], file=sys.stderr, flush=True)
    return table, medians_by_case


def render(
    args: argparse.Namespace,
    command: str,
    clock_name: str,
    clock: Callable[[], float],
    dtypes: dict[str, torch.dtype],
) -> str:
    """The benchmarks.md section of the expert-stack comparison, measured now with ``clock``."""
    load_before = load_average()
    table, medians = measure(args, clock_timer(clock), dtypes)
    load_after = load_average()
    rows, cols = args.expert_shape
    lines = [
        START_MARKER,
        f"### Expert stacks across layers ({args.stack_layers} layers × {args.stack_experts} experts of "
        f"{rows}×{cols}; issue #22 item 3)",
        "",
        "Written by `tools/bench_newton_schulz.py --stacks` (`megatron_muon/bench/newton_schulz_stack.py` says "
        "what each column runs):",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- CPU: {cpu_description()}; `torch.set_num_threads({args.threads})`; torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- {args.steps} steps of `{args.coefficients}`; median of {args.repeats} runs after {args.warmup} "
        f"warm-up, the three contenders interleaved run by run; clock: {clock_name}",
        f"- load average (1/5/15 min) before: {load_before}, after: {load_after}",
        "",
        *table,
        "",
    ]
    for dtype_name in args.dtypes:
        same = medians[(dtype_name, "standard")]
        auto = medians[(dtype_name, "auto")]
        ratio_same = same["across"] / same["loop"]
        ratio_auto = auto["across"] / same["loop"]
        lines.append(
            f"- Goal, batched ≤ {GOAL}× the per-matrix loop, {dtype_name}: same algorithm (standard) "
            f"{ratio_same:.2f} ({'met' if ratio_same <= GOAL else '**not met**'}); the step's batched `auto` ÷ "
            f"the per-matrix standard loop {ratio_auto:.2f} ({'met' if ratio_auto <= GOAL else '**not met**'})"
        )
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"
