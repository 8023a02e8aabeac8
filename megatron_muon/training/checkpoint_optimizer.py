"""Optimizer state in a distributed checkpoint: Muon momentum per logical matrix, megatron's AdamW state, fp32
main params under bf16 (see ``checkpoint.py``'s table). Keyed by parameter and matrix, never by optimizer member
position, so a checkpoint of one layout loads at any other (world 1 included)."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject
from megatron.core.dist_checkpointing.optimizer import (
    get_param_id_to_sharded_param_map,
    make_sharded_optimizer_tensor,
    optim_state_to_sharding_state,
)
from megatron.core.optimizer import DistributedOptimizer

from megatron_muon.optim.build import chain_members
from megatron_muon.optim.muon import Muon
from megatron_muon.optim.state import (
    load_muon_momentum_,
    muon_momentum_sharded_state_dict,
    muon_param_groups_state,
)
from megatron_muon.training.checkpoint_fsdp import FullyShardedEntries, StateDict

if TYPE_CHECKING:
    from megatron.core.optimizer import MegatronOptimizer
__all__ = ["OptimizerStateError", "load_optimizer_state", "optimizer_sharded_state_dict"]


class OptimizerStateError(RuntimeError):
    """The checkpoint's optimizer state does not fit this optimizer (one line)."""


def _members(optimizer: MegatronOptimizer) -> dict[str, MegatronOptimizer]:
    """Role (``muon_dense``, ``muon_expert``, ``adamw_dense``, ``adamw_expert``) → member of the chain.

    Roles rather than positions: they say what the state is, and megatron aligns param groups across ranks so
    every rank has the same roles.
    """
    members = chain_members(optimizer)
    roles: dict[str, MegatronOptimizer] = {}
    for member in members:
        groups = member.optimizer.param_groups
        expert = bool(groups) and bool(groups[0].get("is_expert_parallel", False))
        kind = "muon" if isinstance(member.optimizer, Muon) else "adamw"
        role = f"{kind}_{'expert' if expert else 'dense'}"
        if role in roles:
            raise ValueError(f"two optimizer members have the role {role!r}; expected one per role")
        roles[role] = member
    return roles


def _is_mixed_precision(member: MegatronOptimizer) -> bool:
    """A megatron ``Float16OptimizerWithFloat16Params`` (bf16 params, fp32 main params)."""
    return hasattr(member, "fp32_from_float16_groups")


def _fp32_main_params(
    member: MegatronOptimizer,
    model_sharded_state_dict: StateDict,
    *,
    is_loading: bool,
    owned_here: bool = False,
) -> dict[str, dict[str, ShardedTensor]]:
    """The fp32 main copies of a mixed-precision member's bf16 params, ``{group index: {index: tensor}}``, under
    the key megatron gives them (``optimizer.state.fp32_param.<param key>``). fp32 members have none: their main
    params are the model's.

    Loading reads into copies: ``load_checkpoint`` re-derives the live main params from the loaded bf16 weights
    (``reload_model_params``) and only then copies the saved fp32 values in.

    Dicts, not megatron's lists of lists: dist_checkpointing saves a list whose items are all sharded as an empty
    list in the common state, and then cannot merge the loaded items back into it ("different lengths").
    """
    models = [p for group in member.float16_groups for p in group]
    by_index = get_param_id_to_sharded_param_map(model_sharded_state_dict, models)
    sharded_of = {id(model): by_index[index] for index, model in enumerate(models)}

    def sharded(main: torch.Tensor, model: torch.Tensor) -> ShardedTensor:
        data = main.detach().clone() if is_loading else main
        tensor = make_sharded_optimizer_tensor(
            sharded_of[id(model)], data, prefix="optimizer.state.fp32_param"
        )
        if (
            owned_here
        ):  # the one data-parallel rank holding this main param writes it (as megatron's layer-wise)
            tensor.replica_id = (*tensor.replica_id[:2], 0) if isinstance(tensor.replica_id, tuple) else 0
        return tensor

    return {
        str(g): {
            str(i): sharded(main, model)
            for i, (main, model) in enumerate(zip(mains, group_models, strict=True))
        }
        for g, (mains, group_models) in enumerate(
            zip(member.fp32_from_float16_groups, member.float16_groups, strict=True)
        )
    }


def _as_lists(groups: dict[str, dict[str, torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``{group index: {index: tensor}}`` (:func:`_fp32_main_params`) back to megatron's lists of lists."""
    return [[groups[g][i] for i in sorted(groups[g], key=int)] for g in sorted(groups, key=int)]


# megatron-core 0.19.2: bf16 members are numbered by float16_groups alone (see the docstring below).
def _mixed_precision_sharded_state_dict(
    member: MegatronOptimizer, model_sharded_state_dict: StateDict, *, is_loading: bool
) -> StateDict:
    """``Float16OptimizerWithFloat16Params.sharded_state_dict`` (same layout and keys), numbering parameters as
    torch's ``state_dict`` does.

    Megatron 0.19.2 numbers them by ``float16_groups`` alone, so when a bf16 model keeps some params in fp32
    (``fp32_from_fp32_groups``: megatron's torch norms on CPU do) the ids point at the wrong tensors and its
    save fails with "Param id N does not match any model sharded param".
    """
    if is_loading:
        member.init_state_fn(member.optimizer, member.config)
    state: StateDict = member.state_dict()
    model_of_main = {
        id(main): model
        for mains, models in zip(member.fp32_from_float16_groups, member.float16_groups, strict=True)
        for main, model in zip(mains, models, strict=True)
    }
    in_state_order = [
        model_of_main.get(id(p), p) for group in member.optimizer.param_groups for p in group["params"]
    ]
    by_index = get_param_id_to_sharded_param_map(model_sharded_state_dict, in_state_order)
    state["fp32_from_fp16_params"] = _fp32_main_params(
        member, model_sharded_state_dict, is_loading=is_loading
    )
    step = member._extract_common_per_param_step(state["optimizer"])
    optim_state_to_sharding_state(state["optimizer"], by_index, exclude_keys="step")
    if step:
        state["optimizer"]["state"]["common_step"] = step
    return state


def _adamw_in_state_order(member: DistributedOptimizer) -> list[torch.nn.Parameter]:
    """The model params of a ``DistributedOptimizer`` in the order of its ``sharded_param_state_fully_reshardable``."""
    return [
        model_param
        for gbuf_index, gbuf_range_maps in enumerate(member.gbuf_ranges)
        for _ in gbuf_range_maps
        for model_param in member.buffers[gbuf_index].param_index_map
    ]


_MAIN_PARAM_PREFIX, _OUR_MAIN_PARAM_PREFIX = "optimizer.state.param.", "optimizer.state.fp32_param."


# megatron-core 0.19.2: DistributedOptimizer's own sharded_state_dict nests its state differently from the
# mixed-precision wrapper's (so neither loads the other's) and names the main params ``param``; the tensors' keys
# and shapes are otherwise the same, so only the entry around them is ours.
def _distributed_adamw_sharded_state_dict(
    member: DistributedOptimizer, model_sharded_state_dict: StateDict, *, is_loading: bool
) -> StateDict:
    """Megatron's ``DistributedOptimizer`` state (``optimizer.distributed_optimizer: true``) in its model-space
    format (``fully_reshardable``: each buffer's shards gathered, cut into whole-param tensors
    ``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<param key>``, the keys and shapes the non-distributed members
    save), plus the common step under the path the non-distributed members use: either kind loads the other's
    checkpoint. An fp32 model has no separate main params."""
    if is_loading and not member.optimizer.state:
        member._init_optimizer_states_with_dummy_values()  # megatron's own: state to load into
    per_param = member.sharded_param_state_fully_reshardable(
        model_sharded_state_dict, is_loading=is_loading, metadata={}
    )
    for tensors in per_param.values():
        main = tensors.pop("param", None)
        if main is not None and member.config.bf16:
            tensors["fp32_param"] = dataclasses.replace(
                main, key=_OUR_MAIN_PARAM_PREFIX + main.key.removeprefix(_MAIN_PARAM_PREFIX)
            )
    entry: dict[str, Any] = {"param_state": per_param}
    if not is_loading:
        steps = {float(state["step"]) for state in member.optimizer.state.values() if "step" in state}
        if len(steps) > 1:
            raise OptimizerStateError(f"AdamW shards disagree about the step count: {sorted(steps)}")
        entry["optimizer"] = {"state": {"common_step": steps.pop()} if steps else {}}
    return entry


def _load_distributed_adamw(member: DistributedOptimizer, entry: StateDict, step: object) -> None:
    per_param = entry["param_state"]
    for index, model_param in enumerate(_adamw_in_state_order(member)):
        if "fp32_param" not in per_param[index]:  # fp32 model: the main param is the loaded weight itself
            per_param[index]["fp32_param"] = model_param.detach().float()
    # megatron-core 0.19.2: with torch's Adam (no Apex / Transformer Engine) the per-param state holds a "step"
    # tensor that _set_main_param_and_optimizer_states asks the loaded state for; it is set from the common step.
    steps = [state.pop("step", None) for state in member.optimizer.state.values()]
    member.load_parameter_state_from_fully_reshardable(per_param)
    for state, previous in zip(member.optimizer.state.values(), steps, strict=True):
        if step is not None:
            state["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        elif previous is not None:
            state["step"] = previous


def _fully_sharded_adamw_sharded_state_dict(
    member: MegatronOptimizer, fsdp: FullyShardedEntries, *, is_loading: bool
) -> StateDict:
    """An fp32 AdamW member over fully sharded (FSDP) parameters, in megatron's ``FP32Optimizer`` format (same
    keys, common step under ``state``): each moment cut to this rank's rows like its parameter
    (``checkpoint_fsdp.py``)."""
    if is_loading:
        member.init_state_fn(member.optimizer, member.config)
    state: StateDict = member.state_dict()
    step = member._extract_common_per_param_step(state)
    params = [p for group in member.optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        live = state["state"].get(index)  # torch's state_dict holds the live per-parameter dicts: not edited
        if live is None:
            continue
        state["state"][index] = {
            name: fsdp.optimizer_entries(param, value, f"optimizer.state.{name}")
            for name, value in live.items()
            if name != "step"
        }
    # As megatron's optim_state_to_sharding_state: the groups' parameter ids are this rank's own, not saved.
    state["param_groups"] = copy.deepcopy(state["param_groups"])
    for group in state["param_groups"]:
        group["params"] = LocalNonpersistentObject(group["params"])
    if step:
        state["state"]["common_step"] = step
    return state


def _reshard_loaded_adamw_state_(member: MegatronOptimizer) -> None:
    """torch's ``load_state_dict`` leaves plain local tensors as the moments of FSDP (``DTensor``) parameters;
    make them ``DTensor`` shards like their parameters again."""
    from torch.distributed.tensor import DTensor

    for group in member.optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = member.optimizer.state.get(param, {})
            for name, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0:
                    state[name] = DTensor.from_local(
                        value,
                        param.device_mesh,
                        param.placements,
                        shape=param.shape,
                        stride=param.stride(),
                        run_check=False,
                    )


def optimizer_sharded_state_dict(
    optimizer: MegatronOptimizer,
    model_sharded_state_dict: StateDict,
    *,
    is_loading: bool,
    fsdp: FullyShardedEntries | None = None,
) -> StateDict:
    """Every member's state as sharded entries; ``fsdp``: the model's fully sharded entries
    (``checkpoint.py: _model_sharded_state_dict``), whose parameters' AdamW moments are cut the same way."""
    state: StateDict = {}
    for role, member in _members(optimizer).items():
        if isinstance(member.optimizer, Muon):
            entry = {
                "momentum": muon_momentum_sharded_state_dict(member.optimizer, is_loading=is_loading),
                "param_groups": muon_param_groups_state(member.optimizer),
            }
            if _is_mixed_precision(member):
                entry["fp32_param"] = _fp32_main_params(
                    member,
                    model_sharded_state_dict,
                    is_loading=is_loading,
                    owned_here=bool(getattr(optimizer.config, "use_distributed_optimizer", False)),
                )
            state[role] = entry
        elif fsdp is not None and fsdp.by_param and _holds_fully_sharded(member, fsdp):
            state[role] = _fully_sharded_adamw_sharded_state_dict(member, fsdp, is_loading=is_loading)
        elif isinstance(member, DistributedOptimizer):
            state[role] = _distributed_adamw_sharded_state_dict(
                member, model_sharded_state_dict, is_loading=is_loading
            )
        elif _is_mixed_precision(member):
            state[role] = _mixed_precision_sharded_state_dict(
                member, model_sharded_state_dict, is_loading=is_loading
            )
        else:
            state[role] = member.sharded_state_dict(
                model_sharded_state_dict, is_loading=is_loading, metadata={"chained_optim_avoid_prefix": True}
            )
    return state


def _holds_fully_sharded(member: MegatronOptimizer, fsdp: FullyShardedEntries) -> bool:
    return any(id(p) in fsdp.by_param for group in member.optimizer.param_groups for p in group["params"])


def _saved_common_step(entry: object) -> object:
    """The common AdamW step an entry holds, in whichever member's format it was saved: under ``optimizer.state``
    (mixed precision, distributed optimizer) or under ``state`` (fp32)."""
    if not isinstance(entry, dict):
        return None
    for candidate in (entry.get("optimizer"), entry):
        state = candidate.get("state") if isinstance(candidate, dict) else None
        if isinstance(state, dict) and state.get("common_step") is not None:
            return state["common_step"]
    return None


def _saved_adamw_step(loaded: StateDict, role: str) -> object:
    """The AdamW step count the checkpoint holds for ``role``, or for its counterpart (dense ↔ expert).

    A one-process run keeps expert parameters in the dense members; the same checkpoint loaded with expert
    parallelism has expert members the checkpoint never named. Their per-parameter state is found by parameter
    key (role-free); only the common step count lives under the role, and every member steps together."""
    for candidate in (role, "adamw_expert" if role == "adamw_dense" else "adamw_dense"):
        step = _saved_common_step(loaded.get(candidate))
        if step is not None:
            return step
    return None


def load_optimizer_state(optimizer: MegatronOptimizer, loaded: StateDict) -> None:
    """Load each member's saved *state* (Muon momentum and NorMuon moments, AdamW moments and step, fp32 main
    params) and keep this run's hyperparameters: every optimizer setting of the config takes effect on resume
    (the trainer logs what changed, ``docs/checkpoints.md``). Saved param groups are not read back."""
    for role, member in _members(optimizer).items():
        if role not in loaded:
            raise OptimizerStateError(f"the checkpoint has no optimizer state for {role}")
        entry = loaded[role]
        if isinstance(member.optimizer, Muon):
            load_muon_momentum_(member.optimizer, entry["momentum"])
            if _is_mixed_precision(member):
                saved = _as_lists(entry["fp32_param"])
                for mains, values in zip(member.fp32_from_float16_groups, saved, strict=True):
                    for main, value in zip(mains, values, strict=True):
                        main.data.copy_(value)
            continue
        if isinstance(member, DistributedOptimizer):
            _load_distributed_adamw(member, entry, _saved_adamw_step(loaded, role))
            continue
        if _is_mixed_precision(member):
            entry["fp32_from_fp16_params"] = _as_lists(entry["fp32_from_fp16_params"])
        # The torch Optimizer.state_dict() part: under "optimizer" for a mixed-precision member, the entry itself
        # for an fp32 one.
        torch_state = entry.setdefault("optimizer", {}) if _is_mixed_precision(member) else entry
        # This run's groups (same ids as the request's numbering): megatron pairs saved groups by identifier
        # keys that include the learning rate, so a changed LR would not find its group, and the saved
        # betas / eps would silently replace the configured ones.
        torch_state["param_groups"] = [
            {key: value for key, value in group.items()}
            for group in member.optimizer.state_dict()["param_groups"]
        ]
        per_param = torch_state.get("state", {})
        if "common_step" not in per_param:
            step = _saved_adamw_step(loaded, role)
            has_moments = any(isinstance(v, dict) and v for k, v in per_param.items() if k != "common_step")
            if step is not None:
                per_param["common_step"] = step
            elif has_moments:
                raise OptimizerStateError(f"the checkpoint has AdamW moments but no step count for {role}")
        # megatron's own; for a mixed-precision member it also copies the fp32 main params
        member.load_state_dict(entry)
        _reshard_loaded_adamw_state_(member)
