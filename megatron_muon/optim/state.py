"""Muon's optimizer state in a layout-free sharded form, for megatron's distributed checkpointing.

Muon keeps one fp32 momentum tensor per *logical* matrix (``optimizer.state[param][matrix_key]["momentum"]``),
on the ranks the plan (``plan.py``) makes compute that matrix:

* ``owner``: the whole matrix, on its one owner;
* ``duplicated``: the whole matrix, on every holder (identical copies);
* ``distributed``, and ``owner`` with ``momentum_with_shards`` (the distributed optimizer): each holder keeps the
  momentum of its own shard (``shard_index`` of ``num_shards`` along ``shard_dim``).

Here every such tensor becomes a megatron ``ShardedTensor`` named ``muon.momentum.<matrix key>`` whose global
shape is the logical matrix's full shape. Matrix keys do not depend on TP/PP/EP/DP (``layout.py``), so a
checkpoint saved under one plan loads under any other: each rank asks for exactly the momentum its *new* plan
makes it keep (the full matrix, or one shard) and dist_checkpointing reads that region, wherever the saving
ranks had put it. Exactly one copy of every region is written (``replica_id == 0``): the owner, the
lowest-ranked holder of a duplicated matrix, the lowest-ranked holder of each shard.

With NorMuon, each matrix's per-row second moment (``[rows]``) is saved the same way as
``muon.row_second_moment.<matrix key>``: split like the rows when a ``distributed`` matrix is split along its
rows; whole (and identical) on every holder when it is split along its columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor

from megatron_muon.optim.layout import MatrixPiece, shard_shape
from megatron_muon.optim.muon import ROW_SECOND_MOMENT, Muon
from megatron_muon.optim.plan import part_replicas

__all__ = [
    "MOMENTUM_KEY_PREFIX",
    "MomentumSlot",
    "load_muon_momentum_",
    "momentum_slots",
    "muon_momentum_sharded_state_dict",
    "muon_param_groups_state",
]

MOMENTUM_KEY_PREFIX = "muon.momentum."
ROW_SECOND_MOMENT_KEY_PREFIX = "muon.row_second_moment."


@dataclass(frozen=True, slots=True)
class MomentumSlot:
    """One momentum tensor this rank keeps under its current plan."""

    matrix_key: str
    """Layout-independent key of the logical matrix (``layout.MatrixPiece.key``)."""
    param: torch.Tensor
    """The (main) parameter whose optimizer state holds the momentum."""
    global_shape: tuple[int, int]
    """Full shape of the logical matrix."""
    local_shape: tuple[int, int]
    """Shape of the momentum this rank keeps: the full shape, or one shard's."""
    rank_offsets: tuple[tuple[int, int, int], ...]
    """``()`` for a full matrix; ``((shard_dim, shard_index, num_shards),)`` for a shard."""
    replica_id: int
    """0 on the one rank that writes this region; > 0 on the other ranks keeping the same values."""
    row_runs: tuple[tuple[int, int], ...] = ()
    """A fully sharded (FSDP) matrix: the ``(first row, rows)`` runs of shard ``rank_offsets`` this rank keeps
    (its momentum is those rows, in order); ``()``: the whole region."""

    def run_tensors(self, momentum: torch.Tensor) -> dict[str, ShardedTensor]:
        """One ``ShardedTensor`` per run of ``row_runs``, cut from ``momentum`` (irregular offsets, so any layout
        reads any region of it)."""
        shard_dim, shard, num_shards = self.rank_offsets[0]
        rows, cols = shard_shape(self.global_shape, shard_dim, num_shards)
        row_base = shard * rows if shard_dim == 0 else 0
        col_base = shard * cols if shard_dim == 1 else 0
        result, offset = {}, 0
        for first, count in self.row_runs:
            data = momentum[offset : offset + count]
            result[f"{self.sharded_key}@{first}"] = ShardedTensor(
                key=self.sharded_key,
                data=data,
                dtype=data.dtype,
                local_shape=(count, cols),
                global_shape=self.global_shape,
                global_offset=(row_base + first, col_base),
                axis_fragmentations=None,
                replica_id=self.replica_id,
            )
            offset += count
        return result

    @property
    def sharded_key(self) -> str:
        return MOMENTUM_KEY_PREFIX + self.matrix_key

    @property
    def row_key(self) -> str:
        return ROW_SECOND_MOMENT_KEY_PREFIX + self.matrix_key

    def row_layout(self) -> tuple[tuple[int], tuple[tuple[int, int, int], ...], int]:
        """(local shape, rank offsets, replica id) of the per-row second moment (NorMuon)."""
        if not self.rank_offsets:
            return (self.local_shape[0],), (), self.replica_id
        shard_dim, shard, num_shards = self.rank_offsets[0]
        if shard_dim == 0:
            return (self.local_shape[0],), ((0, shard, num_shards),), self.replica_id
        # Columns split: every holder of every shard keeps the whole vector; one of them writes it.
        return (self.global_shape[0],), (), 0 if shard == 0 and self.replica_id == 0 else 1


def _held_pieces(optimizer: Muon) -> dict[str, tuple[torch.Tensor, MatrixPiece]]:
    held = {}
    for group, group_pieces in zip(optimizer.param_groups, optimizer.pieces, strict=True):
        for param, pieces in zip(group["params"], group_pieces, strict=True):
            for piece in pieces:
                if piece.is_held:
                    held[piece.key] = (param, piece)
    return held


def momentum_slots(optimizer: Muon) -> list[MomentumSlot]:
    """The momentum tensors ``optimizer``'s plan makes this rank keep, in plan order.

    ``optimizer`` is the raw :class:`Muon` (``member.optimizer`` of a megatron wrapper); its ``placement``
    must expose ``plan`` and ``rank`` (``placement.MatrixPlacement``).
    """
    placement = optimizer.placement
    me = placement.rank
    held = _held_pieces(optimizer)
    slots = []
    for matrix in placement.plan.matrices:
        if (
            matrix.momentum_with_shards
        ):  # each shard's (or FSDP part's) one holder keeps and writes its momentum
            if matrix.key in held:
                param, piece = held[matrix.key]
                slots.append(
                    MomentumSlot(
                        matrix_key=matrix.key,
                        param=param,
                        global_shape=(matrix.shape[0], matrix.shape[1]),
                        local_shape=piece.local_shape,
                        rank_offsets=((matrix.shard_dim, piece.shard_index, matrix.num_shards),),
                        # TP replicas of an FSDP part (a matrix TP does not split) keep the same rows; one writes.
                        replica_id=(
                            part_replicas(matrix, piece.shard_index, me).index(me)
                            if matrix.partitioned
                            else 0
                        ),
                        row_runs=matrix.row_parts[piece.shard_index][me] if matrix.partitioned else (),
                    )
                )
            continue
        if me not in matrix.computers:
            continue
        if matrix.key not in held:
            raise RuntimeError(
                f"the Muon plan makes grid rank {me} compute matrix {matrix.key!r}, but this rank holds no piece "
                "of it"
            )
        param, piece = held[matrix.key]
        if matrix.mode == "distributed":
            shard = piece.shard_index
            slots.append(
                MomentumSlot(
                    matrix_key=matrix.key,
                    param=param,
                    global_shape=(matrix.shape[0], matrix.shape[1]),
                    local_shape=piece.local_shape,
                    rank_offsets=((matrix.shard_dim, shard, matrix.num_shards),),
                    replica_id=matrix.holders[shard].index(me),
                )
            )
        else:  # owner (one computer) or duplicated (every holder computes the whole matrix)
            slots.append(
                MomentumSlot(
                    matrix_key=matrix.key,
                    param=param,
                    global_shape=(matrix.shape[0], matrix.shape[1]),
                    local_shape=(matrix.shape[0], matrix.shape[1]),
                    rank_offsets=(),
                    replica_id=matrix.computers.index(me),
                )
            )
    return slots


def muon_momentum_sharded_state_dict(
    optimizer: Muon, *, is_loading: bool = False
) -> dict[str, ShardedTensor]:
    """``{"muon.momentum.<matrix key>": ShardedTensor}`` for every momentum this rank keeps.

    Saving (``is_loading=False``): the live momentum tensors; a matrix that has no momentum yet (no step taken)
    is saved as zeros, which is exactly the state Muon starts from (``Muon._orthogonalize``: zeros, then lerp).
    Loading: fresh fp32 zero buffers of the shape this rank needs, to be read into and handed to
    :func:`load_muon_momentum_` (live state is left alone until the load has succeeded).
    """
    result = {}
    for slot in momentum_slots(optimizer):
        state = optimizer.state.get(slot.param, {}).get(slot.matrix_key, {})
        momentum = None if is_loading else state.get("momentum")
        if momentum is None:
            momentum = torch.zeros(slot.local_shape, dtype=torch.float32, device=slot.param.device)
        elif tuple(momentum.shape) != slot.local_shape:
            raise RuntimeError(
                f"Muon momentum of {slot.matrix_key!r} has shape {tuple(momentum.shape)}; the plan expects "
                f"{slot.local_shape}"
            )
        if slot.row_runs:
            result.update(slot.run_tensors(momentum))
        else:
            result[slot.sharded_key] = ShardedTensor.from_rank_offsets(
                slot.sharded_key, momentum, *slot.rank_offsets, replica_id=slot.replica_id
            )
        if optimizer.post_orthogonalize is not None:
            shape, offsets, replica_id = slot.row_layout()
            moment = None if is_loading else state.get(ROW_SECOND_MOMENT)
            if moment is None:
                moment = torch.zeros(shape, dtype=torch.float32, device=slot.param.device)
            result[slot.row_key] = ShardedTensor.from_rank_offsets(
                slot.row_key, moment, *offsets, replica_id=replica_id
            )
    return result


def load_muon_momentum_(optimizer: Muon, loaded: Mapping[str, torch.Tensor]) -> None:
    """Write loaded momentum (``{"muon.momentum.<matrix key>": tensor}``, as returned by dist_checkpointing for
    the request :func:`muon_momentum_sharded_state_dict` made) into ``optimizer.state``."""
    for slot in momentum_slots(optimizer):
        if slot.row_runs:  # an FSDP part: its runs, in order
            names = [f"{slot.sharded_key}@{first}" for first, _ in slot.row_runs]
            missing = [n for n in names if n not in loaded]
            if missing:
                raise KeyError(f"no loaded momentum for Muon matrix {slot.matrix_key!r} ({missing[0]})")
            value = torch.cat([loaded[n] for n in names])
        elif slot.sharded_key not in loaded:
            raise KeyError(f"no loaded momentum for Muon matrix {slot.matrix_key!r} ({slot.sharded_key})")
        else:
            value = loaded[slot.sharded_key]
        if tuple(value.shape) != slot.local_shape:
            raise RuntimeError(
                f"loaded momentum {slot.sharded_key} has shape {tuple(value.shape)}; this rank needs "
                f"{slot.local_shape}"
            )
        state = optimizer.matrix_state(slot.param, slot.matrix_key)
        state["momentum"] = value.to(device=slot.param.device, dtype=torch.float32).contiguous()
        if optimizer.post_orthogonalize is not None:
            if slot.row_key not in loaded:
                raise KeyError(
                    f"no NorMuon row second moment for Muon matrix {slot.matrix_key!r} ({slot.row_key}): was "
                    "the checkpoint saved without optimizer.muon.normuon?"
                )
            state[ROW_SECOND_MOMENT] = loaded[slot.row_key].to(device=slot.param.device, dtype=torch.float32)


def muon_param_groups_state(optimizer: Muon) -> list[dict[str, Any]]:
    """The hyperparameters of every param group (everything but ``params``), for the common checkpoint state.

    Megatron aligns param groups across all ranks (``_get_param_groups``), so every rank returns the same list.
    """
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
