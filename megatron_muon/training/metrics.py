"""TensorBoard metrics with namespaced tags (torchtitan's metrics.py habit), written by one rank.

Tags: ``loss/train``, ``loss/validation``, ``loss/validation_perplexity``, ``loss/load_balancing``,
``optimizer/lr_muon``, ``optimizer/lr_adamw``, ``optimizer/grad_norm``, ``optimizer/skipped_iterations``,
``throughput/tokens_per_s``, ``throughput/mfu``, ``time/iteration_ms``, ``time/optimizer_step_ms``,
``memory/rss_mib``, ``memory/max_allocated_mib`` (GPU: peak tensor memory, ``platform.device``),
``moe/expert_load_max_over_mean``, ``muon/update_rms/<kind>``, ``muon/ns_orthogonality_error``,
``muon/ns_algorithm/{standard,gram}_{matrix,flop}_share``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import psutil
import torch.distributed as dist

from megatron_muon.optim.build import chain_members
from megatron_muon.training.host_values import read_on_host

if TYPE_CHECKING:
    from megatron.core.process_groups_config import ProcessGroupCollection


def is_logging_rank(pg_collection: ProcessGroupCollection) -> bool:
    """The last pipeline stage's first TP / DP rank: it has the loss and one copy of everything else."""
    pp, tp, dp = pg_collection.pp, pg_collection.tp, pg_collection.dp
    last_stage = dist.get_rank(pp) == dist.get_world_size(pp) - 1
    return last_stage and dist.get_rank(tp) == 0 and dist.get_rank(dp) == 0


class MetricsWriter:
    """Writes scalars to TensorBoard on the logging rank; a no-op elsewhere (or when ``log_dir`` is None)."""

    def __init__(self, log_dir: str | None, enabled: bool) -> None:
        self._writer = None
        if enabled and log_dir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir=log_dir)

    @property
    def active(self) -> bool:
        """Whether this rank writes (a TensorBoard writer is open)."""
        return self._writer is not None

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Write each tag's value at ``step``; None values are left out."""
        if self._writer is None:
            return
        for tag, value in values.items():
            if value is not None:
                self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        """Push what was written to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the writer; later calls write nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def memory_mib() -> float:
    """Resident memory of this process in MiB (on a GPU the trainer also reports the GPU's peak allocated memory,
    ``platform.device.max_memory_allocated_mib``)."""
    resident_bytes: int = psutil.Process().memory_info().rss
    return resident_bytes / 2**20


def muon_stats(optimizer: Any) -> dict[str, float]:
    """``muon/...`` diagnostics of every Muon member of a megatron ChainedOptimizer (last step), read on the host
    (one transfer)."""
    return read_on_host(muon_device_stats(optimizer))


def muon_device_stats(optimizer: Any) -> dict[str, Any]:
    """:func:`muon_stats` before the read: values computed on the device are still tensors there (the trainer reads
    them with the next step's transfer)."""
    stats: dict[str, Any] = {}
    algorithms: dict[str, list[float]] = {}
    for member in chain_members(optimizer):
        muon = getattr(member, "optimizer", None)
        if muon is None or not hasattr(muon, "placement"):
            continue
        for key, value in muon.stats.items():
            stats[f"muon/{key}"] = value
        for name, (count, flops) in muon.placement.plan.algorithm_totals().items():
            totals = algorithms.setdefault(name, [0.0, 0.0])
            totals[0] += count
            totals[1] += flops
    # Standard vs Gram Newton–Schulz over the plans of this rank's grid (dense and expert): share of the logical
    # matrices and of the Newton–Schulz FLOPs (the plan's counts).
    matrices = sum(count for count, _ in algorithms.values())
    flops = sum(f for _, f in algorithms.values())
    for name in ("standard", "gram"):
        count, ns_flops = algorithms.get(name, (0.0, 0.0))
        if matrices:
            stats[f"muon/ns_algorithm/{name}_matrix_share"] = count / matrices
        if flops:
            stats[f"muon/ns_algorithm/{name}_flop_share"] = ns_flops / flops
    return stats


def model_flops_per_token(
    *, num_layers: int, hidden_size: int, seq_length: int, active_matrix_params: int
) -> float:
    """Training FLOPs per token: 6 · (active matrix parameters) for the GEMMs (forward + backward) plus
    attention's 12 · layers · hidden · seq (scores and values, forward + backward) — the PaLM appendix B
    estimate (Chowdhery et al. 2022), used for MFU."""
    return 6.0 * active_matrix_params + 12.0 * num_layers * hidden_size * seq_length
