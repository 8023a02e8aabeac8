"""The pretraining config's schema: one plain typed dataclass per section, composed in :class:`PretrainConfig`.

Each component gets its own section (``model``, ``parallel``, ``optimizer``, ``training``, ``data``,
``checkpoint``, ``logging``), the torchtitan shape: typed fields with a docstring under each, handed to the
part of the code that needs them. Muon's own options are :class:`megatron_muon.optim.options.MuonConfig`,
reused as ``optimizer.muon`` rather than copied.

Near the bottom of the package's one-way chain ``errors`` <- ``schema`` <- ``checks`` / ``param_count`` <-
``loading`` <- ``cli``: fields, their valid choices and derived values only. Whether a value is valid is decided in
``checks.py`` (one place per field), except the process grid :class:`ParallelDims`, which checks its own products
on construction. OmegaConf (``loading.py``) reads ``slots=True`` dataclasses fine (it only needs ``dataclasses.fields`` and
keyword construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from megatron_muon.config.errors import product, require
from megatron_muon.optim.options import MuonConfig, QKClipConfig

if TYPE_CHECKING:
    from megatron_muon.mup import MupWidth

__all__ = [
    "DECAY_STYLES",
    "FP8_RECIPES",
    "LOAD_BALANCING_TYPES",
    "NORMALIZATIONS",
    "PRECISIONS",
    "RESUME_MODES",
    "ROUTER_SCORE_FUNCTIONS",
    "TRANSFORMER_IMPLS",
    "WSD_DECAY_STYLES",
    "DecayStyle",
    "Fp8Recipe",
    "LoadBalancingType",
    "Normalization",
    "Precision",
    "RouterScoreFunction",
    "TransformerImpl",
    "WsdDecayStyle",
    "CheckpointConfig",
    "DataBlendEntry",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizationConfig",
    "ParallelConfig",
    "ParallelDims",
    "PretrainConfig",
    "TrainingConfig",
    "padded_vocab_size",
]

# The valid values of the mode fields, as ``Literal`` types for signatures (the planner, the test helpers) and as
# tuples for the checks. The fields themselves are typed ``str``: their values are checked in one
# place (``checks.py``) with one-line errors naming the key, not by OmegaConf while loading.
Normalization = Literal["RMSNorm", "LayerNorm"]
TransformerImpl = Literal["local", "transformer_engine"]
Precision = Literal["fp32", "bf16"]
Fp8Recipe = Literal["delayed", "current", "mxfp8"]
RouterScoreFunction = Literal["softmax", "sigmoid"]
LoadBalancingType = Literal["aux_loss", "seq_aux_loss", "none"]
DecayStyle = Literal["cosine", "linear", "constant", "WSD"]
WsdDecayStyle = Literal["linear", "cosine", "exponential", "minus_sqrt"]

NORMALIZATIONS: tuple[Normalization, ...] = get_args(Normalization)
TRANSFORMER_IMPLS: tuple[TransformerImpl, ...] = get_args(TransformerImpl)
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
FP8_RECIPES: dict[Fp8Recipe, str] = {"delayed": "delayed", "current": "tensorwise", "mxfp8": "mxfp8"}
"""Our fp8 names -> megatron's ``TransformerConfig.fp8_recipe`` (per-tensor current scaling is "tensorwise")."""
ROUTER_SCORE_FUNCTIONS: tuple[RouterScoreFunction, ...] = get_args(RouterScoreFunction)
LOAD_BALANCING_TYPES: tuple[LoadBalancingType, ...] = get_args(LoadBalancingType)
DECAY_STYLES: tuple[DecayStyle, ...] = get_args(DecayStyle)
WSD_DECAY_STYLES: tuple[WsdDecayStyle, ...] = get_args(WsdDecayStyle)
RESUME_MODES = ("auto", "none")
"""The keywords of ``checkpoint.resume``; any other value is a checkpoint path."""


# --------------------------------------------------------------------------------------------- model


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape and numerics of the MoE GPT (megatron-core ``GPTModel``: SwiGLU MLPs, RoPE, no linear biases).

    Defaults are a ~0.26 M-parameter model that runs on one CPU core (the tests' tiny model). The model builder
    (``models/gpt_moe.py: build_transformer_config``) reads this object itself: a new option is a field here and
    its line in the builder's step (shape, attention, MoE, muP, precision).
    """

    num_layers: int = 4
    """Transformer layers, dense and MoE together."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 128
    """Hidden size of the dense SwiGLU MLP (the dense layers of ``moe_layer_pattern()``)."""
    moe_ffn_hidden_size: int = 64
    """Hidden size of each routed expert's SwiGLU MLP."""
    num_attention_heads: int = 4
    """Query heads."""
    num_query_groups: int | None = 2
    """Key/value heads (grouped-query attention); None: one per query head. Unused with MLA."""
    kv_channels: int | None = None
    """Head dim of standard attention; None: hidden_size / num_attention_heads."""
    qk_layernorm: bool = False
    """Norm on queries and keys (per head); with MLA the norms on the compressed q / kv latents."""
    num_moe_experts: int = 4
    """Routed experts per MoE layer; 0 makes every layer dense."""
    moe_router_topk: int = 2
    """Routed experts per token."""
    moe_layer_freq: list[int] | int = 1
    """Which layers are MoE: a 0/1 list with one entry per layer, or k = every k-th layer (0, k, 2k, ...),
    megatron's convention."""
    first_k_dense_layers: int = 1
    """The first k layers are dense whatever ``moe_layer_freq`` says (DeepSeek-V3 / Moonlight:
    ``first_k_dense_replace``)."""
    moe_shared_expert_intermediate_size: int = 0
    """Total hidden size of the shared experts (n_shared x expert size); 0: no shared expert."""
    moe_router_score_function: str = "softmax"
    """Router scores: softmax | sigmoid (DeepSeek-V3, needed for the expert bias)."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (switch loss over each micro batch) | seq_aux_loss (the same loss per sequence, averaged over the
    batch: DeepSeek-V3's complementary sequence-wise loss) | none (no loss; e.g. balancing by the expert bias alone).
    Megatron's router computes each; the step reports it as ``loss/load_balancing``."""
    moe_aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss (Fedus et al. 2021, eq. 4)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias on the routing scores, updated from the expert loads
    (Wang et al. 2024, arXiv:2408.15664; DeepSeek-V3). Needs the sigmoid score function."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update: after each step every bias moves by ± this towards the mean load
    (DeepSeek-V3's γ = 0.001; megatron's ``moe_router_bias_update_rate``). Used with the expert bias only."""
    moe_router_topk_scaling_factor: float | None = None
    """Factor on the top-k routing weights (Moonlight: 2.446); None: 1."""
    vocab_size: int = 256
    """Rows of the embedding and output layer: the tokenizer's vocabulary padded (``padded_vocab_size``)."""
    seq_length: int = 32
    """Tokens per training sequence; also the maximum position (RoPE has no learned position table)."""
    rotary_base: int = 10000
    """RoPE base θ (Su et al. 2021)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init (under muP: at the base width; see ``megatron_muon/mup.py``)."""
    mup_base_hidden_size: int | None = None
    """muP (``megatron_muon/mup.py``, docs/mup.md): hidden size of the base model the hyperparameters were tuned
    at; the width multiplier is hidden_size / this. None: muP off (standard parametrization)."""
    mup_base_head_dim: float | None = None
    """muP: head dim of the base model (attention scale √this / head_dim); None: mup_base_hidden_size /
    num_attention_heads (the head count stays fixed as the model widens)."""
    output_logit_multiplier: float = 1.0
    """Base multiplier of the output logits, tuned at the base width (docs/mup.md); under muP the logits are
    multiplied by this / m, without muP by this."""
    attention_scale_multiplier: float = 1.0
    """Base multiplier of the attention scale: q·k × this / √d_head (under muP × this · √d_head,base / d_head)."""
    share_embeddings_and_output_weights: bool = False
    """Tie the input embedding and the output layer."""
    normalization: str = "RMSNorm"
    """RMSNorm | LayerNorm (LayerNorm adds a bias per norm)."""
    norm_epsilon: float = 1e-5
    """Epsilon of every norm."""
    transformer_impl: str = "local"
    """local (megatron's torch layers; CPU and tests) | transformer_engine (GPU; needed for fp8)."""
    multi_latent_attention: bool = False
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434) instead of grouped-query attention."""
    q_lora_rank: int | None = None
    """MLA: rank of the compressed query; None: queries are projected directly (DeepSeek-V2-Lite, Moonlight)."""
    kv_lora_rank: int = 512
    """MLA: rank of the compressed key/value latent."""
    qk_head_dim: int = 128
    """MLA: per-head query/key dim without rotary position (DeepSeek's qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = 64
    """MLA: per-head dim of the decoupled rotary part (DeepSeek's qk_rope_head_dim)."""
    v_head_dim: int = 128
    """MLA: per-head value dim."""
    precision: str = "fp32"
    """Parameter and compute dtype: fp32 | bf16 (bf16 keeps fp32 main weights in the optimizer)."""
    fp8: str | None = None
    """FP8 GEMMs through Transformer Engine: None | delayed | current | mxfp8 (megatron's fp8_recipe
    delayed | tensorwise | mxfp8). Needs precision bf16 and transformer_engine."""

    @property
    def head_dim(self) -> int:
        """Head dim of standard attention."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def mup_width(self) -> MupWidth | None:
        """The muP ``MupWidth`` of this model (None when muP is off)."""
        if self.mup_base_hidden_size is None:
            return None
        from megatron_muon.mup import MupWidth

        return MupWidth.of_model(
            hidden_size=self.hidden_size,
            head_dim=self.head_dim,
            num_attention_heads=self.num_attention_heads,
            base_hidden_size=self.mup_base_hidden_size,
            base_head_dim=self.mup_base_head_dim,
        )

    @property
    def query_groups(self) -> int:
        """Key/value heads of standard attention."""
        return self.num_query_groups or self.num_attention_heads

    def moe_layer_pattern(self) -> list[int]:
        """One entry per layer: 1 = MoE, 0 = dense (megatron's ``moe_layer_freq`` as a list)."""
        if self.num_moe_experts == 0:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            pattern = [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        else:
            pattern = [int(v) for v in self.moe_layer_freq]
        return [0 if i < self.first_k_dense_layers else v for i, v in enumerate(pattern)]


def padded_vocab_size(tokenizer_vocab_size: int, tensor_parallel_size: int, multiple: int = 128) -> int:
    """Megatron's padding (``--make-vocab-size-divisible-by 128``): the smallest multiple of
    ``multiple · tensor_parallel_size`` that holds the tokenizer's vocabulary. E.g. 4000 at TP2 -> 4096."""
    step = multiple * tensor_parallel_size
    return -(-tokenizer_vocab_size // step) * step


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
            require(value >= 1, f"parallel.{name}={value} must be >= 1")
        require(self.vpp is None or self.vpp >= 1, f"parallel.vpp={self.vpp} must be >= 1 or null")
        require(
            self.vpp is None or self.vpp == 1 or self.pp > 1,
            f"parallel.vpp={self.vpp} needs parallel.pp > 1 (got {self.pp})",
        )
        dense_text, dense = product(
            [("parallel.tp", self.tp), ("parallel.pp", self.pp), ("parallel.cp", self.cp)]
        )
        require(
            self.world_size % dense == 0, f"world_size={self.world_size} is not divisible by {dense_text}"
        )
        expert = self.ep * self.etp
        require(
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
    fsdp: bool = False
    """Fully sharded data parallelism (torch FSDP2, ``training/fsdp.py``): parameters, gradients and optimizer
    state sharded over the data-parallel ranks (experts over the expert-data-parallel ranks), fp32 shards gathered
    in the model's precision for compute. Instead of ``optimizer.distributed_optimizer``."""

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


# ----------------------------------------------------------------------------------------- optimizer


@dataclass(kw_only=True, slots=True)
class OptimizationConfig:
    """AdamW (embeddings, output layer, norms, router), Muon (hidden matrices) and the learning-rate schedule.

    Named for optimization (both optimizers, clipping, the schedule), not ``OptimizerConfig``: that is megatron's
    config of the AdamW side, built from this one (``training/megatron_configs.py``).
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
    router_lr_multiplier: float = 1.0
    """The MoE router's AdamW LR is ``lr`` × this (× 1/m under muP): a base multiplier tuned at the base width
    (docs/mup.md). Needs the router on AdamW (``muon.router: adamw``) and ``use_muon``."""
    muon: MuonConfig = field(default_factory=MuonConfig)
    """Muon's own options (``optim/build.py``): lr, min_lr, weight decay, momentum, scale rule, Newton–Schulz."""
    use_muon: bool = True
    """False: AdamW (megatron's own optimizer) for every parameter, with the settings above — the baseline."""
    qk_clip: QKClipConfig = field(default_factory=QKClipConfig)
    """MuonClip's QK-clip (Kimi K2) and the per-layer max-logit metric."""
    distributed_optimizer: bool = False
    """True: fp32 master weights and optimizer state stored once across data-parallel replicas, gradients
    reduce-scattered (megatron's DDP with ``use_distributed_optimizer``; Muon on megatron's shard-aligned
    layer-wise layout, AdamW on megatron's ``DistributedOptimizer``). ``docs/distributed_optimizer.md``."""
    overlap_grad_reduce: bool = False
    """Overlap megatron DDP's gradient all-reduce / reduce-scatter with the backward pass (bucketed)."""
    overlap_param_gather: bool = False
    """With ``distributed_optimizer``: overlap the parameter all-gather after the step with the next forward."""
    ddp_bucket_size: int | None = None
    """Elements per DDP gradient bucket (megatron's ``--ddp-bucket-size``): each bucket's all-reduce /
    reduce-scatter starts as soon as its gradients are ready. Only with ``overlap_grad_reduce`` (without it megatron
    makes one bucket per buffer). None: megatron's default, max(40 M, 1 M × DP)."""
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
    optimizer: OptimizationConfig = field(default_factory=OptimizationConfig)
    """AdamW, Muon and the learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Loop length and batch."""
    data: DataConfig = field(default_factory=DataConfig)
    """Datasets and tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Saving and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log lines and TensorBoard."""
