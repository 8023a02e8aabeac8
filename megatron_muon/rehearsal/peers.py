"""What the other ranks of a fake world would answer to an object all-gather.

Under torch's fake process group a collective moves nothing, which is right for tensors (the rehearsal checks
shapes and devices, not values) but not for the few *object* all-gathers that decide what a rank does: the Muon plan
is built identically on every rank from every grid rank's piece records (``optim/placement.py``). The answer is
derived from this rank's own records by the symmetry the scale planner uses and tests (``planning/at_scale.py``):
a peer holds the same pieces with its own tensor-parallel (expert-TP) shard index and, for routed experts, the
global expert ids of its expert-parallel rank (megatron's contiguous placement). Any other object (fingerprints,
megatron's parameter keys) is answered as this rank's own: every rank of a group built the same thing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from megatron_muon.optim.layout import RowBlocks, RowRuns, fsdp_chunk, part_runs, shard_shape
from megatron_muon.optim.plan import PieceRecord, held_rows

__all__ = ["peers_answer_object_gathers", "peer_records"]

_EXPERT_ID = re.compile(r"local_experts\.(\d+)\.")


def peer_records(
    records: list[PieceRecord], mine: dict[str, int], peer: dict[str, int], experts_per_rank: int
) -> list[PieceRecord]:
    """``records`` of this rank (coordinates ``mine``) as the rank at ``peer`` announces them."""
    answer = []
    for record in records:
        match = _EXPERT_ID.search(record.key)
        if match is None:
            shard = peer["tp"] if record.num_shards > 1 else 0
            peer_record = dataclasses.replace(record, shard_index=shard)
        else:
            expert = int(match.group(1)) + (peer["ep"] - mine["ep"]) * experts_per_rank
            key = _EXPERT_ID.sub(f"local_experts.{expert}.", record.key, count=1)
            shard = peer["etp"] if record.num_shards > 1 else 0
            peer_record = dataclasses.replace(record, key=key, shard_index=shard)
        if record.fsdp_cut:
            # FSDP: the peer's own rows, over the data-parallel ranks (experts: expert-data-parallel).
            part = _fsdp_part_of(peer_record, peer["edp"] if match else peer["dp"])
            if part is None:
                continue
            peer_record = part
        answer.append(peer_record)
    return answer


def _fsdp_part_of(record: PieceRecord, rank: int) -> PieceRecord | None:
    """``record`` as FSDP rank ``rank`` holds it (None: that rank holds no row of it)."""
    rows, ranks, offset, length, period, repeats = record.fsdp_cut
    runs = part_runs(RowBlocks(offset, length, period, repeats), *fsdp_chunk(rows, ranks, rank))
    if not runs:
        return None
    shard_rows = shard_shape(record.shape, record.shard_dim, record.num_shards)[0]
    return dataclasses.replace(record, rows_held=held_rows(RowRuns(runs), shard_rows))


@contextlib.contextmanager
def peers_answer_object_gathers(coordinates: list[dict[str, int]], experts_per_rank: int) -> Iterator[None]:
    """Inside: ``torch.distributed.all_gather_object`` fills each slot with what that rank of the group would send
    (``coordinates``: per global rank, from ``planning.at_scale.rank_coordinates``)."""

    def all_gather_object(object_list: list[Any], obj: Any, group: Any = None) -> None:
        ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
        mine = coordinates[dist.get_rank()]
        is_records = isinstance(obj, list) and obj and all(isinstance(r, PieceRecord) for r in obj)
        for slot, rank in enumerate(ranks):
            object_list[slot] = (
                peer_records(obj, mine, coordinates[rank], experts_per_rank) if is_records else obj
            )

    original = dist.all_gather_object
    dist.all_gather_object = all_gather_object  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.all_gather_object = original
