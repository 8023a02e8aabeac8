"""Newton–Schulz implementations side by side on the issue-#22 shapes: time and orthogonality error per shape.

Contenders, each on the same input (a Gaussian matrix, seed 0) with Keller Jordan's quintic, 5 steps:

* ``ours standard``, ``ours gram``, ``ours auto`` — ``ops.newton_schulz(algorithm=...)`` (Gram: restart after
  step 2, the default);
* ``DeepSpeed gram`` — ``zeropower_via_gram_newtonschulz`` of DeepSpeed's ``runtime/zero/muon/original_muon.py``
  (PR #7953) as DeepSpeed ships it (``torch.compile``'d; one untimed call per shape compiles it; its restart is
  fixed after step 2; it picks its own dtype: fp16 where the accelerator supports it, else fp32 — fp32 on a CPU);
  imported when ``deepspeed`` is importable (``--deepspeed-path`` adds a directory to ``sys.path`` first);
* ``EO newton_schulz`` — NVIDIA Emerging-Optimizers' ``muon_utils.newton_schulz`` (the backend of megatron-core's
  own Muon), standard Newton–Schulz.

Ours and Emerging-Optimizers run in ``--dtype`` (default float32: this CPU has no bf16 GEMM units, where bf16 runs
~4x slower than fp32, and DeepSpeed's Gram runs fp32 on a CPU too). Orthogonality error is ``‖X·Xᵀ − I‖_F / √k``
(``ops.orthogonality_error``, fp32 accumulation): quintic NS does not converge to 0 by design, so the column
compares contenders with each other, not with 0. ``--clock cpu --threads 1`` times this process's CPU seconds
(robust to other jobs on a shared machine). Each time is the median of ``--repeats`` runs after
``--warmup`` rounds, contenders interleaved (``report.interleaved_medians``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import time
from collections.abc import Callable

import torch

from megatron_muon.bench.report import clock_timer, cpu_description, interleaved_medians, load_average
from megatron_muon.ops.newton_schulz import choose_ns_algorithm, newton_schulz, orthogonality_error

START_MARKER = "<!-- bench_newton_schulz_compare:start -->"
END_MARKER = "<!-- bench_newton_schulz_compare:end -->"
SHAPES = ((2048, 11059), (3584, 19353), (7168, 2048), (2048, 1408), (4096, 4096), (128, 4096))
"""DeepSpeed's two benchmark shapes, a Kimi-K2 expert, a Moonlight expert, a square matrix, one attention head's
slice."""
STEPS = 5


def contenders(
    dtype: torch.dtype, deepspeed_path: str | None
) -> tuple[dict[str, Callable[[torch.Tensor], torch.Tensor]], list[str]]:
    """name → function(x) → orthogonalized x, and notes on what could not be imported."""
    found: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ours standard": lambda x: newton_schulz(x, STEPS, "quintic", dtype, algorithm="standard"),
        "ours gram": lambda x: newton_schulz(x, STEPS, "quintic", dtype, algorithm="gram"),
        "ours auto": lambda x: newton_schulz(x, STEPS, "quintic", dtype, algorithm="auto"),
    }
    notes = []
    if deepspeed_path:
        sys.path.insert(0, deepspeed_path)
    try:
        muon = importlib.import_module("deepspeed.runtime.zero.muon.original_muon")
        found["DeepSpeed gram"] = lambda x: muon.zeropower_via_gram_newtonschulz(x, STEPS)
        notes.append(f"DeepSpeed {importlib.import_module('deepspeed').__version__}: its Gram runs in "
                     f"{muon.ns_compute_dtype('gram')} here")  # fmt: skip
    except Exception as error:  # an optional peer: say why it is missing instead of failing
        notes.append(f"DeepSpeed not importable ({type(error).__name__}: {error})")
    try:
        from emerging_optimizers.orthogonalized_optimizers import muon_utils

        # EO's "simple" set is Keller Jordan's quintic (its "quintic" is another, tuned schedule).
        found["EO newton_schulz"] = lambda x: muon_utils.newton_schulz(x.to(dtype), STEPS, "simple")
    except Exception as error:
        notes.append(f"Emerging-Optimizers not importable ({type(error).__name__}: {error})")
    return found, notes


def measure(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(table rows, notes): each contender's median seconds and orthogonality error per shape of ``args``."""
    dtype = getattr(torch, args.dtype)
    functions, notes = contenders(dtype, args.deepspeed_path)
    names = list(functions)
    header = (
        "| shape | auto picks | " + " | ".join(f"{n}: s (orth. err.)" for n in names) + " | gram ÷ standard |"
    )
    rows = [header, "|" + "---|" * (len(names) + 3)]
    for shape in args.shapes:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
        if "DeepSpeed gram" in functions:
            functions["DeepSpeed gram"](x)  # torch.compile: compile for this shape outside the timing
        bound: dict[str, Callable[[], object]] = {
            name: functools.partial(f, x) for name, f in functions.items()
        }
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        seconds = interleaved_medians(bound, args.warmup, args.repeats, clock_timer(clock))
        errors = {
            name: float(orthogonality_error(f(x).float(), accumulate_dtype=torch.float32))
            for name, f in functions.items()
        }
        cells = " | ".join(f"{seconds[n]:.3g} ({errors[n]:.3f})" for n in names)
        ratio = seconds["ours gram"] / seconds["ours standard"]
        rows.append(
            f"| {shape[0]}x{shape[1]} | {choose_ns_algorithm(shape[0], shape[1], STEPS)} | {cells} | {ratio:.2f} |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows, notes


def render(args: argparse.Namespace, command: str) -> str:
    """The benchmarks.md section of the comparison, measured now, with ``command`` to rerun it."""
    rows, notes = measure(args)
    return "\n".join(
        [
            START_MARKER,
            "### Newton–Schulz side by side: ours (standard, Gram, auto), DeepSpeed's Gram, Emerging-Optimizers",
            "",
            f"`{command}` — {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"{args.dtype}, quintic, {STEPS} steps, {args.clock} clock, median of {args.repeats} after {args.warmup} "
            "warm-up rounds "
            f"(load average before: {load_average()}). {'; '.join(notes)}.",
            "",
            *rows,
            END_MARKER,
        ]
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this comparison's options to ``tools/bench_newton_schulz.py``'s parser."""
    parser.add_argument(
        "--deepspeed-path", help="directory holding the deepspeed package (a --target install)"
    )
