"""The planner's figures with the distributed optimizer on follow docs/distributed_optimizer.md exactly: per rank
bf16 params (2 B) and fp32 grads (4 B) of every param, AdamW state 8/d, every logical Muon matrix's momentum stored
once in the grid, grads reduce-scattered (fp32, 4·P·(d−1)/d sent) and params all-gathered (bf16, 2·P·(d−1)/d);
off: grads all-reduced (8·P·(d−1)/d); with FSDP params and grads sharded too. The dry run itemizes memory for every
setting, marking the configured one."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_muon.config import load_config, validate
from megatron_muon.planning.report import plan_at_scale

ROOT = Path(__file__).resolve().parents[2]
MOE_1B = ROOT / "launch/configs/moe_1b_8gpu.yaml"


@pytest.fixture(scope="module")
def report():
    cfg = load_config(MOE_1B, [])
    dims = validate(cfg)
    return cfg, dims, plan_at_scale(cfg, dims, "h100", with_matrices=False)


def test_bytes_per_rank_and_per_step_follow_the_design(report):
    cfg, dims, figures = report
    assert cfg.model.precision == "bf16" and dims.pp == 1 and dims.cp == 1
    stage = figures["parameters_per_rank"]["stage0"]
    dense, expert, total = stage["dense"], stage["expert"], stage["total"]
    d, e = dims.dp * dims.cp, dims.expert_dp
    assert d > 1 and e > 1
    both_ways = dense * (d - 1) / d + expert * (e - 1) / e
    for mode, sync, factor in (
        ("ours", "DP all-reduce (grads)", 8),
        ("ours + distributed optimizer", "DP reduce-scatter (grads)", 4),
        ("megatron layer-wise", "DP reduce-scatter (grads)", 4),
    ):
        for row in figures["modes"][mode]["classes"]:
            assert row["grad_sync_bytes_sent"] == {sync: pytest.approx(factor * both_ways)}, mode
            memory = row["memory_bytes"]
            assert memory["params"] == 2 * total and memory["grads"] == 4 * total, mode
            if mode != "ours":
                assert row["bytes_sent"]["DP all-gather (params)"] == pytest.approx(2 * both_ways), mode
    # AdamW (everything but the Muon matrices; no routed expert is AdamW's here) on megatron's DistributedOptimizer.
    on = figures["modes"]["ours + distributed optimizer"]
    muon_per_rank = stage["muon"]
    adamw = total - muon_per_rank
    for row in on["classes"]:
        assert row["memory_bytes"]["adamw_state"] == pytest.approx(8 * adamw / d)
    # Every logical Muon matrix's momentum is stored once in the TP×DP grid: the per-rank state sums to the whole.
    report_off = figures["modes"]["ours"]
    assert sum(report_off["muon_state_bytes"]) > sum(on["muon_state_bytes"])
    dense_muon = muon_per_rank - expert  # every routed-expert param is a Muon matrix
    logical = dense_muon * dims.tp + expert * dims.ep * dims.etp
    assert sum(on["muon_state_bytes"]) == pytest.approx(4 * logical)


@pytest.mark.parametrize("configured", ["off", "on", "fsdp"])
def test_dry_run_itemizes_memory_for_every_setting(configured):
    from megatron_muon.pretrain import _dry_run

    overrides = {
        "off": [],
        "on": ["optimizer.distributed_optimizer=true"],
        "fsdp": ["parallel.fsdp=true"],
    }[configured]
    cfg = load_config(MOE_1B, overrides)
    text = _dry_run(cfg, validate(cfg))
    lines = {
        name: next(line for line in text.splitlines() if line.startswith(prefix))
        for name, prefix in (
            ("off", "  distributed_optimizer off"),
            ("on", "  distributed_optimizer on"),
            ("fsdp", "  parallel.fsdp on"),
        )
    }
    for line in lines.values():
        assert "params" in line and "grads" in line and "masters" in line and "Muon momentum" in line
    assert [name for name, line in lines.items() if "(configured)" in line] == [configured]


def test_fsdp_shards_params_grads_and_state_and_keeps_every_momentum_once(report):
    """``parallel.fsdp``: fp32 parameter and gradient shards (4 + 4 B per parameter / d) plus about two layers held
    whole for compute, no separate masters, AdamW state 8/d, each Muon matrix's momentum once in the grid (its
    rows with their holders), the gradients reduce-scattered and the parameters all-gathered twice in the passes."""
    cfg, dims, figures = report
    stage = figures["parameters_per_rank"]["stage0"]
    dense, expert, total = stage["dense"], stage["expert"], stage["total"]
    d, e = dims.dp * dims.cp, dims.expert_dp
    fsdp = figures["modes"]["ours + FSDP"]
    sharded = dense / d + expert / e
    whole_layers = 2 * total / (cfg.model.num_layers // dims.pp)
    for row in fsdp["classes"]:
        memory = row["memory_bytes"]
        assert memory["params"] == pytest.approx(4 * sharded + 2 * whole_layers)
        assert memory["grads"] == pytest.approx(4 * sharded + 4 * whole_layers)
        assert memory["master"] == 0
        assert memory["adamw_state"] == pytest.approx(8 * ((dense - (stage["muon"] - expert)) / d))
        both_ways = dense * (d - 1) / d + expert * (e - 1) / e
        assert row["grad_sync_bytes_sent"] == {
            "DP reduce-scatter (grads)": pytest.approx(4 * both_ways),
            "FSDP all-gather (params, forward + backward)": pytest.approx(2 * 2 * both_ways),
        }
    logical = (stage["muon"] - expert) * dims.tp + expert * dims.ep * dims.etp
    assert sum(fsdp["muon_state_bytes"]) == pytest.approx(4 * logical)
    layer_wise = figures["modes"]["megatron layer-wise"]["memory_max_bytes"]
    assert fsdp["memory_max_bytes"] < layer_wise


def test_momentum_stays_with_the_shards_each_rank_owns_as_the_built_optimizer_keeps_it(report):
    # optim/build.py builds the distributed optimizer's plan with momentum_with_shards (NorMuon off): each rank keeps
    # the momentum of exactly the Muon shards whose fp32 master it keeps, never a whole TP-split matrix on its owner.
    cfg, _, figures = report
    assert not cfg.optimizer.muon.normuon and cfg.model.precision == "bf16"
    rows = figures["modes"]["ours + distributed optimizer"]["classes"]
    for row in rows:
        memory = row["memory_bytes"]
        owned_muon_master = memory["master"] - memory["adamw_state"] / 2  # 4 B master vs 8 B AdamW state
        assert memory["muon_state"] == pytest.approx(owned_muon_master), row


@pytest.mark.parametrize("with_shards", [True, False])
def test_the_planner_counts_momentum_on_the_ranks_the_built_optimizer_keeps_it(with_shards):
    # One TP2 group of one DP index (the distributed optimizer's plan, replicated state off): two tall matrices split
    # along their short side (owner mode: distributed needs a long-side split) and one router held whole by both TP
    # ranks (duplicated).
    from megatron_muon.optim.options import MuonPlanSettings
    from megatron_muon.optim.plan import PieceRecord, build_muon_plan
    from megatron_muon.planning.cost import momentum_elements

    def record(key, shape, shard_index, num_shards=2):
        return PieceRecord(key, shape, 1, num_shards, shard_index, "tp")

    records = [
        [record("fc1", (256, 64), r), record("qkv", (192, 64), r), record("router", (8, 64), 0, 1)]
        for r in (0, 1)
    ]
    plan = build_muon_plan(
        records, MuonPlanSettings(tp_mode="auto", replicate_state=False, momentum_with_shards=with_shards)
    )
    kept = {m.key: (m.mode, momentum_elements(m)) for m in plan.matrices}
    assert kept["router"] == ("duplicated", {0: 8 * 64, 1: 8 * 64})
    for key, rows in (("fc1", 256), ("qkv", 192)):
        mode, elements = kept[key]
        assert mode == "owner", key
        if with_shards:  # Muon._momentum_input on each holder, of its own shard
            assert elements == {0: rows * 64 / 2, 1: rows * 64 / 2}, key
        else:  # NorMuon: the owner keeps the whole matrix
            (owner,) = plan.matrices[[m.key for m in plan.matrices].index(key)].computers
            assert elements == {owner: rows * 64}, key
