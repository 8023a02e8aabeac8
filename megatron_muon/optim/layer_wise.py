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
  master and momentum here. It first asserts that this rule gives every parameter the shard megatron's own
  layer-wise optimizer gives it (:func:`check_ownership_matches_megatron`), and the chain asserts that megatron
  narrowed no member further: a disagreement would leave a parameter updated by no rank.
* :func:`build_layer_wise_chain` chains megatron's ``LayerWiseDistributedOptimizer`` (our Muon on the owned
  parameters; it wraps them in megatron's mixed-precision wrapper after narrowing and all-gathers the
  parameter buffers after the step) with megatron's ``DistributedOptimizer`` for the AdamW groups, as
  megatron's own ``get_megatron_optimizer`` does in layer-wise mode.

No math and no communication of ours here: the Muon step and its TP exchange are ``muon.py`` / ``comm.py``.
"""

from __future__ import annotations

import copy
import types
import typing
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
    "check_ownership_matches_megatron",
    "check_tags_match",
    "megatron_shard_assignment",
    "owned_params",
    "shard_assignment",
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


def _layouts(model_chunks: Iterable[Any]) -> list[FullParamLayout]:
    layouts = [getattr(chunk, "full_param_layout", None) for chunk in model_chunks]
    if not layouts or any(layout is None for layout in layouts):
        raise ValueError(
            "the model chunks carry no full_param_layout: wrap them with wrap_in_ddp and a "
            "DistributedDataParallelConfig(use_distributed_optimizer=True)"
        )
    return typing.cast(list[FullParamLayout], layouts)


def shard_assignment(model_chunks: Iterable[Any]) -> dict[torch.nn.Parameter, tuple[int, bool]]:
    """Every shard-aligned (Muon) parameter -> (the data-parallel shard that owns it, whether it is an expert
    parameter: then the shard is an expert-data-parallel rank). The layout puts each parameter whole in one shard
    of its bucket."""
    assignment: dict[torch.nn.Parameter, tuple[int, bool]] = {}
    for layout in _layouts(model_chunks):
        for key, buffer_layout in layout.layouts.items():
            if not key.is_managed_by_layer_wise_optimizer:
                continue
            for param, (start, _end, bucket_id) in buffer_layout.param_index_map.items():
                bucket_start, bucket_end = buffer_layout.bucket_indices[bucket_id]
                shard_size = (bucket_end - bucket_start) // buffer_layout.num_optimizer_shards
                assignment[param] = ((start - bucket_start) // shard_size, bool(key.is_expert_parallel))
    return assignment


def megatron_shard_assignment(
    model_chunks: Iterable[Any], pg_collection: ProcessGroupCollection
) -> dict[torch.nn.Parameter, int]:
    """megatron's own assignment of the same parameters: ``LayerWiseDistributedOptimizer._shard_params_from_layout``
    run on every shard-aligned parameter of the layouts, read back from the per-rank lists it fills."""
    layouts = _layouts(model_chunks)
    groups: list[dict[str, Any]] = [
        {"params": list(buffer_layout.param_index_map), "is_expert_parallel": bool(key.is_expert_parallel)}
        for layout in layouts
        for key, buffer_layout in layout.layouts.items()
        if key.is_managed_by_layer_wise_optimizer and buffer_layout.param_index_map
    ]
    probe = types.SimpleNamespace(dp_cp=pg_collection.dp_cp, expt_dp=pg_collection.expt_dp)
    # megatron-core 0.19.2: the assignment lives in a private method that narrows param groups in place and
    # records every rank's params in dp_cp_params_list / expt_dp_params_list; run it on copies.
    LayerWiseDistributedOptimizer._shard_params_from_layout(
        probe,
        [types.SimpleNamespace(param_groups=groups)],
        layouts,
        pg_collection.dp_cp.size(),
        pg_collection.expt_dp.size(),
    )
    assignment: dict[torch.nn.Parameter, int] = {}
    for per_rank in (probe.dp_cp_params_list, probe.expt_dp_params_list or []):
        for shard, params in enumerate(per_rank):
            for param in params:
                assignment[param] = shard
    if (
        probe.expt_dp_params_list is None
    ):  # one expert-data-parallel rank: megatron keeps every expert param there
        for group in groups:
            if group["is_expert_parallel"]:
                for param in group["params"]:
                    assignment[param] = 0
    return assignment


def _param_names(model_chunks: Iterable[Any]) -> dict[int, str]:
    return {id(param): name for chunk in model_chunks for name, param in chunk.named_parameters()}


def check_ownership_matches_megatron(
    model_chunks: Sequence[Any], pg_collection: ProcessGroupCollection
) -> None:
    """One-line ``ValueError`` naming the first parameter (by name) that :func:`shard_assignment` and megatron's
    own assignment give to different data-parallel shards, or that one of them leaves out. A disagreement would
    leave that parameter updated by no rank (or by two). Every rank computes the whole assignment, so every rank
    raises the same error."""
    ours = shard_assignment(model_chunks)
    theirs = megatron_shard_assignment(model_chunks, pg_collection)
    if {id(p): s for p, (s, _) in ours.items()} == {id(p): s for p, s in theirs.items()}:
        return
    names = _param_names(model_chunks)
    for param in sorted(set(ours) | set(theirs), key=lambda p: names.get(id(p), "")):
        our_shard = ours[param][0] if param in ours else None
        if our_shard != theirs.get(param):
            raise ValueError(
                f"distributed optimizer: parameter {names.get(id(param), tuple(param.shape))} is owned by "
                f"data-parallel shard {our_shard} in optim/layer_wise.shard_assignment but by shard "
                f"{theirs.get(param)} in megatron's LayerWiseDistributedOptimizer; the ownership rule no longer "
                "matches megatron's (a megatron-core upgrade?): it would go un-updated"
            )


def owned_params(model_chunks: Iterable[Any], pg_collection: ProcessGroupCollection) -> set[int]:
    """ids of the shard-aligned (Muon) parameters this rank owns (:func:`shard_assignment`), after checking that
    megatron's layer-wise optimizer, which narrows the same groups again, assigns every one alike
    (:func:`check_ownership_matches_megatron`)."""
    chunks = list(model_chunks)
    check_ownership_matches_megatron(chunks, pg_collection)
    dense_rank, expert_rank = pg_collection.dp_cp.rank(), pg_collection.expt_dp.rank()
    return {
        id(param)
        for param, (shard, is_expert) in shard_assignment(chunks).items()
        if shard == (expert_rank if is_expert else dense_rank)
    }


def _model_param_ids(member: Any) -> set[int]:
    """ids of the model parameters a megatron optimizer member updates. megatron's bf16 wrapper
    (``Float16OptimizerWithFloat16Params``) puts fp32 main copies of the bf16 parameters in its torch optimizer's
    groups and keeps the model parameters in ``float16_groups`` (fp32 ones stay in ``fp32_from_fp32_groups``)."""
    float16_groups = getattr(member, "float16_groups", None)
    if float16_groups is None:
        return {id(p) for group in member.param_groups for p in group["params"]}
    return {id(p) for groups in (float16_groups, member.fp32_from_fp32_groups) for g in groups for p in g}


def _check_members_kept_their_params(
    layer_wise: LayerWiseDistributedOptimizer, passed: list[list[int]], model_chunks: Sequence[Any]
) -> None:
    """megatron narrows each member's groups to the params it assigns this rank; ours already are: any param it
    drops would be updated by no rank."""
    for index, (member, before) in enumerate(zip(layer_wise.chained_optimizers, passed, strict=True)):
        after = _model_param_ids(member)
        dropped = [pid for pid in before if pid not in after]
        if dropped or len(after) != len(before):
            names = _param_names(model_chunks)
            first = names.get(dropped[0], "?") if dropped else "a parameter it was not given"
            raise ValueError(
                f"distributed optimizer: megatron's LayerWiseDistributedOptimizer narrowed Muon member {index} to "
                f"{len(after)} of the {len(before)} parameters this rank owns (first difference: {first}); "
                "the ownership rule no longer matches megatron's"
            )


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
    passed = [[id(p) for group in optimizer.param_groups for p in group["params"]] for optimizer in raw]
    layer_wise = LayerWiseDistributedOptimizer(raw, config, pg_collection, model_chunks=model_chunks)
    _check_members_kept_their_params(layer_wise, passed, model_chunks)
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
