"""Initial weights that depend on the run seed only, not on the parallel layout.

Megatron draws a weight either as the full matrix from the CPU generator and keeps this rank's slice
(``use_cpu_initialization``) or as this rank's shard from the tensor-parallel RNG tracker (on the GPU). Neither is
layout-independent: a fused SwiGLU ``linear_fc1`` shard at TP2 holds gate and up rows that the TP1 draw puts
elsewhere, experts on other EP ranks draw from other streams, and pipeline stages consume the generator in
another order. The same config then trains a different model at each layout.

Here every *logical* tensor — a Muon matrix of ``optim/layout.py`` (each expert, each fused part separately) or
an AdamW-managed matrix (embedding, output layer, router) at its TP1 shape — is drawn again from generators seeded
by ``(run seed, the tensor's layout-independent key, row block)``, and each rank writes only its shard. Rows come in
blocks of :data:`ROW_BLOCK` drawn independently, so

* a rank never materializes more than one block of a matrix it does not hold whole (nothing is built whole on
  the CPU for a large model: blocks are drawn on the parameter's own device);
* a vocabulary padded to a larger multiple at a higher TP gets the same rows for the real tokens.

Standard deviations come from megatron's own init methods on the ``TransformerConfig`` (``init_method``,
``output_layer_init_method``, ``embedding_init_method``: muP's widths included), read from the
``functools.partial(torch.nn.init.normal_, std=...)`` megatron builds. One-dimensional parameters (norm scales,
biases, the router's expert bias) keep megatron's constant initialization, which is already layout-independent.

The draws depend on the device type (CPU and CUDA generators differ), not on the layout: runs on the same kind of
device start from the same weights at every TP/PP/EP/DP.
"""

from __future__ import annotations

import functools
import hashlib
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_muon import mup
from megatron_muon.optim.layout import LayoutConfig, _global_key, megatron_param_pieces, module_tp_group
from megatron_muon.optim.param_groups import route_parameters

if TYPE_CHECKING:
    from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["ROW_BLOCK", "initialize_layout_independent_", "init_std"]

ROW_BLOCK = 128
"""Rows drawn from one generator; megatron pads the vocabulary to multiples of 128 × TP, so padding never
changes the blocks that hold real tokens."""

# Init layout: a fixed split of fused weights, so the initial model does not depend on optimizer options.
_INIT_LAYOUT = LayoutConfig()

# Linear layers megatron initializes with ``output_layer_init_method`` (attention.py ``linear_proj``, mlp.py
# ``linear_fc2``, experts' fc2): the depth-scaled std of residual-branch outputs.
_OUTPUT_PROJECTIONS = ("linear_proj", "linear_fc2")
_TIED_EMBEDDING_KEY = "embedding.word_embeddings.weight"


def init_std(init_method: object) -> float:
    """The std of a megatron init method ``functools.partial(torch.nn.init.normal_, mean=0.0, std=σ)``.

    Raises:
        ValueError: the init method is something else (a layout-independent draw needs to know its law).
    """
    if (
        isinstance(init_method, functools.partial)
        and init_method.func is torch.nn.init.normal_
        and "std" in init_method.keywords
        and init_method.keywords.get("mean", 0.0) == 0.0
    ):
        return float(init_method.keywords["std"])
    raise ValueError(
        f"init method {init_method!r} is not megatron's normal init (functools.partial(torch.nn.init.normal_, "
        "mean=0.0, std=...)); layout-independent initialization supports only that"
    )


def _seed_of(seed: int, key: str, block: int) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _draw_shard(
    seed: int,
    key: str,
    full_shape: tuple[int, int],
    shard_dim: int,
    num_shards: int,
    shard_index: int,
    std: float,
    device: torch.device,
) -> torch.Tensor:
    """Shard ``shard_index`` of ``num_shards`` along ``shard_dim`` of the logical ``full_shape`` matrix, float32.

    Row block ``b`` (rows ``[b·ROW_BLOCK, (b+1)·ROW_BLOCK)``) is ``N(0, std²)`` from its own generator."""
    rows, cols = full_shape
    if shard_dim == 0:
        if rows % num_shards:
            raise ValueError(f"{key}: {rows} rows do not split into {num_shards} shards")
        first, last = shard_index * rows // num_shards, (shard_index + 1) * rows // num_shards
        col_slice = slice(None)
    else:
        if cols % num_shards:
            raise ValueError(f"{key}: {cols} columns do not split into {num_shards} shards")
        first, last = 0, rows
        width = cols // num_shards
        col_slice = slice(shard_index * width, (shard_index + 1) * width)
    parts = []
    generator = torch.Generator(device=device)
    for block in range(first // ROW_BLOCK, math.ceil(last / ROW_BLOCK)):
        generator.manual_seed(_seed_of(seed, key, block))
        values = torch.randn((ROW_BLOCK, cols), generator=generator, device=device, dtype=torch.float32)
        start = block * ROW_BLOCK
        parts.append(values[max(first - start, 0) : min(last - start, ROW_BLOCK), col_slice])
    return torch.cat(parts, dim=0).mul_(std)


def _muon_matrix_std(module_name: str, config: TransformerConfig) -> float:
    leaf = module_name.rsplit(".", 1)[-1]
    if leaf in _OUTPUT_PROJECTIONS:
        return init_std(config.output_layer_init_method)
    return init_std(config.init_method)


def _adamw_matrix_std(name: str, config: TransformerConfig) -> float:
    if "word_embeddings" in name or "position_embeddings" in name:
        return init_std(config.embedding_init_method)
    if name.endswith("output_layer.weight"):
        # gpt_model.py: muP's output layer (untied) takes the embedding init; otherwise init_method.
        if getattr(config, "use_mup", False) and not getattr(
            config, "share_embeddings_and_output_weights", False
        ):
            return init_std(config.embedding_init_method)
        return init_std(config.init_method)
    if name.endswith("router.weight"):
        # muP: the router is an output-type matrix (fan-out = the expert count stays): σ/m, not init_method's σ/√m.
        rescale = mup.router_init_rescale(config.mup_width_mult) if getattr(config, "use_mup", False) else 1.0
        return init_std(config.init_method) * rescale
    raise ValueError(
        f"parameter {name!r} is a matrix managed by AdamW that layout-independent initialization does not know "
        "(known: word/position embeddings, output layer, router)"
    )


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _tp_shard_of(param: torch.Tensor, module: torch.nn.Module) -> tuple[int, int, int]:
    """(shard dim, shards, index) of a megatron TP-split parameter; (0, 1, 0) when not split."""
    partition_dim: int = getattr(param, "partition_dim", -1)  # megatron's attribute of a TP-split parameter
    if not getattr(param, "tensor_model_parallel", False) or partition_dim < 0:
        return 0, 1, 0
    group = module_tp_group(module)
    if group is None:
        return 0, 1, 0
    return int(partition_dim), dist.get_world_size(group), dist.get_rank(group)


@torch.no_grad()
def initialize_layout_independent_(
    model_chunks: list[torch.nn.Module], config: TransformerConfig, seed: int
) -> int:
    """Overwrite every weight matrix of ``model_chunks`` with its layout-independent draw (see the module
    docstring); return how many logical tensors were drawn. Call before the optimizer copies main params.

    ``config`` is the model's ``TransformerConfig`` (its init methods give the stds); ``seed`` the run seed.
    """
    routing = route_parameters(model_chunks)
    drawn = 0
    for routed in routing.muon:
        module_path = routing.module_paths[routed.chunk]
        std = _muon_matrix_std(_module_name(routed.name), config)
        for piece in megatron_param_pieces(
            routed.name, routed.param, routed.module, config, module_path, _INIT_LAYOUT
        ):
            shard = _draw_shard(
                seed,
                piece.key,
                piece.shape,
                piece.shard_dim,
                piece.num_shards,
                piece.shard_index,
                std,
                routed.param.device,
            )
            piece.write(routed.param.data, shard.to(routed.param.dtype))
            drawn += 1
    for routed in routing.adamw:
        param = routed.param
        if param.ndim < 2:
            continue  # norm scales, biases, expert bias: megatron's constants
        if param.ndim > 2:
            raise ValueError(f"parameter {routed.name!r} has shape {tuple(param.shape)}; expected a matrix")
        key = _global_key(routed.name, routing.module_paths[routed.chunk])
        tied_copy = key == "output_layer.weight" and getattr(param, "shared_embedding", False)
        if tied_copy:
            # The last stage's copy of a tied embedding: the same draw as the first stage's embedding.
            key = _TIED_EMBEDDING_KEY
        shard_dim, num_shards, shard_index = _tp_shard_of(param, routed.module)
        full = list(param.shape)
        full[shard_dim] *= num_shards
        shard = _draw_shard(
            seed,
            key,
            (full[0], full[1]),
            shard_dim,
            num_shards,
            shard_index,
            init_std(config.embedding_init_method) if tied_copy else _adamw_matrix_std(routed.name, config),
            param.device,
        )
        param.data.copy_(shard.to(param.dtype))
        drawn += 1
    return drawn
