"""Glue to megatron-core's distributed optimizer for ``optimizer.distributed_optimizer: true``
(``docs/distributed_optimizer.md``): fp32 master weights and optimizer state stored once across the
data-parallel replicas.

* Before DDP wraps the model, :func:`tag_muon_params` marks the parameters Muon updates
  (``is_managed_by_layer_wise_optimizer``, megatron's attribute); :func:`shard_aligned_layout` then gives DDP
  megatron's layer-wise layout, in which each data-parallel shard of a bucket holds *whole* Muon parameters
  (bin-packed by size) and AdamW parameters keep the byte-level layout of megatron's ``DistributedOptimizer``.
  DDP reduce-scatters gradients over data-parallel ranks and all-gathers the updated parameters, bucket by
  bucket, with its own overlap.
* :func:`owned_params` reads from that layout which Muon parameters this data-parallel rank owns: the only
  ones its Muon updates, whose gradient the reduce-scatter completed here, and the only ones with an fp32
  master and momentum here.
* :func:`build_layer_wise_chain` chains megatron's ``LayerWiseDistributedOptimizer`` (our Muon on the owned
  parameters; it wraps them in megatron's mixed-precision wrapper after narrowing and all-gathers the
  parameter buffers after the step) with megatron's ``DistributedOptimizer`` for the AdamW groups, as
  megatron's own ``get_megatron_optimizer`` does in layer-wise mode.

No math and no communication of ours here: the Muon step and its TP exchange are ``muon.py`` / ``comm.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import (
    ChainedOptimizer,
    FP32Optimizer,
    OptimizerConfig,
    _get_megatron_optimizer_based_on_param_groups,
)
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.optimizer.param_layout import FullParamLayout
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_muon.optim.param_groups import route_parameters

__all__ = [
    "LAYER_WISE_ATTRIBUTE",
    "build_layer_wise_chain",
    "check_tags_match",
    "owned_params",
    "shard_aligned_layout",
    "tag_muon_params",
]

LAYER_WISE_ATTRIBUTE = "is_managed_by_layer_wise_optimizer"
"""megatron's parameter attribute that puts a parameter in a shard-aligned (layer-wise) DDP buffer."""


def tag_muon_params(model_chunks: Iterable[torch.nn.Module], *, router: str) -> None:
    """Mark every trainable parameter of the *unwrapped* ``model_chunks``: True for the ones Muon updates
    (``param_groups.route_parameters``, ``router`` as ``MuonConfig.router``), False for AdamW's. Call before
    :func:`~megatron_muon.training.step.wrap_in_ddp` builds the buffers."""
    chunks = list(model_chunks)
    muon_ids = {id(r.param) for r in route_parameters(chunks, router=router).muon}
    for chunk in chunks:
        for param in chunk.parameters():
            if param.requires_grad:
                setattr(param, LAYER_WISE_ATTRIBUTE, id(param) in muon_ids)


def check_tags_match(model_chunks: Iterable[torch.nn.Module], muon_ids: set[int]) -> None:
    """One-line error unless the DDP buffers were laid out for exactly the parameters Muon will update."""
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            if not param.requires_grad:
                continue
            tagged = getattr(param, LAYER_WISE_ATTRIBUTE, None)
            if tagged is None or bool(tagged) != (id(param) in muon_ids):
                raise ValueError(
                    f"parameter {name} is {'' if id(param) in muon_ids else 'not '}updated by Muon but "
                    f"{LAYER_WISE_ATTRIBUTE}={tagged}; call optim.layer_wise.tag_muon_params(chunks, "
                    "router=<MuonConfig.router>) before wrap_in_ddp"
                )


def _bucket_size(ddp_config: DistributedDataParallelConfig, dp_size: int, unbucketed: bool) -> int | None:
    """The bucket size megatron's DDP will use for this chunk (``DistributedDataParallel.__init__``): one bucket
    without grad-reduce overlap, for chunks after the first and on later pipeline stages."""
    if not ddp_config.overlap_grad_reduce or unbucketed:
        return None
    if ddp_config.bucket_size is not None:
        return int(ddp_config.bucket_size)
    return max(40_000_000, 1_000_000 * dp_size)


def shard_aligned_layout(
    chunk: torch.nn.Module,
    ddp_config: DistributedDataParallelConfig,
    pg_collection: ProcessGroupCollection,
    *,
    unbucketed: bool,
) -> FullParamLayout:
    """megatron's ``LayerWiseDistributedOptimizer.compute_full_param_layout`` for one unwrapped model chunk:
    shard-aligned buffers for tagged (Muon) parameters, byte-level ones for the rest. ``unbucketed``: the chunk
    is not the first one, or not on the first pipeline stage (DDP then uses one bucket)."""
    params = [p for _, p in chunk.named_parameters() if p.requires_grad]
    dp_size = pg_collection.dp.size()
    return LayerWiseDistributedOptimizer.compute_full_param_layout(
        params,
        _bucket_size(ddp_config, dp_size, unbucketed),
        pg_collection.dp_cp.size(),
        ddp_config,
        expert_data_parallel_world_size=pg_collection.expt_dp.size(),
    )


def owned_params(model_chunks: Iterable[Any], pg_collection: ProcessGroupCollection) -> set[int]:
    """ids of the shard-aligned (Muon) parameters this rank owns: the layout puts each in one data-parallel
    shard of its bucket (the arithmetic of megatron's ``LayerWiseDistributedOptimizer._shard_params_from_layout``,
    which narrows the same groups again and must agree)."""
    dense_rank, expert_rank = pg_collection.dp_cp.rank(), pg_collection.expt_dp.rank()
    owned: set[int] = set()
    for chunk in model_chunks:
        layout = getattr(chunk, "full_param_layout", None)
        if layout is None:
            raise ValueError(
                "the model chunks carry no full_param_layout: wrap them with wrap_in_ddp and a "
                "DistributedDataParallelConfig(use_distributed_optimizer=True)"
            )
        for key, buffer_layout in layout.layouts.items():
            if not key.is_managed_by_layer_wise_optimizer:
                continue
            local_rank = expert_rank if key.is_expert_parallel else dense_rank
            for param, (start, _end, bucket_id) in buffer_layout.param_index_map.items():
                bucket_start, bucket_end = buffer_layout.bucket_indices[bucket_id]
                shard_size = (bucket_end - bucket_start) // buffer_layout.num_optimizer_shards
                if (start - bucket_start) // shard_size == local_rank:
                    owned.add(id(param))
    return owned


def build_layer_wise_chain(
    *,
    muon_optimizers: Sequence[tuple[torch.optim.Optimizer, Callable[..., None]]],
    adamw_groups: list[dict[str, Any]],
    model_chunks: list[Any],
    config: OptimizerConfig,
    pg_collection: ProcessGroupCollection,
) -> ChainedOptimizer:
    """megatron's ``LayerWiseDistributedOptimizer`` over ``muon_optimizers`` (raw torch optimizers already
    narrowed to the owned parameters, each with a hook that sets its megatron wrapper's attributes) chained
    with megatron's ``DistributedOptimizer`` over ``adamw_groups`` — megatron's ``get_megatron_optimizer``
    layer-wise branch, with our Muon as the emerging optimizer."""
    for group in adamw_groups:
        if group["is_expert_parallel"]:
            raise ValueError(
                "optimizer.distributed_optimizer=true cannot serve expert-parallel parameters updated by AdamW "
                "(megatron-core 0.19.2 has no expert-data-parallel DistributedOptimizer beside the layer-wise "
                "one); route expert matrices to Muon or set distributed_optimizer=false"
            )
    raw = [optimizer for optimizer, _ in muon_optimizers]
    if not config.bf16:  # megatron's layer-wise optimizer wraps bf16 optimizers itself, fp32 ones not at all
        raw = [FP32Optimizer(optimizer, config, None) for optimizer in raw]
    layer_wise = LayerWiseDistributedOptimizer(raw, config, pg_collection, model_chunks=model_chunks)
    for member, (_, configure) in zip(layer_wise.chained_optimizers, muon_optimizers, strict=True):
        configure(member)
        # Each rank holds the gradients of its own parameters only: norms and zero counts sum over the world
        # (as the layer-wise optimizer's own get_grad_norm does), never over the model-parallel group alone.
        member.grad_stats_parallel_group = None
    members: list[MegatronOptimizer] = [layer_wise]
    if adamw_groups:
        groups = ProcessGroupCollection.setup_process_groups_for_optimizer(
            pg_collection, model_chunks, use_gloo_process_groups=False
        )
        byte_level_buffers = {
            index: buffers
            for index, chunk in enumerate(model_chunks)
            if (
                buffers := [
                    b
                    for b in chunk.buffers
                    if b.params and not getattr(b.params[0], LAYER_WISE_ATTRIBUTE, False)
                ]
            )
        }
        adamw_config = copy.copy(config)
        adamw_config.use_distributed_optimizer = True
        adamw = _get_megatron_optimizer_based_on_param_groups(
            config=adamw_config,
            model_chunks=model_chunks,
            param_groups=adamw_groups,
            per_model_buffers=byte_level_buffers,
            model_parallel_group=groups["mp_group"],
            data_parallel_group=groups["intra_dp_cp_group"],
            data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
            data_parallel_group_idx=groups["mp_group"].rank(),
            intra_dist_opt_group=groups["intra_dist_opt_group"],
            distributed_optimizer_instance_id=0,
            pg_collection=pg_collection,
        )
        adamw.config = config  # ChainedOptimizer asserts one config across members (as megatron resets it)
        adamw.grad_stats_parallel_group = None
        members.append(adamw)
    return ChainedOptimizer(members)
