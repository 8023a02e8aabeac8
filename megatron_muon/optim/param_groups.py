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
ROUTER_CHOICES = ("adamw", "muon")


def _linear_types() -> tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    types: list[type] = [ColumnParallelLinear, RowParallelLinear]
    try:  # Transformer Engine linear layers, when TE is installed (GPU machines).
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TELinear,
            TERowParallelLinear,
        )

        te_types = [TEColumnParallelLinear, TELayerNormColumnParallelLinear, TELinear, TERowParallelLinear]
        # Without TE installed megatron binds these names to None placeholders.
        types += [t for t in te_types if isinstance(t, type)]
    except ImportError:
        return tuple(types)  # no Transformer Engine: megatron's local layers only
    return tuple(types)


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


def _is_hidden_matrix(module_name, attribute, module, param, linear_types) -> bool:
    if attribute.startswith("weight") and attribute[6:].isdigit():
        # TE grouped GEMM experts store one weight per local expert (weight0..N-1); their expert ids need
        # the grouped layout, which is not implemented: refuse rather than treat EP ranks as replicas.
        raise ValueError(
            f"{module_name}.{attribute}: Transformer Engine grouped-GEMM expert weights are not supported by the "
            "Muon layout yet; build the model with moe_grouped_gemm=False"
        )
    if attribute != "weight":
        return False  # biases, TE's fused layer-norm weights ("layer_norm_weight"), ...
    if getattr(param, "is_embedding_or_output_parameter", False):
        return False
    if not isinstance(module, linear_types):
        return False
    return module_name.rsplit(".", 1)[-1] in HIDDEN_LINEAR_NAMES
