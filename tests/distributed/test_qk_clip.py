"""MuonClip's QK-clip on the tiny MoE GPT: a head with a planted large logit (scaled-up W_q and W_k rows) is
brought to at most τ by one step, heads under τ keep their weights bit for bit (except the key they share with a
clipped head under GQA), and TP1 and TP2 give the same result."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing.planted_logit import PlantedHead, run_planted

pytestmark = pytest.mark.slow

PLANTED_LAYER = 2  # global, 1-based
PLANT = 6.0  # the planted head's query and key rows are multiplied by this: its logits by 36
THRESHOLD = 1.0  # the canonical weights' logits are ~0.1; the planted head's ~3.3


def _is_attention(module) -> bool:
    return hasattr(module, "linear_qkv") and hasattr(module, "core_attention")


def _plant(attention) -> None:
    """Head 0's query rows and its group's key rows (megatron's qkv rows per group: the group's queries, then
    its key, then its value)."""
    heads = attention.num_attention_heads_per_partition
    groups = attention.num_query_groups_per_partition
    d = attention.hidden_size_per_attention_head
    per_group = heads // groups
    weight = attention.linear_qkv.weight
    weight[:d] *= PLANT
    weight[per_group * d : (per_group + 1) * d] *= PLANT


def _qkv_rows(attention) -> dict[str, torch.Tensor]:
    """This rank's qkv rows as ``[groups, rows per group, hidden]`` (TP ranks hold consecutive groups)."""
    weight = attention.linear_qkv.weight.detach().clone()
    return {"qkv": weight.view(attention.num_query_groups_per_partition, -1, weight.shape[-1])}


HEAD = PlantedHead(
    is_attention=_is_attention,
    plant=_plant,
    weights=_qkv_rows,
    threshold=THRESHOLD,
    planted_layer=PLANTED_LAYER,
)

LAYOUTS = {  # name: (tp, model); one process group per TP size, its variants run in turn
    "tp1_gqa": (1, dict(num_layers=2, moe_layer_freq=[0, 1], num_attention_heads=4, num_query_groups=2)),
    "tp2_gqa": (2, dict(num_layers=2, moe_layer_freq=[0, 1], num_attention_heads=4, num_query_groups=2)),
    "tp2_mha": (2, dict(num_layers=2, moe_layer_freq=[0, 1], num_attention_heads=4, num_query_groups=4)),
}


@pytest.fixture(scope="module")
def runs():
    return run_planted(LAYOUTS, HEAD)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planted_logit_is_clipped_and_other_heads_keep_their_weights(name, runs):
    clipped, plain = runs[name, "clipped"], runs[name, "plain"]
    before = plain["before"][PLANTED_LAYER]
    assert before[0] > 2 * THRESHOLD, f"the plant did not work: {before.tolist()}"
    others = [
        v
        for n, b in plain["before"].items()
        for h, v in enumerate(b.tolist())
        if (n, h) != (PLANTED_LAYER, 0)
    ]
    assert max(others) < THRESHOLD, f"a head other than the planted one is above τ: {others}"
    assert plain["per_layer"][PLANTED_LAYER] == pytest.approx(float(before[0]))

    # One step with QK-clip brings the planted head to τ (the step itself moves weights by ~1e-5).
    after = clipped["after"][PLANTED_LAYER]
    assert after[0] <= THRESHOLD * 1.001, after.tolist()
    assert after[0] >= THRESHOLD * 0.99, f"clipped far below τ: {after.tolist()}"
    assert plain["after"][PLANTED_LAYER][0] > 2 * THRESHOLD  # without the clip it stays

    model = LAYOUTS[name][1]
    per_group = model["num_attention_heads"] // model["num_query_groups"]
    for layer, rows in clipped["weights"].items():
        weights, reference = rows["qkv"], plain["weights"][layer]["qkv"]
        if layer != PLANTED_LAYER:
            assert torch.equal(weights, reference), f"layer {layer} changed although no head was above τ"
            continue
        d = weights.shape[1] // (per_group + 2)  # a group's rows: its queries, its key, its value
        # Groups without the planted head: bit-identical. Its own group: the planted head's query and the
        # shared key are scaled; the other query heads of the group (GQA) and the values are not.
        assert torch.equal(weights[1:], reference[1:])
        q0, k0 = slice(0, d), slice(per_group * d, (per_group + 1) * d)
        untouched = torch.cat([weights[0, d : per_group * d], weights[0, (per_group + 1) * d :]])
        assert torch.equal(
            untouched, torch.cat([reference[0, d : per_group * d], reference[0, (per_group + 1) * d :]])
        )
        gamma = THRESHOLD / float(before[0])
        torch.testing.assert_close(weights[0, q0], reference[0, q0] * gamma**0.5, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(weights[0, k0], reference[0, k0] * gamma**0.5, rtol=1e-4, atol=1e-7)


def test_tp1_and_tp2_clip_the_same_way(runs):
    one, two = runs["tp1_gqa", "clipped"], runs["tp2_gqa", "clipped"]
    for layer in one["weights"]:
        torch.testing.assert_close(
            one["weights"][layer]["qkv"], two["weights"][layer]["qkv"], rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(one["after"][layer], two["after"][layer], rtol=1e-4, atol=1e-6)
