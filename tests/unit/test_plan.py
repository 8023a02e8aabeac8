"""The Muon plan (who orthogonalizes what, and which shard goes where), built from hand-written piece records of
a few ranks: no processes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_muon.ops.newton_schulz import newton_schulz_flops, ns_algorithm_flops
from megatron_muon.optim.options import MuonPlanSettings
from megatron_muon.optim.plan import MODES, CostModel, MuonPlan, PieceRecord, build_muon_plan

NS_STEPS = 5


def piece(key, shape, *, shard_dim=0, num_shards=1, shard_index=0, shard_group="tp") -> PieceRecord:
    return PieceRecord(
        key=key,
        shape=tuple(shape),
        shard_dim=shard_dim,
        num_shards=num_shards,
        shard_index=shard_index,
        shard_group=shard_group,
    )


def tp2_dp2_records() -> list[list[PieceRecord]]:
    """4 ranks = 2 TP ranks × 2 data-parallel replicas (grid ranks 0, 1 and 2, 3 are the TP groups), holding a
    column-parallel (dim 0) and a row-parallel (dim 1) weight of each shape kind, and one unsharded matrix."""
    sharded = [
        ("qkv", (96, 32), 0),  # tall, split along its long side
        ("proj", (32, 96), 1),  # wide, split along its long side
        ("fc1", (64, 256), 0),  # wide, split along its short side
        ("fc2", (256, 64), 1),  # tall, split along its short side
    ]
    records = []
    for rank in range(4):
        tp_rank = rank % 2
        mine = [piece(k, s, shard_dim=d, num_shards=2, shard_index=tp_rank) for k, s, d in sharded]
        mine.append(piece("router", (8, 64)))
        records.append(mine)
    return records


def replicated_records(shapes: dict[str, tuple[int, int]], ranks: int) -> list[list[PieceRecord]]:
    """Every rank holds every matrix whole (pure data parallelism)."""
    return [[piece(key, shape) for key, shape in shapes.items()] for _ in range(ranks)]


def assert_valid(plan: MuonPlan, records_by_rank: list[list[PieceRecord]]) -> None:
    """The invariants every plan must keep, whatever the modes."""
    holders_of = {}
    for rank, records in enumerate(records_by_rank):
        for record in records:
            holders_of.setdefault(record.key, {}).setdefault(record.shard_index, set()).add(rank)
    assert sorted(m.key for m in plan.matrices) == sorted(holders_of)
    for matrix in plan.matrices:
        assert {i: set(r) for i, r in matrix.holders.items()} == holders_of[matrix.key], matrix.key
        shard_of = {rank: shard for shard, ranks in matrix.holders.items() for rank in ranks}
        assert matrix.mode in ("owner", "duplicated", "distributed"), matrix.key
        if matrix.mode == "owner":
            assert len(matrix.computers) == 1 and matrix.computers[0] in shard_of, matrix.key
        else:
            assert sorted(matrix.computers) == matrix.all_holders, matrix.key
        if matrix.mode == "distributed":
            assert matrix.gather == [] and matrix.scatter == [], matrix.key
            continue
        for _, sender, receiver in matrix.gather + matrix.scatter:
            assert sender != receiver, f"{matrix.key}: rank {sender} sends to itself"
        # gather: every computer ends up with every shard, each missing one brought exactly once by a holder of it
        for computer in matrix.computers:
            received = Counter(shard for shard, _, receiver in matrix.gather if receiver == computer)
            assert all(count == 1 for count in received.values()), (
                f"{matrix.key}: duplicate gather {received}"
            )
            assert set(received) | {shard_of[computer]} == set(range(matrix.num_shards)), matrix.key
            assert shard_of[computer] not in received, f"{matrix.key}: rank {computer} is sent its own shard"
        for shard, sender, receiver in matrix.gather:
            assert shard_of.get(sender) == shard and receiver in matrix.computers, (matrix.key, shard, sender)
        # scatter: every holder that did not compute gets exactly its shard, from a computer
        non_computers = set(shard_of) - set(matrix.computers)
        assert sorted(receiver for _, _, receiver in matrix.scatter) == sorted(non_computers), matrix.key
        for shard, sender, receiver in matrix.scatter:
            assert shard == shard_of[receiver] and sender in matrix.computers, (matrix.key, shard, receiver)
    assert set(plan.loads) == set(range(len(records_by_rank)))


# ---------------------------------------------------------------------------------------------------------
# Validity in every mode


@pytest.mark.parametrize("mode", MODES)
def test_plan_is_valid_in_every_mode(mode):
    records = tp2_dp2_records()
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode=mode, ns_steps=NS_STEPS))
    assert_valid(plan, records)


def test_owner_mode_has_one_computer_per_matrix_and_moves_every_shard():
    records = tp2_dp2_records()
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    for matrix in plan.matrices:
        assert matrix.mode == "owner"
        if matrix.num_shards == 2:  # the owner lacks one shard; the three other holders get a shard back
            assert len(matrix.gather) == 1 and len(matrix.scatter) == 3, matrix.key
        else:
            assert matrix.gather == [] and len(matrix.scatter) == 3, matrix.key


def test_duplicated_mode_gathers_the_missing_shard_to_every_holder_and_scatters_nothing():
    records = tp2_dp2_records()
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="duplicated", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    for matrix in plan.matrices:
        assert matrix.scatter == []
        assert len(matrix.gather) == (4 if matrix.num_shards == 2 else 0), matrix.key


def test_unknown_mode_raises_naming_it():
    with pytest.raises(ValueError, match="'sharded'"):
        build_muon_plan(tp2_dp2_records(), MuonPlanSettings(tp_mode="sharded"))


# ---------------------------------------------------------------------------------------------------------
# Load balance


def test_equal_matrices_are_spread_within_one_matrix_of_each_other():
    shapes = {f"layers.{i}.linear_proj.weight": (64, 64) for i in range(10)}
    records = replicated_records(shapes, ranks=4)
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    cost = newton_schulz_flops(64, 64, NS_STEPS)
    loads = sorted(plan.loads.values())
    assert sum(loads) == 10 * cost
    assert loads[-1] - loads[0] <= cost
    assert sorted(Counter(m.computers[0] for m in plan.matrices).values()) == [2, 2, 3, 3]


def test_big_matrices_are_placed_first():
    # Six small matrices sort before the big one by key. Placed in key order, the big one would land on a rank
    # that already owns a small one (max load big + small); placed first (LPT), it has a rank to itself.
    shapes = {f"a{i}": (32, 32) for i in range(6)} | {"z_big": (64, 64)}
    records = replicated_records(shapes, ranks=4)
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    big_cost = newton_schulz_flops(64, 64, NS_STEPS)
    (big,) = [m for m in plan.matrices if m.key == "z_big"]
    others_on_big_owner = [m.key for m in plan.matrices if m.computers == big.computers and m.key != "z_big"]
    assert others_on_big_owner == []
    assert max(plan.loads.values()) == big_cost


def test_more_ranks_than_matrices_leaves_idle_ranks_at_zero_load():
    records = replicated_records({"w1": (64, 64), "w2": (64, 64)}, ranks=4)
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    owners = [m.computers[0] for m in plan.matrices]
    assert len(set(owners)) == 2
    idle = set(range(4)) - set(owners)
    assert all(plan.loads[rank] == 0 for rank in idle)
    assert all(plan.loads[rank] == newton_schulz_flops(64, 64, NS_STEPS) for rank in owners)


def test_a_rank_holding_no_matrix_is_in_the_plan_with_load_zero():
    records = [[piece("w", (64, 64))], []]
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    assert plan.loads[1] == 0


# ---------------------------------------------------------------------------------------------------------
# Mode choice


def two_shards(shape, shard_dim) -> list[list[PieceRecord]]:
    return [[piece("w", shape, shard_dim=shard_dim, num_shards=2, shard_index=rank)] for rank in range(2)]


@pytest.mark.parametrize("bytes_per_s", [1e6, 1e16])
@pytest.mark.parametrize(("shape", "short_dim"), [((64, 1024), 0), ((1024, 64), 1)])
def test_auto_never_runs_distributed_on_a_shard_split_along_the_short_side(shape, short_dim, bytes_per_s):
    cost_model = CostModel(bytes_per_s=bytes_per_s, latency_s=0.0)
    short = build_muon_plan(
        two_shards(shape, short_dim),
        MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS),
        cost_model=cost_model,
    )
    assert short.matrices[0].mode != "distributed"
    assert_valid(short, two_shards(shape, short_dim))


@pytest.mark.parametrize(("shape", "long_dim"), [((64, 1024), 1), ((1024, 64), 0)])
def test_auto_runs_distributed_on_a_long_side_split_when_bandwidth_is_scarce(shape, long_dim):
    # The Gram all-reduce moves 5 × 64² floats, less than the half matrix the other modes move (64 × 512).
    cost_model = CostModel(bytes_per_s=1e6, latency_s=0.0)
    plan = build_muon_plan(
        two_shards(shape, long_dim),
        MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS),
        cost_model=cost_model,
    )
    assert plan.matrices[0].mode == "distributed"


def test_forced_distributed_falls_back_to_duplicated_for_a_short_side_split():
    records = [
        [
            piece("short_split", (64, 1024), shard_dim=0, num_shards=2, shard_index=rank),
            piece("long_split", (64, 1024), shard_dim=1, num_shards=2, shard_index=rank),
        ]
        for rank in range(2)
    ]
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="distributed", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    assert {m.key: m.mode for m in plan.matrices} == {
        "short_split": "duplicated",
        "long_split": "distributed",
    }


def test_forced_distributed_runs_unsharded_matrices_locally():
    records = replicated_records({"w": (32, 32)}, ranks=2)
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="distributed", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    assert plan.matrices[0].mode == "duplicated" and plan.matrices[0].gather == []


def test_default_cost_model_prefers_duplicated_for_small_and_owner_for_large_replicated_matrices():
    # Unsharded, on H holders, among many matrices: duplicated costs the Newton–Schulz time t; owner costs
    # (t + (H−1)·s)/H with s the time to move the matrix once (the owner's sends; the bin packing spreads owners),
    # unless that one job outlasts the group's duplicated work (16·t).
    # Owner wins exactly when t > s, i.e. for a square n × n matrix when 30·n³ / 4e14 FLOP/s > 4·n² B / 1e11 B/s,
    # n > 533.
    model = CostModel()
    holders, many = 4, 16
    for n in (32, 64, 256, 512, 640, 1024, 4096):
        compute = newton_schulz_flops(n, n, NS_STEPS) / model.flops_per_s
        transfer = n * n * model.bytes_per_element / model.bytes_per_s
        costs = model.mode_costs((n, n), 1, holders, False, NS_STEPS, group_duplicated_s=many * compute)
        assert costs["duplicated"] == pytest.approx(compute)
        job = compute + (holders - 1) * transfer
        assert costs["owner"] == pytest.approx(job / holders if job <= many * compute else job)
        assert "distributed" not in costs  # an unsharded matrix has no shards to iterate on
        records = replicated_records({f"w{i:02d}": (n, n) for i in range(many)}, ranks=holders)
        plan = build_muon_plan(records, MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS), cost_model=model)
        assert {m.mode for m in plan.matrices} == {"owner" if compute > transfer else "duplicated"}, n


def test_one_owner_job_longer_than_the_groups_duplicated_work_sets_the_step():
    # A single replicated matrix: its owner computes it and sends it to H − 1 holders, more than any holder spends
    # computing it itself, so duplicated wins whatever its size.
    model = CostModel()
    for n in (512, 4096):
        plan = build_muon_plan(
            replicated_records({"w": (n, n)}, 4), MuonPlanSettings(ns_steps=NS_STEPS), cost_model=model
        )
        assert plan.matrices[0].mode == "duplicated", n
        compute = newton_schulz_flops(n, n, NS_STEPS) / model.flops_per_s
        transfer = n * n * model.bytes_per_element / model.bytes_per_s
        assert model.mode_costs((n, n), 1, 4, False, NS_STEPS)["owner"] == pytest.approx(
            compute + 3 * transfer
        )


@pytest.mark.parametrize(("replicas", "expected"), [(2, "owner"), (256, "duplicated")])
def test_owner_fan_out_to_every_replica_is_charged_to_the_owner(replicas, expected):
    # 24 TP2-split matrices on 2 × R holders (R DP replicas): an owner receives the other half and sends a half to
    # each of the 2R − 1 other holders. At R = 2 the owners' jobs are short and spread; at R = 256 one owner sends
    # 511 halves (~23 GB), longer than every holder running all 24 matrices itself.
    model = CostModel(flops_per_s=6e14, bytes_per_s=4e10, latency_s=0.0)
    shape, count = (11264, 2048), 24
    holders = 2 * replicas
    half = shape[0] * shape[1] * model.bytes_per_element / 2 / model.bytes_per_s
    compute = newton_schulz_flops(*shape, NS_STEPS) / model.flops_per_s
    job = half + compute + (holders - 1) * half
    group = count * (compute + half)
    costs = model.mode_costs(shape, 2, holders, False, NS_STEPS, group_duplicated_s=group)
    assert costs["owner"] == pytest.approx(job / holders if job <= group else job)
    records = [
        [piece(f"w{i:02d}", shape, shard_dim=1, num_shards=2, shard_index=rank % 2) for i in range(count)]
        for rank in range(holders)
    ]
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS), cost_model=model)
    assert {m.mode for m in plan.matrices} == {expected}


def test_without_a_cost_model_the_plan_uses_this_machines_numbers():
    machine = CostModel.for_this_machine()
    for n in (32, 64, 256, 1024):
        records = replicated_records({"w": (n, n)}, ranks=4)
        default = (
            build_muon_plan(records, MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS)).matrices[0].mode
        )
        explicit = (
            build_muon_plan(records, MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS), cost_model=machine)
            .matrices[0]
            .mode
        )
        assert default == explicit, n


def test_a_matrix_with_one_holder_is_local_work_under_auto():
    plan = build_muon_plan(
        [[piece("w", (4096, 4096))], []], MuonPlanSettings(tp_mode="auto", ns_steps=NS_STEPS)
    )
    assert plan.matrices[0].mode == "duplicated" and plan.matrices[0].computers == [0]
    assert plan.matrices[0].gather == [] and plan.matrices[0].scatter == []


# ---------------------------------------------------------------------------------------------------------
# Experts


@pytest.mark.parametrize("mode", ["auto", "owner", "duplicated"])
def test_uneven_expert_counts_each_expert_owned_by_its_holder(mode):
    def expert(e):
        return piece(f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight", (64, 32))

    records = [[expert(0), expert(1), expert(2)], [expert(3)]]
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode=mode, ns_steps=NS_STEPS))
    assert_valid(plan, records)
    for matrix in plan.matrices:
        holder = 1 if matrix.key.endswith(".3.linear_fc1.weight") else 0
        assert matrix.computers == [holder], matrix.key
        assert matrix.gather == [] and matrix.scatter == [], matrix.key
    # aspect 2 > 1.5: build_muon_plan's default auto picks Gram
    cost = ns_algorithm_flops(64, 32, NS_STEPS, "gram")
    assert plan.loads == {0: 3 * cost, 1: cost}


def test_experts_replicated_over_data_parallel_ranks_are_owned_by_one_of_their_holders():
    # EP = 2 × DP = 2: ranks 0 and 2 hold experts 0..2, ranks 1 and 3 hold expert 3.
    def expert(e):
        return piece(f"experts.{e}", (64, 32))

    records = [[expert(0), expert(1), expert(2)], [expert(3)], [expert(0), expert(1), expert(2)], [expert(3)]]
    plan = build_muon_plan(records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS))
    assert_valid(plan, records)
    owners = {m.key: m.computers[0] for m in plan.matrices}
    assert owners["experts.3"] in (1, 3)
    assert {owners[f"experts.{e}"] for e in range(3)} == {0, 2}  # the three spread over both holders


def moe_layers_records(layers: int, experts: int, ranks: int) -> list[list[PieceRecord]]:
    """``ranks`` data-parallel replicas of ``layers`` layers, each an attention projection and ``experts`` experts
    of two shapes (fc1 wide, fc2 tall): three shape classes repeated in every layer."""
    mine = []
    for layer in range(layers):
        prefix = f"decoder.layers.{layer}"
        mine.append(piece(f"{prefix}.self_attention.linear_proj.weight", (64, 64)))
        for e in range(experts):
            mine.append(piece(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc1.weight", (32, 64)))
            mine.append(piece(f"{prefix}.mlp.experts.local_experts.{e}.linear_fc2.weight", (64, 32)))
    return [list(mine) for _ in range(ranks)]


@pytest.mark.parametrize("num_buckets", [2, 4])
def test_same_shape_matrices_of_every_layer_share_a_bucket_except_where_a_boundary_cuts_their_class(
    num_buckets,
):
    records = moe_layers_records(layers=4, experts=4, ranks=2)
    plan = build_muon_plan(
        records, MuonPlanSettings(tp_mode="owner", ns_steps=NS_STEPS, num_buckets=num_buckets)
    )
    assert_valid(plan, records)
    # What the step batches on a rank: one Newton–Schulz call per (bucket, shape, algorithm) it computes.
    for rank in range(2):
        classes = {(m.shape, m.ns_algorithm) for m in plan.matrices if rank in m.computers}
        calls = {(m.bucket, m.shape, m.ns_algorithm) for m in plan.matrices if rank in m.computers}
        assert len(calls) <= len(classes) + num_buckets - 1, sorted(calls)
    # Every bucket is used, and buckets still carry about equal Newton–Schulz work (within one matrix).
    per_bucket = [sum(m.cost_flops for m in plan.matrices if m.bucket == b) for b in range(num_buckets)]
    largest = max(m.cost_flops for m in plan.matrices)
    assert max(per_bucket) - min(per_bucket) <= 2 * largest, per_bucket


def test_a_one_process_grid_runs_a_single_bucket():
    from megatron_muon.optim.layout import whole_tensor_pieces
    from megatron_muon.optim.options import MuonPlanSettings
    from megatron_muon.optim.placement import MatrixPlacement

    pieces = [p for e in range(8) for p in whole_tensor_pieces(f"expert{e}", torch.zeros(32, 64))]
    placement = MatrixPlacement(pieces, MuonPlanSettings(num_buckets=4))
    assert {m.bucket for m in placement.plan.matrices} == {0}
    assert len(placement.transport.buckets) == 1


# ---------------------------------------------------------------------------------------------------------
# Agreement and errors


def test_fingerprint_is_the_same_for_records_built_twice():
    first = build_muon_plan(tp2_dp2_records(), MuonPlanSettings(ns_steps=NS_STEPS)).fingerprint()
    second = build_muon_plan(tp2_dp2_records(), MuonPlanSettings(ns_steps=NS_STEPS)).fingerprint()
    assert first == second


def _extra_matrix_on_rank_3(records):
    records[3].append(piece("extra", (32, 32)))


def _shards_swapped_on_ranks_0_and_1(records):
    for rank in (0, 1):
        records[rank] = [
            piece(r.key, r.shape, shard_dim=r.shard_dim, num_shards=2, shard_index=1 - r.shard_index)
            if r.num_shards == 2
            else r
            for r in records[rank]
        ]


@pytest.mark.parametrize("change", [_extra_matrix_on_rank_3, _shards_swapped_on_ranks_0_and_1])
def test_fingerprint_differs_when_one_rank_announces_different_pieces(change):
    records = tp2_dp2_records()
    changed = tp2_dp2_records()
    change(changed)
    assert (
        build_muon_plan(records, MuonPlanSettings(tp_mode="owner")).fingerprint()
        != build_muon_plan(changed, MuonPlanSettings(tp_mode="owner")).fingerprint()
    )


def test_fingerprint_differs_when_a_matrix_has_another_shape():
    # A matrix only rank 1 holds is announced (64, 32) in one run and (32, 64) in the other. Nothing moves for it
    # either way, but the plans differ (the placement sizes its buffers from the shapes), so must the fingerprints.
    records, changed = tp2_dp2_records(), tp2_dp2_records()
    records[1].append(piece("expert", (64, 32)))
    changed[1].append(piece("expert", (32, 64)))
    assert (
        build_muon_plan(records, MuonPlanSettings(tp_mode="owner")).fingerprint()
        != build_muon_plan(changed, MuonPlanSettings(tp_mode="owner")).fingerprint()
    )


def test_ranks_disagreeing_about_a_matrix_shape_raise_naming_the_key():
    records = [
        [piece("layers.3.linear_qkv.weight", (96, 32))],
        [piece("layers.3.linear_qkv.weight", (32, 96))],
    ]
    with pytest.raises(RuntimeError, match=r"layers\.3\.linear_qkv\.weight"):
        build_muon_plan(records, MuonPlanSettings(ns_steps=NS_STEPS))


def test_ranks_disagreeing_about_the_number_of_shards_raise_naming_the_key():
    records = [
        [piece("w", (96, 32), num_shards=2, shard_index=0)],
        [piece("w", (96, 32), num_shards=4, shard_index=1)],
    ]
    with pytest.raises(RuntimeError, match="'w'"):
        build_muon_plan(records, MuonPlanSettings(ns_steps=NS_STEPS))


def test_a_shard_no_rank_holds_raises():
    records = [
        [piece("w", (96, 32), num_shards=2, shard_index=0)],
        [piece("w", (96, 32), num_shards=2, shard_index=0)],
    ]
    with pytest.raises(RuntimeError, match=r"'w'.*shard\(s\) \[1\]"):
        build_muon_plan(records, MuonPlanSettings(ns_steps=NS_STEPS))


def test_without_replicated_state_no_sharded_matrix_is_duplicated():
    """The distributed optimizer's plan (``replicate_state=False``): with links so slow that ``auto`` duplicates
    everything otherwise, a TP-sharded matrix goes to one owner (or runs on its shards) and only a whole matrix both
    TP ranks hold (a router) stays duplicated; ``duplicated`` itself is refused."""
    records = [
        [piece("layer.fc1", (512, 256), shard_dim=0, num_shards=2, shard_index=0), piece("router", (8, 256))],
        [piece("layer.fc1", (512, 256), shard_dim=0, num_shards=2, shard_index=1), piece("router", (8, 256))],
    ]
    slow_links = CostModel(flops_per_s=1e15, bytes_per_s=1.0, latency_s=1.0)
    replicated = {m.key: m.mode for m in build_muon_plan(records, cost_model=slow_links).matrices}
    assert replicated == {"layer.fc1": "duplicated", "router": "duplicated"}
    once = {
        m.key: m.mode
        for m in build_muon_plan(
            records, MuonPlanSettings(replicate_state=False), cost_model=slow_links
        ).matrices
    }
    assert once["router"] == "duplicated" and once["layer.fc1"] in ("owner", "distributed"), once
    fast_links = CostModel(flops_per_s=1.0, bytes_per_s=1e15, latency_s=0.0)  # owner would be cheapest
    assert {m.key: m.mode for m in build_muon_plan(records, cost_model=fast_links).matrices}[
        "router"
    ] == "owner"
    fast = build_muon_plan(records, MuonPlanSettings(replicate_state=False), cost_model=fast_links)
    assert {m.key: m.mode for m in fast.matrices}["router"] == "duplicated"  # whole, TP-replicated: no bytes
    fallback = build_muon_plan(records, MuonPlanSettings(tp_mode="distributed", replicate_state=False))
    assert {m.key: m.mode for m in fallback.matrices}["router"] == "duplicated"
    with pytest.raises(ValueError, match="tp_mode='duplicated' keeps every holder's momentum"):
        build_muon_plan(records, MuonPlanSettings(tp_mode="duplicated", replicate_state=False))


def test_momentum_with_shards_marks_owner_matrices_whose_shards_have_one_holder_each():
    tp_group = [
        [piece("layer.fc1", (512, 256), shard_dim=0, num_shards=2, shard_index=0), piece("router", (8, 256))],
        [piece("layer.fc1", (512, 256), shard_dim=0, num_shards=2, shard_index=1), piece("router", (8, 256))],
    ]
    plan = build_muon_plan(
        tp_group, MuonPlanSettings(tp_mode="owner", replicate_state=False, momentum_with_shards=True)
    )
    assert {m.key: m.momentum_with_shards for m in plan.matrices} == {"layer.fc1": True, "router": False}
    assert not any(
        m.momentum_with_shards for m in build_muon_plan(tp_group, MuonPlanSettings(tp_mode="owner")).matrices
    )
    # Two data-parallel replicas hold every shard.
    replicas = tp_group + [list(tp_group[0]), list(tp_group[1])]
    plan = build_muon_plan(replicas, MuonPlanSettings(tp_mode="owner", momentum_with_shards=True))
    assert not any(m.momentum_with_shards for m in plan.matrices)  # a shard held twice: momentum stays whole
