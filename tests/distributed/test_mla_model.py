"""Multi-head latent attention built on megatron's local spec (our core attention, models/mla_attention.py): the
parameter count the configs state is the one megatron builds, and tensor parallelism does not change the model's
output or its gradients (TP-invariant initial weights, so TP1 and TP2 compute the same loss and gradients)."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.config import ModelConfig
from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

SHAPE = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    moe_ffn_hidden_size=32,
    num_attention_heads=4,
    num_query_groups=None,
    num_moe_experts=4,
    moe_layer_freq=[0, 1],
    first_k_dense_layers=1,
    moe_shared_expert_intermediate_size=64,
    vocab_size=256,
    seq_length=32,
    multi_latent_attention=True,
    kv_lora_rank=24,
    qk_head_dim=16,
    qk_pos_emb_head_dim=8,
    v_head_dim=12,
)
VARIANTS = {  # name: overrides of SHAPE
    "no_q_compression_kv_norm": dict(q_lora_rank=None, qk_layernorm=True),
    "q_compression_norms": dict(q_lora_rank=16, qk_layernorm=True),
    "q_compression_no_norms": dict(q_lora_rank=16, qk_layernorm=False),
}


def _build_and_forward(variants: dict, tp: int):
    """Per variant: (parameters this rank holds, loss of one fixed batch) with the model built from ModelConfig."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_muon.config.checks import check_model
    from megatron_muon.models.gpt_moe import (
        build_gpt_moe_model_chunks,
        build_transformer_config,
        causal_attention_mask,
    )

    pg = ProcessGroupCollection.use_mpu_process_groups()
    results = {}
    for name, overrides in variants.items():
        model = ModelConfig(**(SHAPE | overrides))
        check_model(model)
        config = build_transformer_config(model, tp=tp, pp=1, ep=1, etp=1)
        torch.manual_seed(1234)
        model_parallel_cuda_manual_seed(1234)
        (chunk,) = build_gpt_moe_model_chunks(model, config, pg)
        chunk.eval()
        tokens = torch.randint(
            0, model.vocab_size, (2, model.seq_length), generator=torch.Generator().manual_seed(5)
        )
        positions = torch.arange(model.seq_length).expand(2, -1)
        losses = chunk(tokens, positions, causal_attention_mask(model.seq_length), labels=tokens.roll(-1, 1))
        losses.float().sum().backward()
        names = {n.split("self_attention.")[-1] for n, _ in chunk.named_parameters() if "self_attention" in n}
        # Gradients of the column-parallel MLA projections (rows split over TP): comparable across TP sizes.
        grads = {
            n: p.grad.clone()
            for n, p in chunk.named_parameters()
            if "self_attention.linear_" in n and "linear_proj" not in n
        }
        results[name] = (
            sum(p.numel() for p in chunk.parameters()),
            float(losses.float().mean()),
            names,
            grads,
        )
    return results


def test_mla_parameter_counts_match_megatron_and_tp2_computes_the_same_loss():
    from megatron_muon.config.param_count import count_parameters

    (one,) = run_distributed(
        _build_and_forward, 1, tp=1, pp=1, ep=1, etp=1, args=(VARIANTS, 1), timeout_s=300
    )
    two = run_distributed(_build_and_forward, 2, tp=2, pp=1, ep=1, etp=1, args=(VARIANTS, 2), timeout_s=300)
    for name, overrides in VARIANTS.items():
        numel, loss, names, _ = one[name]
        assert count_parameters(ModelConfig(**(SHAPE | overrides)))[0] == numel, name
        compressed = overrides["q_lora_rank"] is not None
        assert ("linear_q_down_proj.weight" in names) == compressed and (
            "linear_q_proj.weight" in names
        ) != compressed
        assert ("kv_layernorm.weight" in names) == overrides["qk_layernorm"], names
        assert ("q_layernorm.weight" in names) == (compressed and overrides["qk_layernorm"]), names
        # TP2: every rank the same loss, equal to TP1's (weights are drawn whole, then sliced).
        assert all(rank[name][1] == two[0][name][1] for rank in two)
        assert two[0][name][1] == pytest.approx(loss, rel=1e-5), name
        # ... and the same gradients (the shared rotary key's included: models/mla_attention.py sums it over TP).
        for key, grad in one[name][3].items():
            tp2 = torch.cat([rank[name][3][key] for rank in two])
            torch.testing.assert_close(
                tp2, grad, rtol=1e-4, atol=1e-6, msg=lambda m, k=key, n=name: f"{n} {k}: {m}"
            )
    # The variants are different models (the norms and the query compression change the loss).
    assert len({round(one[name][1], 6) for name in VARIANTS}) == len(VARIANTS)
