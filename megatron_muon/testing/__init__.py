"""Test helpers: run functions on several gloo ranks with megatron's parallel state initialized; build the small
model and its optimizer there (``small_model.py``, imported from its module: it pulls in megatron)."""

from megatron_muon.testing.multiprocess import (
    DistributedRunError,
    DistributedTimeoutError,
    ParallelSizes,
    keep_rank_processes,
    run_distributed,
)

__all__ = [
    "DistributedRunError",
    "DistributedTimeoutError",
    "ParallelSizes",
    "keep_rank_processes",
    "run_distributed",
]
