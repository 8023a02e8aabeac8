"""The MoE GPT on megatron-core's ``GPTModel``, at every size (the tiny test models up to the 16 B configuration),
on the local spec (no Transformer Engine; CPU and tests) or Transformer Engine's.

It is built from the run config's :class:`~megatron_muon.config.schema.ModelConfig` itself (no copy of it):
:func:`build_transformer_config` turns it into megatron's own :class:`TransformerConfig` in named steps —
what this builder builds and whether the parallel sizes divide the shape (:func:`require_buildable`,
``_require_layout``), then the fields of the shape, attention, MoE, parallelism, numerics and muP, then the
precision — with settings that also run on CPU: every fusion off, no grouped GEMM, no linear biases, sequence
parallelism whenever TP > 1, per-token loss. The architecture is a modern MoE decoder: RMSNorm, SwiGLU, RoPE,
grouped-query or multi-latent attention, top-k routed experts with a load-balancing loss (switch, per sequence,
or none) and optionally the expert bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_muon import mup
from megatron_muon.config.errors import require
from megatron_muon.config.schema import ModelConfig
from megatron_muon.models.mla_attention import LocalMLASelfAttention, MLACoreAttention

__all__ = [
    "build_gpt_moe_model",
    "build_gpt_moe_model_chunks",
    "build_transformer_config",
    "causal_attention_mask",
    "require_buildable",
    "require_transformer_engine",
]


def require_buildable(model: ModelConfig) -> None:
    """Raise ``ConfigError`` (one line) for what this builder does not build, rather than silently building
    something else: FP8 GEMMs, LayerNorm, a head dim other than hidden_size / num_attention_heads."""
    require(not model.fp8, f"model.fp8={model.fp8!r} is not supported by models.gpt_moe (local spec builder)")
    require(
        model.normalization == "RMSNorm",
        f"model.normalization={model.normalization!r} is not supported by models.gpt_moe (local spec builder); "
        "it builds 'RMSNorm'",
    )
    require(
        model.kv_channels in (None, model.hidden_size // model.num_attention_heads),
        f"model.kv_channels={model.kv_channels} is not supported by models.gpt_moe",
    )


def require_transformer_engine(transformer_impl: str) -> None:
    """Raise a one-line ``ValueError`` unless ``transformer_impl`` is ``local``, or ``transformer_engine`` with
    CUDA and an importable Transformer Engine."""
    if transformer_impl == "local":
        return
    if transformer_impl != "transformer_engine":
        raise ValueError(f"transformer_impl={transformer_impl!r}; valid: ['local', 'transformer_engine']")
    if not torch.cuda.is_available():
        raise ValueError(
            "transformer_impl='transformer_engine' needs a CUDA GPU (torch.cuda.is_available() is False)"
        )
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as error:
        raise ValueError(
            f"transformer_impl='transformer_engine' needs Transformer Engine, which is not importable here ({error})"
        ) from None


def _require_divisible(numerator_name: str, numerator: int, denominator_name: str, denominator: int) -> None:
    if numerator % denominator != 0:
        raise ValueError(f"{denominator_name}={denominator} does not divide {numerator_name}={numerator}")


def build_transformer_config(
    model: ModelConfig,
    *,
    tp: int,
    pp: int,
    ep: int,
    etp: int | None = None,
    vpp: int | None = None,
    cp: int = 1,
    sequence_parallel: bool | None = None,
    use_cpu_initialization: bool = True,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` of ``model`` at the given parallel sizes, with CPU-friendly settings.

    ``etp=None`` means expert tensor parallelism equal to ``tp``; ``vpp`` is the number of virtual
    pipeline stages per pipeline rank (None: no interleaving); ``cp`` the context-parallel size (Transformer
    Engine attention only); ``sequence_parallel=None`` means on when ``tp > 1``. ``use_cpu_initialization``: True
    draws every weight on the CPU (the CPU path; TP-invariant initial weights), False lets megatron initialize on
    the current GPU (``megatron_muon.platform.device`` decides). ``no_sync_func`` and
    ``finalize_model_grads_func`` are set later, by :func:`megatron_muon.training.step.wrap_in_ddp`.
    Raises ``ValueError`` (``ConfigError`` for what the builder does not build) for a model it cannot build.
    """
    expert_tp = tp if etp is None else etp
    sequence_parallel = tp > 1 if sequence_parallel is None else sequence_parallel
    require_buildable(model)
    require_transformer_engine(model.transformer_impl)
    _require_layout(
        model, tp=tp, pp=pp, ep=ep, expert_tp=expert_tp, vpp=vpp, cp=cp, sequence_parallel=sequence_parallel
    )
    mup_fields = _mup_fields(model)
    config_class, attention_fields = _attention_fields(model)
    config = config_class(
        **_shape_fields(model),
        **attention_fields,
        **_moe_fields(model),
        **_parallel_fields(
            tp=tp, pp=pp, ep=ep, expert_tp=expert_tp, vpp=vpp, cp=cp, sequence_parallel=sequence_parallel
        ),
        **_numerics_fields(use_cpu_initialization),
        **mup_fields,
    )
    if mup_fields:
        # megatron-core 0.19.2 replaces a logit multiplier of exactly 1.0 by 1/m (its "not set" value), which
        # a base multiplier equal to m would hit; the value asked for is put back.
        config.mup_output_mult = mup_fields["mup_output_mult"]
    _set_precision(config, model.precision)
    return config


def _require_layout(
    model: ModelConfig,
    *,
    tp: int,
    pp: int,
    ep: int,
    expert_tp: int,
    vpp: int | None,
    cp: int,
    sequence_parallel: bool,
) -> None:
    """One-line errors for parallel sizes that do not fit the model (megatron would fail deep inside the build)."""
    if cp > 1 and model.transformer_impl != "transformer_engine":
        # megatron-core 0.19.2: the local DotProductAttention asserts context_parallel_size == 1.
        raise ValueError(
            f"context_parallel_size={cp} needs transformer_impl='transformer_engine' (megatron's local "
            "attention has no context parallelism)"
        )
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor_parallel_size > 1 (got 1)")
    pattern = model.moe_layer_pattern()
    if len(pattern) != model.num_layers:
        raise ValueError(
            f"moe_layer_freq={pattern} has {len(pattern)} entries, expected num_layers={model.num_layers}"
        )
    _require_divisible("num_attention_heads", model.num_attention_heads, "tensor_parallel_size", tp)
    if model.multi_latent_attention:
        _require_mla_shapes(model, tp)
    else:
        _require_divisible("num_query_groups", model.query_groups, "tensor_parallel_size", tp)
    _require_divisible("ffn_hidden_size", model.ffn_hidden_size, "tensor_parallel_size", tp)
    _require_divisible("vocab_size", model.vocab_size, "tensor_parallel_size", tp)
    _require_divisible("seq_length", model.seq_length, "tensor_parallel_size", tp)
    _require_divisible("num_moe_experts", model.num_moe_experts, "expert_parallel_size", ep)
    _require_divisible(
        "moe_ffn_hidden_size", model.moe_ffn_hidden_size, "expert_tensor_parallel_size", expert_tp
    )
    _require_divisible("num_layers", model.num_layers, "pipeline_parallel_size * (vpp or 1)", pp * (vpp or 1))


def _require_mla_shapes(model: ModelConfig, tp: int) -> None:
    """One-line errors for MLA shapes megatron would fail on deep inside the build."""
    for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        if getattr(model, name) < 1:
            raise ValueError(f"{name}={getattr(model, name)} must be >= 1 with multi_latent_attention=True")
    if model.qk_pos_emb_head_dim % 2:
        raise ValueError(f"qk_pos_emb_head_dim={model.qk_pos_emb_head_dim} must be even (RoPE rotates pairs)")
    if model.q_lora_rank is not None and model.q_lora_rank < 1:
        raise ValueError(f"q_lora_rank={model.q_lora_rank} must be >= 1 or None")
    if model.transformer_impl == "local":
        # The local spec builds the down projections as column-parallel linears split over TP.
        if model.q_lora_rank is not None:
            _require_divisible("q_lora_rank", model.q_lora_rank, "tensor_parallel_size", tp)
        _require_divisible(
            "kv_lora_rank + qk_pos_emb_head_dim",
            model.kv_lora_rank + model.qk_pos_emb_head_dim,
            "tensor_parallel_size",
            tp,
        )


def _shape_fields(model: ModelConfig) -> dict[str, Any]:
    """Widths and the layer: RMSNorm, SwiGLU, no biases (the expert MLP's in-place bias add fails on CPU), no
    dropout."""
    return dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        init_method_std=model.init_method_std,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )


def _attention_fields(model: ModelConfig) -> tuple[type[TransformerConfig], dict[str, Any]]:
    """Grouped-query attention on megatron's ``TransformerConfig``, or multi-latent attention on its
    ``MLATransformerConfig``, which carries MLA's shapes."""
    if not model.multi_latent_attention:
        return TransformerConfig, dict(num_query_groups=model.query_groups, qk_layernorm=model.qk_layernorm)
    return MLATransformerConfig, dict(
        num_query_groups=None,
        qk_layernorm=model.qk_layernorm,
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        # Plain RoPE on the rotary part (megatron's MLA default is YaRN with a 40x context extension, which a
        # model trained from scratch does not want).
        rope_type="rope",
        rotary_base=model.rotary_base,
        # MLA resolves its q / kv norms through the backend this names (megatron's default: TE).
        transformer_impl=model.transformer_impl,
    )


def _moe_fields(model: ModelConfig) -> dict[str, Any]:
    """Routed (and shared) experts, the router and its load balancing; all-to-all token dispatch."""
    return dict(
        num_moe_experts=model.num_moe_experts or None,  # megatron's dense model has None, and refuses 0
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_layer_freq=model.moe_layer_pattern(),
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size or None,
        moe_router_score_function=model.moe_router_score_function,
        # Top-1 with softmax: softmax over all experts, then top-1 (Switch Transformer); a softmax over the one
        # selected logit would always be 1 and give the router no gradient (megatron refuses that).
        moe_router_pre_softmax=model.moe_router_topk == 1 and model.moe_router_score_function == "softmax",
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=model.transformer_impl == "transformer_engine",  # TE's grouped GEMM for the experts
    )


def _parallel_fields(
    *, tp: int, pp: int, ep: int, expert_tp: int, vpp: int | None, cp: int, sequence_parallel: bool
) -> dict[str, Any]:
    """The process grid (MoE with TP requires sequence parallelism)."""
    return dict(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=expert_tp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
    )


def _numerics_fields(use_cpu_initialization: bool) -> dict[str, Any]:
    """fp32 (``_set_precision`` makes it bf16), every fused kernel off, per-token loss; where the weights are
    drawn is the device's decision."""
    return dict(
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        bf16=False,
        fp16=False,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        cross_entropy_loss_fusion=False,
        # Loss: summed over tokens, divided by the global token count in finalize_model_grads.
        # Must be set before the model is wrapped in DDP (DDP reads it to decide its own scaling).
        calculate_per_token_loss=True,
    )


def _mup_fields(model: ModelConfig) -> dict[str, object]:
    """muP through megatron's own hooks: init methods, logit multiplier, attention scale (megatron_muon/mup.py);
    none for the standard model without base multipliers."""
    base_multipliers = (model.output_logit_multiplier, model.attention_scale_multiplier) != (1.0, 1.0)
    if model.mup_base_hidden_size is None and not base_multipliers:
        return {}
    if model.multi_latent_attention:
        raise ValueError(
            "mup_base_hidden_size or a base multiplier is set with multi_latent_attention=True: muP's "
            "attention scale is not defined for MLA's two head dims here (see config/checks.py: _check_mup)"
        )
    # Without muP, base multipliers are muP at m = 1 (every width rule the identity): megatron applies a
    # logit multiplier only under use_mup.
    width = mup.MupWidth.of_model(
        hidden_size=model.hidden_size,
        head_dim=model.hidden_size / model.num_attention_heads,
        num_attention_heads=model.num_attention_heads,
        base_hidden_size=model.mup_base_hidden_size or model.hidden_size,
        base_head_dim=model.mup_base_head_dim if model.mup_base_hidden_size is not None else None,
    )
    return mup.transformer_config_fields(
        width,
        output_logit_base=model.output_logit_multiplier,
        attention_scale_base=model.attention_scale_multiplier,
    )


def _set_precision(config: TransformerConfig, precision: str) -> None:
    """bf16 parameters and pipeline sends (the optimizers keep fp32 main weights) for ``precision='bf16'``.
    Set on the built config: given to the constructor, megatron's ``__post_init__`` would also make
    ``autocast_dtype`` bf16."""
    if precision == "bf16":
        config.bf16, config.params_dtype, config.pipeline_dtype = True, torch.bfloat16, torch.bfloat16


def _layer_spec(config: TransformerConfig, *, transformer_engine: bool, vp_stage: int | None, pp_rank: int):
    spec = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=transformer_engine,
        normalization="RMSNorm",
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    if transformer_engine or not config.multi_latent_attention:
        return spec
    # megatron-core 0.19.2: the local MLA spec names DotProductAttention as core_attention, which takes no
    # k_channels / v_channels and cannot be built; ours takes MLA's two head dims.
    spec.layer_specs = [_with_mla_core_attention(layer, config) for layer in spec.layer_specs]
    return spec


def _with_mla_core_attention(layer_spec, config: TransformerConfig):
    attention = layer_spec.submodules.self_attention
    if attention.module is not MLASelfAttention:
        raise ValueError(
            f"expected megatron's MLASelfAttention in the MLA layer spec, got {attention.module}"
        )
    attention = dataclasses.replace(
        attention,
        module=LocalMLASelfAttention,
        submodules=dataclasses.replace(attention.submodules, core_attention=MLACoreAttention),
    )
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, self_attention=attention)
    )


def build_gpt_moe_model(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    pre_process: bool,
    post_process: bool,
    pg_collection: ProcessGroupCollection,
    vp_stage: int | None = None,
) -> GPTModel:
    """One megatron ``GPTModel`` chunk of ``model`` (the layers of this pipeline rank / virtual stage) with
    ``config`` from :func:`build_transformer_config`, on the local or Transformer Engine spec.

    Seeding: with ``use_cpu_initialization`` (the CPU path) weights come from the CPU default generator, so call
    ``torch.manual_seed(seed)`` first; megatron's forward forks its tensor-parallel RNG tracker, so call
    ``megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed(seed)`` before the first forward
    (on a GPU, before the build: megatron draws tensor-parallel weights from that tracker).
    On the CPU every rank draws full matrices and keeps its own slice, so the initial model does not depend on the
    tensor-parallel size. It does depend on the pipeline size (a stage draws only its own layers) and on
    the expert-parallel size (an EP rank draws only its local experts).
    """
    pp_rank = pg_collection.pp.rank()
    chunk = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(
            config,
            transformer_engine=model.transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
            pp_rank=pp_rank,
        ),
        vocab_size=model.vocab_size,
        max_sequence_length=model.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=model.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    _apply_mup_router_init(chunk, config)
    return chunk


def _apply_mup_router_init(model: GPTModel, config: TransformerConfig) -> None:
    """Give the MoE routers muP's output-type init σ/m (``mup.router_init_std``)."""
    # megatron-core 0.19.2: under use_mup the router is drawn with the hidden init_method (σ/√m), although its
    # fan-out (the expert count) does not grow with width; rescaling the drawn weights by 1/√m keeps the draw.
    if not config.use_mup or config.mup_width_mult == 1.0:
        return
    from megatron.core.transformer.moe.router import Router

    factor = mup.router_init_rescale(config.mup_width_mult)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                module.weight.mul_(factor)


def build_gpt_moe_model_chunks(
    model: ModelConfig, config: TransformerConfig, pg_collection: ProcessGroupCollection
) -> list[GPTModel]:
    """The model chunks this rank holds: one per virtual pipeline stage (one without interleaving),
    with ``pre_process`` / ``post_process`` set from the pipeline position."""
    vp_size = config.virtual_pipeline_model_parallel_size
    vp_stages: list[int | None] = [None] if vp_size is None else list(range(vp_size))
    first_stage, last_stage = is_pp_first_stage(pg_collection.pp), is_pp_last_stage(pg_collection.pp)
    return [
        build_gpt_moe_model(
            model,
            config,
            pre_process=first_stage and is_vp_first_stage(vp_stage or 0, vp_size),
            post_process=last_stage and is_vp_last_stage(vp_stage or 0, vp_size),
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        for vp_stage in vp_stages
    ]


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's causal mask, ``[1, 1, seq_length, seq_length]`` bool, True where attention is *blocked*.

    Megatron's own default is built on ``"cuda"`` (transformer/utils.py ``get_default_causal_mask``),
    so on CPU the mask must be passed explicitly."""
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    blocked = torch.ones(seq_length, seq_length, dtype=torch.bool, device=device).triu(diagonal=1)
    return blocked.view(1, 1, seq_length, seq_length)
