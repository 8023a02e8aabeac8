"""The MoE GPT on megatron-core's ``GPTModel``, at every size (the tiny test models up to the 16 B configuration),
on the local spec (no Transformer Engine; CPU and tests) or Transformer Engine's.

:class:`GptMoeConfig` is its shape; :func:`build_transformer_config` turns it into megatron's own
:class:`TransformerConfig` with settings that also run on CPU: fp32, every fusion off, no grouped GEMM, no
linear biases, sequence parallelism whenever TP > 1, per-token loss. The architecture is a modern MoE decoder:
RMSNorm, SwiGLU, RoPE, grouped-query or multi-latent attention, top-k routed experts with a load-balancing loss
(switch, per sequence, or none) and optionally the expert bias.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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
from megatron_muon.models.mla_attention import LocalMLASelfAttention, MLACoreAttention

if TYPE_CHECKING:
    from megatron_muon.config.schema import LoadBalancingType, RouterScoreFunction, TransformerImpl

__all__ = [
    "GptMoeConfig",
    "build_gpt_moe_model",
    "build_gpt_moe_model_chunks",
    "build_transformer_config",
    "causal_attention_mask",
]


@dataclass(kw_only=True, slots=True)
class GptMoeConfig:
    """Shape of the MoE GPT. Defaults: ~0.2 M parameters, a few ms per microbatch on one core."""

    num_layers: int = 4
    """Transformer layers (dense and MoE together)."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """Hidden size of the dense SwiGLU MLP (layers marked 0 in ``moe_layer_freq``)."""
    moe_ffn_hidden_size: int = 64
    """Hidden size of each expert's SwiGLU MLP."""
    num_attention_heads: int = 4
    """Query heads; head dim = hidden_size / num_attention_heads."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention)."""
    num_moe_experts: int = 4
    """Routed experts per MoE layer."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_layer_freq: list[int] = field(default_factory=lambda: [0, 1, 1, 1])
    """Per layer: 1 = MoE, 0 = dense. A dense first layer is the DeepSeek-V3 / Moonlight layout."""
    moe_aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (Fedus et al. 2021, eq. 4)."""
    moe_router_load_balancing_type: LoadBalancingType = "aux_loss"
    """aux_loss (switch loss over each micro batch) | seq_aux_loss (per sequence, DeepSeek-V3) | none."""
    vocab_size: int = 256
    """Vocabulary size; must be divisible by the tensor-parallel size."""
    seq_length: int = 32
    """Tokens per sequence; must be divisible by the tensor-parallel size (sequence parallelism)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init."""
    rotary_base: int = 10000
    """RoPE base (Su et al. 2021)."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the output layer."""
    moe_shared_expert_intermediate_size: int = 0
    """Hidden size of the shared expert every token also goes through (DeepSeek-MoE); 0: none."""
    moe_router_score_function: RouterScoreFunction = "softmax"
    """Router scores: softmax | sigmoid (DeepSeek-V3 / Moonlight)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free load balancing (Wang et al. 2024): a per-expert bias on the routing scores, updated from
    the expert loads (megatron's ``moe_router_enable_expert_bias``)."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update (megatron's ``finalize_model_grads`` applies it after each step)."""
    moe_router_topk_scaling_factor: float | None = None
    """Scale of the top-k routing weights (Moonlight: 2.446)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3, OLMo 2)."""
    norm_epsilon: float = 1e-5
    """ε of every RMSNorm."""
    mup_base_hidden_size: int | None = None
    """muP base width (``megatron_muon/mup.py``); None: standard parametrization."""
    mup_base_head_dim: float | None = None
    """muP base head dim; None: mup_base_hidden_size / num_attention_heads."""
    output_logit_multiplier: float = 1.0
    """Base multiplier of the output logits (under muP the logits are multiplied by this / m)."""
    attention_scale_multiplier: float = 1.0
    """Base multiplier of the attention scale (q·k × this / √d_head; under muP × this · √d_head,base / d_head)."""
    multi_latent_attention: bool = False
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434) instead of grouped-query attention: megatron's
    ``MLASelfAttention`` (``num_query_groups`` unused)."""
    q_lora_rank: int | None = None
    """MLA: rank of the compressed query; None: one direct query projection (Moonlight, DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 32
    """MLA: rank of the compressed key/value latent."""
    qk_head_dim: int = 16
    """MLA: per-head query/key dim without rotary position (DeepSeek's qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = 8
    """MLA: per-head dim of the decoupled rotary query/key part, the key part shared by all heads."""
    v_head_dim: int = 16
    """MLA: per-head value dim."""
    transformer_impl: TransformerImpl = "local"
    """local (megatron's torch layers; CPU) | transformer_engine (megatron's TE spec: TE linears with fused norms,
    TE attention, grouped-GEMM experts; needs CUDA and transformer_engine)."""


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
    cfg: GptMoeConfig,
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
    """Megatron ``TransformerConfig`` for ``cfg`` at the given parallel sizes, with CPU-friendly settings.

    ``etp=None`` means expert tensor parallelism equal to ``tp``; ``vpp`` is the number of virtual
    pipeline stages per pipeline rank (None: no interleaving); ``cp`` the context-parallel size (Transformer
    Engine attention only); ``sequence_parallel=None`` means on when ``tp > 1``. ``use_cpu_initialization``: True
    draws every weight on the CPU (the CPU path; TP-invariant initial weights), False lets megatron initialize on
    the current GPU (``megatron_muon.platform.device`` decides). ``no_sync_func`` and
    ``finalize_model_grads_func`` are set later, by :func:`megatron_muon.training.step.wrap_in_ddp`.
    """
    expert_tp = tp if etp is None else etp
    sequence_parallel = tp > 1 if sequence_parallel is None else sequence_parallel
    require_transformer_engine(cfg.transformer_impl)
    if cp > 1 and cfg.transformer_impl != "transformer_engine":
        # megatron-core 0.19.2: the local DotProductAttention asserts context_parallel_size == 1.
        raise ValueError(
            f"context_parallel_size={cp} needs transformer_impl='transformer_engine' (megatron's local "
            "attention has no context parallelism)"
        )
    if sequence_parallel and tp == 1:
        raise ValueError("sequence_parallel=True needs tensor_parallel_size > 1 (got 1)")
    if len(cfg.moe_layer_freq) != cfg.num_layers:
        raise ValueError(
            f"moe_layer_freq={cfg.moe_layer_freq} has {len(cfg.moe_layer_freq)} entries, "
            f"expected num_layers={cfg.num_layers}"
        )
    _require_divisible("num_attention_heads", cfg.num_attention_heads, "tensor_parallel_size", tp)
    if cfg.multi_latent_attention:
        _require_mla_shapes(cfg, tp)
    else:
        _require_divisible("num_query_groups", cfg.num_query_groups, "tensor_parallel_size", tp)
    _require_divisible("ffn_hidden_size", cfg.ffn_hidden_size, "tensor_parallel_size", tp)
    _require_divisible("vocab_size", cfg.vocab_size, "tensor_parallel_size", tp)
    _require_divisible("seq_length", cfg.seq_length, "tensor_parallel_size", tp)
    _require_divisible("num_moe_experts", cfg.num_moe_experts, "expert_parallel_size", ep)
    _require_divisible(
        "moe_ffn_hidden_size", cfg.moe_ffn_hidden_size, "expert_tensor_parallel_size", expert_tp
    )
    _require_divisible("num_layers", cfg.num_layers, "pipeline_parallel_size * (vpp or 1)", pp * (vpp or 1))

    # muP through megatron's own hooks: init methods, logit multiplier, attention scale (megatron_muon/mup.py).
    mup_fields: dict[str, object] = {}
    base_multipliers = (cfg.output_logit_multiplier, cfg.attention_scale_multiplier) != (1.0, 1.0)
    if cfg.mup_base_hidden_size is not None or base_multipliers:
        if cfg.multi_latent_attention:
            raise ValueError(
                "mup_base_hidden_size or a base multiplier is set with multi_latent_attention=True: muP's "
                "attention scale is not defined for MLA's two head dims here (see config/checks.py: _check_mup)"
            )
        # Without muP, base multipliers are muP at m = 1 (every width rule the identity): megatron applies a
        # logit multiplier only under use_mup.
        base_hidden_size = cfg.mup_base_hidden_size or cfg.hidden_size
        mup_fields = mup.transformer_config_fields(
            mup.MupWidth.of_model(
                hidden_size=cfg.hidden_size,
                head_dim=cfg.hidden_size / cfg.num_attention_heads,
                num_attention_heads=cfg.num_attention_heads,
                base_hidden_size=base_hidden_size,
                base_head_dim=cfg.mup_base_head_dim if cfg.mup_base_hidden_size is not None else None,
            ),
            output_logit_base=cfg.output_logit_multiplier,
            attention_scale_base=cfg.attention_scale_multiplier,
        )

    config_class, mla_fields = TransformerConfig, {}
    if cfg.multi_latent_attention:
        # megatron's MLA reads its shapes from an MLATransformerConfig; plain RoPE on the rotary part (its
        # default is YaRN with a 40x context extension, which a model trained from scratch does not want).
        config_class = MLATransformerConfig
        mla_fields = dict(
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_head_dim=cfg.qk_head_dim,
            qk_pos_emb_head_dim=cfg.qk_pos_emb_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_type="rope",
            rotary_base=cfg.rotary_base,
            # MLA resolves its q / kv norms through the backend this names (megatron's default: TE).
            transformer_impl=cfg.transformer_impl,
        )
    config = config_class(
        # Shape.
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=None if cfg.multi_latent_attention else cfg.num_query_groups,
        init_method_std=cfg.init_method_std,
        # Architecture: RMSNorm, SwiGLU, no biases (the expert MLP's in-place bias add fails on CPU).
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # MoE.
        num_moe_experts=cfg.num_moe_experts or None,  # megatron's dense model has None, and refuses 0
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_router_topk=cfg.moe_router_topk,
        moe_layer_freq=list(cfg.moe_layer_freq),
        moe_router_load_balancing_type=cfg.moe_router_load_balancing_type,
        moe_aux_loss_coeff=cfg.moe_aux_loss_coeff,
        moe_shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size or None,
        moe_router_score_function=cfg.moe_router_score_function,
        # Top-1 with softmax: softmax over all experts, then top-1 (Switch Transformer); a softmax over the one
        # selected logit would always be 1 and give the router no gradient (megatron refuses that).
        moe_router_pre_softmax=cfg.moe_router_topk == 1 and cfg.moe_router_score_function == "softmax",
        moe_router_enable_expert_bias=cfg.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=cfg.moe_router_bias_update_rate,
        moe_router_topk_scaling_factor=cfg.moe_router_topk_scaling_factor,
        qk_layernorm=cfg.qk_layernorm,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=cfg.transformer_impl == "transformer_engine",  # TE's grouped GEMM for the experts
        # Parallelism. MoE with TP requires sequence parallelism.
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=expert_tp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=torch.float32,
        # fp32, all fused kernels off; where the weights are drawn is the device's decision.
        use_cpu_initialization=use_cpu_initialization,
        params_dtype=torch.float32,
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
        **mup_fields,
        **mla_fields,
    )
    if mup_fields:
        # megatron-core 0.19.2 replaces a logit multiplier of exactly 1.0 by 1/m (its "not set" value), which
        # a base multiplier equal to m would hit; the value asked for is put back.
        config.mup_output_mult = mup_fields["mup_output_mult"]
    return config


def _require_mla_shapes(cfg: GptMoeConfig, tp: int) -> None:
    """One-line errors for MLA shapes megatron would fail on deep inside the build."""
    for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)} must be >= 1 with multi_latent_attention=True")
    if cfg.qk_pos_emb_head_dim % 2:
        raise ValueError(f"qk_pos_emb_head_dim={cfg.qk_pos_emb_head_dim} must be even (RoPE rotates pairs)")
    if cfg.q_lora_rank is not None and cfg.q_lora_rank < 1:
        raise ValueError(f"q_lora_rank={cfg.q_lora_rank} must be >= 1 or None")
    if cfg.transformer_impl == "local":
        # The local spec builds the down projections as column-parallel linears split over TP.
        if cfg.q_lora_rank is not None:
            _require_divisible("q_lora_rank", cfg.q_lora_rank, "tensor_parallel_size", tp)
        _require_divisible(
            "kv_lora_rank + qk_pos_emb_head_dim",
            cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim,
            "tensor_parallel_size",
            tp,
        )


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
    cfg: GptMoeConfig,
    config: TransformerConfig,
    *,
    pre_process: bool,
    post_process: bool,
    pg_collection: ProcessGroupCollection,
    vp_stage: int | None = None,
) -> GPTModel:
    """One megatron ``GPTModel`` chunk (the layers of this pipeline rank / virtual stage), local spec.

    Seeding: with ``use_cpu_initialization`` (the CPU path) weights come from the CPU default generator, so call
    ``torch.manual_seed(seed)`` first; megatron's forward forks its tensor-parallel RNG tracker, so call
    ``megatron.core.tensor_parallel.random.model_parallel_cuda_manual_seed(seed)`` before the first forward
    (on a GPU, before the build: megatron draws tensor-parallel weights from that tracker).
    On the CPU every rank draws full matrices and keeps its own slice, so the initial model does not depend on the
    tensor-parallel size. It does depend on the pipeline size (a stage draws only its own layers) and on
    the expert-parallel size (an EP rank draws only its local experts).
    """
    pp_rank = pg_collection.pp.rank()
    model = GPTModel(
        config=config,
        transformer_layer_spec=_layer_spec(
            config,
            transformer_engine=cfg.transformer_impl == "transformer_engine",
            vp_stage=vp_stage,
            pp_rank=pp_rank,
        ),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )
    _apply_mup_router_init(model, config)
    return model


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
    cfg: GptMoeConfig, config: TransformerConfig, pg_collection: ProcessGroupCollection
) -> list[GPTModel]:
    """The model chunks this rank holds: one per virtual pipeline stage (one without interleaving),
    with ``pre_process`` / ``post_process`` set from the pipeline position."""
    vp_size = config.virtual_pipeline_model_parallel_size
    vp_stages: list[int | None] = [None] if vp_size is None else list(range(vp_size))
    first_stage, last_stage = is_pp_first_stage(pg_collection.pp), is_pp_last_stage(pg_collection.pp)
    return [
        build_gpt_moe_model(
            cfg,
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
