"""Which parameters Muon updates and which go to AdamW.

Muon is for the hidden weight matrices of the transformer blocks: attention QKV / Q / KV / output projections
(MLA's down/up projections included), MLP ``linear_fc1`` / ``linear_fc2`` of dense layers, of every expert and of
shared experts. Everything else goes to AdamW: embeddings and the output layer (megatron tags them
``is_embedding_or_output_parameter``), norms, biases, and by default the MoE router. Parameters are identified by
the *type* of the module that owns them and megatron's parameter attributes, never by ``ndim == 2`` alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

logger = logging.getLogger(__name__)

# Attribute names megatron-core gives the linear layers of a transformer block (attention.py,
# multi_latent_attention.py, mlp.py). A weight of one of these modules is a hidden matrix.
HIDDEN_LINEAR_NAMES = frozenset(
    {
        "linear_qkv",
        "linear_proj",
        "linear_fc1",
        "linear_fc2",
        "linear_q_proj",
        "linear_q_down_proj",
        "linear_q_up_proj",
        "linear_kv_down_proj",
        "linear_kv_up_proj",
    }
)
Router = Literal["adamw", "muon"]
"""Which optimizer updates the MoE router weight."""
ROUTER_CHOICES: tuple[Router, ...] = get_args(Router)

# megatron's Transformer Engine wrappers (megatron/core/extensions/transformer_engine.py), recognised by class name
# anywhere in the module's MRO so that nothing here imports TE (absent on CPU machines, where megatron binds these
# names to None). The grouped ones hold one weight per local expert: ``weight0`` … ``weight{num_gemms-1}``.
TE_LINEAR_CLASS_NAMES = frozenset(
    {"TELinear", "TEColumnParallelLinear", "TERowParallelLinear", "TELayerNormColumnParallelLinear"}
)
TE_GROUPED_LINEAR_CLASS_NAMES = frozenset(
    {"TEGroupedLinear", "TEColumnParallelGroupedLinear", "TERowParallelGroupedLinear"}
)


def _linear_types() -> tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (ColumnParallelLinear, RowParallelLinear)


def _class_names(module: torch.nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _router_types() -> tuple[type, ...]:
    from megatron.core.transformer.moe.router import Router

    return (Router,)


@dataclass(slots=True)
class RoutedParam:
    name: str
    param: torch.nn.Parameter
    module: torch.nn.Module
    chunk: int
    """Index of the model chunk (virtual pipeline stage) holding it."""


@dataclass(slots=True)
class ParamRouting:
    muon: list[RoutedParam] = field(default_factory=list)
    adamw: list[RoutedParam] = field(default_factory=list)
    module_paths: list[dict[str, torch.nn.Module]] = field(default_factory=list)
    """Per model chunk: module name → module (for global layer / expert indices in ``layout.py``)."""

    def summary(self) -> str:
        def count(items: Iterable[RoutedParam]) -> tuple[int, int]:
            items = list(items)
            return len(items), sum(r.param.numel() for r in items)

        muon_tensors, muon_elements = count(self.muon)
        adam_tensors, adam_elements = count(self.adamw)
        return (
            f"Muon: {muon_tensors} tensors, {muon_elements:,} elements; "
            f"AdamW: {adam_tensors} tensors, {adam_elements:,} elements"
        )


def route_parameters(model_chunks: list[torch.nn.Module], router: str = "adamw") -> ParamRouting:
    """Split the trainable parameters of ``model_chunks`` between Muon and AdamW.

    ``router``: optimizer of the MoE router weight (``adamw`` default, as Moonlight and Kimi K2 do).
    """
    if router not in ROUTER_CHOICES:
        raise ValueError(f"router optimizer {router!r}; valid: {list(ROUTER_CHOICES)}")
    linear_types = _linear_types()
    router_types = _router_types()
    routing = ParamRouting()
    for chunk_index, chunk in enumerate(model_chunks):
        modules = dict(chunk.named_modules())
        routing.module_paths.append(modules)
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            module_name, _, attribute = name.rpartition(".")
            module = modules[module_name]
            entry = RoutedParam(name=name, param=param, module=module, chunk=chunk_index)
            if _is_hidden_matrix(module_name, attribute, module, param, linear_types):
                routing.muon.append(entry)
            elif router == "muon" and isinstance(module, router_types) and attribute == "weight":
                routing.muon.append(entry)
            else:
                routing.adamw.append(entry)
    logger.info("Parameter routing: %s", routing.summary())
    return routing


def _is_hidden_matrix(
    module_name: str,
    attribute: str,
    module: torch.nn.Module,
    param: torch.nn.Parameter,
    linear_types: tuple[type, ...],
) -> bool:
    class_names = _class_names(module)
    if class_names & TE_GROUPED_LINEAR_CLASS_NAMES:
        if attribute == "weight":  # TE >= 2.14 with moe_single_grouped_weight: one (experts, out, in) tensor
            raise ValueError(
                f"{module_name}.weight: a single grouped expert weight (moe_single_grouped_weight=True) is not "
                "supported by the Muon layout; use one weight per expert (moe_single_grouped_weight=False)"
            )
        per_expert_weight = attribute.startswith("weight") and attribute[6:].isdigit()
        return per_expert_weight and module_name.rsplit(".", 1)[-1] in HIDDEN_LINEAR_NAMES
    if attribute.startswith("weight") and attribute[6:].isdigit():
        # Numbered weights on anything but TE's grouped linear: an unknown expert layout. Refuse rather than
        # guess expert ids (and treat EP ranks as replicas).
        raise ValueError(
            f"{module_name}.{attribute}: numbered weights of a {type(module).__name__} are not understood by the "
            f"Muon layout (known grouped layers: {sorted(TE_GROUPED_LINEAR_CLASS_NAMES)})"
        )
    if attribute != "weight":
        return False  # biases, TE's fused layer-norm weights ("layer_norm_weight"), ...
    if getattr(param, "is_embedding_or_output_parameter", False):
        return False
    if not (isinstance(module, linear_types) or class_names & TE_LINEAR_CLASS_NAMES):
        return False
    return module_name.rsplit(".", 1)[-1] in HIDDEN_LINEAR_NAMES


# ---------------------------------------------------------------------------------------------------- muP


def mup_width_multiplier(model_chunks: list[torch.nn.Module]) -> float | None:
    """megatron's ``mup_width_mult`` (d_model / d_base) of the model, or None when it was built without muP
    (``TransformerConfig.use_mup`` off)."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model_chunks[0])
    return float(config.mup_width_mult) if getattr(config, "use_mup", False) else None


def adamw_parameter_class(param: torch.nn.Parameter, module: torch.nn.Module | None = None) -> str:
    """muP class of a parameter AdamW trains (``mup.ADAMW_CLASSES``): the embedding and output weights (megatron
    tags them ``is_embedding_or_output_parameter``; the output layer's 1/m lives in the logit multiplier),
    vector-like (norms, biases), the router weight (output-type: fan-in d_model grows, fan-out does not), else
    hidden matrix-like."""
    if getattr(param, "is_embedding_or_output_parameter", False):
        return "embedding"
    if param.dim() < 2:
        return "vector"
    if module is not None and isinstance(module, _router_types()):
        return "router"
    return "hidden"


def adamw_matrix_overrides(
    routing: ParamRouting, config: Any, width_multiplier: float | None, router_lr_multiplier: float = 1.0
) -> dict[Any, Any]:
    """megatron param-group overrides for the AdamW matrices ``routing`` sends to AdamW beside Muon: muP's rules
    (``mup.adamw_multipliers``; ``width_multiplier`` None: muP off) and the router's base LR multiplier. Only the
    router and hidden classes change (LR times 1/m; ε times 1/m for hidden matrices only; the router's LR times
    ``router_lr_multiplier`` at every width); the rest keep the base values, so they need no override."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from megatron_muon import mup

    overrides = {}
    for parameter_class in ("router", "hidden"):
        lr_mult, eps_mult = 1.0, 1.0
        if width_multiplier is not None:
            lr_mult, eps_mult = mup.adamw_multipliers(parameter_class, width_multiplier)
        if parameter_class == "router":
            lr_mult *= router_lr_multiplier
        if (lr_mult, eps_mult) == (1.0, 1.0):
            continue
        ids = {
            id(r.param) for r in routing.adamw if adamw_parameter_class(r.param, r.module) == parameter_class
        }
        if not ids:
            continue
        key = ParamKey(
            with_name_predicate=ParamWithNamePredicate(
                name=f"adamw_{parameter_class}", fn=lambda param, name, ids=ids: id(param) in ids
            )
        )
        overrides[key] = {
            "max_lr": config.lr * lr_mult,
            "min_lr": config.min_lr * lr_mult,
            "eps": config.adam_eps * eps_mult,
        }
    return overrides
