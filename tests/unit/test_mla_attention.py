"""Our MLA core attention (models/mla_attention.py) against a plain softmax(scale · q·kᵀ + mask) · v written out
by hand: separate query/key and value head dims, the explicit mask, the causal mask type, the softmax scale,
dropout, and the inputs it refuses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_muon.models.mla_attention import MLACoreAttention, blocked_positions

HEADS, QK_DIM, V_DIM, SEQ, BATCH = 4, 12, 8, 6, 2
ONE_RANK = SimpleNamespace(tp=SimpleNamespace(size=lambda: 1))


def mla_config(**overrides) -> MLATransformerConfig:
    fields = dict(
        num_layers=1,
        hidden_size=32,
        num_attention_heads=HEADS,
        qk_head_dim=QK_DIM - 4,
        qk_pos_emb_head_dim=4,
        v_head_dim=V_DIM,
        kv_lora_rank=16,
        q_lora_rank=None,
        rope_type="rope",
        attention_dropout=0.0,
    )
    return MLATransformerConfig(**(fields | overrides))


def core_attention(config=None, **kwargs) -> MLACoreAttention:
    return MLACoreAttention(
        config or mla_config(),
        layer_number=1,
        attn_mask_type=kwargs.pop("attn_mask_type", AttnMaskType.causal),
        attention_type="self",
        k_channels=QK_DIM,
        v_channels=V_DIM,
        pg_collection=ONE_RANK,
        **kwargs,
    )


def inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(SEQ, BATCH, HEADS, QK_DIM, generator=generator)
    k = torch.randn(SEQ, BATCH, HEADS, QK_DIM, generator=generator)
    v = torch.randn(SEQ, BATCH, HEADS, V_DIM, generator=generator)
    return q, k, v


def by_hand(q, k, v, scale: float, blocked: torch.Tensor | None) -> torch.Tensor:
    """[sq, b, heads · dv] as megatron's DotProductAttention computes it (blocked positions get no weight)."""
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * scale
    if blocked is not None:
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = scores.softmax(dim=-1)
    context = torch.einsum("bhst,tbhd->sbhd", probs, v)
    return context.reshape(q.shape[0], q.shape[1], -1)


def causal(sq: int = SEQ, sk: int = SEQ) -> torch.Tensor:
    return torch.ones(sq, sk, dtype=torch.bool).triu(1).view(1, 1, sq, sk)


def test_separate_head_dims_with_the_explicit_causal_mask():
    q, k, v = inputs()
    out = core_attention()(q, k, v, causal())
    assert out.shape == (SEQ, BATCH, HEADS * V_DIM)
    torch.testing.assert_close(out, by_hand(q, k, v, 1 / math.sqrt(QK_DIM), causal()), rtol=1e-5, atol=1e-6)


def test_without_a_mask_the_causal_mask_type_masks_the_future_and_padding_masks_nothing():
    q, k, v = inputs(1)
    scale = 1 / math.sqrt(QK_DIM)
    torch.testing.assert_close(core_attention()(q, k, v, None), by_hand(q, k, v, scale, causal()))
    unmasked = core_attention(attn_mask_type=AttnMaskType.padding)(q, k, v, None)
    torch.testing.assert_close(unmasked, by_hand(q, k, v, scale, None))
    assert not torch.allclose(unmasked, by_hand(q, k, v, scale, causal()))
    # The mask type of the call overrides the module's, as megatron's attention passes it per call.
    torch.testing.assert_close(
        core_attention()(q, k, v, None, attn_mask_type=AttnMaskType.padding), by_hand(q, k, v, scale, None)
    )


def test_an_explicit_mask_is_used_as_given_and_padding_causal_adds_the_causal_one():
    q, k, v = inputs(2)
    scale = 1 / math.sqrt(QK_DIM)
    padding = torch.zeros(BATCH, 1, SEQ, SEQ, dtype=torch.bool)
    padding[1, :, :, 0] = True  # the second sequence's first key is padding
    torch.testing.assert_close(core_attention()(q, k, v, padding), by_hand(q, k, v, scale, padding))
    both = core_attention(attn_mask_type=AttnMaskType.padding_causal)(q, k, v, padding)
    # Query 0 of sequence 1 has no key left (its only one, key 0, is padding): finite, not NaN.
    assert torch.isfinite(both).all()
    expected = by_hand(q, k, v, scale, padding | causal())
    torch.testing.assert_close(both[1:], expected[1:])
    torch.testing.assert_close(both[0, 0], expected[0, 0])
    assert blocked_positions(None, AttnMaskType.no_mask, SEQ, SEQ, "cpu") is None


def test_the_softmax_scale_megatron_passes_is_used():
    q, k, v = inputs(3)
    scale = 0.37  # MLA passes mscale² / √(q head dim); with YaRN mscale != 1
    out = core_attention(softmax_scale=scale)(q, k, v, causal())
    torch.testing.assert_close(out, by_hand(q, k, v, scale, causal()))
    assert not torch.allclose(out, by_hand(q, k, v, 1 / math.sqrt(QK_DIM), causal()))


def test_dropout_acts_in_training_only():
    q, k, v = inputs(4)
    attention = core_attention(mla_config(attention_dropout=0.5))
    expected = by_hand(q, k, v, 1 / math.sqrt(QK_DIM), causal())
    attention.eval()
    torch.testing.assert_close(attention(q, k, v, causal()), expected)
    attention.train()
    # Sequence parallelism on: no RNG-tracker fork (as megatron's DotProductAttention), the default generator.
    attention.config.sequence_parallel = True
    torch.manual_seed(0)
    first = attention(q, k, v, causal())
    torch.manual_seed(0)
    again = attention(q, k, v, causal())
    torch.testing.assert_close(first, again)  # seeded: reproducible
    assert not torch.allclose(first, expected)


def test_unsupported_inputs_are_refused_in_one_line():
    q, k, v = inputs()
    attention = core_attention()
    with pytest.raises(ValueError, match="packed sequences"):
        attention(q, k, v, None, packed_seq_params=object())
    with pytest.raises(ValueError, match="attention bias"):
        attention(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match=r"v_channels=8"):
        attention(q, k, v[..., :5], None)
    with pytest.raises(ValueError, match="k_channels=12"):
        attention(q[..., :10], k[..., :10], v, None)
