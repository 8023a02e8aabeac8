"""Newton–Schulz on one GPU: TFLOP/s against plain bf16 matmuls, and FP8 Newton–Schulz's speed-up and accuracy.
Writes its section of docs/benchmarks.md, with the device name.

(a) ``newton_schulz`` in bf16 on an m × n float32 matrix (Muon's momentum) against the same GEMM sequence as bare
    ``torch.matmul`` calls in bf16 (per step X·Xᵀ, A·A, B·X on preallocated operands): both are
    ``newton_schulz_flops(m, n, steps)`` FLOPs, ratio = matmul time / NS time (goal: ≥ 0.8). Also a stack of
    expert matrices in one batched call.
(b) ``newton_schulz(..., fp8_steps=k)`` (``megatron_muon/ops/newton_schulz_fp8.py``) for each k of
    ``--fp8-steps``: time and speed-up over bf16 NS, orthogonality error ‖X·Xᵀ − I‖_F/√k of the result, and its
    relative Frobenius distance to fp32 Newton–Schulz (TF32 off) of the same input and schedule, next to bf16
    NS's own. The "FP8 GEMMs" row times the bare GEMM sequence in e4m3 (``torch._scaled_mm``): the ceiling of
    the speed-up with every step in FP8.

Timing: CUDA events around each call, the median of ``--repeats`` after ``--warmup``, the compared calls
interleaved run by run. Usage on the GPU machine::

    python tools/bench_newton_schulz_gpu.py --out docs/benchmarks.md

``--device cpu`` runs the same code on the CPU (tiny shapes; a check of the tool, not a benchmark).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from megatron_muon.bench.newton_schulz import (
    gemm_operands,
    parse_shape,
    parse_sizes,
    plain_gemm_sequence,
)
from megatron_muon.bench.report import (
    clock_timer,
    cpu_description,
    interleaved_medians,
    publish,
    rerun_command,
)
from megatron_muon.ops import newton_schulz_fp8 as fp8
from megatron_muon.ops.newton_schulz import newton_schulz, newton_schulz_flops, orthogonality_error

START_MARKER = "<!-- bench_newton_schulz_gpu:start -->"
END_MARKER = "<!-- bench_newton_schulz_gpu:end -->"
DEFAULT_SHAPES = ("1024x1024", "2048x2048", "4096x4096", "2048x8192", "4096x16384")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return (
            f"{properties.name} (compute capability {properties.major}.{properties.minor}, "
            f"{properties.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
        )
    return f"CPU: {cpu_description()}"


def parse_stack(text: str) -> tuple[int, ...]:
    return parse_sizes(text, "stack", "COUNTxROWSxCOLS", "64x1024x2048")


def device_timer(device: torch.device):
    """A ``time_call`` for ``interleaved_medians``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    if device.type != "cuda":
        return clock_timer(time.perf_counter)

    def time_call(function) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return time_call


def plain_gemms(shape: tuple[int, ...], steps: int, device: torch.device, *, fp8_gemms: bool):
    """The GEMMs of ``steps`` NS iterations on random operands: bf16 ``torch.matmul`` (batched for a stack), or
    e4m3 ``torch._scaled_mm`` with per-tensor scales (a loop over a stack, as ``newton_schulz`` does)."""
    if not fp8_gemms:
        return plain_gemm_sequence(shape, steps, torch.bfloat16, device)
    x, gram = gemm_operands(shape, torch.bfloat16, device)
    x_q, x_scale = fp8.quantize_e4m3(fp8.pad_to_alignment(x))
    gram_q, gram_scale = fp8.quantize_e4m3(fp8.pad_to_alignment(gram))
    x_columns, gram_columns = x_q.mT.contiguous().mT, gram_q.mT.contiguous().mT

    def run_fp8() -> None:
        for _ in range(steps):
            fp8.scaled_matmul(x_q, x_q.mT, x_scale, x_scale, torch.bfloat16)
            fp8.scaled_matmul(gram_q, gram_columns, gram_scale, gram_scale, torch.bfloat16)
            fp8.scaled_matmul(gram_q, x_columns, gram_scale, x_scale, torch.bfloat16)

    return run_fp8


def shape_label(shape: tuple[int, ...]) -> str:
    return "×".join(str(size) for size in shape)


def relative_distance(y: torch.Tensor, reference: torch.Tensor) -> float:
    difference = torch.linalg.matrix_norm(y.float() - reference.float())
    return (difference / torch.linalg.matrix_norm(reference.float())).max().item()


def measure(args: argparse.Namespace, device: torch.device) -> tuple[list[str], list[str], list[str]]:
    """Tables (a) and (b) as markdown rows, and the goal lines."""
    table_a = [
        "| shape | NS bf16 (ms) | NS TFLOP/s | bf16 matmuls (ms) | matmul TFLOP/s | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    table_b = [
        "| shape | GEMMs | time (ms) | speed-up over bf16 NS | orthogonality error | distance to fp32 NS |",
        "|---|---|---:|---:|---:|---:|",
    ]
    ratios, speedups = [], []
    shapes = [tuple(shape) for shape in args.shapes] + [tuple(stack) for stack in args.stacks]
    for shape in shapes:
        *batch, rows, cols = shape
        flops = newton_schulz_flops(rows, cols, args.steps) * (batch[0] if batch else 1)
        x = torch.randn(*shape, device=device)  # fp32 momentum, as Muon keeps it

        def call(fp8_steps: int, x=x):
            return newton_schulz(x, args.steps, args.coefficients, torch.bfloat16, fp8_steps=fp8_steps)

        functions = {
            "bf16": lambda: call(0),
            "matmul": plain_gemms(shape, args.steps, device, fp8_gemms=False),
        }
        if args.fp8_steps:
            functions["fp8_matmul"] = plain_gemms(shape, args.steps, device, fp8_gemms=True)
            for k in args.fp8_steps:
                functions[f"fp8_{k}"] = lambda k=k: call(k)
        medians = interleaved_medians(functions, args.warmup, args.repeats, device_timer(device))
        ratio = medians["matmul"] / medians["bf16"]
        ratios.append((shape, ratio))
        table_a.append(
            f"| {shape_label(shape)} | {medians['bf16'] * 1e3:.2f} | {flops / medians['bf16'] / 1e12:.1f} "
            f"| {medians['matmul'] * 1e3:.2f} | {flops / medians['matmul'] / 1e12:.1f} | {ratio:.2f} |"
        )
        print(table_a[-1], file=sys.stderr, flush=True)
        if not args.fp8_steps:
            continue
        fp32 = newton_schulz(x, args.steps, args.coefficients, torch.float32)
        bf16 = call(0)
        table_b.append(
            f"| {shape_label(shape)} | bf16 (all steps) | {medians['bf16'] * 1e3:.2f} | 1.00 "
            f"| {orthogonality_error(bf16, torch.float32).max().item():.4f} "
            f"| {relative_distance(bf16, fp32):.4f} |"
        )
        for k in args.fp8_steps:
            result = call(k)
            speedup = medians["bf16"] / medians[f"fp8_{k}"]
            speedups.append((shape, k, speedup))
            table_b.append(
                f"| {shape_label(shape)} | e4m3 steps 1–{k}, bf16 after | {medians[f'fp8_{k}'] * 1e3:.2f} "
                f"| {speedup:.2f} | {orthogonality_error(result, torch.float32).max().item():.4f} "
                f"| {relative_distance(result, fp32):.4f} |"
            )
            print(table_b[-1], file=sys.stderr, flush=True)
        table_b.append(
            f"| {shape_label(shape)} | FP8 GEMMs alone (all steps, bare) | {medians['fp8_matmul'] * 1e3:.2f} "
            f"| {medians['matmul'] / medians['fp8_matmul']:.2f} (over bf16 GEMMs) | – | – |"
        )
    goals = []
    large = [(shape, ratio) for shape, ratio in ratios if min(shape[-2:]) >= 1024]
    if large:
        shape, worst = min(large, key=lambda entry: entry[1])
        verdict = "met" if worst >= 0.8 else "**not met**"
        goals.append(
            f"- Goal, NS ≥ 0.8 × plain bf16 matmul TFLOP/s from 1024 up: lowest {worst:.2f} "
            f"({shape_label(shape)}): {verdict}"
        )
    for k in args.fp8_steps:
        values = [speedup for _, steps, speedup in speedups if steps == k]
        if values:
            goals.append(
                f"- FP8 NS with {k} e4m3 step(s): speed-up over bf16 NS from {min(values):.2f} to {max(values):.2f}"
            )
    return table_a, table_b, goals


def render_section(args: argparse.Namespace, device: torch.device, command: str) -> str:
    table_a, table_b, goals = measure(args, device)
    lines = [
        START_MARKER,
        f"## Newton–Schulz on {'one GPU' if device.type == 'cuda' else 'the CPU (tool check)'}",
        "",
        "Written by `tools/bench_newton_schulz_gpu.py`; rerun it to refresh this section:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- Device: {device_description(device)}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; TF32 matmuls off",
        f"- {args.steps} steps of the `{args.coefficients}` schedule on float32 Gaussian inputs; median of "
        f"{args.repeats} runs after {args.warmup} warm-up runs, compared calls interleaved run by run",
        *goals,
        "",
        "### (a) bf16 `newton_schulz` vs the same GEMMs as plain bf16 `torch.matmul`",
        "",
        "FLOPs per matrix = steps·(4·k²·K + 2·k³), k = min(m, n), K = max(m, n); ratio = matmul time / NS time.",
        "",
        *table_a,
    ]
    if args.fp8_steps:
        lines += [
            "",
            "### (b) FP8 Newton–Schulz (`fp8_steps`): speed and accuracy",
            "",
            "The first k steps' GEMMs in e4m3 with one scale per matrix (`torch._scaled_mm`, fp32 accumulation), "
            "the rest in bf16. Orthogonality error = ‖X·Xᵀ − I‖_F/√k (the quintic schedule leaves about 0.3 even "
            "in exact arithmetic: it does not converge to 1); distance = ‖Y − Y_fp32‖_F/‖Y_fp32‖_F against fp32 "
            "NS of the same input. A stack runs its FP8 GEMMs one matrix at a time.",
            "",
            *table_b,
        ]
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", type=parse_shape, nargs="+", default=[parse_shape(s) for s in DEFAULT_SHAPES]
    )
    parser.add_argument(
        "--stacks", type=parse_stack, nargs="*", default=[(64, 1024, 2048)], help="COUNTxROWSxCOLS"
    )
    parser.add_argument("--fp8-steps", type=int, nargs="*", default=[1, 2, 5], help="[] to skip (b)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--coefficients", default="quintic")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the tool)")
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: torch.cuda.is_available() is False (use --device cpu to check the tool)"
        )
    if args.fp8_steps and (reason := fp8.fp8_unavailable_reason(device)) is not None:
        raise SystemExit(f"{reason}; pass --fp8-steps with no values to skip table (b)")
    for k in args.fp8_steps:
        if not 1 <= k <= args.steps:
            raise SystemExit(f"--fp8-steps {k} must be in [1, --steps={args.steps}]")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    command = rerun_command("bench_newton_schulz_gpu.py", argv)
    section = render_section(args, device, command.strip())
    publish(section, args.out, START_MARKER, END_MARKER)


if __name__ == "__main__":
    main()
