"""Where Muon's matrices are orthogonalized across a grid of ranks: the plan every rank of the grid derives
(``plan.py``) from the pieces every rank holds, the transport that moves matrix pieces as the plan says
(``comm.MatrixTransport``) and the process groups of the ``distributed`` mode's Gram all-reduce.

No math here: the Muon step (``muon.py``) asks this object which matrices this rank computes and hands its
pieces to the transport. With no grid group (one process) every matrix is local and no collective runs, so the
single-process and the parallel paths are the same code.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from megatron_muon.optim.comm import (
    MatrixTransport,
    all_gather_objects,
    all_reduce_sum_fn,
    check_agreement,
    group_rank,
    group_size,
)
from megatron_muon.optim.layout import MatrixPiece
from megatron_muon.optim.options import MuonPlanSettings
from megatron_muon.optim.plan import CostModel, MatrixPlan, PieceRecord, build_muon_plan, held_rows

logger = logging.getLogger(__name__)


def _record(piece: MatrixPiece, shard_group: str) -> PieceRecord:
    rows_held: tuple[tuple[int, int], ...] = ()
    fsdp_cut: tuple[int, ...] = ()
    if piece.part is not None:  # a fully sharded parameter's part of the shard
        blocks = piece.rows
        fsdp_cut = (*piece.part.cut, blocks.offset, blocks.length, blocks.period, blocks.repeats)
        rows_held = held_rows(piece.part, piece.shard_shape[0])
    return PieceRecord(
        key=piece.key,
        shape=(piece.shape[0], piece.shape[1]),
        shard_dim=piece.shard_dim,
        num_shards=piece.num_shards,
        shard_index=piece.shard_index,
        shard_group=shard_group,
        rows_held=rows_held,
        fsdp_cut=fsdp_cut,
    )


class MatrixPlacement:
    """The placement of one Muon optimizer's matrices on a grid of ranks: which matrices this rank
    orthogonalizes (whole, after a gather, or as shards) and the transport that moves their pieces.

    Args:
        pieces: every logical-matrix piece this rank's optimizer holds.
        settings: what the plan is built from (``options.MuonPlanSettings``, validated there; default: its
            defaults): the mode, the Newton–Schulz algorithm and steps its cost model counts, the exchange buckets,
            and whether the state is replicated or kept with the shards. On a grid of one rank, one bucket (nothing travels, so buckets
            would only cut the same-shape batches into pieces).
        grid_group: all ranks of this pipeline stage (megatron's ``tp_dp_cp`` group); ``None`` for one process.
        shard_groups: name → process group of the ranks that hold the other shards of a matrix in the same
            replica (``{"tp": tp, "expert_tp": expt_tp}``); needed by the ``distributed`` mode only.
        shard_group_of: piece key → name in ``shard_groups`` (default ``"tp"``).
        cost_model: the cost model that picks modes under ``auto`` (default: this machine's).
        device: the model's device, where a rank that sends nothing puts its empty buffers (default: the device
            of the first pieces it gathers).

    Builds the plan collectively at construction and checks that every rank of the grid derived the same one.
    """

    def __init__(
        self,
        pieces: list[MatrixPiece],
        settings: MuonPlanSettings | None = None,
        *,
        grid_group: Any = None,
        shard_groups: dict[str, Any] | None = None,
        shard_group_of: dict[str, str] | None = None,
        cost_model: CostModel | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.grid_group = grid_group
        self.shard_groups = shard_groups or {}
        shard_group_of = shard_group_of or {}
        counts = Counter(p.key for p in pieces)
        duplicates = sorted(k for k, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"two pieces share the matrix keys {duplicates[:5]}")
        records = [_record(p, shard_group_of.get(p.key, "tp")) for p in pieces]
        settings = settings or MuonPlanSettings()
        if group_size(grid_group) == 1:
            # Nothing travels on one process, so buckets would only cut the same-shape batches into pieces.
            settings = dataclasses.replace(settings, num_buckets=1)
        self.settings = settings
        self.plan = build_muon_plan(all_gather_objects(records, grid_group), settings, cost_model=cost_model)
        check_agreement(self.plan.fingerprint(), grid_group, "Muon plans")
        self.rank = group_rank(grid_group)
        self._by_key = {m.key: m for m in self.plan.matrices}
        self.transport = MatrixTransport(
            self.plan.matrices,
            rank=self.rank,
            group=grid_group,
            num_buckets=settings.num_buckets,
            device=device,
        )
        for matrix in self.plan.matrices:
            if matrix.mode == "distributed" and self.rank in matrix.all_holders:
                if matrix.shard_group not in self.shard_groups:
                    raise ValueError(
                        f"matrix {matrix.key!r} runs in distributed mode but no process group was given for "
                        f"shard group {matrix.shard_group!r} (have {sorted(self.shard_groups)})"
                    )
        logger.info("Muon plan: %s", self.plan.summary())

    def state_bytes(self, optimizer: Any) -> int:
        """Bytes of Muon state (momentum) this rank keeps."""
        total = 0
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, dict):
                    total += sum(t.numel() * t.element_size() for t in value.values() if torch.is_tensor(t))
        return total

    def matrix(self, key: str) -> MatrixPlan:
        return self._by_key[key]

    def held_only_here(self, key: str) -> bool:
        """Whether no other rank of the grid holds a piece of matrix ``key``."""
        return self._by_key[key].all_holders == [self.rank]

    def sharded_matrices(self) -> list[MatrixPlan]:
        """The ``distributed``-mode matrices this rank orthogonalizes on its shard (Gram all-reduced)."""
        return [m for m in self.plan.matrices if m.mode == "distributed" and self.rank in m.computers]

    def gram_all_reduce(self, matrix: MatrixPlan) -> Callable[[torch.Tensor], torch.Tensor]:
        """The in-place fp32 sum over the ranks holding the other shards of ``matrix`` (same replica)."""
        return all_reduce_sum_fn(self.shard_groups[matrix.shard_group])
