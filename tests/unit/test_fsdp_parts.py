"""Fully sharded (FSDP) parameters as Muon pieces: a rank's rows of a fused parameter cut into the parts of the
logical matrices it holds, the plan that gathers every part to one owner, the transport's cut and assembly, and
the config combinations FSDP cannot serve. No processes."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.config import ConfigError, load_config, validate
from megatron_muon.optim.comm import _assemble, _piece
from megatron_muon.optim.layout import MatrixPiece, RowBlocks, fsdp_part_pieces
from megatron_muon.optim.options import MuonPlanSettings
from megatron_muon.optim.plan import PieceRecord, build_muon_plan

TINY = "launch/configs/tiny_cpu.yaml"


def _fused_qkv_pieces(groups: int, q_rows: int, head: int, cols: int) -> list[MatrixPiece]:
    """q, k, v of a fused QKV weight with ``groups`` repeats of ``[q; k; v]`` rows (layout.py's split)."""
    period = q_rows + 2 * head
    parts = [("q", 0, q_rows), ("k", q_rows, head), ("v", q_rows + head, head)]
    return [
        MatrixPiece(
            key=f"qkv/{name}",
            shape=(length * groups, cols),
            rows=RowBlocks(offset=offset, length=length, period=period, repeats=groups),
        )
        for name, offset, length in parts
    ]


@pytest.mark.parametrize("ranks", [2, 3, 4, 7])
def test_every_rank_reads_and_writes_exactly_its_rows_of_every_logical_matrix(ranks):
    groups, q_rows, head, cols = 3, 4, 2, 5
    pieces = _fused_qkv_pieces(groups, q_rows, head, cols)
    full = torch.randn(groups * (q_rows + 2 * head), cols)
    rows = full.shape[0]
    chunk = -(-rows // ranks)  # torch.chunk, as FSDP2 shards
    assembled = {p.key: torch.full(p.shape, float("nan")) for p in pieces}
    rebuilt = torch.full_like(full, float("nan"))
    for rank in range(ranks):
        start, stop = min(rank * chunk, rows), min((rank + 1) * chunk, rows)
        local = full[start:stop]
        for part in fsdp_part_pieces(pieces, rows, ranks, rank):
            assert part.part is not None and part.local_shape == (part.part.num_rows, cols)
            value = part.read(local)
            offset = 0
            for first, count in part.part.shard_rows:
                assembled[part.key][first : first + count] = value[offset : offset + count]
                offset += count
            part.write(rebuilt[start:stop], value)  # the parts cover the rank's rows
    for piece in pieces:
        assert torch.equal(assembled[piece.key], piece.read(full)), piece.key
    assert torch.equal(rebuilt, full)


def _record(key, shape, rows_held, *, num_shards=1, shard_index=0, shard_dim=0) -> PieceRecord:
    return PieceRecord(
        key=key,
        shape=shape,
        shard_dim=shard_dim,
        num_shards=num_shards,
        shard_index=shard_index,
        shard_group="tp",
        rows_held=rows_held,
    )


def _fsdp_records() -> list[list[PieceRecord]]:
    """Grid of 4 = TP2 × FSDP2: a column-parallel (16, 8) matrix, each TP shard's 8 rows split 5 + 3, and a
    row-parallel (6, 8) matrix, each TP shard's 6 rows split 4 + 2 (runs may be several per rank)."""
    records: list[list[PieceRecord]] = [[] for _ in range(4)]
    for rank in range(4):
        tp, dp = rank % 2, rank // 2
        records[rank].append(
            _record("col", (16, 8), ((0, 5),) if dp == 0 else ((5, 3),), num_shards=2, shard_index=tp)
        )
        runs = ((0, 1), (3, 3)) if dp == 0 else ((1, 2),)
        records[rank].append(_record("row", (6, 8), runs, num_shards=2, shard_index=tp, shard_dim=1))
    return records


def test_the_plan_gathers_every_part_to_one_owner_and_returns_each_its_rows():
    plan = build_muon_plan(
        _fsdp_records(), MuonPlanSettings(tp_mode="auto", momentum_with_shards=True, replicate_state=False)
    )
    for matrix in plan.matrices:
        assert matrix.partitioned and matrix.mode == "owner" and matrix.momentum_with_shards
        (owner,) = matrix.computers
        others = {(shard, rank) for shard, ranks in matrix.holders.items() for rank in ranks if rank != owner}
        assert {(shard, sender) for shard, sender, receiver in matrix.gather} == others
        assert {receiver for _, _, receiver in matrix.gather} == {owner}
        assert {(shard, receiver) for shard, _, receiver in matrix.scatter} == others
    row = next(m for m in plan.matrices if m.key == "row")
    assert row.piece_shape(0, 0) == (4, 4) and row.piece_shape(1, 3) == (2, 4)


def test_the_owner_assembles_the_whole_matrix_from_the_parts_and_cuts_each_holder_its_rows():
    plan = build_muon_plan(
        _fsdp_records(), MuonPlanSettings(tp_mode="owner", momentum_with_shards=True, replicate_state=False)
    )
    for matrix in plan.matrices:
        full = torch.randn(matrix.shape)
        (owner,) = matrix.computers
        pieces = {
            (shard, rank): _piece(full, matrix, shard, rank)
            for shard, ranks in matrix.holders.items()
            for rank in ranks
        }
        my_shard = next(shard for shard, ranks in matrix.holders.items() if owner in ranks)
        received = {key: value for key, value in pieces.items() if key[1] != owner}
        assert torch.equal(_assemble(matrix, received, pieces[(my_shard, owner)], owner, my_shard), full)


def test_tp_replicas_of_a_part_send_it_once_and_each_gets_its_rows_back():
    """A matrix TP does not split (the router) under FSDP over 2: TP ranks 0, 1 hold rows 0-3, ranks 2, 3 rows
    4-7."""
    router = [[_record("router", (8, 4), ((0, 4),) if rank < 2 else ((4, 4),))] for rank in range(4)]
    plan = build_muon_plan(
        router, MuonPlanSettings(tp_mode="owner", momentum_with_shards=True, replicate_state=False)
    )
    (matrix,) = plan.matrices
    (owner,) = matrix.computers
    replica = owner ^ 1  # the other TP rank of the owner's data-parallel index
    assert (
        len(matrix.gather) == 1 and matrix.gather[0][1] // 2 != owner // 2
    )  # the other part, from one replica
    assert {receiver for _, _, receiver in matrix.scatter} == {0, 1, 2, 3} - {owner}
    assert replica in {receiver for _, _, receiver in matrix.scatter}
    full = torch.randn(8, 4)
    sender = matrix.gather[0][1]
    received = {(0, sender): _piece(full, matrix, 0, sender)}
    assert torch.equal(_assemble(matrix, received, _piece(full, matrix, 0, owner), owner, 0), full)


def test_parts_that_miss_or_repeat_a_row_and_modes_without_an_owner_are_refused():
    gap = [[_record("m", (8, 4), ((0, 4),))], [_record("m", (8, 4), ((5, 3),))]]
    with pytest.raises(RuntimeError, match="do not cover rows 0..7 exactly once"):
        build_muon_plan(gap)
    for mode in ("duplicated", "distributed"):
        with pytest.raises(ValueError, match=f"tp_mode='{mode}' with fully sharded"):
            build_muon_plan(_fsdp_records(), MuonPlanSettings(tp_mode=mode))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["optimizer.distributed_optimizer=true"],
            "parallel.fsdp=true with optimizer.distributed_optimizer=true",
        ),
        (["optimizer.muon.tp_mode=duplicated"], "optimizer.muon.tp_mode=duplicated: .*valid: auto, owner"),
        (["optimizer.muon.tp_mode=distributed"], "optimizer.muon.tp_mode=distributed"),
        (["optimizer.overlap_grad_reduce=true"], "optimizer.overlap_grad_reduce=true: a megatron DDP option"),
        (["optimizer.ddp_bucket_size=1000"], "optimizer.ddp_bucket_size=1000: a megatron DDP option"),
    ],
)
def test_fsdp_with_what_it_cannot_serve_is_one_line_naming_both(overrides, message):
    cfg = load_config(TINY, ["parallel.fsdp=true", *overrides])
    with pytest.raises(ConfigError, match=message) as error:
        validate(cfg)
    assert "\n" not in str(error.value)
    validate(load_config(TINY, ["parallel.fsdp=true"]))  # and the plain FSDP config passes


@pytest.mark.parametrize(
    "mine, saved, refused",
    [
        ("fsdp-fp32", "bf16+masters", True),
        ("bf16+masters", "fsdp-fp32", True),
        ("fsdp-fp32", "fp32", False),
        ("fp32", "fsdp-fp32", False),
        ("fsdp-fp32", "fsdp-fp32", False),
        ("fsdp-fp32", None, False),  # a checkpoint from before the format was recorded
    ],
)
def test_bf16_checkpoints_do_not_cross_between_fsdp_and_ddp_runs(monkeypatch, mine, saved, refused):
    """FSDP keeps its fp32 shards as the weights and reads no master keys; a non-FSDP bf16 run needs its masters:
    resuming across the two is refused in one line (fp32 crosses either way)."""
    from pathlib import Path

    from megatron_muon.training import checkpoint

    monkeypatch.setattr(checkpoint, "_weights_format", lambda chunks: mine)
    problem = checkpoint._weights_mismatch(Path("/run/iter_0000003"), saved, [])
    assert (problem is not None) == refused
    if refused:
        assert "\n" not in problem and "/run/iter_0000003" in problem and "parallel.fsdp" in problem
