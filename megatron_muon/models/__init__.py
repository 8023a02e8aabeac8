"""MoE GPT models built from megatron-core specs."""

from megatron_muon.models.tiny import (
    TinyMoEConfig,
    build_gpt_moe_model,
    build_gpt_moe_model_chunks,
    build_transformer_config,
    causal_attention_mask,
)

__all__ = [
    "TinyMoEConfig",
    "build_gpt_moe_model",
    "build_gpt_moe_model_chunks",
    "build_transformer_config",
    "causal_attention_mask",
]
