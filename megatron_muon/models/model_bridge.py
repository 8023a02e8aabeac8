"""From the run config's :class:`~megatron_muon.config.schema.ModelConfig` to the model builder's own config,
refusing what the builder does not build (never silently replacing it)."""

from __future__ import annotations

from megatron_muon.config.errors import require
from megatron_muon.config.schema import ModelConfig
from megatron_muon.models.gpt_moe import GptMoeConfig


def gpt_moe_config(model: ModelConfig) -> GptMoeConfig:
    """The ``models.gpt_moe.GptMoeConfig`` of ``model``, for the local-spec builder; raises ``ConfigError`` for
    features that builder does not construct."""
    require(not model.fp8, f"model.fp8={model.fp8!r} is not supported by models.gpt_moe (local spec builder)")
    # What the local-spec builder hard-wires; anything else must fail rather than be silently replaced.
    fixed = {
        "normalization": (model.normalization, "RMSNorm"),
    }
    for name, (value, supported) in fixed.items():
        require(
            value == supported,
            f"model.{name}={value!r} is not supported by models.gpt_moe (local spec builder); it builds {supported!r}",
        )
    require(
        model.kv_channels in (None, model.hidden_size // model.num_attention_heads),
        f"model.kv_channels={model.kv_channels} is not supported by models.gpt_moe",
    )
    return GptMoeConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        num_moe_experts=model.num_moe_experts,
        moe_router_topk=model.moe_router_topk,
        moe_layer_freq=model.moe_layer_pattern(),
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        vocab_size=model.vocab_size,
        seq_length=model.seq_length,
        init_method_std=model.init_method_std,
        rotary_base=model.rotary_base,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        qk_layernorm=model.qk_layernorm,
        multi_latent_attention=model.multi_latent_attention,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        norm_epsilon=model.norm_epsilon,
        mup_base_hidden_size=model.mup_base_hidden_size,
        mup_base_head_dim=model.mup_base_head_dim,
        output_logit_multiplier=model.output_logit_multiplier,
        attention_scale_multiplier=model.attention_scale_multiplier,
        transformer_impl=model.transformer_impl,
    )
