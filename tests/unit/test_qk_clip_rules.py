"""QK-clip's factors (Kimi K2, our GQA rule) and the per-head maximum logit the recording hook computes."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.ops.qk_clip import gqa_clip_factors, mla_clip_factors
from megatron_muon.optim.qk_clip import max_attention_logits


def test_gqa_rule_clips_every_head_to_tau_and_leaves_groups_under_tau_alone():
    logits = torch.tensor([400.0, 50.0, 90.0, 80.0])  # groups (0, 1) and (2, 3)
    q, k = gqa_clip_factors(logits, num_query_groups=2, threshold=100.0, alpha=0.5)
    torch.testing.assert_close(q, torch.tensor([0.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(k, torch.tensor([0.5, 1.0]))  # the group's most restrictive γ = 1/4
    new_bound = logits * q * k.repeat_interleave(2)
    assert (new_bound <= 100.0 + 1e-4).all() and new_bound[0] == pytest.approx(100.0)
    assert torch.equal(q[2:], torch.ones(2)) and k[1] == 1.0


def test_mha_alpha_splits_the_exponent_and_mla_leaves_the_shared_rotary_key():
    q, k = gqa_clip_factors(torch.tensor([200.0, 10.0]), num_query_groups=2, threshold=100.0, alpha=0.25)
    torch.testing.assert_close(q * k, torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(q[0], torch.tensor(0.5**0.25))
    q_c, q_r, k_c = mla_clip_factors(torch.tensor([400.0, 10.0]), threshold=100.0)
    torch.testing.assert_close(q_c * k_c, torch.tensor([0.25, 1.0]))  # compressed part: γ overall
    torch.testing.assert_close(q_r, torch.tensor([0.25, 1.0]))  # rotary query: γ (the rotary key is shared)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="alpha=1.5"):
        gqa_clip_factors(torch.ones(4), 2, 100.0, alpha=1.5)
    with pytest.raises(ValueError, match="num_query_groups=3"):
        gqa_clip_factors(torch.ones(4), 3, 100.0)
    with pytest.raises(ValueError, match="non-finite"):
        gqa_clip_factors(torch.tensor([float("nan"), 1.0]), 2, 100.0)


def test_max_logit_matches_a_brute_force_loop_with_gqa_and_the_causal_mask():
    torch.manual_seed(0)
    sq, b, heads, groups, d = 5, 2, 4, 2, 3
    query, key = torch.randn(sq, b, heads, d), torch.randn(sq, b, groups, d)
    expected = torch.full((heads,), float("-inf"))
    for h in range(heads):
        for batch in range(b):
            for i in range(sq):
                for j in range(i + 1):  # causal: position i sees 0..i
                    s = 0.5 * float(query[i, batch, h] @ key[j, batch, h // (heads // groups)])
                    expected[h] = max(expected[h], s)
    mask = torch.ones(sq, sq, dtype=torch.bool).triu(1).view(1, 1, sq, sq)
    torch.testing.assert_close(max_attention_logits(query, key, 0.5, mask, causal=False), expected)
    torch.testing.assert_close(max_attention_logits(query, key, 0.5, None, causal=True), expected)


def test_config_refuses_qk_clip_with_qk_layernorm_and_a_bad_threshold():
    from megatron_muon.config import ConfigError, load_config, validate

    def check(*overrides):
        validate(load_config("launch/configs/tiny_cpu.yaml", list(overrides)), world_size=4)

    check("optimizer.qk_clip.enabled=true")
    with pytest.raises(ConfigError, match="qk_layernorm=true") as error:
        check("optimizer.qk_clip.enabled=true", "model.qk_layernorm=true")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"optimizer.qk_clip.threshold=-1.0 must be > 0"):
        check("optimizer.qk_clip.threshold=-1")
