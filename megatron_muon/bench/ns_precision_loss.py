"""What the Newton–Schulz precision costs in training loss: the tiny MoE GPT trained from the same weights on the
same data with fp32, bf16 and FP8 (``fp8_steps``) Newton–Schulz, everything else equal. Writes its section of
docs/benchmarks.md.

    python tools/bench_ns_precision_loss.py --steps 200 --out docs/benchmarks.md

One process (gloo, the CPU stand-ins; on a GPU machine it still trains on the CPU: the GPU comparison is
tests/gpu/test_train_step_gpu.py). FP8 NS is switched on with ``MuonConfig.ns_fp8_steps``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_muon.bench.report import cpu_description, publish, rerun_command
from megatron_muon.testing import run_distributed

START_MARKER = "<!-- bench_ns_precision_loss:start -->"
END_MARKER = "<!-- bench_ns_precision_loss:end -->"
VARIANTS = (("float32", 0), ("bfloat16", 0), ("bfloat16", 1), ("bfloat16", 2), ("bfloat16", 5))


def _train_variants(
    steps: int, hidden: int, variants: Sequence[tuple[str, int]]
) -> dict[str, tuple[list[float], float]]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.testing.tiny_training import DEFAULT_MODEL, train_tiny_moe

    pg = ProcessGroupCollection.use_mpu_process_groups()
    model = dict(DEFAULT_MODEL, hidden_size=hidden, ffn_hidden_size=2 * hidden, moe_ffn_hidden_size=hidden)
    results = {}
    for dtype, fp8_steps in variants:
        start = time.perf_counter()
        run = train_tiny_moe(pg, steps=steps, model=model, ns_compute_dtype=dtype, ns_fp8_steps=fp8_steps)
        if any(run.skipped):
            raise RuntimeError(f"{dtype} NS with fp8_steps={fp8_steps}: non-finite gradients skipped steps")
        results[f"{dtype}/{fp8_steps}"] = (run.losses, time.perf_counter() - start)
    return results


def render_section(args: argparse.Namespace, command: str) -> str:
    """Train every precision variant and return the benchmarks.md section comparing their losses."""
    (results,) = run_distributed(
        _train_variants, 1, args=(args.steps, args.hidden, VARIANTS), timeout_s=args.timeout
    )
    window = min(10, args.steps)
    reference = sum(results["float32/0"][0][-window:]) / window
    table = [
        f"| Newton–Schulz | loss at step 1 | mean loss, last {window} steps | difference to fp32 NS | wall time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for dtype, fp8_steps in VARIANTS:
        losses, seconds = results[f"{dtype}/{fp8_steps}"]
        label = f"{dtype}" if not fp8_steps else f"e4m3 steps 1–{fp8_steps}, {dtype} after"
        final = sum(losses[-window:]) / window
        table.append(
            f"| {label} | {losses[0]:.4f} | {final:.4f} | {final - reference:+.4f} | {seconds:.0f} |"
        )
    lines = [
        START_MARKER,
        "## Newton–Schulz precision: cost in training loss",
        "",
        "Written by `tools/bench_ns_precision_loss.py`; rerun it to refresh this section:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- CPU: {cpu_description()}; torch {torch.__version__}, Python {platform.python_version()}; "
        "FP8 GEMMs through torch's CPU `_scaled_mm` (the same e4m3 values and scales as cuBLAS, fp32 sums)",
        f"- Model: the tiny MoE GPT of `megatron_muon/testing/tiny_training.py` at hidden {args.hidden} "
        f"(4 layers, 4 experts top-2, vocab 512, 64 tokens × 8 sequences per step), fp32 weights, Muon (quintic, "
        f"5 steps, lr 0.02) + AdamW, {args.steps} steps, the same init and synthetic data for every row",
        "- Wall times are from a shared machine, with torch's slow CPU FP8 kernels: not a speed figure",
        "",
        *table,
        END_MARKER,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Measure and publish the section (``--out``: rewritten in that markdown file)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, help="markdown file whose section to rewrite")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.hidden < 16 or args.hidden % 16:
        raise SystemExit(f"--steps {args.steps} must be >= 1 and --hidden {args.hidden} a multiple of 16")
    command = rerun_command("bench_ns_precision_loss.py", argv)
    section = render_section(args, command.strip())
    publish(section, args.out, START_MARKER, END_MARKER)


if __name__ == "__main__":
    main()
