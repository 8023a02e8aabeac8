"""Parameter counts of the megatron GPTModel a :class:`~megatron_muon.config.schema.ModelConfig` describes,
layer by layer as megatron-core builds it (checked against ``sum(p.numel())`` of real models), for the configs'
arithmetic, dry runs and MFU."""

from __future__ import annotations

from megatron_muon.config.schema import ModelConfig


def _norm_parameters(model: ModelConfig, size: int) -> int:
    return size * (2 if model.normalization == "LayerNorm" else 1)  # LayerNorm has a bias


def _attention_parameters(model: ModelConfig) -> int:
    h, heads = model.hidden_size, model.num_attention_heads
    count = _norm_parameters(model, h)  # input_layernorm (fused into linear_qkv with Transformer Engine)
    if model.multi_latent_attention:
        # megatron-core transformer/multi_latent_attention.py, MLASelfAttention.
        q_head_dim = model.qk_head_dim + model.qk_pos_emb_head_dim
        if model.q_lora_rank is None:
            count += h * heads * q_head_dim  # linear_q_proj
            if model.qk_layernorm and model.transformer_impl == "transformer_engine":
                # megatron's MLA norm resolver fuses a norm (on the layer input) into TE's linear_q_proj; the
                # local spec (models/mla_attention.py) has no query latent to normalize and adds none.
                count += _norm_parameters(model, h)
        else:
            count += h * model.q_lora_rank + model.q_lora_rank * heads * q_head_dim  # q down / up
            count += _norm_parameters(model, model.q_lora_rank) if model.qk_layernorm else 0
        count += h * (model.kv_lora_rank + model.qk_pos_emb_head_dim)  # linear_kv_down_proj
        count += model.kv_lora_rank * heads * (model.qk_head_dim + model.v_head_dim)  # linear_kv_up_proj
        count += _norm_parameters(model, model.kv_lora_rank) if model.qk_layernorm else 0
        return count + heads * model.v_head_dim * h  # linear_proj
    d = model.head_dim
    count += h * (heads + 2 * model.query_groups) * d  # linear_qkv
    count += 2 * _norm_parameters(model, d) if model.qk_layernorm else 0  # q_layernorm, k_layernorm
    return count + heads * d * h  # linear_proj


def count_parameters(model: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of the megatron GPTModel ``model`` describes.

    ``active`` is what one token passes through: everything but the routed experts, plus ``moe_router_topk``
    experts per MoE layer. Both include the input embedding and (when untied) the output layer. SwiGLU MLPs
    (fc1 holds gate and up: 3·hidden·ffn weights), no linear biases; the expert bias of aux-loss-free routing is
    a buffer, not a parameter.
    """
    h = model.hidden_size
    attention = _attention_parameters(model)
    dense_mlp = _norm_parameters(model, h) + 3 * h * model.ffn_hidden_size
    expert = 3 * h * model.moe_ffn_hidden_size
    moe_common = (
        _norm_parameters(model, h)  # pre_mlp_layernorm
        + model.num_moe_experts * h  # router weight
        + 3 * h * model.moe_shared_expert_intermediate_size  # shared experts, one SwiGLU MLP
    )
    total = active = 0
    for is_moe in model.moe_layer_pattern():
        if is_moe:
            total += attention + moe_common + model.num_moe_experts * expert
            active += attention + moe_common + model.moe_router_topk * expert
        else:
            total += attention + dense_mlp
            active += attention + dense_mlp
    embeddings = model.vocab_size * h * (1 if model.share_embeddings_and_output_weights else 2)
    embeddings += _norm_parameters(model, h)  # final_layernorm
    return total + embeddings, active + embeddings
