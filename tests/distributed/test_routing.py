"""Muon vs AdamW routing on a real megatron MoE GPTModel, and the optimizer builder's param groups."""

from __future__ import annotations

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow


def _route_on_rank(router: str):
    from megatron_muon.optim.options import MuonConfig
    from megatron_muon.optim.param_groups import route_parameters
    from megatron_muon.testing.small_model import build_small_model

    small = build_small_model(seed=0)
    chunks = small.chunks
    routing = route_parameters(chunks, router=router)
    optimizer = small.build_optimizer(
        MuonConfig(router=router, lr=0.02, weight_decay=0.05), small.adam_config(lr=1e-3)
    )
    names = {id(p): n for n, p in chunks[0].named_parameters()}
    groups = []
    for member in optimizer.chained_optimizers:
        kind = "muon" if hasattr(member.optimizer, "placement") else "adamw"
        for group in member.optimizer.param_groups:
            groups.append(
                (kind, [names[id(p)] for p in group["params"]], group.get("max_lr"), group.get("start_wd"))
            )
    return (
        [r.name for r in routing.muon],
        [r.name for r in routing.adamw],
        sorted(names.values()),
        groups,
        routing.summary(),
    )


@pytest.mark.parametrize("router", ["adamw", "muon"])
def test_every_parameter_lands_in_exactly_one_group(router):
    (result,) = run_distributed(_route_on_rank, 1, args=(router,))
    muon, adamw, all_names, groups, summary = result
    assert sorted(muon + adamw) == all_names
    assert not set(muon) & set(adamw)
    grouped = [name for _, params, _, _ in groups for name in params]
    assert sorted(grouped) == all_names, "each parameter appears in exactly one optimizer param group"

    for name in adamw:
        assert not any(
            name.endswith(f"{linear}.weight") for linear in ("linear_qkv", "linear_proj", "linear_fc2")
        )
    for name in all_names:
        if "embedding" in name or "output_layer" in name or "norm" in name:
            assert name in adamw, f"{name} must go to AdamW"
        if name.endswith(
            ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")
        ):
            assert name in muon, f"{name} must go to Muon"
        if name.endswith("router.weight"):
            assert (name in muon) == (router == "muon"), f"{name} with router={router}"
    assert any("local_experts" in name for name in muon), "expert weights go to Muon"

    for kind, params, max_lr, start_wd in groups:
        if kind == "muon" and params:
            assert max_lr == 0.02 and start_wd == 0.05, "Muon groups carry the Muon LR and weight decay"
        if kind == "adamw" and params:
            assert max_lr == 1e-3
    assert summary.startswith("Muon: ") and "AdamW: " in summary
