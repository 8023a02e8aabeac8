"""MuonClip's QK-clip on multi-head latent attention (Kimi K2's rule): a head with a planted large logit (its
non-rotary query and key rows scaled up) is brought to τ by one step — its q_C and k_C rows scaled by √γ, its
rotary query rows q_R by γ — while the shared rotary key (``linear_kv_down_proj``), the values and every other
head keep their weights bit for bit; TP1 and TP2 clip the same way."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.testing.planted_logit import PlantedHead, run_planted

pytestmark = pytest.mark.slow

PLANTED_LAYER = 2  # global, 1-based
PLANT = 8.0  # head 0's q_C and k_C rows are multiplied by this: the non-rotary part of its logits by 64
THRESHOLD = 0.5  # the canonical weights' logits are ~0.04; the planted head's ~1.4 (compressed q) to ~5
QK, ROPE, V = 16, 8, 12
MLA = dict(
    num_layers=2,
    moe_layer_freq=[0, 1],
    multi_latent_attention=True,
    kv_lora_rank=32,
    qk_head_dim=QK,
    qk_pos_emb_head_dim=ROPE,
    v_head_dim=V,
    qk_layernorm=True,  # the latent norms sit before the up projections: the clip still acts
)


def _is_attention(module) -> bool:
    return hasattr(module, "linear_kv_up_proj")


def _query(attention):
    return attention.linear_q_proj if attention.config.q_lora_rank is None else attention.linear_q_up_proj


def _plant(attention) -> None:
    """Head 0's q_C and k_C rows (per head: [q_C; q_R] query rows and [k_C; v] kv_up rows)."""
    _query(attention).weight[:QK] *= PLANT
    attention.linear_kv_up_proj.weight[:QK] *= PLANT


def _attention_weights(attention) -> dict[str, torch.Tensor]:
    return {
        "q": _query(attention).weight.detach().clone(),
        "kv_up": attention.linear_kv_up_proj.weight.detach().clone(),
        "kv_down": attention.linear_kv_down_proj.weight.detach().clone(),
    }


HEAD = PlantedHead(
    is_attention=_is_attention,
    plant=_plant,
    weights=_attention_weights,
    threshold=THRESHOLD,
    planted_layer=PLANTED_LAYER,
)

LAYOUTS = {  # name: (tp, model); one process group per TP size, its variants run in turn
    "tp1_direct_q": (1, MLA | dict(q_lora_rank=None)),
    "tp2_direct_q": (2, MLA | dict(q_lora_rank=None)),
    "tp2_compressed_q": (2, MLA | dict(q_lora_rank=16)),
}


@pytest.fixture(scope="module")
def runs():
    return run_planted(LAYOUTS, HEAD)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_planted_mla_head_is_clipped_by_k2s_rule_and_nothing_else_changes(name, runs):
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

    after = clipped["after"][PLANTED_LAYER]
    assert THRESHOLD * 0.99 <= after[0] <= THRESHOLD * 1.001, after.tolist()
    assert plain["after"][PLANTED_LAYER][0] > 2 * THRESHOLD  # without the clip it stays

    gamma = THRESHOLD / float(before[0])
    for layer, weights in clipped["weights"].items():
        reference = plain["weights"][layer]
        assert torch.equal(weights["kv_down"], reference["kv_down"]), "the shared rotary key must not change"
        if layer != PLANTED_LAYER:
            assert all(torch.equal(weights[w], reference[w]) for w in weights), f"layer {layer} changed"
            continue
        q, q_ref = weights["q"], reference["q"]
        kv, kv_ref = weights["kv_up"], reference["kv_up"]
        assert torch.equal(q[QK + ROPE :], q_ref[QK + ROPE :]) and torch.equal(kv[QK + V :], kv_ref[QK + V :])
        torch.testing.assert_close(q[:QK], q_ref[:QK] * gamma**0.5, rtol=1e-4, atol=1e-7)  # q_C: √γ
        torch.testing.assert_close(
            q[QK : QK + ROPE], q_ref[QK : QK + ROPE] * gamma, rtol=1e-4, atol=1e-7
        )  # q_R
        torch.testing.assert_close(kv[:QK], kv_ref[:QK] * gamma**0.5, rtol=1e-4, atol=1e-7)  # k_C: √γ
        assert torch.equal(kv[QK : QK + V], kv_ref[QK : QK + V])  # head 0's values


def test_tp1_and_tp2_clip_mla_the_same_way(runs):
    one, two = runs["tp1_direct_q", "clipped"], runs["tp2_direct_q", "clipped"]
    for layer in one["weights"]:
        for w in one["weights"][layer]:
            torch.testing.assert_close(
                one["weights"][layer][w], two["weights"][layer][w], rtol=1e-5, atol=1e-7
            )
        torch.testing.assert_close(one["after"][layer], two["after"][layer], rtol=1e-4, atol=1e-6)
