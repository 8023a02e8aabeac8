"""muP (maximal update parametrization) for a Muon + AdamW MoE GPT: every width rule in one place.

A model of width ``d_model`` is described relative to a *base* model of width ``d_base`` (the proxy the
hyperparameters are tuned on) by the width multiplier ``m = d_model / d_base``. muP (Yang & Hu, "Tensor
Programs IV", arXiv:2011.14522; Yang et al., "Tensor Programs V", arXiv:2203.03466, "TP5" below) picks, per
parameter class, how the init, the multipliers and the learning rate change with ``m`` so that every
activation and every activation *update* stays the same size as the model widens; then the optimal
hyperparameters of the base model are (approximately) optimal at every width.

Assumption: every hidden dimension grows with ``m`` (``ffn_hidden_size``, ``moe_ffn_hidden_size``, the
attention width ``heads · head_dim``); the vocabulary, the number of experts and top-k do not. So every hidden
matrix's fan-in grows by ``m``. Per class, the rules below (functions of shapes and ``m`` only, unit-tested):

=============================  ==========================  ===================================================
parameter class                init std                    optimizer (LR / ε / weight decay)
=============================  ==========================  ===================================================
embedding                      σ                           AdamW: LR, ε constant
norms (vector-like)            1 (ones)                    AdamW: LR, ε constant; no weight decay
hidden matrices (attention,    σ·√(fan_in_base/fan_in)     Muon, spectral scale √(fan_out/fan_in): LR
MLP, experts, shared experts)  = σ/√m  (residual outputs:  constant; weight decay coefficient / m
                               σ/√(2L·m))                  (independent WD ∝ 1/width)
router (d_model → experts)     σ/m (output-type: fan-in    AdamW: LR / m, ε constant (its gradient is Θ(1)
                               grows, fan-out fixed)       per entry, like the output layer's)
output layer (LM head)         σ, logits × 1/m             AdamW: LR, ε constant (the 1/m multiplier makes
                                                           its effective LR 1/m: TP5 Table 3's "Adam LR
                                                           1/fan_in" for output weights)
attention logits               softmax scale √d_head_base / d_head  (1/√d_head at the base width, ∝ 1/d_head)
=============================  ==========================  ===================================================

Base multipliers (TP5 §5: constants tuned once at the base width, the same at every width): the logit multiplier
and the attention scale's factor (:func:`transformer_config_fields`) and the router's AdamW LR factor
(``optim/param_groups.adamw_matrix_overrides``); config keys ``model.output_logit_multiplier``,
``model.attention_scale_multiplier``, ``optimizer.router_lr_multiplier``.

How it reaches megatron-core: ``TransformerConfig.use_mup`` with our explicit ``softmax_scale`` and
``mup_output_mult`` (GPTModel multiplies its logits by it, ``LanguageModule._scale_logits``); megatron builds
the init methods itself from ``init_method_std`` and ``mup_width_mult`` (:func:`init_std` states the rule it
applies, and ``tests/unit/test_mup.py`` checks they agree) and tags the embedding and output weights
``is_embedding_parameter``. megatron gives the router the hidden init σ/√m; the model builder rescales it by
:func:`router_init_rescale` to the output-type σ/m. The optimizer rules are param-group overrides
(``optim/build.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "MUON_SCALE_MODE",
    "MupWidth",
    "adamw_multipliers",
    "attention_softmax_scale",
    "init_std",
    "muon_weight_decay",
    "output_logit_multiplier",
    "residual_output_init_std",
    "router_init_rescale",
    "router_init_std",
    "scaled_width_dims",
    "transformer_config_fields",
]

MUON_SCALE_MODE = "spectral"
"""Muon's update scale under muP (``ops/scaling.py``): √(fan_out/fan_in) gives each hidden matrix's update a
width-independent RMS→RMS operator norm, the muP condition on updates in the spectral view (Yang, Simon &
Bernstein, "A Spectral Condition for Feature Learning", arXiv:2310.17813). It is the same rule for expert
matrices, with their own (fan_out, fan_in): (d_ff_expert, d_model) for fc1, (d_model, d_ff_expert) for fc2.
The config refuses other scale modes under muP rather than silently replacing them."""

ADAMW_CLASSES = ("embedding", "vector", "output", "router", "hidden")
"""Classes of AdamW parameters: embedding, vector-like (norms, biases), output layer, the MoE router (an
output-type matrix: fan-in d_model grows, fan-out = the expert count does not), hidden matrix-like (both fans grow:
every hidden matrix when AdamW trains the whole model)."""


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number")


@dataclass(frozen=True, slots=True)
class MupWidth:
    """The width of a model relative to its muP base."""

    hidden_size: int
    """d_model of this model."""
    base_hidden_size: int
    """d_model of the base (proxy) model the hyperparameters were tuned at."""
    head_dim: float
    """Attention head dim of this model."""
    base_head_dim: float
    """Head dim of the base model (1/√ of it is the attention scale there)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "base_hidden_size", "head_dim", "base_head_dim"):
            _positive(name, getattr(self, name))

    @classmethod
    def of_model(
        cls,
        *,
        hidden_size: int,
        head_dim: float,
        num_attention_heads: int,
        base_hidden_size: int,
        base_head_dim: float | None = None,
    ) -> MupWidth:
        """The width of a model; ``base_head_dim=None`` means the base model has the same number of heads
        (``base_hidden_size / num_attention_heads``), i.e. the head dim grows with the width."""
        if base_head_dim is None:
            base_head_dim = base_hidden_size / num_attention_heads
        return cls(
            hidden_size=hidden_size,
            base_hidden_size=base_hidden_size,
            head_dim=head_dim,
            base_head_dim=base_head_dim,
        )

    @property
    def multiplier(self) -> float:
        """m = d_model / d_base."""
        return self.hidden_size / self.base_hidden_size


def init_std(base_std: float, fan_in: int, base_fan_in: float) -> float:
    """Init std of a hidden matrix: ∝ 1/√fan_in, equal to ``base_std`` at the base model's fan-in.

    TP5 Table 3, hidden weights: init variance 1/fan_in. With every hidden dim ∝ m this is ``base_std/√m``,
    which is what megatron's ``use_mup`` applies (``init_method_std / √mup_width_mult``).
    """
    _positive("base_std", base_std)
    _positive("fan_in", fan_in)
    _positive("base_fan_in", base_fan_in)
    return base_std * math.sqrt(base_fan_in / fan_in)


def residual_output_init_std(base_std: float, num_layers: int, width_multiplier: float) -> float:
    """Init std of the matrices that write into the residual stream (attention ``linear_proj``, MLP and expert
    ``linear_fc2``): GPT-2's depth scaling σ/√(2L) times the fan-in rule 1/√m (megatron's
    ``mup_scaled_init_method_normal``)."""
    _positive("num_layers", num_layers)
    _positive("width_multiplier", width_multiplier)
    return base_std / math.sqrt(2 * num_layers * width_multiplier)


def router_init_std(base_std: float, width_multiplier: float) -> float:
    """Init std of the MoE router (d_model → experts): ``base_std / m``, the output-type rule.

    The router's fan-in (d_model) grows with m, its fan-out (the expert count) does not: the shape of the output
    layer, not of a hidden matrix. The spectral condition (Yang, Simon & Bernstein, arXiv:2310.17813, Condition
    1) asks ‖W‖₂ = Θ(√(fan_out/fan_in)) = Θ(1/√d); a Gaussian (fan_out × fan_in) matrix of std s has
    ‖W‖₂ ≈ s(√fan_in + √fan_out) ≈ s√d, so s ∝ 1/d = 1/fan_in — TP5 Table 3's output-weight init (variance
    1/fan_in²), not the hidden one (1/fan_in). With the hidden σ/√m, ‖W‖₂ stays Θ(1): the router's backward
    signal into the residual stream, Wᵀ·∂L/∂logits, is then √m too large against the rest of the network's
    Θ(1/d) per coordinate, and its logits at init stay Θ(1) instead of vanishing under the learned part.
    """
    _positive("base_std", base_std)
    _positive("width_multiplier", width_multiplier)
    return base_std / width_multiplier


def router_init_rescale(width_multiplier: float) -> float:
    """Factor that turns megatron's router init under ``use_mup`` (the hidden ``init_method``, σ/√m) into
    :func:`router_init_std` (σ/m): 1/√m. Rescaling the drawn weights keeps the draw (and every rank's RNG
    stream) as it is."""
    _positive("width_multiplier", width_multiplier)
    return 1.0 / math.sqrt(width_multiplier)


def output_logit_multiplier(width_multiplier: float) -> float:
    """Factor on the output logits: 1/m.

    The output layer keeps the base init σ and a width-independent Adam LR; the 1/m on its output makes it
    equivalent to TP5 Table 3's output-weight rule (init std ∝ 1/fan_in, Adam LR ∝ 1/fan_in), because Adam's
    update does not depend on the gradient's scale: reparametrize W = W'/m. This is the formulation of the
    ``mup`` package's ``MuReadout`` (output divided by the width multiplier) and of megatron's
    ``mup_output_mult``. Tied embeddings are then possible, which Table 3 does not allow.
    """
    _positive("width_multiplier", width_multiplier)
    return 1.0 / width_multiplier


def attention_softmax_scale(head_dim: float, base_head_dim: float) -> float:
    """Scale of q·k: √d_head_base / d_head, i.e. 1/d_head (TP5 §4, "attention logits scaled by 1/d") anchored
    so it equals the standard 1/√d_head at the base width (megatron's ``mup_base_head_dim`` formula)."""
    _positive("head_dim", head_dim)
    _positive("base_head_dim", base_head_dim)
    return math.sqrt(base_head_dim) / head_dim


def adamw_multipliers(parameter_class: str, width_multiplier: float) -> tuple[float, float]:
    """(LR multiplier, ε multiplier) of an AdamW parameter of ``parameter_class`` (one of ``ADAMW_CLASSES``).

    TP5 Table 3 "Adam LR": input weights and biases 1, hidden and output weights 1/fan_in; the output layer's
    1/fan_in is carried by :func:`output_logit_multiplier`, so its LR multiplier here is 1. The router is an
    output-type matrix without a logit multiplier (:func:`router_init_std`), so its LR is divided by m itself:
    an Adam step moves each entry by ~LR, and its logits by ~LR·fan_in·(alignment), Θ(1) only with LR ∝ 1/fan_in.
    ε scales like the gradient (TP5 Appendix B.3): ∝ 1/fan_in for hidden weights, whose gradient comes through
    the Θ(1/d) backward signal (as megatron's ``get_mup_config_overrides`` does), but constant for the router,
    whose gradient (∂L/∂logits)·xᵀ has Θ(1) entries at every width.
    """
    _positive("width_multiplier", width_multiplier)
    if parameter_class not in ADAMW_CLASSES:
        raise ValueError(f"parameter_class={parameter_class!r}; valid: {list(ADAMW_CLASSES)}")
    if parameter_class == "hidden":
        return 1.0 / width_multiplier, 1.0 / width_multiplier
    if parameter_class == "router":
        return 1.0 / width_multiplier, 1.0
    return 1.0, 1.0


def muon_weight_decay(base_weight_decay: float, width_multiplier: float) -> float:
    """Muon's weight-decay coefficient at width multiplier m: ``base / m``.

    Our Muon decays ``W ← W·(1 − lr·wd)``, so the *independent* weight decay (the per-step shrink factor,
    Loshchilov & Hutter's original form) is lr·wd. Under muP the Muon LR does not change with width, so
    keeping independent weight decay ∝ 1/width — what Qiu et al. 2025 ("Hyperparameter Transfer Enables
    Consistent Gains of Matrix-Preconditioned Optimizers Across Scales", arXiv:2512.05620) found nearly optimal
    for Muon, Shampoo and SOAP at compute-optimal scale — means the coefficient scales as 1/m. AdamW's matrix-like
    groups (LR / m: the router, hidden matrices) get the same independent 1/m from their LR, with the coefficient
    unchanged.
    """
    if isinstance(base_weight_decay, bool) or not base_weight_decay >= 0:
        raise ValueError(f"base_weight_decay={base_weight_decay!r} must be >= 0")
    _positive("width_multiplier", width_multiplier)
    return base_weight_decay / width_multiplier


def transformer_config_fields(
    width: MupWidth, *, output_logit_base: float = 1.0, attention_scale_base: float = 1.0
) -> dict[str, object]:
    """megatron ``TransformerConfig`` fields that switch its muP on for ``width``: megatron then derives the
    init methods (:func:`init_std`, :func:`residual_output_init_std`; the embedding and the untied output
    layer keep σ); the attention scale and the logit multiplier are given explicitly from the rules above.

    ``output_logit_base`` and ``attention_scale_base`` are the base model's own multipliers (tuned once at the
    base width, TP5 §5 "base multipliers"): the logits are multiplied by ``output_logit_base / m`` and q·k by
    ``attention_scale_base · √d_head,base / d_head``. The width rules are unchanged; at m = 1 these are the
    only difference from the standard model. A standard-parametrization model with base multipliers is this at
    m = 1 (``MupWidth`` with base = itself): every other muP rule is then the identity.
    """
    _positive("output_logit_base", output_logit_base)
    _positive("attention_scale_base", attention_scale_base)
    return {
        "use_mup": True,
        "mup_base_hidden_size": width.base_hidden_size,
        "mup_base_head_dim": float(width.base_head_dim),
        "softmax_scale": attention_scale_base * attention_softmax_scale(width.head_dim, width.base_head_dim),
        "mup_output_mult": output_logit_base * output_logit_multiplier(width.multiplier),
    }


def scaled_width_dims(
    *, reference_hidden_size: int, hidden_size: int, dims: dict[str, int], multiple_of: int = 1
) -> dict[str, int]:
    """``dims`` (e.g. ffn_hidden_size) of a model of width ``reference_hidden_size`` rescaled to ``hidden_size``
    so that dim / d_model stays fixed (the muP assumption above), rounded to a multiple of ``multiple_of``."""
    _positive("reference_hidden_size", reference_hidden_size)
    _positive("hidden_size", hidden_size)
    scaled = {}
    for name, value in dims.items():
        exact = value * hidden_size / reference_hidden_size
        rounded = max(multiple_of, round(exact / multiple_of) * multiple_of)
        if value and rounded != exact:
            raise ValueError(
                f"{name}={value} at hidden_size={reference_hidden_size} scales to {exact:g} at "
                f"hidden_size={hidden_size}, not a multiple of {multiple_of}; choose widths that keep it whole"
            )
        scaled[name] = int(rounded) if value else 0
    return scaled
