"""Seconds per optimizer step of a ``compare_optimizers`` study's model at one device's micro-batch, measured
through the launcher: the t_step of ``pareto_frontier``'s model of time (``--step-seconds measure``).

One run per optimizer of ``launch/pretrain_muon.sh CONFIG`` with the study's model overrides and sequence length,
global batch = micro-batch = the per-device micro-batch m (one process: one device's step), ``logging.log_interval=1``,
no evaluation and no checkpoint. The step time is the median ``ms/iter`` the launcher logs from iteration
:data:`FIRST_TIMED_ITERATION` on (the first iterations include allocation and warm-up). It includes everything a
step does on that device: forward, backward and the optimizer (Muon's Newton–Schulz included). Run it on an otherwise
idle machine: the section it feeds prints the load average around the measurement.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from megatron_muon.bench.launcher_runs import iteration_values, run_training
from megatron_muon.bench.report import load_average

FIRST_TIMED_ITERATION = 11


@dataclasses.dataclass(frozen=True, slots=True)
class StepTimes:
    """Measured seconds per step of each optimizer, with how they were measured (for the printed section)."""

    seconds: dict[str, float]
    """optimizer → median seconds per step."""
    timed_iterations: int
    """Iterations in each median."""
    load: tuple[str, str]
    """Load average before and after the measurement."""


def median_seconds_per_step(stdout: str, first_iteration: int = FIRST_TIMED_ITERATION) -> tuple[float, int]:
    """(median seconds, count) of the ``ms/iter`` the launcher logged for iterations ≥ ``first_iteration``.

    Raises:
        ValueError: it logged none there.
    """
    values = [ms / 1e3 for _, ms in iteration_values(stdout, "ms/iter", first_iteration)]
    if not values:
        raise ValueError(f"no ms/iter logged at iteration >= {first_iteration}")
    return statistics.median(values), len(values)


def step_overrides(
    model_overrides: Sequence[str], seq_length: int, micro_batch: int, optimizer: str, iterations: int
) -> list[str]:
    """The launcher overrides of one timing run (one device's step; LRs are the config's: they do not change
    the time)."""
    return [
        *model_overrides,
        f"model.seq_length={seq_length}",
        f"training.global_batch_size={micro_batch}",
        f"training.micro_batch_size={micro_batch}",
        f"training.train_iters={iterations + FIRST_TIMED_ITERATION - 1}",
        "training.eval_interval=0",
        "logging.log_interval=1",
        "optimizer.warmup_iters=1",
        "checkpoint.resume=none",
        "checkpoint.save_interval=0",
        f"optimizer.use_muon={'true' if optimizer == 'muon' else 'false'}",
    ]


def measure_step_seconds(
    config: str,
    model_overrides: Sequence[str],
    seq_length: int,
    micro_batch: int,
    optimizers: Sequence[str],
    iterations: int,
) -> StepTimes:
    """Time ``iterations`` steps of each optimizer (``adamw`` or ``muon``) after the warm-up iterations.

    Raises:
        ValueError: an optimizer other than adamw or muon, or a run that logged no step time.
        RuntimeError: a launch failed.
    """
    unknown = sorted(set(optimizers) - {"adamw", "muon"})
    if unknown:
        raise ValueError(f"cannot time optimizer {', '.join(unknown)}: valid: adamw, muon")
    before = load_average()
    seconds, counts = {}, set()
    for optimizer in optimizers:
        run = run_training(
            config,
            step_overrides(model_overrides, seq_length, micro_batch, optimizer, iterations),
            evaluates=False,
        )
        seconds[optimizer], count = median_seconds_per_step(run.stdout)
        counts.add(count)
    return StepTimes(seconds=seconds, timed_iterations=min(counts), load=(before, load_average()))
