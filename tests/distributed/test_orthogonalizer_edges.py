"""Edge cases of the parallel-aware Muon on hand-made layouts (no model): ranks that own nothing, uneven
expert counts per rank, a shard split along the short side, and plans that must agree across ranks."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.optim.reference import ReferenceMuon
from megatron_muon.testing import DistributedRunError, run_distributed
from megatron_muon.testing.canonical import canonical_tensor

pytestmark = pytest.mark.slow

HYPER = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, scale_mode="spectral")

# key → (full shape, shard dim, {rank: shard index}). World 4; ranks 0/1 and 2/3 are "TP pairs" of two replicas.
LAYOUT = {
    # sharded along rows (the long side: 64 > 32) over TP pairs, replicated over the two pairs
    "dense.tall": ((64, 32), 0, {0: 0, 1: 1, 2: 0, 3: 1}),
    # sharded along columns of a tall matrix = the short side: auto must not pick "distributed"
    "dense.short_side": ((64, 16), 1, {0: 0, 1: 1, 2: 0, 3: 1}),
    # unsharded, held by everyone
    "dense.small": ((8, 8), None, {0: 0, 1: 0, 2: 0, 3: 0}),
    # three experts on "EP rank 0" (ranks 0, 2) and one on "EP rank 1" (ranks 1, 3)
    "expert.0": ((16, 24), None, {0: 0, 2: 0}),
    "expert.1": ((16, 24), None, {0: 0, 2: 0}),
    "expert.2": ((16, 24), None, {0: 0, 2: 0}),
    "expert.3": ((16, 24), None, {1: 0, 3: 0}),
}


def _local_params(rank: int, layout: dict):
    """This rank's parameters (one per held matrix) and their pieces."""
    from megatron_muon.optim.layout import MatrixPiece, RowBlocks

    params, pieces = [], []
    for key, (shape, shard_dim, holders) in layout.items():
        if rank not in holders:
            continue
        num_shards = 1 if shard_dim is None else 2
        full = canonical_tensor(key, shape, salt="weight")
        local = full if shard_dim is None else full.chunk(2, dim=shard_dim)[holders[rank]]
        param = torch.nn.Parameter(local.clone())
        rows = local.shape[0]
        piece = MatrixPiece(
            key=key,
            shape=shape,
            rows=RowBlocks(offset=0, length=rows, period=rows),
            shard_dim=shard_dim or 0,
            num_shards=num_shards,
            shard_index=holders[rank],
        )
        params.append((key, param))
        pieces.append([piece])
    return params, pieces


def _run_muon(mode: str, steps: int, layout: dict, rank_modes=None):
    import torch.distributed as dist

    from megatron_muon.optim.muon import Muon
    from megatron_muon.optim.options import MuonPlanSettings
    from megatron_muon.optim.placement import MatrixPlacement

    rank = dist.get_rank()
    world = dist.group.WORLD
    pair = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    params, pieces = _local_params(rank, layout)
    if rank_modes is not None:
        mode = rank_modes[rank]
    placement = MatrixPlacement(
        [p for ps in pieces for p in ps],
        MuonPlanSettings(tp_mode=mode, num_buckets=2),
        grid_group=world,
        shard_groups={"tp": pair[rank // 2]},
    )
    optimizer = Muon(
        [p for _, p in params] or [torch.nn.Parameter(torch.zeros(1, 1))],
        compute_dtype=torch.float32,
        pieces=[[ps for ps in pieces]] if params else [[[]]],
        placement=placement,
        **HYPER,
    )
    for step in range(steps):
        for (key, param), (piece,) in zip(params, pieces, strict=True):
            full = canonical_tensor(key, piece.shape, salt=f"grad{step}")
            param.grad = (
                full if piece.num_shards == 1 else full.chunk(2, dim=piece.shard_dim)[piece.shard_index]
            )
        optimizer.step()
    modes = {m.key: m.mode for m in placement.plan.matrices}
    owners = {m.key: m.computers for m in placement.plan.matrices}
    values = {
        key: (param.detach().clone(), piece.shard_dim, piece.num_shards, piece.shard_index)
        for (key, param), (piece,) in zip(params, pieces, strict=True)
    }
    return values, modes, owners, placement.plan.loads


def _assemble(per_rank):
    out = {}
    for values, *_ in per_rank:
        for key, (value, dim, num_shards, index) in values.items():
            out.setdefault(key, {})[index] = (value, dim, num_shards)
    return {
        key: torch.cat([shards[i][0] for i in range(shards[0][2])], dim=shards[0][1])
        for key, shards in out.items()
    }


def _reference(steps):
    shapes = {key: shape for key, (shape, _, _) in LAYOUT.items()}
    reference = ReferenceMuon(
        {k: canonical_tensor(k, s, salt="weight") for k, s in shapes.items()},
        compute_dtype=torch.float32,
        **HYPER,
    )
    for step in range(steps):
        reference.step({k: canonical_tensor(k, s, salt=f"grad{step}") for k, s in shapes.items()})
    return reference.weights


MODES = ("auto", "owner", "duplicated", "distributed")
SPARSE = {
    "only.a": ((32, 32), None, {0: 0, 1: 0, 2: 0, 3: 0}),
    "only.b": ((32, 64), 1, {0: 0, 1: 1, 2: 0, 3: 1}),
}


def _run_muon_cases(cases: dict[str, tuple[str, int, dict]]):
    """``_run_muon(mode, steps, layout)`` for every named case in the same ranks (fresh parameters, groups and
    optimizer each time)."""
    return {name: _run_muon(*case) for name, case in cases.items()}


@pytest.fixture(scope="module")
def runs():
    """Every mode on LAYOUT and the owner mode on SPARSE, from one 4-rank start-up (the start-up, not the few
    steps, is what a run costs)."""
    cases = {mode: (mode, 3, LAYOUT) for mode in MODES} | {"sparse": ("owner", 2, SPARSE)}
    per_rank = run_distributed(_run_muon_cases, 4, args=(cases,), timeout_s=400)
    return {name: [rank[name] for rank in per_rank] for name in cases}


@pytest.mark.parametrize("mode", MODES)
def test_uneven_experts_short_side_shards_and_idle_ranks(mode, runs):
    per_rank = runs[mode]
    expected = _reference(3)
    got = _assemble(per_rank)
    for key, value in expected.items():
        error = (got[key] - value).norm() / value.norm()
        assert error < 1e-5, f"{mode}: {key} differs by {error:.2e}"
    modes = per_rank[0][1]
    assert modes["dense.short_side"] != "distributed", "a shard along the short side must not run distributed"
    if mode == "distributed":
        assert modes["dense.tall"] == "distributed"
    if mode == "owner":
        owners = per_rank[0][2]
        assert all(len(o) == 1 for o in owners.values())
        assert owners["expert.3"][0] in (1, 3), "an expert is owned by a rank that holds it"


def test_more_ranks_than_matrices(runs):
    per_rank = runs["sparse"]
    loads = per_rank[0][3]
    assert sorted(loads.values()).count(0.0) == 2, f"two of four ranks should own nothing: {loads}"
    shapes = {k: s for k, (s, _, _) in SPARSE.items()}
    reference = ReferenceMuon(
        {k: canonical_tensor(k, s, salt="weight") for k, s in shapes.items()},
        compute_dtype=torch.float32,
        **HYPER,
    )
    for step in range(2):
        reference.step({k: canonical_tensor(k, s, salt=f"grad{step}") for k, s in shapes.items()})
    got = _assemble(per_rank)
    for key, value in reference.weights.items():
        assert (got[key] - value).norm() / value.norm() < 1e-5, key


def test_ranks_that_build_different_plans_fail_loudly():
    with pytest.raises(DistributedRunError, match="ranks built different Muon plans"):
        run_distributed(
            _run_muon,
            4,
            args=("owner", 1, LAYOUT),
            kwargs=dict(rank_modes=["owner", "owner", "owner", "duplicated"]),
            timeout_s=240,
        )


def test_ranks_that_disagree_about_a_matrix_fail_loudly():
    with pytest.raises(DistributedRunError, match="ranks disagree about matrix 'dense.tall'"):
        run_distributed(_run_muon_inconsistent, 4, args=(LAYOUT,), timeout_s=240)


def _run_muon_inconsistent(layout):
    import torch.distributed as dist

    # rank 3 believes "dense.tall" has another shape: the plan must refuse, on every rank
    if dist.get_rank() == 3:
        layout = dict(layout)
        layout["dense.tall"] = ((64, 48), 0, {0: 0, 1: 1, 2: 0, 3: 1})
    return _run_muon("owner", 1, layout)
