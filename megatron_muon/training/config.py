"""Typed pretraining configuration: one small dataclass per component, composed in :class:`PretrainConfig`.

Each component gets its own section (``model``, ``parallel``, ``optimizer``, ``training``, ``data``,
``checkpoint``, ``logging``), the torchtitan shape: typed fields with a docstring under each, handed to the
part of the code that needs them. Muon's own options are :class:`megatron_muon.optim.build.MuonOptions`,
reused as ``optimizer.muon`` rather than copied.

Loading (:func:`load_config`) merges a YAML file and dotted command-line overrides onto the dataclass schema
with OmegaConf structured configs, so an unknown key or a value of the wrong type fails at once, with a one-line
:class:`ConfigError` naming the key (and the closest valid key). OmegaConf reads ``slots=True`` dataclasses
fine (it only needs ``dataclasses.fields`` and keyword construction), so the sections keep the house style.

Cross-field checks live in :func:`validate` and :meth:`ParallelConfig.validate` and run before any process
group exists: the layout (TP·PP·CP·DP = world size, the expert grid, divisibility of heads, layers, vocabulary
and sequence), the batch arithmetic, the learning-rate schedule and Muon's options.

    python -m megatron_muon.training.config launch/configs/tiny_cpu.yaml model.hidden_size=256 --print
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_muon.optim.options import MuonOptions, QKClipOptions
from megatron_muon.training.config_checks import (  # noqa: F401  (re-exported)
    DECAY_STYLES,
    RESUME_MODES,
    WSD_DECAY_STYLES,
    ConfigError,
    _product,
    _require,
    _require_choice,
    _require_divides,
    _require_positive,
)
from megatron_muon.training.model_config import (  # noqa: F401  (re-exported)
    ModelConfig,
    count_parameters,
    padded_vocab_size,
    tiny_moe_config,
)

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataBlendEntry",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerSection",
    "ParallelConfig",
    "ParallelDims",
    "PretrainConfig",
    "TrainingConfig",
    "count_parameters",
    "describe",
    "load_config",
    "padded_vocab_size",
    "tiny_moe_config",
    "to_yaml",
    "validate",
    "validate_tokenizer",
]


# ------------------------------------------------------------------------------------------ parallel


@dataclass(frozen=True, kw_only=True, slots=True)
class ParallelDims:
    """The validated process grid (torchtitan ``ParallelDims``): checked on construction, no processes needed.

    Dense layers: world = TP · CP · DP per pipeline stage, times PP. Expert layers reuse the same ranks of a
    stage as expert-TP · EP · expert-DP.
    """

    world_size: int
    """Number of processes."""
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    cp: int = 1
    """Context-parallel size."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int = 1
    """Expert tensor-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank; None: no interleaving."""
    sequence_parallel: bool = False
    """Sequence parallelism across the TP group."""

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp", "ep", "etp"):
            value = getattr(self, name)
            _require(value >= 1, f"parallel.{name}={value} must be >= 1")
        _require(self.vpp is None or self.vpp >= 1, f"parallel.vpp={self.vpp} must be >= 1 or null")
        _require(
            self.vpp is None or self.vpp == 1 or self.pp > 1,
            f"parallel.vpp={self.vpp} needs parallel.pp > 1 (got {self.pp})",
        )
        dense_text, dense = _product(
            [("parallel.tp", self.tp), ("parallel.pp", self.pp), ("parallel.cp", self.cp)]
        )
        _require(
            self.world_size % dense == 0, f"world_size={self.world_size} is not divisible by {dense_text}"
        )
        expert = self.ep * self.etp
        _require(
            self.stage_size % expert == 0,
            f"parallel.ep={self.ep} x parallel.etp={self.etp} = {expert} does not divide the ranks of one "
            f"pipeline stage, world_size={self.world_size} / parallel.pp={self.pp} = {self.stage_size}",
        )

    @property
    def stage_size(self) -> int:
        """Ranks of one pipeline stage: TP·CP·DP = expert-TP·EP·expert-DP."""
        return self.world_size // self.pp

    @property
    def dp(self) -> int:
        """Data-parallel size of the dense layers."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def expert_dp(self) -> int:
        """Data-parallel size of the expert layers: world / (PP · EP · ETP)."""
        return self.stage_size // (self.ep * self.etp)

    def describe(self) -> str:
        text = (
            f"world {self.world_size} = TP{self.tp} x PP{self.pp} x CP{self.cp} x DP{self.dp}; "
            f"experts per stage: ETP{self.etp} x EP{self.ep} x EDP{self.expert_dp}"
        )
        return text + (f"; VPP{self.vpp}" if self.vpp else "") + ("; SP" if self.sequence_parallel else "")


@dataclass(kw_only=True, slots=True)
class ParallelConfig:
    """How the model is split across processes."""

    world_size: int | None = None
    """Intended number of processes; None: whatever the launcher starts. When set, it must match."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B); None: no interleaving."""
    cp: int = 1
    """Context-parallel size (the sequence split across ranks in attention)."""
    ep: int = 1
    """Expert-parallel size."""
    etp: int | None = None
    """Expert tensor-parallel size; None: equal to ``tp``."""
    sequence_parallel: bool | None = None
    """Sequence parallelism; None: on when tp > 1 (megatron's MoE layers require it then)."""

    def dims(self, world_size: int) -> ParallelDims:
        """The process grid at ``world_size`` (checks the products, not the model)."""
        return ParallelDims(
            world_size=world_size,
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            ep=self.ep,
            etp=self.tp if self.etp is None else self.etp,
            vpp=self.vpp,
            sequence_parallel=self.tp > 1 if self.sequence_parallel is None else self.sequence_parallel,
        )

    def validate(self, world_size: int, model: ModelConfig) -> ParallelDims:
        """The process grid at ``world_size``, checked against ``model``'s shapes. Raises ``ConfigError``."""
        dims = self.dims(world_size)
        tp, pp, cp = dims.tp, dims.pp, dims.cp
        _require_divides("parallel.tp", tp, "model.num_attention_heads", model.num_attention_heads)
        if not model.multi_latent_attention:
            _require_divides("parallel.tp", tp, "model.num_query_groups", model.query_groups)
        elif model.transformer_impl == "local":
            # The local spec splits MLA's down projections over TP (column-parallel linears).
            if model.q_lora_rank is not None:
                _require_divides("parallel.tp", tp, "model.q_lora_rank", model.q_lora_rank)
            _require_divides(
                "parallel.tp",
                tp,
                "model.kv_lora_rank + model.qk_pos_emb_head_dim",
                model.kv_lora_rank + model.qk_pos_emb_head_dim,
            )
        _require_divides("parallel.tp", tp, "model.vocab_size", model.vocab_size)
        pattern = model.moe_layer_pattern()
        if not all(pattern):
            _require_divides("parallel.tp", tp, "model.ffn_hidden_size", model.ffn_hidden_size)
        if any(pattern):
            _require_divides("parallel.ep", dims.ep, "model.num_moe_experts", model.num_moe_experts)
            _require_divides("parallel.etp", dims.etp, "model.moe_ffn_hidden_size", model.moe_ffn_hidden_size)
            if model.moe_shared_expert_intermediate_size:
                _require_divides(
                    "parallel.tp",
                    tp,
                    "model.moe_shared_expert_intermediate_size",
                    model.moe_shared_expert_intermediate_size,
                )
            _require(
                tp == 1 or dims.sequence_parallel,
                f"parallel.sequence_parallel=false with parallel.tp={tp}: megatron's MoE layers need sequence "
                "parallelism when tp > 1",
            )
        else:
            _require(dims.ep == 1, f"parallel.ep={dims.ep} needs MoE layers (model.num_moe_experts=0)")
        stage_factors = [("parallel.pp", pp)] + ([("parallel.vpp", dims.vpp)] if dims.vpp else [])
        _require(
            model.num_layers % _product(stage_factors)[1] == 0,
            f"{_product(stage_factors)[0]} does not divide model.num_layers={model.num_layers}",
        )
        if dims.sequence_parallel:
            seq_factors = [("parallel.tp", tp)] + ([("parallel.cp", cp)] if cp > 1 else [])
            _require(
                model.seq_length % _product(seq_factors)[1] == 0,
                f"{_product(seq_factors)[0]} does not divide model.seq_length={model.seq_length} "
                "(sequence parallelism splits each sequence over the TP ranks)",
            )
        if cp > 1:
            _require(
                model.seq_length % (2 * cp) == 0,
                f"2 x parallel.cp={cp} = {2 * cp} does not divide model.seq_length={model.seq_length} "
                "(context parallelism splits each sequence into 2·CP chunks)",
            )
        return dims


# ----------------------------------------------------------------------------------------- optimizer


@dataclass(kw_only=True, slots=True)
class OptimizerSection:
    """AdamW (embeddings, output layer, norms, router), Muon (hidden matrices) and the learning-rate schedule.

    Named ``Section`` so it is not confused with megatron's ``OptimizerConfig``, which the AdamW side is built from.
    """

    lr: float = 3e-4
    """Peak learning rate of the AdamW groups."""
    min_lr: float = 3e-5
    """Final learning rate of the AdamW groups."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the AdamW groups (megatron exempts norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (β1, β2)."""
    eps: float = 1e-8
    """AdamW ε."""
    clip_grad: float = 1.0
    """Global gradient-norm clip over all parameters (Muon and AdamW); 0: off."""
    muon: MuonOptions = field(default_factory=MuonOptions)
    """Muon's own options (``optim/build.py``): lr, min_lr, weight decay, momentum, scale rule, Newton–Schulz."""
    use_muon: bool = True
    """False: AdamW (megatron's own optimizer) for every parameter, with the settings above — the baseline."""
    qk_clip: QKClipOptions = field(default_factory=QKClipOptions)
    """MuonClip's QK-clip (Kimi K2) and the per-layer max-logit metric."""
    distributed_optimizer: bool = False
    """True: fp32 master weights and optimizer state stored once across data-parallel replicas, gradients
    reduce-scattered (megatron's DDP with ``use_distributed_optimizer``; Muon on megatron's shard-aligned
    layer-wise layout, AdamW on megatron's ``DistributedOptimizer``). ``docs/distributed_optimizer.md``."""
    overlap_grad_reduce: bool = False
    """Overlap megatron DDP's gradient all-reduce / reduce-scatter with the backward pass (bucketed)."""
    overlap_param_gather: bool = False
    """With ``distributed_optimizer``: overlap the parameter all-gather after the step with the next forward."""
    warmup_iters: int = 0
    """Linear warm-up steps from 0 to the peak learning rate."""
    decay_style: str = "cosine"
    """cosine | linear | constant | WSD (warmup-stable-decay, Hu et al. 2024, arXiv:2404.06395)."""
    lr_decay_iters: int | None = None
    """Steps over which the learning rate decays (warm-up included); None: training.train_iters."""
    wsd_decay_fraction: float = 0.2
    """WSD: fraction of lr_decay_iters spent in the final decay."""
    wsd_decay_style: str = "linear"
    """WSD: shape of the final decay: linear | cosine | exponential | minus_sqrt."""

    def resolved_lr_decay_iters(self, train_iters: int) -> int:
        return train_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def wsd_decay_iters(self, train_iters: int) -> int:
        """Steps of WSD's final decay phase."""
        return round(self.wsd_decay_fraction * self.resolved_lr_decay_iters(train_iters))

    def validate(self, train_iters: int) -> None:
        from megatron_muon.ops.newton_schulz import COEFFICIENT_SCHEDULES
        from megatron_muon.ops.scaling import SCALE_MODES
        from megatron_muon.optim.param_groups import ROUTER_CHOICES

        _require(self.lr > 0, f"optimizer.lr={self.lr} must be > 0")
        _require(
            0 <= self.min_lr <= self.lr,
            f"optimizer.min_lr={self.min_lr} must be in [0, optimizer.lr={self.lr}]",
        )
        _require(self.weight_decay >= 0, f"optimizer.weight_decay={self.weight_decay} must be >= 0")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas={list(self.betas)} must be two values in [0, 1)",
        )
        _require(self.eps > 0, f"optimizer.eps={self.eps} must be > 0")
        _require(self.clip_grad >= 0, f"optimizer.clip_grad={self.clip_grad} must be >= 0 (0: off)")
        _require_choice("optimizer.decay_style", self.decay_style, DECAY_STYLES)
        decay_iters = self.resolved_lr_decay_iters(train_iters)
        _require(
            0 <= self.warmup_iters <= decay_iters,
            f"optimizer.warmup_iters={self.warmup_iters} must be in [0, lr_decay_iters={decay_iters}]",
        )
        if self.decay_style == "WSD":
            _require(
                0 < self.wsd_decay_fraction <= 1,
                f"optimizer.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]",
            )
            _require_choice("optimizer.wsd_decay_style", self.wsd_decay_style, WSD_DECAY_STYLES)
        _require(
            not (self.overlap_param_gather and not self.distributed_optimizer),
            "optimizer.overlap_param_gather=true needs optimizer.distributed_optimizer=true (without it "
            "parameters are updated on every rank and nothing is gathered)",
        )
        if self.distributed_optimizer and self.use_muon:
            _require(
                self.muon.tp_mode != "duplicated",
                "optimizer.distributed_optimizer=true cannot serve optimizer.muon.tp_mode=duplicated (it keeps "
                "a matrix's momentum on every TP rank); valid: auto, owner, distributed",
            )
        muon = self.muon
        try:
            muon.validate()
        except ValueError as error:
            raise ConfigError(f"optimizer.{error}") from None
        _require(muon.lr > 0, f"optimizer.muon.lr={muon.lr} must be > 0")
        _require(
            0 <= muon.min_lr <= muon.lr, f"optimizer.muon.min_lr={muon.min_lr} must be in [0, {muon.lr}]"
        )
        _require(muon.weight_decay >= 0, f"optimizer.muon.weight_decay={muon.weight_decay} must be >= 0")
        _require(0 <= muon.momentum < 1, f"optimizer.muon.momentum={muon.momentum} must be in [0, 1)")
        _require(muon.ns_steps >= 1, f"optimizer.muon.ns_steps={muon.ns_steps} must be >= 1")
        _require_choice("optimizer.muon.scale_mode", muon.scale_mode, SCALE_MODES)
        _require_choice("optimizer.muon.coefficients", muon.coefficients, sorted(COEFFICIENT_SCHEDULES))
        _require_choice("optimizer.muon.router", muon.router, ROUTER_CHOICES)


# ------------------------------------------------------------------- training, data, checkpoint, logging


@dataclass(kw_only=True, slots=True)
class TrainingConfig:
    """Length, batch and robustness of the training loop."""

    train_iters: int = 100
    """Optimizer steps."""
    global_batch_size: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro batches."""
    micro_batch_size: int = 2
    """Sequences per forward/backward on one rank."""
    eval_interval: int = 50
    """Steps between validation runs; 0: never."""
    eval_iters: int = 10
    """Micro-batch rounds (global batches) per validation run."""
    seed: int = 1234
    """Seed of weight init and data order."""
    max_consecutive_skips: int = 5
    """Steps in a row skipped for a NaN/Inf gradient before training stops with an error."""
    exit_signal_handler: bool = True
    """On SIGTERM (e.g. a SLURM time limit), save a checkpoint at the next step boundary and exit cleanly."""

    def num_microbatches(self, data_parallel_size: int) -> int:
        """Gradient-accumulation steps: global batch / (micro batch · DP)."""
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)


@dataclass(kw_only=True, slots=True)
class DataBlendEntry:
    """One dataset of the training blend."""

    prefix: str
    """Path prefix of a megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``)."""
    weight: float = 1.0
    """Relative sampling weight (normalized over the blend)."""


@dataclass(kw_only=True, slots=True)
class DataConfig:
    """Where the tokens come from."""

    blend: list[DataBlendEntry] = field(default_factory=list)
    """Datasets and their weights; empty only with ``mock``."""
    mock: bool = False
    """Synthetic tokens instead of files (megatron's MockGPTDataset); for smoke tests."""
    split: str = "969,30,1"
    """Train, validation, test proportions of each dataset's documents."""
    tokenizer_path: str | None = None
    """Directory of the tokenizer (SentencePiece model + megatron metadata); optional with ``mock``."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""

    def split_weights(self) -> tuple[int, int, int]:
        parts = self.split.split(",")
        _require(
            len(parts) == 3 and all(p.strip().isdigit() for p in parts),
            f"data.split={self.split!r} must be three non-negative integers, e.g. '969,30,1'",
        )
        weights = tuple(int(p) for p in parts)
        _require(weights[0] > 0, f"data.split={self.split!r} gives training no documents")
        return weights  # type: ignore[return-value]

    def validate(self, evaluates: bool) -> None:
        _require(
            self.mock or bool(self.blend),
            "no training data: set data.blend (a list of {prefix, weight}) or data.mock=true",
        )
        _require(
            not (self.mock and self.blend),
            f"data.mock=true and data.blend ({len(self.blend)} entries) are both set; choose one",
        )
        for index, entry in enumerate(self.blend):
            _require(bool(entry.prefix), f"data.blend[{index}].prefix is empty")
            _require(entry.weight > 0, f"data.blend[{index}].weight={entry.weight} must be > 0")
        weights = self.split_weights()
        if evaluates and not self.mock:
            # megatron's GPTDataset loops forever when asked for samples from an empty split.
            _require(
                weights[1] > 0,
                f"data.split={self.split!r} leaves validation no documents but training.eval_interval > 0",
            )
        _require(
            self.mock or self.tokenizer_path is not None, "data.tokenizer_path is required with data.blend"
        )
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    """Saving and resuming (megatron distributed checkpoints: loadable at another TP/PP/EP/DP)."""

    save_dir: str | None = None
    """Where checkpoints go; None: never save."""
    save_interval: int = 0
    """Steps between saves; 0: only at the end (and on an exit signal)."""
    keep_last: int | None = None
    """Keep only the newest K checkpoints; None: keep all."""
    load_dir: str | None = None
    """Where to look for a checkpoint to resume from; None: save_dir."""
    resume: str = "auto"
    """auto (the latest checkpoint in load_dir, if any) | none (start fresh) | a path to one checkpoint."""
    finetune: bool = False
    """Load weights only: fresh optimizer, schedule and iteration count."""

    def validate(self) -> None:
        _require(self.save_interval >= 0, f"checkpoint.save_interval={self.save_interval} must be >= 0")
        _require(
            self.save_interval == 0 or self.save_dir is not None,
            f"checkpoint.save_interval={self.save_interval} needs checkpoint.save_dir",
        )
        _require(
            self.keep_last is None or self.keep_last >= 1,
            f"checkpoint.keep_last={self.keep_last} must be >= 1 or null",
        )
        _require(bool(self.resume), "checkpoint.resume is empty; use auto, none or a checkpoint path")
        if self.finetune:
            has_source = self.resume not in RESUME_MODES or (
                self.resume == "auto" and (self.load_dir or self.save_dir) is not None
            )
            _require(
                has_source,
                f"checkpoint.finetune=true needs weights to load: checkpoint.resume={self.resume!r} with "
                f"load_dir={self.load_dir!r}",
            )


@dataclass(kw_only=True, slots=True)
class LoggingConfig:
    """What is logged where (rank 0 prints; one rank writes TensorBoard)."""

    log_interval: int = 10
    """Steps between log lines and TensorBoard scalars."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory; None: no TensorBoard."""
    verbose: bool = False
    """Also print the benign third-party warnings that ``megatron_muon/logging_setup.py`` silences."""


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """Everything a pretraining run needs, one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape and numerics."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Process grid."""
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    """AdamW, Muon and the learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Loop length and batch."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log lines and TensorBoard."""


# --------------------------------------------------------------------------------------- validation


def validate(cfg: PretrainConfig, world_size: int | None = None) -> ParallelDims:
    """Check ``cfg`` as a whole at ``world_size`` processes (None: ``cfg.parallel.world_size``), before any
    process group starts. Returns the process grid. Raises ``ConfigError`` with a one-line message."""
    intended = cfg.parallel.world_size
    if world_size is None:
        _require(
            intended is not None, "the world size is unknown: set parallel.world_size or pass world_size"
        )
        world_size = intended
    _require(
        intended is None or intended == world_size,
        f"parallel.world_size={intended} but {world_size} processes were started",
    )
    cfg.model.validate()
    dims = cfg.parallel.validate(world_size, cfg.model)
    train = cfg.training
    _require_positive("training", train, "train_iters", "global_batch_size", "micro_batch_size")
    per_step = train.micro_batch_size * dims.dp
    _require(
        train.global_batch_size % per_step == 0,
        f"training.global_batch_size={train.global_batch_size} is not divisible by training.micro_batch_size="
        f"{train.micro_batch_size} x data-parallel size {dims.dp} = {per_step}",
    )
    _require(train.eval_interval >= 0, f"training.eval_interval={train.eval_interval} must be >= 0")
    _require(
        train.eval_interval == 0 or train.eval_iters >= 1,
        f"training.eval_iters={train.eval_iters} must be >= 1 when training.eval_interval > 0",
    )
    _require(
        train.max_consecutive_skips >= 1,
        f"training.max_consecutive_skips={train.max_consecutive_skips} must be >= 1",
    )
    cfg.optimizer.validate(train.train_iters)
    qk_clip = cfg.optimizer.qk_clip
    try:
        qk_clip.validate()
    except ValueError as error:
        raise ConfigError(f"optimizer.{error}") from None
    _require(
        # With MLA the norms are on the q / kv latents, before the up projections the clip rescales.
        not (qk_clip.enabled and cfg.model.qk_layernorm and not cfg.model.multi_latent_attention),
        "optimizer.qk_clip.enabled=true with model.qk_layernorm=true: the norm on queries and keys undoes any "
        "rescaling of their weights; turn one of them off",
    )
    if cfg.model.mup_base_hidden_size is not None and cfg.optimizer.use_muon:
        from megatron_muon.mup import MUON_SCALE_MODE

        _require(
            cfg.optimizer.muon.scale_mode == MUON_SCALE_MODE,
            f"optimizer.muon.scale_mode={cfg.optimizer.muon.scale_mode!r} with muP (model.mup_base_hidden_size="
            f"{cfg.model.mup_base_hidden_size}); muP needs {MUON_SCALE_MODE!r} (√(fan_out/fan_in), docs/mup.md)",
        )
    cfg.data.validate(evaluates=train.eval_interval > 0)
    cfg.checkpoint.validate()
    _require(cfg.logging.log_interval >= 1, f"logging.log_interval={cfg.logging.log_interval} must be >= 1")
    return dims


def validate_tokenizer(cfg: PretrainConfig, tokenizer_vocab_size: int) -> None:
    """Check the model's vocabulary holds the tokenizer's (call once the tokenizer is loaded)."""
    vocab = cfg.model.vocab_size
    _require(
        tokenizer_vocab_size <= vocab,
        f"the tokenizer has {tokenizer_vocab_size} tokens but model.vocab_size={vocab}; set model.vocab_size="
        f"{padded_vocab_size(tokenizer_vocab_size, cfg.parallel.tp)} (padded to 128 x parallel.tp)",
    )


def describe(cfg: PretrainConfig, dims: ParallelDims) -> str:
    """The run's arithmetic, a few lines: layout, batch, tokens and parameters."""
    train, model = cfg.training, cfg.model
    total, active = count_parameters(model)
    tokens_per_step = train.global_batch_size * model.seq_length
    accumulation = train.num_microbatches(dims.dp)
    return "\n".join(
        [
            dims.describe(),
            f"batch: {train.micro_batch_size} micro x {accumulation} accumulation x {dims.dp} DP = "
            f"{train.global_batch_size} sequences x {model.seq_length} tokens = {tokens_per_step:,} tokens/step",
            f"tokens: {train.train_iters:,} steps x {tokens_per_step:,} = {train.train_iters * tokens_per_step:,}",
            f"parameters: {total:,} total, {active:,} active per token",
        ]
    )


# Loading lives in config_loading.py (OmegaConf, the CLI); these forwarders let callers import one module.
def load_config(path, overrides=()) -> PretrainConfig:
    """YAML file (or None: defaults) + dotted overrides -> a typed :class:`PretrainConfig` (see config_loading)."""
    from megatron_muon.training.config_loading import load_config as load

    return load(path, overrides)


def to_yaml(cfg: PretrainConfig) -> str:
    """The resolved configuration as YAML (saved with checkpoints); ``load_config`` reads it back."""
    from megatron_muon.training.config_loading import to_yaml as dump

    return dump(cfg)


if __name__ == "__main__":
    import sys

    from megatron_muon.training.config_loading import main

    sys.exit(main())
