"""Explicit maps between our megatron MoE GPT and the Hugging Face ``transformers`` MoE architectures.

Pure: configs and tensors only, no files, no processes, no ``transformers`` import (it is a test/dev dependency).

Our model (``models/gpt_moe.py`` on megatron's local spec) is: RMSNorm (ε = ``model.norm_epsilon``, on the input of
attention and of the MLP, and at the end), grouped-query attention without biases, RoPE on the whole head
(``rotary_percent=1``, halves rotated as in GPT-NeoX, θ = ``model.rotary_base``), optional RMSNorm per head on
queries and keys (``qk_layernorm``), SwiGLU MLPs without biases, top-k routed experts, optional ungated shared
expert, untied or tied embeddings. Megatron's router (``moe_router_pre_softmax=False``): softmax over the top-k
*logits*, which is the top-k softmax probabilities renormalized to sum to 1; sigmoid: top-k of ``sigmoid +
expert bias``, weights ``sigmoid`` renormalized when k > 1; then times ``moe_router_topk_scaling_factor``.

Supported architectures (``ARCHITECTURES``) and what each one cannot hold (:func:`obstacles`):

==============  ============================================================================================
``mixtral``     every layer MoE; softmax top-k renormalized; no QK-norm, no shared expert
``qwen3_moe``   QK-norm per head (required); dense layers anywhere (``mlp_only_layers``); softmax, renormalized
                (``norm_topk_prob``); no shared expert
``qwen2_moe``   no QK-norm; dense layers anywhere; its shared expert is *gated* (``sigmoid(shared_expert_gate
                x)``) and megatron's is not, so only a model without a shared expert fits (written with a
                0-wide shared expert, which adds exactly zero); q/k/v biases written as zeros
``glm4_moe``    sigmoid router with expert bias (``e_score_correction_bias``) and scaling factor, ungated shared
                experts (a multiple of the expert width), dense layers only as the first k, optional QK-norm
==============  ============================================================================================

muP (``model.mup_base_hidden_size``) changes two things in the forward pass that HF models do not have: the
attention scale ``√d_base / d_head`` (HF: ``1/√d_head``) and a factor ``1/m`` on the logits. Both are folded into
the weights on export (:func:`mup_folding`): the query scaled by ``scale·√d_head`` (into ``q_norm`` with QK-norm,
else into ``q_proj``; RoPE is linear, so it commutes), ``lm_head`` by ``1/m``. An import is then a standard
(non-muP) model with the same outputs.

Tensor names on our side are those of a TP1/PP1/EP1 model's ``state_dict()`` ("canonical"; full tensors,
experts by global index). Layouts (:class:`TensorMapping.layout`):

``copy``      same tensor.
``qkv``       megatron's fused ``linear_qkv`` ``[groups·(q_per_group + 2)·head_dim, hidden]``, per query group
              ``[q heads of the group; k; v]`` <-> HF ``q_proj`` / ``k_proj`` / ``v_proj``.
``gate_up``   megatron's fused ``linear_fc1`` ``[2·ffn, hidden]`` = ``[gate; up]`` <-> ``gate_proj`` / ``up_proj``
              (Mixtral ``w1`` / ``w3``).
``zero``      HF-only tensor with no megatron counterpart that must be zero to be equivalent (Qwen2-MoE q/k/v
              biases): written as zeros, checked on import.
``unused``    HF-only tensor without effect (the gate of a 0-wide Qwen2-MoE shared expert): written as zeros,
              ignored on import.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_muon.config import ModelConfig

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ConversionError",
    "TensorMapping",
    "architecture_for_hf_config",
    "choose_architecture",
    "fold_into_hf",
    "hf_config_from_model",
    "megatron_shapes",
    "megatron_shapes_of",
    "merge_to_megatron",
    "model_config_from_hf",
    "mup_folding",
    "obstacles",
    "split_to_hf",
    "tensor_mappings",
]


class ConversionError(ValueError):
    """A conversion that cannot be done; the message is one line naming the input and the obstacle."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Architecture:
    """One ``transformers`` MoE architecture: its names and which of our model's features it can hold."""

    name: str
    """Our name for it, also the HF ``model_type``."""
    hf_class: str
    """``config.json``'s ``architectures`` entry."""
    moe_block: str
    """Module of the MoE block inside a layer (Mixtral: ``block_sparse_moe``)."""
    expert_projections: tuple[str, str, str]
    """Names of an expert's gate, up and down projections."""
    num_experts_key: str
    """``config.json`` key of the number of routed experts."""
    expert_ffn_key: str
    """``config.json`` key of one expert's hidden size."""
    dense_ffn_key: str | None
    """``config.json`` key of the dense MLP's hidden size; None: no dense layers."""
    qk_norm: str
    """QK-norm: ``required`` | ``forbidden`` | ``optional`` (``use_qk_norm``)."""
    dense_layers: str
    """Where dense layers may be: ``none`` | ``any`` (``mlp_only_layers``) | ``prefix`` (``first_k_dense_replace``)."""
    router: str
    """``softmax`` (renormalized top-k) | ``sigmoid`` (with expert bias and scaling factor)."""
    shared_expert: str
    """``none`` | ``gated`` (Qwen2-MoE: only a 0-wide one fits) | ``ungated`` (GLM-4-MoE)."""


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="mixtral",
            hf_class="MixtralForCausalLM",
            moe_block="block_sparse_moe",
            expert_projections=("w1", "w3", "w2"),
            num_experts_key="num_local_experts",
            expert_ffn_key="intermediate_size",
            dense_ffn_key=None,
            qk_norm="forbidden",
            dense_layers="none",
            router="softmax",
            shared_expert="none",
        ),
        Architecture(
            name="qwen3_moe",
            hf_class="Qwen3MoeForCausalLM",
            moe_block="mlp",
            expert_projections=("gate_proj", "up_proj", "down_proj"),
            num_experts_key="num_experts",
            expert_ffn_key="moe_intermediate_size",
            dense_ffn_key="intermediate_size",
            qk_norm="required",
            dense_layers="any",
            router="softmax",
            shared_expert="none",
        ),
        Architecture(
            name="qwen2_moe",
            hf_class="Qwen2MoeForCausalLM",
            moe_block="mlp",
            expert_projections=("gate_proj", "up_proj", "down_proj"),
            num_experts_key="num_experts",
            expert_ffn_key="moe_intermediate_size",
            dense_ffn_key="intermediate_size",
            qk_norm="forbidden",
            dense_layers="any",
            router="softmax",
            shared_expert="gated",
        ),
        Architecture(
            name="glm4_moe",
            hf_class="Glm4MoeForCausalLM",
            moe_block="mlp",
            expert_projections=("gate_proj", "up_proj", "down_proj"),
            num_experts_key="n_routed_experts",
            expert_ffn_key="moe_intermediate_size",
            dense_ffn_key="intermediate_size",
            qk_norm="optional",
            dense_layers="prefix",
            router="sigmoid",
            shared_expert="ungated",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------
# Which architecture can hold which model.
# ---------------------------------------------------------------------------------------------------


def _dense_layer_ids(model: ModelConfig) -> list[int]:
    return [i for i, moe in enumerate(model.moe_layer_pattern()) if not moe]


def obstacles(arch: Architecture, model: ModelConfig) -> list[str]:
    """Features of ``model`` that ``arch`` cannot represent exactly (empty: it can), each naming the setting."""
    found = []
    if model.multi_latent_attention:
        found.append(
            "model.multi_latent_attention=true (MLA; the supported architectures use grouped-query attention)"
        )
    if model.normalization != "RMSNorm":
        found.append(f"model.normalization={model.normalization!r} ({arch.name} uses RMSNorm)")
    if model.kv_channels not in (None, model.hidden_size // model.num_attention_heads):
        found.append(f"model.kv_channels={model.kv_channels} (models.gpt_moe builds hidden/heads)")
    if model.num_moe_experts == 0 or not any(model.moe_layer_pattern()):
        found.append(
            f"model.num_moe_experts={model.num_moe_experts}: no MoE layer ({arch.name} is a MoE architecture)"
        )
    if arch.qk_norm == "required" and not model.qk_layernorm:
        found.append(f"model.qk_layernorm=false ({arch.name} always normalizes queries and keys per head)")
    if arch.qk_norm == "forbidden" and model.qk_layernorm:
        found.append(f"model.qk_layernorm=true ({arch.name} has no QK-norm)")
    dense = _dense_layer_ids(model)
    if dense and arch.dense_layers == "none":
        found.append(
            f"dense layers {dense} (first_k_dense_layers / moe_layer_freq; {arch.name} has MoE in every layer)"
        )
    if dense and arch.dense_layers == "prefix" and dense != list(range(len(dense))):
        found.append(f"dense layers {dense} are not the first k layers ({arch.name}: first_k_dense_replace)")
    shared = model.moe_shared_expert_intermediate_size
    if shared and arch.shared_expert == "none":
        found.append(f"model.moe_shared_expert_intermediate_size={shared} ({arch.name} has no shared expert)")
    if shared and arch.shared_expert == "gated":
        found.append(
            f"model.moe_shared_expert_intermediate_size={shared}: megatron's shared expert is ungated, {arch.name} "
            "scales it by sigmoid(shared_expert_gate x)"
        )
    if shared and arch.shared_expert == "ungated" and shared % model.moe_ffn_hidden_size:
        found.append(
            f"model.moe_shared_expert_intermediate_size={shared} is not a multiple of model.moe_ffn_hidden_size="
            f"{model.moe_ffn_hidden_size} ({arch.name}: n_shared_experts x moe_intermediate_size)"
        )
    if model.moe_router_score_function != arch.router:
        found.append(
            f"model.moe_router_score_function={model.moe_router_score_function!r} ({arch.name} routes with {arch.router})"
        )
    if arch.router == "softmax":
        if model.moe_router_enable_expert_bias:
            found.append(f"model.moe_router_enable_expert_bias=true ({arch.name} has no expert bias)")
        if model.moe_router_topk_scaling_factor not in (None, 1.0):
            found.append(
                f"model.moe_router_topk_scaling_factor={model.moe_router_topk_scaling_factor} ({arch.name} has no "
                "routing scale)"
            )
    _, logit_factor = mup_folding(model)
    if logit_factor != 1.0 and model.share_embeddings_and_output_weights:
        found.append(
            f"muP output multiplier {logit_factor:g} with tied embeddings (it cannot be folded into a shared "
            "embedding / lm_head)"
        )
    if arch.router == "sigmoid" and model.num_moe_experts < 2:
        found.append(
            f"model.num_moe_experts={model.num_moe_experts} ({arch.name}'s group routing needs >= 2)"
        )
    return found


def mup_folding(model: ModelConfig) -> tuple[float, float]:
    """(factor on the queries, factor on the logits) that make a muP ``model``'s forward pass that of a standard
    one: ``scale·√d_head`` with megatron's muP attention scale, and the output multiplier ``1/m``. (1, 1) without
    muP."""
    width = model.mup_width() if hasattr(model, "mup_width") else None
    if width is None:
        return 1.0, 1.0
    from megatron_muon import mup

    scale = mup.attention_softmax_scale(width.head_dim, width.base_head_dim)
    return scale * math.sqrt(model.head_dim), mup.output_logit_multiplier(width.multiplier)


def fold_into_hf(name: str, tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """``tensor`` (HF ``name``) with :func:`mup_folding`'s factors applied where they belong."""
    query_factor, logit_factor = mup_folding(model)
    query_tensor = "self_attn.q_norm.weight" if model.qk_layernorm else "self_attn.q_proj.weight"
    if query_factor != 1.0 and name.endswith(query_tensor):
        return tensor * query_factor
    if logit_factor != 1.0 and name == "lm_head.weight":
        return tensor * logit_factor
    return tensor


def choose_architecture(model: ModelConfig, requested: str = "auto") -> Architecture:
    """``requested`` (an ``ARCHITECTURES`` name) if it represents ``model``, or with ``auto`` the first that does.

    Raises:
        ConversionError: one line naming, per architecture tried, the feature that is the obstacle.
    """
    if requested != "auto" and requested not in ARCHITECTURES:
        raise ConversionError(f"architecture {requested!r} is not one of {['auto', *ARCHITECTURES]}")
    candidates = list(ARCHITECTURES.values()) if requested == "auto" else [ARCHITECTURES[requested]]
    reasons = []
    for arch in candidates:
        found = obstacles(arch, model)
        if not found:
            return arch
        reasons.append(f"{arch.name}: {'; '.join(found)}")
    raise ConversionError(
        f"no supported Hugging Face architecture represents this model: {' | '.join(reasons)}"
    )


# ---------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig.
# ---------------------------------------------------------------------------------------------------


def hf_config_from_model(
    arch: Architecture,
    model: ModelConfig,
    *,
    dtype: str,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """``config.json`` of ``model`` as ``arch`` (the caller has checked :func:`obstacles`). ``dtype``: the
    ``torch_dtype`` written (``float32`` | ``bfloat16`` | ``float16``)."""
    experts, topk = model.num_moe_experts, model.moe_router_topk
    config: dict[str, Any] = {
        "architectures": [arch.hf_class],
        "model_type": arch.name,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model.seq_length,
        "initializer_range": model.init_method_std,
        "rms_norm_eps": model.norm_epsilon,
        "tie_word_embeddings": model.share_embeddings_and_output_weights,
        # transformers >= 5 reads rope_parameters, older versions rope_theta.
        "rope_theta": float(model.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model.rotary_base)},
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        arch.num_experts_key: experts,
        arch.expert_ffn_key: model.moe_ffn_hidden_size,
        "num_experts_per_tok": topk,
        "router_aux_loss_coef": model.moe_aux_loss_coeff,
        "output_router_logits": False,
    }
    if arch.dense_ffn_key is not None:
        config[arch.dense_ffn_key] = model.ffn_hidden_size
    if arch.name == "mixtral":
        config.update(sliding_window=None, router_jitter_noise=0.0)
    if arch.name in ("qwen2_moe", "qwen3_moe"):
        config.update(
            decoder_sparse_step=1,
            mlp_only_layers=_dense_layer_ids(model),
            norm_topk_prob=True,  # megatron renormalizes the top-k softmax weights
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=model.num_layers,
        )
    if arch.name == "qwen3_moe":
        config["attention_bias"] = False
    if arch.name == "qwen2_moe":
        # transformers < 5 (and other runtimes) build q/k/v biases unconditionally: write them, as zeros.
        config.update(qkv_bias=True, shared_expert_intermediate_size=0)
    if arch.name == "glm4_moe":
        config.update(
            n_shared_experts=model.moe_shared_expert_intermediate_size // model.moe_ffn_hidden_size,
            first_k_dense_replace=len(_dense_layer_ids(model)),
            routed_scaling_factor=float(model.moe_router_topk_scaling_factor or 1.0),
            n_group=1,
            topk_group=1,
            norm_topk_prob=topk > 1,  # megatron's sigmoid router renormalizes only when k > 1
            use_qk_norm=model.qk_layernorm,
            attention_bias=False,
            partial_rotary_factor=1.0,
            num_nextn_predict_layers=0,
            num_mtp_layers=0,
        )
        config["rope_parameters"]["partial_rotary_factor"] = 1.0
    return config


def architecture_for_hf_config(config: dict[str, Any], where: str) -> Architecture:
    """The :class:`Architecture` of a ``config.json``; ``ConversionError`` naming it when unsupported."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        names = config.get("architectures") or []
        raise ConversionError(
            f"{where}: unsupported architecture {', '.join(names) or '?'} (model_type {model_type!r}); supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[model_type]


_EXPERT_COUNT_KEYS = {
    "mixtral": ("num_local_experts", "num_experts"),
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "qwen2_moe": ("num_experts", "num_local_experts"),
    "glm4_moe": ("n_routed_experts", "num_local_experts"),
}


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_type", rope.get("type", "default"))
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if "partial_rotary_factor" in config:
        rope.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return rope


def model_config_from_hf(
    config: dict[str, Any], *, where: str, seq_length: int | None = None, precision: str | None = None
) -> tuple[Architecture, ModelConfig]:
    """Our ``ModelConfig`` of a ``config.json``. ``seq_length`` (None: ``max_position_embeddings`` capped at
    4096) is the training length written to the checkpoint's config; ``precision`` (None: from ``torch_dtype``).

    Raises:
        ConversionError: unsupported architecture, or one line listing the settings our model cannot build.
    """
    arch = architecture_for_hf_config(config, where)
    get = config.get
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    found = []
    if get("hidden_act", "silu") != "silu":
        found.append(f"hidden_act={get('hidden_act')!r} (ours: silu)")
    head_dim = get("head_dim") or hidden // heads
    if head_dim != hidden // heads:
        found.append(f"head_dim={head_dim} != hidden_size / num_attention_heads={hidden // heads}")
    rope = _rope_parameters(config)
    if rope["rope_type"] != "default":
        found.append(f"rope type {rope['rope_type']!r} (ours: plain RoPE)")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        found.append(f"partial_rotary_factor={rope['partial_rotary_factor']} (ours rotates the whole head)")
    if get("sliding_window") and (arch.name == "mixtral" or get("use_sliding_window")):
        found.append(f"sliding_window={get('sliding_window')} (ours: full attention)")
    if get("attention_bias"):
        found.append("attention_bias=true (ours: no linear biases)")
    layers = int(config["num_hidden_layers"])
    # transformers >= 5 writes some of these under another name (Qwen3-MoE: num_local_experts).
    experts = next(
        (int(count) for key in _EXPERT_COUNT_KEYS[arch.name] if (count := get(key)) is not None), 0
    )
    topk = int(get("num_experts_per_tok", 1))
    shared = 0
    scaling: float | None = None
    if arch.name == "mixtral":
        pattern = [1] * layers
    elif arch.name == "glm4_moe":
        first_dense = int(get("first_k_dense_replace", 0))
        pattern = [0 if i < first_dense else 1 for i in range(layers)]
        shared = int(get("n_shared_experts") or 0) * int(config[arch.expert_ffn_key])
        scaling = float(get("routed_scaling_factor", 1.0))
        scaling = None if scaling == 1.0 else scaling
        if int(get("n_group", 1)) != 1 or int(get("topk_group", 1)) != 1:
            found.append(
                f"n_group={get('n_group')}, topk_group={get('topk_group')} (ours: no group-limited routing)"
            )
        if bool(get("norm_topk_prob", True)) != (topk > 1):
            found.append(
                f"norm_topk_prob={get('norm_topk_prob')} with top-{topk} (megatron renormalizes iff k > 1)"
            )
    else:
        step, only_dense = int(get("decoder_sparse_step", 1)), set(get("mlp_only_layers") or [])
        pattern = [int(i not in only_dense and experts > 0 and (i + 1) % step == 0) for i in range(layers)]
        if not get("norm_topk_prob", False):
            found.append("norm_topk_prob=false (megatron's softmax router renormalizes the top-k weights)")
        if arch.name == "qwen2_moe":
            shared = int(get("shared_expert_intermediate_size") or 0)
            if shared:
                found.append(
                    f"shared_expert_intermediate_size={shared}: the shared expert is gated by "
                    "sigmoid(shared_expert_gate x), megatron's is not"
                )
                shared = 0
    if found:
        raise ConversionError(f"{where}: {arch.name} settings our model cannot build: {'; '.join(found)}")
    torch_dtype = str(get("torch_dtype") or get("dtype") or "float32").replace("torch.", "")
    if precision is None:
        precision = "bf16" if torch_dtype == "bfloat16" else "fp32"
    max_positions = int(get("max_position_embeddings", 4096))
    model = ModelConfig(
        num_layers=layers,
        hidden_size=hidden,
        ffn_hidden_size=int(config[arch.dense_ffn_key])
        if arch.dense_ffn_key
        else int(config[arch.expert_ffn_key]),
        moe_ffn_hidden_size=int(config[arch.expert_ffn_key]),
        num_attention_heads=heads,
        num_query_groups=int(get("num_key_value_heads") or heads),
        qk_layernorm={"required": True, "forbidden": False}.get(
            arch.qk_norm, bool(get("use_qk_norm", False))
        ),
        num_moe_experts=experts,
        moe_router_topk=topk,
        moe_layer_freq=pattern,
        first_k_dense_layers=0,
        moe_shared_expert_intermediate_size=shared,
        moe_router_score_function=arch.router,
        moe_router_enable_expert_bias=arch.router == "sigmoid",
        moe_router_topk_scaling_factor=scaling,
        moe_aux_loss_coeff=float(get("router_aux_loss_coef", 0.01)),
        vocab_size=int(config["vocab_size"]),
        seq_length=seq_length or min(max_positions, 4096),
        rotary_base=int(float(rope["rope_theta"])),
        init_method_std=float(get("initializer_range", 0.02)),
        share_embeddings_and_output_weights=bool(get("tie_word_embeddings", False)),
        norm_epsilon=float(get("rms_norm_eps", 1e-6)),
        precision=precision,
    )
    if float(rope["rope_theta"]) != model.rotary_base:
        raise ConversionError(
            f"{where}: rope_theta={rope['rope_theta']} is not an integer (ours: model.rotary_base)"
        )
    return arch, model


# ---------------------------------------------------------------------------------------------------
# Tensor name and layout maps.
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorMapping:
    """One megatron tensor (or none) <-> one or more HF tensors."""

    megatron: str | None
    """Canonical megatron name (a TP1 model's ``state_dict`` key); None for an HF-only tensor."""
    megatron_shape: tuple[int, ...] | None
    """Its full shape."""
    hf: tuple[str, ...]
    """HF names, in the order the layout splits the megatron tensor."""
    hf_shapes: tuple[tuple[int, ...], ...]
    """Their shapes."""
    layout: str
    """``copy`` | ``qkv`` | ``gate_up`` | ``zero`` | ``unused`` (see the module docstring)."""
    group: str
    """What it belongs to (``embedding``, ``layer 3``, ``final``): export and import work one group at a time."""


def tensor_mappings(arch: Architecture, model: ModelConfig) -> list[TensorMapping]:
    """Every tensor of ``model`` as ``arch``, in file order. Counts: per layer 4 attention tensors (+2 with
    QK-norm) and 2 norms, then a dense MLP (1 fused fc1 -> 2, 1 fc2) or a router (+ expert bias) and experts
    (2 per expert -> 3) (+ shared expert)."""
    hidden, heads, groups, head_dim = (
        model.hidden_size,
        model.num_attention_heads,
        model.query_groups,
        model.head_dim,
    )
    gate, up, down = arch.expert_projections
    maps: list[TensorMapping] = []

    def add(
        megatron: str | None,
        shape: tuple[int, ...] | None,
        hf: Sequence[str],
        hf_shapes: Sequence[tuple[int, ...]],
        layout: str,
        group: str,
    ) -> None:
        maps.append(TensorMapping(megatron, shape, tuple(hf), tuple(hf_shapes), layout, group))

    def swiglu(megatron_prefix: str, hf_prefix: str, names: Sequence[str], ffn: int, group: str) -> None:
        add(
            f"{megatron_prefix}.linear_fc1.weight",
            (2 * ffn, hidden),
            [f"{hf_prefix}.{names[0]}.weight", f"{hf_prefix}.{names[1]}.weight"],
            [(ffn, hidden)] * 2,
            "gate_up",
            group,
        )
        add(
            f"{megatron_prefix}.linear_fc2.weight",
            (hidden, ffn),
            [f"{hf_prefix}.{names[2]}.weight"],
            [(hidden, ffn)],
            "copy",
            group,
        )

    embedding = ("embedding.word_embeddings.weight", (model.vocab_size, hidden))
    add(*embedding, ["model.embed_tokens.weight"], [embedding[1]], "copy", "embedding")
    for layer, moe in enumerate(model.moe_layer_pattern()):
        ours, theirs, group = f"decoder.layers.{layer}", f"model.layers.{layer}", f"layer {layer}"
        add(
            f"{ours}.input_layernorm.weight",
            (hidden,),
            [f"{theirs}.input_layernorm.weight"],
            [(hidden,)],
            "copy",
            group,
        )
        q_rows, kv_rows = heads * head_dim, groups * head_dim
        add(
            f"{ours}.self_attention.linear_qkv.weight",
            (q_rows + 2 * kv_rows, hidden),
            [f"{theirs}.self_attn.{name}_proj.weight" for name in "qkv"],
            [(q_rows, hidden), (kv_rows, hidden), (kv_rows, hidden)],
            "qkv",
            group,
        )
        if arch.name == "qwen2_moe":
            for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                add(None, None, [f"{theirs}.self_attn.{name}_proj.bias"], [(rows,)], "zero", group)
        add(
            f"{ours}.self_attention.linear_proj.weight",
            (hidden, q_rows),
            [f"{theirs}.self_attn.o_proj.weight"],
            [(hidden, q_rows)],
            "copy",
            group,
        )
        if model.qk_layernorm:
            for name in "qk":
                add(
                    f"{ours}.self_attention.{name}_layernorm.weight",
                    (head_dim,),
                    [f"{theirs}.self_attn.{name}_norm.weight"],
                    [(head_dim,)],
                    "copy",
                    group,
                )
        add(
            f"{ours}.pre_mlp_layernorm.weight",
            (hidden,),
            [f"{theirs}.post_attention_layernorm.weight"],
            [(hidden,)],
            "copy",
            group,
        )
        if not moe:
            swiglu(
                f"{ours}.mlp",
                f"{theirs}.mlp",
                ("gate_proj", "up_proj", "down_proj"),
                model.ffn_hidden_size,
                group,
            )
            continue
        block, experts = f"{theirs}.{arch.moe_block}", model.num_moe_experts
        add(
            f"{ours}.mlp.router.weight",
            (experts, hidden),
            [f"{block}.gate.weight"],
            [(experts, hidden)],
            "copy",
            group,
        )
        if model.moe_router_enable_expert_bias:
            add(
                f"{ours}.mlp.router.expert_bias",
                (experts,),
                [f"{block}.gate.e_score_correction_bias"],
                [(experts,)],
                "copy",
                group,
            )
        for expert in range(experts):
            swiglu(
                f"{ours}.mlp.experts.local_experts.{expert}",
                f"{block}.experts.{expert}",
                (gate, up, down),
                model.moe_ffn_hidden_size,
                group,
            )
        shared = model.moe_shared_expert_intermediate_size
        zero_wide = (("gate_proj", (0, hidden)), ("up_proj", (0, hidden)), ("down_proj", (hidden, 0)))
        if shared:  # GLM-4-MoE's names (the other architectures refuse a shared expert: obstacles)
            swiglu(
                f"{ours}.mlp.shared_experts",
                f"{block}.shared_experts",
                ("gate_proj", "up_proj", "down_proj"),
                shared,
                group,
            )
        elif arch.shared_expert == "ungated":  # n_shared_experts = 0: HF still builds a 0-wide MLP
            for name, shape in zero_wide:
                add(None, None, [f"{block}.shared_experts.{name}.weight"], [shape], "unused", group)
        elif arch.shared_expert == "gated":  # Qwen2-MoE without a shared expert: a 0-wide one and its gate
            for name, shape in zero_wide:
                add(None, None, [f"{block}.shared_expert.{name}.weight"], [shape], "unused", group)
            add(None, None, [f"{block}.shared_expert_gate.weight"], [(1, hidden)], "unused", group)
    add("decoder.final_layernorm.weight", (hidden,), ["model.norm.weight"], [(hidden,)], "copy", "final")
    if not model.share_embeddings_and_output_weights:
        add("output_layer.weight", embedding[1], ["lm_head.weight"], [embedding[1]], "copy", "final")
    return maps


def megatron_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> full shape of every tensor of our ``model``. Our names do not depend on the HF
    architecture; GLM-4-MoE's map is used because it has a place for every optional tensor (expert bias,
    shared expert, QK-norm)."""
    return megatron_shapes_of(tensor_mappings(ARCHITECTURES["glm4_moe"], model))


def megatron_shapes_of(mappings: list[TensorMapping]) -> dict[str, tuple[int, ...]]:
    """Canonical name -> full shape of the megatron tensors of ``mappings`` (HF-only ones have neither)."""
    return {
        m.megatron: m.megatron_shape
        for m in mappings
        if m.megatron is not None and m.megatron_shape is not None
    }


def split_to_hf(
    mapping: TensorMapping, tensor: torch.Tensor | None, model: ModelConfig
) -> list[torch.Tensor]:
    """The HF tensors of ``mapping`` from the megatron tensor (None for HF-only ones), contiguous."""
    if mapping.layout in ("zero", "unused"):
        dtype = tensor.dtype if tensor is not None else torch.float32
        return [torch.zeros(shape, dtype=dtype) for shape in mapping.hf_shapes]
    assert tensor is not None and tuple(tensor.shape) == mapping.megatron_shape, (
        mapping.megatron,
        None if tensor is None else tensor.shape,
    )
    if mapping.layout == "copy":
        parts = [tensor]
    elif mapping.layout == "gate_up":
        parts = list(tensor.chunk(2, dim=0))
    elif mapping.layout == "qkv":
        groups, head_dim = model.query_groups, model.head_dim
        per_group = model.num_attention_heads // groups
        grouped = tensor.view(groups, per_group + 2, head_dim, -1)
        parts = [
            grouped[:, :per_group].reshape(groups * per_group * head_dim, -1),
            grouped[:, per_group].reshape(groups * head_dim, -1),
            grouped[:, per_group + 1].reshape(groups * head_dim, -1),
        ]
    else:
        raise ValueError(f"unknown layout {mapping.layout!r}")
    return [part.contiguous() for part in parts]


def merge_to_megatron(
    mapping: TensorMapping, tensors: list[torch.Tensor], model: ModelConfig
) -> torch.Tensor | None:
    """The megatron tensor of ``mapping`` from its HF tensors (inverse of :func:`split_to_hf`); None for
    HF-only tensors. Raises ``ConversionError`` for a ``zero`` tensor that is not zero."""
    if mapping.layout == "unused":
        return None
    if mapping.layout == "zero":
        if any(t.count_nonzero() for t in tensors):
            raise ConversionError(f"{mapping.hf[0]} is not zero; our model has no linear biases")
        return None
    if mapping.layout == "copy":
        return tensors[0].clone()
    if mapping.layout == "gate_up":
        return torch.cat(tensors, dim=0)
    if mapping.layout == "qkv":
        groups, head_dim = model.query_groups, model.head_dim
        per_group = model.num_attention_heads // groups
        hidden = tensors[0].shape[-1]
        q = tensors[0].view(groups, per_group, head_dim, hidden)
        k = tensors[1].view(groups, 1, head_dim, hidden)
        v = tensors[2].view(groups, 1, head_dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)
    raise ValueError(f"unknown layout {mapping.layout!r}")
