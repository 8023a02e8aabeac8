"""Glue to megatron-core's optimizer stack: our Muon for the hidden matrices, megatron's own AdamW for the rest,
wrapped in megatron's mixed-precision wrappers and chained so one ``step()`` clips with one grad norm and
updates everything.

Follows megatron-core's ``_get_megatron_emerging_optimizer`` (optimizer/__init__.py): param groups come from
megatron's ``_get_param_groups`` (so the LR/WD scheduler and distributed checkpointing see the groups they
expect, aligned across ranks) and are bucketed by (optimizer, expert-parallel) because dense and expert grads
reduce their norms over different groups.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from megatron.core.optimizer import (
    ChainedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    OptimizerConfig,
    _get_megatron_optimizer_based_on_param_groups,
    _get_param_groups,
    get_mup_config_overrides,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey, ParamPredicate
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_muon import mup
from megatron_muon.optim import layer_wise
from megatron_muon.optim.layout import LayoutConfig, fsdp_part_pieces, fsdp_shard, megatron_param_pieces
from megatron_muon.optim.muon import Muon, NorMuonNormalization
from megatron_muon.optim.options import MuonConfig, MuonSettings
from megatron_muon.optim.param_groups import (
    ParamRouting,
    adamw_matrix_overrides,
    mup_width_multiplier,
    route_parameters,
)
from megatron_muon.optim.placement import MatrixPlacement
from megatron_muon.optim.plan import CostModel

logger = logging.getLogger(__name__)


def build_optimizer(
    model_chunks: list[torch.nn.Module],
    config: OptimizerConfig,
    muon: MuonConfig,
    pg_collection: ProcessGroupCollection,
    *,
    cost_model: CostModel | None = None,
    router_lr_multiplier: float = 1.0,
) -> ChainedOptimizer:
    """Muon + AdamW for megatron ``model_chunks`` (DDP-wrapped), as one megatron ``ChainedOptimizer``.

    ``config`` is megatron's ``OptimizerConfig`` with ``optimizer="adam"`` (the AdamW side, clipping, precision,
    the default LR schedule); ``pg_collection`` a megatron ``ProcessGroupCollection``; only its groups are used.
    ``router_lr_multiplier``: the MoE router's AdamW LR is ``config.lr`` times this (times muP's 1/m).
    """
    if router_lr_multiplier != 1.0 and muon.router != "adamw":
        raise ValueError(
            f"router_lr_multiplier={router_lr_multiplier} needs the router on AdamW (router={muon.router!r})"
        )
    # Validated here, once, into frozen settings (a run config was checked by the same code before launch).
    settings = muon.settings()
    if config.optimizer != "adam":
        raise ValueError(f"OptimizerConfig.optimizer={config.optimizer!r}; the AdamW side needs 'adam'")
    if config.fp16:
        raise ValueError("fp16 is not supported with Muon; use bf16")
    routing = route_parameters(model_chunks, router=muon.router)
    muon_ids = {id(r.param) for r in routing.muon}
    owned = None
    fully_sharded = is_fully_sharded(model_chunks)
    if fully_sharded:
        if config.use_distributed_optimizer:
            raise ValueError(
                "use_distributed_optimizer=True with fully sharded (FSDP) model chunks; FSDP already shards the "
                "optimizer state: valid is use_distributed_optimizer=False"
            )
        # The shards are the fp32 master weights (FSDP gathers them in the compute dtype), so no
        # mixed-precision wrapper copies them again.
        config = copy.copy(config)
        config.bf16 = False
    if config.use_distributed_optimizer:
        _check_distributed_optimizer(model_chunks, muon_ids)
        owned = layer_wise.owned_params(model_chunks, pg_collection)
    overrides = get_standard_config_overrides(config)
    muon_key = ParamKey(predicate=ParamPredicate(name="megatron_muon", fn=lambda p: id(p) in muon_ids))
    width_multiplier = mup_width_multiplier(model_chunks)
    weight_decay = muon.weight_decay
    if width_multiplier is not None:  # muP: Muon's LR transfers as is (spectral scale); its WD goes as 1/m
        weight_decay = mup.muon_weight_decay(muon.weight_decay, width_multiplier)
    overrides.update(adamw_matrix_overrides(routing, config, width_multiplier, router_lr_multiplier))
    overrides[muon_key] = {
        "optimizer": "muon",
        "max_lr": muon.lr,
        "min_lr": muon.min_lr,
        "start_wd": weight_decay,
        "end_wd": weight_decay,
    }
    groups = _get_param_groups(model_chunks, config, overrides)

    results = []
    layer_wise_muons = []
    for use_muon, is_expert in ((True, False), (True, True), (False, False), (False, True)):
        bucket = [
            g
            for g in groups
            if (g.get("optimizer") == "muon") == use_muon and g["is_expert_parallel"] == is_expert
        ]
        if not bucket:
            continue
        model_parallel_group = pg_collection.tp_ep_pp if is_expert else pg_collection.mp

        def configure(optimizer: Any, group: Any = model_parallel_group) -> None:
            optimizer.grad_stats_parallel_group = group
            optimizer.tp_group = pg_collection.tp
            optimizer.expert_tp_group = pg_collection.expt_tp

        if use_muon:
            if owned is not None:
                # Distributed optimizer: this data-parallel rank updates (and keeps state for) its own params only.
                bucket = [{**g, "params": [p for p in g["params"] if id(p) in owned]} for g in bucket]
            raw = _build_muon(
                bucket,
                routing,
                model_chunks,
                muon,
                settings,
                pg_collection,
                cost_model,
                # The distributed optimizer's owners and FSDP's part holders keep their own momentum, never replicas.
                replicate_state=owned is None and not fully_sharded,
            )
            if owned is not None:
                layer_wise_muons.append((raw, configure))
                continue
            optimizer = (
                Float16OptimizerWithFloat16Params(raw, config, None, None)
                if config.bf16
                else FP32Optimizer(raw, config, None)
            )
            configure(optimizer)
        elif owned is not None:
            continue  # AdamW groups: megatron's DistributedOptimizer, below
        else:
            optimizer = _get_megatron_optimizer_based_on_param_groups(
                config=config,
                model_chunks=model_chunks,
                param_groups=bucket,
                model_parallel_group=model_parallel_group,
                pg_collection=pg_collection,
            )
        results.append(optimizer)
    logger.info("Optimizer: %s", routing.summary())
    if owned is not None:
        return layer_wise.build_layer_wise_chain(
            muon_optimizers=layer_wise_muons,
            adamw_groups=[g for g in groups if g.get("optimizer") != "muon"],
            model_chunks=model_chunks,
            config=config,
            pg_collection=pg_collection,
        )
    return ChainedOptimizer(results)


def is_fully_sharded(model_chunks: list[torch.nn.Module]) -> bool:
    """Whether the chunks' parameters are FSDP shards (``DTensor``s: ``training/fsdp.py``)."""
    return any(fsdp_shard(p) is not None for chunk in model_chunks for p in chunk.parameters())


def chain_members(optimizer: Any) -> list[Any]:
    """The megatron optimizers at the leaves of a (nested) ``ChainedOptimizer``, each wrapping one torch optimizer
    (``.optimizer``): with the distributed optimizer the chain holds megatron's layer-wise optimizer, itself a
    chain of the Muon members, beside megatron's ``DistributedOptimizer``."""
    if isinstance(optimizer, ChainedOptimizer):
        return [leaf for member in optimizer.chained_optimizers for leaf in chain_members(member)]
    return [optimizer]


def _check_distributed_optimizer(model_chunks: list[Any], muon_ids: set[int]) -> None:
    """One-line errors for what ``use_distributed_optimizer=True`` cannot serve (``tp_mode='duplicated'``: the
    plan refuses it without replicated state)."""
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is None or not ddp_config.use_distributed_optimizer:
            raise ValueError(
                "use_distributed_optimizer=True needs model chunks wrapped by wrap_in_ddp with "
                "DistributedDataParallelConfig(use_distributed_optimizer=True)"
            )
        if ddp_config.num_distributed_optimizer_instances != 1:
            raise ValueError(
                f"num_distributed_optimizer_instances={ddp_config.num_distributed_optimizer_instances} with "
                "Muon's distributed optimizer; valid: 1 (megatron's layer-wise layout spans the whole DP group)"
            )
    layer_wise.check_tags_match(model_chunks, muon_ids)


def _build_muon(
    groups: list[dict[str, Any]],
    routing: ParamRouting,
    model_chunks: list[torch.nn.Module],
    muon: MuonConfig,
    settings: MuonSettings,
    pg_collection: ProcessGroupCollection,
    cost_model: CostModel | None,
    *,
    replicate_state: bool = True,
) -> Muon:
    """Our Muon (a torch optimizer) over ``groups``, its logical matrices and plan over the TP x DP grid, from
    ``settings`` (``muon.settings()``, validated) and ``muon``'s layout and router choices."""
    by_id = {id(r.param): r for r in routing.muon}
    layout_options = LayoutConfig(
        split_qkv=muon.split_qkv, qkv_per_head=muon.qkv_per_head, split_gate_up=muon.split_gate_up
    )
    pieces, shard_group_of = [], {}
    for group in groups:
        group_pieces = []
        for param in group["params"]:
            routed = by_id[id(param)]
            chunk: Any = model_chunks[routed.chunk]  # megatron DDP: .config or .module.config
            transformer_config = getattr(chunk, "config", None) or chunk.module.config
            param_pieces = megatron_param_pieces(
                routed.name,
                param,
                routed.module,
                transformer_config,
                routing.module_paths[routed.chunk],
                layout_options,
            )
            shard = fsdp_shard(param)
            if shard is not None:  # FSDP: only this rank's rows of the parameter
                param_pieces = fsdp_part_pieces(param_pieces, *shard)
            for piece in param_pieces:
                shard_group_of[piece.key] = "expert_tp" if group["is_expert_parallel"] else "tp"
            group_pieces.append(param_pieces)
        pieces.append(group_pieces)
    plan_settings = dataclasses.replace(
        settings.plan,
        replicate_state=replicate_state,
        # The distributed optimizer spreads the momentum as the params (NorMuon's row statistics stay whole on
        # the owner, so its momentum does too).
        momentum_with_shards=not replicate_state and settings.normuon is None,
    )
    placement = MatrixPlacement(
        [p for group_pieces in pieces for param_pieces in group_pieces for p in param_pieces],
        plan_settings,
        grid_group=pg_collection.tp_dp_cp,
        shard_groups={"tp": pg_collection.tp, "expert_tp": pg_collection.expt_tp},
        shard_group_of=shard_group_of,
        cost_model=cost_model,
        # Where this rank's empty sends live when it moves nothing of its own: the model's device.
        device=next((p.device for chunk in model_chunks for p in chunk.parameters()), None),
    )
    hyperparameters, newton_schulz = settings.hyperparameters, settings.newton_schulz
    return Muon(
        groups,
        lr=hyperparameters.lr,
        momentum=hyperparameters.momentum,
        nesterov=hyperparameters.nesterov,
        weight_decay=hyperparameters.weight_decay,
        scale_mode=hyperparameters.scale_mode,
        ns_steps=newton_schulz.steps,
        coefficients=newton_schulz.coefficients,
        compute_dtype=newton_schulz.compute_dtype,
        pieces=pieces,
        placement=placement,
        ns_fp8_steps=newton_schulz.fp8_steps,
        ns_gram_restarts=newton_schulz.gram_restarts,
        post_orthogonalize=(
            NorMuonNormalization(settings.normuon.beta2, settings.normuon.eps) if settings.normuon else None
        ),
    )


def adamw_config_overrides(config: OptimizerConfig, model_chunks: list[torch.nn.Module]) -> dict[Any, Any]:
    """Param-group overrides for megatron's own AdamW over the whole model (the ``use_muon=false`` baseline):
    megatron's standard ones, plus its muP rules (``get_mup_config_overrides``: hidden matrices LR / m and
    ε / m) when the model was built with muP."""
    overrides: dict[Any, Any] = get_standard_config_overrides(config)
    width_multiplier = mup_width_multiplier(model_chunks)
    if width_multiplier is not None:
        overrides.update(get_mup_config_overrides(config, width_multiplier, config.optimizer))
    return overrides
