"""The ``model`` section of the pretraining config (see ``config.py``): shape and numerics of the MoE GPT."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_muon.training.config_checks import (
    FP8_RECIPES,
    LOAD_BALANCING_TYPES,
    NORMALIZATIONS,
    PRECISIONS,
    ROUTER_SCORE_FUNCTIONS,
    TRANSFORMER_IMPLS,
    ConfigError,
    _require,
    _require_choice,
    _require_divides,
    _require_positive,
)

__all__ = ["ConfigError", "ModelConfig", "count_parameters", "padded_vocab_size", "tiny_moe_config"]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """Shape and numerics of the MoE GPT (megatron-core ``GPTModel``: SwiGLU MLPs, RoPE, no linear biases).

    Defaults are a ~0.26 M-parameter model that runs on one CPU core (the shape of ``models.tiny.TinyMoEConfig``).
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

    def mup_width(self):
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

    def validate(self) -> None:
        """Checks within the model section (the layout-dependent ones are in ``ParallelConfig.validate``)."""
        _require_positive(
            "model", self, "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"
        )
        freq = self.moe_layer_freq
        if isinstance(freq, int) and not isinstance(freq, bool):
            _require(freq >= 1, f"model.moe_layer_freq={freq} must be >= 1 (every k-th layer) or a 0/1 list")
        else:
            _require(
                isinstance(freq, list) and all(v in (0, 1) for v in freq),
                f"model.moe_layer_freq={freq!r} must be an int >= 1 or a list of 0/1 per layer",
            )
            _require(
                len(freq) == self.num_layers,
                f"model.moe_layer_freq has {len(freq)} entries, expected model.num_layers={self.num_layers}",
            )
        _require(
            0 <= self.first_k_dense_layers <= self.num_layers,
            f"model.first_k_dense_layers={self.first_k_dense_layers} must be in [0, {self.num_layers}]",
        )
        pattern = self.moe_layer_pattern()
        if any(v == 0 for v in pattern):
            _require_positive("model", self, "ffn_hidden_size")
        if self.num_moe_experts:
            _require(any(pattern), f"model.num_moe_experts={self.num_moe_experts} but no layer is MoE")
            _require_positive("model", self, "moe_ffn_hidden_size", "moe_router_topk")
            _require(
                self.moe_router_topk <= self.num_moe_experts,
                f"model.moe_router_topk={self.moe_router_topk} exceeds model.num_moe_experts={self.num_moe_experts}",
            )
        _require(self.num_moe_experts >= 0, f"model.num_moe_experts={self.num_moe_experts} must be >= 0")
        _require(
            self.moe_shared_expert_intermediate_size >= 0,
            f"model.moe_shared_expert_intermediate_size={self.moe_shared_expert_intermediate_size} must be >= 0",
        )
        _require_choice(
            "model.moe_router_score_function", self.moe_router_score_function, ROUTER_SCORE_FUNCTIONS
        )
        _require_choice(
            "model.moe_router_load_balancing_type", self.moe_router_load_balancing_type, LOAD_BALANCING_TYPES
        )
        _require(
            self.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0"
        )
        _require(
            self.moe_router_bias_update_rate >= 0,
            f"model.moe_router_bias_update_rate={self.moe_router_bias_update_rate} must be >= 0",
        )
        _require(
            not self.moe_router_enable_expert_bias or self.moe_router_score_function == "sigmoid",
            "model.moe_router_enable_expert_bias=true needs model.moe_router_score_function='sigmoid' "
            f"(got {self.moe_router_score_function!r})",
        )
        _require_choice("model.normalization", self.normalization, NORMALIZATIONS)
        _require_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        _require_choice("model.precision", self.precision, PRECISIONS)
        if self.fp8 is not None:
            _require_choice("model.fp8", self.fp8, [None, *FP8_RECIPES])
            _require(self.precision == "bf16", f"model.fp8={self.fp8!r} needs model.precision='bf16'")
            _require(
                self.transformer_impl == "transformer_engine",
                f"model.fp8={self.fp8!r} needs model.transformer_impl='transformer_engine'",
            )
        self._validate_mup()
        if self.multi_latent_attention:
            self._validate_mla()
        else:
            _require(
                self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size}; set model.kv_channels",
            )
            _require_divides(
                "model.num_query_groups",
                self.query_groups,
                "model.num_attention_heads",
                self.num_attention_heads,
            )

    def _validate_mla(self) -> None:
        """MLA's head dims (the layout-dependent divisibility is in ``ParallelConfig.validate``)."""
        _require_positive("model", self, "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
        _require(
            self.q_lora_rank is None or self.q_lora_rank >= 1,
            f"model.q_lora_rank={self.q_lora_rank} must be >= 1 or null",
        )
        _require(
            self.qk_pos_emb_head_dim % 2 == 0,
            f"model.qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even (RoPE rotates pairs of dims)",
        )
        # Standard attention's head shape has no meaning with MLA: a value here would silently change nothing.
        _require(
            self.kv_channels is None,
            f"model.kv_channels={self.kv_channels} with model.multi_latent_attention=true: MLA's head dims are "
            "model.qk_head_dim + model.qk_pos_emb_head_dim (query/key) and model.v_head_dim; set it to null",
        )
        _require(
            self.num_query_groups in (None, self.num_attention_heads),
            f"model.num_query_groups={self.num_query_groups} with model.multi_latent_attention=true: MLA has one "
            f"key/value head per query head; set it to null (or {self.num_attention_heads})",
        )

    def _validate_mup(self) -> None:
        base, base_head = self.mup_base_hidden_size, self.mup_base_head_dim
        if base is None:
            _require(
                base_head is None,
                f"model.mup_base_head_dim={base_head} needs model.mup_base_hidden_size (muP is off without it)",
            )
            return
        _require(base >= 1, f"model.mup_base_hidden_size={base} must be >= 1 or null (muP off)")
        _require(
            base_head is None or base_head > 0, f"model.mup_base_head_dim={base_head} must be > 0 or null"
        )
        _require(
            not self.multi_latent_attention,
            "model.mup_base_hidden_size is set but model.multi_latent_attention=true: muP with MLA is not "
            "implemented (megatron's MLA fixes its softmax scale from qk + rotary head dims, and the width rules "
            "for its latent ranks are not worked out here)",
        )


def count_parameters(model: ModelConfig) -> tuple[int, int]:
    """(total, active) parameters of the megatron GPTModel ``model`` describes (see ``param_count.py``)."""
    from megatron_muon.training.param_count import count_parameters as count

    return count(model)


def padded_vocab_size(tokenizer_vocab_size: int, tensor_parallel_size: int, multiple: int = 128) -> int:
    """Megatron's padding (``--make-vocab-size-divisible-by 128``): the smallest multiple of
    ``multiple · tensor_parallel_size`` that holds the tokenizer's vocabulary. E.g. 4000 at TP2 -> 4096."""
    step = multiple * tensor_parallel_size
    return -(-tokenizer_vocab_size // step) * step


def tiny_moe_config(model: ModelConfig):
    """The ``models.tiny.TinyMoEConfig`` of ``model`` (see ``model_bridge.py``); ``ConfigError`` for features the
    local-spec builder does not build."""
    from megatron_muon.training.model_bridge import tiny_moe_config as bridge

    return bridge(model)
