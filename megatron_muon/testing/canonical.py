"""Layout-independent values for a megatron model's parameters and gradients, for cross-layout tests.

Megatron's CPU initialization draws the full weight and slices it, but the slice of a fused SwiGLU ``linear_fc1``
at TP2 mixes gate and up rows of the TP1 weight, and experts on EP ranks are drawn in another order. To compare
layouts, every *logical* tensor (a Muon matrix of ``layout.py``, or any other parameter seen at TP1) gets values
from a generator seeded by its layout-independent key, and each rank writes its own shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist

from megatron_muon.optim.layout import (
    LayoutConfig,
    MatrixPiece,
    _global_key,
    fsdp_row_range,
    local_tensor,
    megatron_param_pieces,
    module_tp_group,
)
from megatron_muon.optim.param_groups import ParamRouting, RoutedParam, route_parameters

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

DEFAULT_LAYOUT = LayoutConfig()

CollectedPieces = dict[str, dict[int, tuple[torch.Tensor, int, int]]]
"""Matrix piece key → shard index → (this rank's value, shard dim, number of shards): :func:`collect_pieces`."""


def canonical_tensor(key: str, shape: Sequence[int], *, salt: str = "", std: float = 0.02) -> torch.Tensor:
    """A float32 tensor of ``shape`` drawn from N(0, std²) with a seed derived from ``key`` and ``salt``."""
    seed = int.from_bytes(hashlib.sha256(f"{salt}|{key}".encode()).digest()[:8], "little") % (2**63)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float64).mul_(std).float()


def _shard(full: torch.Tensor, piece: MatrixPiece) -> torch.Tensor:
    if piece.num_shards == 1:
        return full
    return full.chunk(piece.num_shards, dim=piece.shard_dim)[piece.shard_index]


def _other_param_full_and_shard(
    name: str, param: torch.Tensor, module: torch.nn.Module, module_paths: dict[str, torch.nn.Module]
) -> tuple[str, tuple[int, ...], int | None, int, int]:
    """(global key, TP1 shape, TP split dim or None, TP size, TP rank) of a parameter Muon does not manage."""
    key = _global_key(name, module_paths)
    dim: int = getattr(param, "partition_dim", -1) if getattr(param, "tensor_model_parallel", False) else -1
    if dim < 0:
        return key, tuple(param.shape), None, 1, 0
    group = module_tp_group(module)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    full = list(param.shape)
    full[dim] *= size
    return key, tuple(full), dim, size, rank


def logical_pieces(
    model_chunks: list[torch.nn.Module], options: LayoutConfig = DEFAULT_LAYOUT, router: str = "adamw"
) -> tuple[ParamRouting, list[tuple[RoutedParam, list[MatrixPiece]]]]:
    """(param, pieces) for every Muon parameter of ``model_chunks`` (as the optimizer builder lays them out;
    ``router`` as ``MuonConfig.router``)."""
    routing = route_parameters(model_chunks, router=router)
    result = []
    for routed in routing.muon:
        chunk = model_chunks[routed.chunk]
        # megatron's model chunks (or their DDP wrappers, ``.module``) carry the TransformerConfig.
        wrapped: Any = chunk
        config = getattr(wrapped, "config", None) or wrapped.module.config
        pieces = megatron_param_pieces(
            routed.name, routed.param, routed.module, config, routing.module_paths[routed.chunk], options
        )
        result.append((routed, pieces))
    return routing, result


@torch.no_grad()
def fill_canonical_(
    model_chunks: list[torch.nn.Module],
    *,
    salt: str = "weight",
    grads: bool = False,
    options: LayoutConfig = DEFAULT_LAYOUT,
    router: str = "adamw",
) -> None:
    """Write canonical values into every parameter (``grads=False``) or its ``main_grad`` / ``grad``; the MoE
    router as a Muon matrix with ``router="muon"``."""
    routing, muon = logical_pieces(model_chunks, options, router)

    def target(param: torch.Tensor) -> torch.Tensor:
        if not grads:
            return param.data
        main_grad: torch.Tensor | None = getattr(param, "main_grad", None)  # megatron's DDP gradient buffer
        if main_grad is not None:
            return main_grad
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad

    for routed, pieces in muon:
        value = torch.empty(routed.param.shape)
        for piece in pieces:
            piece.write(value, _shard(canonical_tensor(piece.key, piece.shape, salt=salt), piece))
        _copy_held_rows(target(routed.param), value)
    for routed in routing.adamw:
        key, full_shape, dim, size, rank = _other_param_full_and_shard(
            routed.name, routed.param, routed.module, routing.module_paths[routed.chunk]
        )
        is_norm = routed.param.ndim == 1 and "norm" in routed.name and not grads
        full = torch.ones(full_shape) if is_norm else canonical_tensor(key, full_shape, salt=salt)
        shard = full if dim is None else full.chunk(size, dim=dim)[rank]
        _copy_held_rows(target(routed.param), shard)


def _copy_held_rows(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``, or for a fully sharded (FSDP) ``target`` the rows of ``value`` this rank holds."""
    rows = fsdp_row_range(target)
    if rows is None:
        target.copy_(value)
    else:
        local_tensor(target).copy_(value[rows[0] : rows[1]])


def collect_pieces(
    model_chunks: list[torch.nn.Module],
    options: LayoutConfig = DEFAULT_LAYOUT,
    *,
    main_params: bool = False,
    router: str = "adamw",
) -> CollectedPieces:
    """This rank's value of every Muon matrix piece: key → shard index → tensor (for assembling in a test).
    ``main_params``: the fp32 main copies megatron's mixed-precision wrapper keeps (``param.main_param``) instead
    of the bf16 parameters, from the parameters that have one here (with the distributed optimizer: the owned)."""
    _, muon = logical_pieces(model_chunks, options, router)
    out: CollectedPieces = {}
    for routed, pieces in muon:
        source = getattr(routed.param, "main_param", None) if main_params else routed.param.data
        if source is None:
            continue
        if fsdp_row_range(source) is not None:  # FSDP: the whole (TP-local) parameter, gathered
            source = cast("DTensor", source).full_tensor()  # only a DTensor has a row range
        for piece in pieces:
            out.setdefault(piece.key, {})[piece.shard_index] = (
                piece.read(source).clone(),
                piece.shard_dim,
                piece.num_shards,
            )
    return out


def assemble(collected_by_rank: list[CollectedPieces]) -> dict[str, torch.Tensor]:
    """Full logical matrices from every rank's :func:`collect_pieces` (replicas must agree exactly)."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    meta: dict[str, tuple[int, int]] = {}
    for rank, collected in enumerate(collected_by_rank):
        for key, by_shard in collected.items():
            for shard, (value, shard_dim, num_shards) in by_shard.items():
                meta[key] = (shard_dim, num_shards)
                previous = shards.setdefault(key, {}).get(shard)
                if previous is not None and not torch.equal(previous, value):
                    diff = (previous - value).abs().max().item()
                    raise AssertionError(
                        f"replicas disagree on {key} shard {shard} (rank {rank}, max diff {diff})"
                    )
                shards[key][shard] = value
    return {
        key: torch.cat([by_shard[i] for i in range(meta[key][1])], dim=meta[key][0])
        for key, by_shard in shards.items()
    }
