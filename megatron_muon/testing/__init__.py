"""Test helpers: run functions on several gloo ranks with megatron's parallel state initialized."""

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
