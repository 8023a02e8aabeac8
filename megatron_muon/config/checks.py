"""Whether a config can run: every check of the schema's values, one place per field, before any process group
exists. Cross-section rules (the layout against the model's shapes, the batch arithmetic, the learning-rate
schedule, Muon's and QK-clip's options against the model) live here too.

Each ``check_*`` raises :class:`~megatron_muon.config.errors.ConfigError` with a one-line message; :func:`validate`
runs them all and returns the process grid.
"""

from __future__ import annotations

from megatron_muon.config.errors import (
    ConfigError,
    product,
    require,
    require_choice,
    require_divides,
    require_positive,
)
from megatron_muon.config.schema import (
    DECAY_STYLES,
    FP8_RECIPES,
    LOAD_BALANCING_TYPES,
    NORMALIZATIONS,
    PRECISIONS,
    RESUME_MODES,
    ROUTER_SCORE_FUNCTIONS,
    TRANSFORMER_IMPLS,
    WSD_DECAY_STYLES,
    CheckpointConfig,
    DataConfig,
    ModelConfig,
    OptimizationConfig,
    ParallelConfig,
    ParallelDims,
    PretrainConfig,
    padded_vocab_size,
)
from megatron_muon.mup import MUON_SCALE_MODE
from megatron_muon.optim.param_groups import ROUTER_CHOICES

__all__ = [
    "check_checkpoint",
    "check_data",
    "check_model",
    "check_optimizer",
    "check_parallel",
    "split_weights",
    "validate",
    "validate_tokenizer",
]


# --------------------------------------------------------------------------------------------- model


def check_model(model: ModelConfig) -> None:
    """Checks within the model section (the layout-dependent ones are in :func:`check_parallel`)."""
    require_positive(
        "model", model, "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"
    )
    freq = model.moe_layer_freq
    if isinstance(freq, int) and not isinstance(freq, bool):
        require(freq >= 1, f"model.moe_layer_freq={freq} must be >= 1 (every k-th layer) or a 0/1 list")
    else:
        require(
            isinstance(freq, list) and all(v in (0, 1) for v in freq),
            f"model.moe_layer_freq={freq!r} must be an int >= 1 or a list of 0/1 per layer",
        )
        require(
            len(freq) == model.num_layers,
            f"model.moe_layer_freq has {len(freq)} entries, expected model.num_layers={model.num_layers}",
        )
    require(
        0 <= model.first_k_dense_layers <= model.num_layers,
        f"model.first_k_dense_layers={model.first_k_dense_layers} must be in [0, {model.num_layers}]",
    )
    pattern = model.moe_layer_pattern()
    if any(v == 0 for v in pattern):
        require_positive("model", model, "ffn_hidden_size")
    if model.num_moe_experts:
        require(any(pattern), f"model.num_moe_experts={model.num_moe_experts} but no layer is MoE")
        require_positive("model", model, "moe_ffn_hidden_size", "moe_router_topk")
        require(
            model.moe_router_topk <= model.num_moe_experts,
            f"model.moe_router_topk={model.moe_router_topk} exceeds model.num_moe_experts={model.num_moe_experts}",
        )
    require(model.num_moe_experts >= 0, f"model.num_moe_experts={model.num_moe_experts} must be >= 0")
    require(
        model.moe_shared_expert_intermediate_size >= 0,
        f"model.moe_shared_expert_intermediate_size={model.moe_shared_expert_intermediate_size} must be >= 0",
    )
    require_choice("model.moe_router_score_function", model.moe_router_score_function, ROUTER_SCORE_FUNCTIONS)
    require_choice(
        "model.moe_router_load_balancing_type", model.moe_router_load_balancing_type, LOAD_BALANCING_TYPES
    )
    require(
        model.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff={model.moe_aux_loss_coeff} must be >= 0"
    )
    require(
        model.moe_router_bias_update_rate >= 0,
        f"model.moe_router_bias_update_rate={model.moe_router_bias_update_rate} must be >= 0",
    )
    require(
        not model.moe_router_enable_expert_bias or model.moe_router_score_function == "sigmoid",
        "model.moe_router_enable_expert_bias=true needs model.moe_router_score_function='sigmoid' "
        f"(got {model.moe_router_score_function!r})",
    )
    require_choice("model.normalization", model.normalization, NORMALIZATIONS)
    require_choice("model.transformer_impl", model.transformer_impl, TRANSFORMER_IMPLS)
    require_choice("model.precision", model.precision, PRECISIONS)
    if model.fp8 is not None:
        require_choice("model.fp8", model.fp8, [None, *FP8_RECIPES])
        require(model.precision == "bf16", f"model.fp8={model.fp8!r} needs model.precision='bf16'")
        require(
            model.transformer_impl == "transformer_engine",
            f"model.fp8={model.fp8!r} needs model.transformer_impl='transformer_engine'",
        )
    _check_mup(model)
    if model.multi_latent_attention:
        _check_mla(model)
    else:
        require(
            model.kv_channels is not None or model.hidden_size % model.num_attention_heads == 0,
            f"model.num_attention_heads={model.num_attention_heads} does not divide "
            f"model.hidden_size={model.hidden_size}; set model.kv_channels",
        )
        require_divides(
            "model.num_query_groups",
            model.query_groups,
            "model.num_attention_heads",
            model.num_attention_heads,
        )


def _check_mla(model: ModelConfig) -> None:
    """MLA's head dims (the layout-dependent divisibility is in :func:`check_parallel`)."""
    require_positive("model", model, "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
    require(
        model.q_lora_rank is None or model.q_lora_rank >= 1,
        f"model.q_lora_rank={model.q_lora_rank} must be >= 1 or null",
    )
    require(
        model.qk_pos_emb_head_dim % 2 == 0,
        f"model.qk_pos_emb_head_dim={model.qk_pos_emb_head_dim} must be even (RoPE rotates pairs of dims)",
    )
    # Standard attention's head shape has no meaning with MLA: a value here would silently change nothing.
    require(
        model.kv_channels is None,
        f"model.kv_channels={model.kv_channels} with model.multi_latent_attention=true: MLA's head dims are "
        "model.qk_head_dim + model.qk_pos_emb_head_dim (query/key) and model.v_head_dim; set it to null",
    )
    require(
        model.num_query_groups in (None, model.num_attention_heads),
        f"model.num_query_groups={model.num_query_groups} with model.multi_latent_attention=true: MLA has one "
        f"key/value head per query head; set it to null (or {model.num_attention_heads})",
    )


def _check_mup(model: ModelConfig) -> None:
    for name in ("output_logit_multiplier", "attention_scale_multiplier"):
        value = getattr(model, name)
        require(value > 0, f"model.{name}={value} must be > 0 (1: no multiplier)")
        require(
            value == 1.0 or not model.multi_latent_attention,
            f"model.{name}={value} with model.multi_latent_attention=true: base multipliers are not "
            "implemented for MLA (set it to 1)",
        )
    base, base_head = model.mup_base_hidden_size, model.mup_base_head_dim
    if base is None:
        require(
            base_head is None,
            f"model.mup_base_head_dim={base_head} needs model.mup_base_hidden_size (muP is off without it)",
        )
        return
    require(base >= 1, f"model.mup_base_hidden_size={base} must be >= 1 or null (muP off)")
    require(base_head is None or base_head > 0, f"model.mup_base_head_dim={base_head} must be > 0 or null")
    require(
        not model.multi_latent_attention,
        "model.mup_base_hidden_size is set but model.multi_latent_attention=true: muP with MLA is not "
        "implemented (megatron's MLA fixes its softmax scale from qk + rotary head dims, and the width rules "
        "for its latent ranks are not worked out here)",
    )


# --------------------------------------------------------------------------------------------------- parallel


def check_parallel(parallel: ParallelConfig, world_size: int, model: ModelConfig) -> ParallelDims:
    """The process grid at ``world_size``, checked against ``model``'s shapes. Raises ``ConfigError``."""
    dims = parallel.dims(world_size)
    tp, pp, cp = dims.tp, dims.pp, dims.cp
    require_divides("parallel.tp", tp, "model.num_attention_heads", model.num_attention_heads)
    if not model.multi_latent_attention:
        require_divides("parallel.tp", tp, "model.num_query_groups", model.query_groups)
    elif model.transformer_impl == "local":
        # The local spec splits MLA's down projections over TP (column-parallel linears).
        if model.q_lora_rank is not None:
            require_divides("parallel.tp", tp, "model.q_lora_rank", model.q_lora_rank)
        require_divides(
            "parallel.tp",
            tp,
            "model.kv_lora_rank + model.qk_pos_emb_head_dim",
            model.kv_lora_rank + model.qk_pos_emb_head_dim,
        )
    require_divides("parallel.tp", tp, "model.vocab_size", model.vocab_size)
    pattern = model.moe_layer_pattern()
    if not all(pattern):
        require_divides("parallel.tp", tp, "model.ffn_hidden_size", model.ffn_hidden_size)
    if any(pattern):
        require_divides("parallel.ep", dims.ep, "model.num_moe_experts", model.num_moe_experts)
        require_divides("parallel.etp", dims.etp, "model.moe_ffn_hidden_size", model.moe_ffn_hidden_size)
        if model.moe_shared_expert_intermediate_size:
            require_divides(
                "parallel.tp",
                tp,
                "model.moe_shared_expert_intermediate_size",
                model.moe_shared_expert_intermediate_size,
            )
        require(
            tp == 1 or dims.sequence_parallel,
            f"parallel.sequence_parallel=false with parallel.tp={tp}: megatron's MoE layers need sequence "
            "parallelism when tp > 1",
        )
    else:
        require(dims.ep == 1, f"parallel.ep={dims.ep} needs MoE layers (model.num_moe_experts=0)")
    stage_factors = [("parallel.pp", pp)] + ([("parallel.vpp", dims.vpp)] if dims.vpp else [])
    require(
        model.num_layers % product(stage_factors)[1] == 0,
        f"{product(stage_factors)[0]} does not divide model.num_layers={model.num_layers}",
    )
    if dims.sequence_parallel:
        seq_factors = [("parallel.tp", tp)] + ([("parallel.cp", cp)] if cp > 1 else [])
        require(
            model.seq_length % product(seq_factors)[1] == 0,
            f"{product(seq_factors)[0]} does not divide model.seq_length={model.seq_length} "
            "(sequence parallelism splits each sequence over the TP ranks)",
        )
    if cp > 1:
        require(
            model.seq_length % (2 * cp) == 0,
            f"2 x parallel.cp={cp} = {2 * cp} does not divide model.seq_length={model.seq_length} "
            "(context parallelism splits each sequence into 2·CP chunks)",
        )
    return dims


# -------------------------------------------------------------------------------------------------- optimizer


def check_optimizer(optimizer: OptimizationConfig, train_iters: int) -> None:
    """The optimizer section, its schedule over ``train_iters`` steps and Muon's options."""
    require(optimizer.lr > 0, f"optimizer.lr={optimizer.lr} must be > 0")
    require(
        0 <= optimizer.min_lr <= optimizer.lr,
        f"optimizer.min_lr={optimizer.min_lr} must be in [0, optimizer.lr={optimizer.lr}]",
    )
    require(optimizer.weight_decay >= 0, f"optimizer.weight_decay={optimizer.weight_decay} must be >= 0")
    require(
        len(optimizer.betas) == 2 and all(0 <= b < 1 for b in optimizer.betas),
        f"optimizer.betas={list(optimizer.betas)} must be two values in [0, 1)",
    )
    require(optimizer.eps > 0, f"optimizer.eps={optimizer.eps} must be > 0")
    multiplier = optimizer.router_lr_multiplier
    require(multiplier > 0, f"optimizer.router_lr_multiplier={multiplier} must be > 0 (1: the AdamW LR)")
    require(
        multiplier == 1.0 or (optimizer.use_muon and optimizer.muon.router == "adamw"),
        f"optimizer.router_lr_multiplier={multiplier} applies to the router on AdamW beside Muon; it needs "
        f"optimizer.use_muon=true and optimizer.muon.router=adamw (got use_muon={optimizer.use_muon}, "
        f"router={optimizer.muon.router!r})",
    )
    require(optimizer.clip_grad >= 0, f"optimizer.clip_grad={optimizer.clip_grad} must be >= 0 (0: off)")
    require_choice("optimizer.decay_style", optimizer.decay_style, DECAY_STYLES)
    decay_iters = optimizer.resolved_lr_decay_iters(train_iters)
    require(
        0 <= optimizer.warmup_iters <= decay_iters,
        f"optimizer.warmup_iters={optimizer.warmup_iters} must be in [0, lr_decay_iters={decay_iters}]",
    )
    if optimizer.decay_style == "WSD":
        require(
            0 < optimizer.wsd_decay_fraction <= 1,
            f"optimizer.wsd_decay_fraction={optimizer.wsd_decay_fraction} must be in (0, 1]",
        )
        require_choice("optimizer.wsd_decay_style", optimizer.wsd_decay_style, WSD_DECAY_STYLES)
    require(
        not (optimizer.overlap_param_gather and not optimizer.distributed_optimizer),
        "optimizer.overlap_param_gather=true needs optimizer.distributed_optimizer=true (without it "
        "parameters are updated on every rank and nothing is gathered)",
    )
    require(
        optimizer.ddp_bucket_size is None or optimizer.ddp_bucket_size > 0,
        f"optimizer.ddp_bucket_size={optimizer.ddp_bucket_size} must be > 0 (elements), or null for megatron's default",
    )
    if optimizer.distributed_optimizer and optimizer.use_muon:
        require(
            optimizer.muon.tp_mode != "duplicated",
            "optimizer.distributed_optimizer=true cannot serve optimizer.muon.tp_mode=duplicated (it keeps "
            "a matrix's momentum on every TP rank); valid: auto, owner, distributed",
        )
    muon = optimizer.muon
    # The schedule's peak and floor; every value the optimizer itself runs is checked by Muon's frozen settings.
    require(muon.lr > 0, f"optimizer.muon.lr={muon.lr} must be > 0")
    require(0 <= muon.min_lr <= muon.lr, f"optimizer.muon.min_lr={muon.min_lr} must be in [0, {muon.lr}]")
    try:
        muon.settings()
    except ValueError as error:
        raise ConfigError(f"optimizer.{error}") from None
    require_choice("optimizer.muon.router", muon.router, ROUTER_CHOICES)


# ------------------------------------------------------------------------------------------- data, checkpoint


def split_weights(data: DataConfig) -> tuple[int, int, int]:
    """``data.split`` as (train, validation, test) proportions."""
    parts = data.split.split(",")
    require(
        len(parts) == 3 and all(p.strip().isdigit() for p in parts),
        f"data.split={data.split!r} must be three non-negative integers, e.g. '969,30,1'",
    )
    train, validation, test = (int(p) for p in parts)
    require(train > 0, f"data.split={data.split!r} gives training no documents")
    return train, validation, test


def check_data(data: DataConfig, evaluates: bool) -> None:
    """The data section; ``evaluates``: training.eval_interval > 0."""
    require(
        data.mock or bool(data.blend),
        "no training data: set data.blend (a list of {prefix, weight}) or data.mock=true",
    )
    require(
        not (data.mock and data.blend),
        f"data.mock=true and data.blend ({len(data.blend)} entries) are both set; choose one",
    )
    for index, entry in enumerate(data.blend):
        require(bool(entry.prefix), f"data.blend[{index}].prefix is empty")
        require(entry.weight > 0, f"data.blend[{index}].weight={entry.weight} must be > 0")
    weights = split_weights(data)
    if evaluates and not data.mock:
        # megatron's GPTDataset loops forever when asked for samples from an empty split.
        require(
            weights[1] > 0,
            f"data.split={data.split!r} leaves validation no documents but training.eval_interval > 0",
        )
    require(data.mock or data.tokenizer_path is not None, "data.tokenizer_path is required with data.blend")
    require(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")


def check_checkpoint(checkpoint: CheckpointConfig) -> None:
    """The checkpoint section."""
    require(
        checkpoint.save_interval >= 0, f"checkpoint.save_interval={checkpoint.save_interval} must be >= 0"
    )
    require(
        checkpoint.save_interval == 0 or checkpoint.save_dir is not None,
        f"checkpoint.save_interval={checkpoint.save_interval} needs checkpoint.save_dir",
    )
    require(
        checkpoint.keep_last is None or checkpoint.keep_last >= 1,
        f"checkpoint.keep_last={checkpoint.keep_last} must be >= 1 or null",
    )
    require(bool(checkpoint.resume), "checkpoint.resume is empty; use auto, none or a checkpoint path")
    if checkpoint.finetune:
        has_source = checkpoint.resume not in RESUME_MODES or (
            checkpoint.resume == "auto" and (checkpoint.load_dir or checkpoint.save_dir) is not None
        )
        require(
            has_source,
            f"checkpoint.finetune=true needs weights to load: checkpoint.resume={checkpoint.resume!r} with "
            f"load_dir={checkpoint.load_dir!r}",
        )


# ------------------------------------------------------------------------------------------- the whole config


def _check_fsdp(cfg: PretrainConfig) -> None:
    """What ``parallel.fsdp=true`` cannot serve, each named with the option that conflicts."""
    opt = cfg.optimizer
    require(
        not opt.distributed_optimizer,
        "parallel.fsdp=true with optimizer.distributed_optimizer=true: FSDP already shards the optimizer state "
        "(and the parameters and gradients); set one of them",
    )
    for name in ("overlap_grad_reduce", "overlap_param_gather"):
        require(
            not getattr(opt, name),
            f"parallel.fsdp=true with optimizer.{name}=true: a megatron DDP option; FSDP overlaps its "
            "reduce-scatters and all-gathers itself (valid: false)",
        )
    require(
        opt.ddp_bucket_size is None,
        f"parallel.fsdp=true with optimizer.ddp_bucket_size={opt.ddp_bucket_size}: a megatron DDP option; FSDP "
        "shards per transformer layer (valid: null)",
    )
    if opt.use_muon:
        require(
            opt.muon.tp_mode in ("auto", "owner"),
            f"parallel.fsdp=true with optimizer.muon.tp_mode={opt.muon.tp_mode}: no rank holds a whole shard of "
            "a fully sharded matrix, so one owner gathers it; valid: auto, owner",
        )


def validate(cfg: PretrainConfig, world_size: int | None = None) -> ParallelDims:
    """Check ``cfg`` as a whole at ``world_size`` processes (None: ``cfg.parallel.world_size``), before any
    process group starts. Returns the process grid. Raises ``ConfigError`` with a one-line message."""
    intended = cfg.parallel.world_size
    if world_size is None:
        require(intended is not None, "the world size is unknown: set parallel.world_size or pass world_size")
        world_size = intended
    require(
        intended is None or intended == world_size,
        f"parallel.world_size={intended} but {world_size} processes were started",
    )
    check_model(cfg.model)
    dims = check_parallel(cfg.parallel, world_size, cfg.model)
    train = cfg.training
    require_positive("training", train, "train_iters", "global_batch_size", "micro_batch_size")
    per_step = train.micro_batch_size * dims.dp
    require(
        train.global_batch_size % per_step == 0,
        f"training.global_batch_size={train.global_batch_size} is not divisible by training.micro_batch_size="
        f"{train.micro_batch_size} x data-parallel size {dims.dp} = {per_step}",
    )
    require(train.eval_interval >= 0, f"training.eval_interval={train.eval_interval} must be >= 0")
    require(
        train.eval_interval == 0 or train.eval_iters >= 1,
        f"training.eval_iters={train.eval_iters} must be >= 1 when training.eval_interval > 0",
    )
    require(
        train.max_consecutive_skips >= 1,
        f"training.max_consecutive_skips={train.max_consecutive_skips} must be >= 1",
    )
    check_optimizer(cfg.optimizer, train.train_iters)
    qk_clip = cfg.optimizer.qk_clip
    try:
        qk_clip.validate()
    except ValueError as error:
        raise ConfigError(f"optimizer.{error}") from None
    require(
        # With MLA the norms are on the q / kv latents, before the up projections the clip rescales.
        not (qk_clip.enabled and cfg.model.qk_layernorm and not cfg.model.multi_latent_attention),
        "optimizer.qk_clip.enabled=true with model.qk_layernorm=true: the norm on queries and keys undoes any "
        "rescaling of their weights; turn one of them off",
    )
    require(
        cfg.optimizer.router_lr_multiplier == 1.0 or cfg.model.num_moe_experts > 0,
        f"optimizer.router_lr_multiplier={cfg.optimizer.router_lr_multiplier} with model.num_moe_experts=0: a "
        "dense model has no router",
    )
    if cfg.model.mup_base_hidden_size is not None and cfg.optimizer.use_muon:
        require(
            cfg.optimizer.muon.scale_mode == MUON_SCALE_MODE,
            f"optimizer.muon.scale_mode={cfg.optimizer.muon.scale_mode!r} with muP (model.mup_base_hidden_size="
            f"{cfg.model.mup_base_hidden_size}); muP needs {MUON_SCALE_MODE!r} (√(fan_out/fan_in), docs/mup.md)",
        )
    if cfg.parallel.fsdp:
        _check_fsdp(cfg)
    check_data(cfg.data, evaluates=train.eval_interval > 0)
    check_checkpoint(cfg.checkpoint)
    require(cfg.logging.log_interval >= 1, f"logging.log_interval={cfg.logging.log_interval} must be >= 1")
    return dims


def validate_tokenizer(cfg: PretrainConfig, tokenizer_vocab_size: int) -> None:
    """Check the model's vocabulary holds the tokenizer's (call once the tokenizer is loaded)."""
    vocab = cfg.model.vocab_size
    require(
        tokenizer_vocab_size <= vocab,
        f"the tokenizer has {tokenizer_vocab_size} tokens but model.vocab_size={vocab}; set model.vocab_size="
        f"{padded_vocab_size(tokenizer_vocab_size, cfg.parallel.tp)} (padded to 128 x parallel.tp)",
    )
