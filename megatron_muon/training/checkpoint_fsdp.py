"""Checkpoint entries of fully sharded (FSDP) parameters in the layout-free format every other layout uses.

megatron's ``sharded_state_dict`` describes each (TP-local) parameter as a ``ShardedTensor`` (or, for a SwiGLU
``linear_fc1``, a ``ShardedTensorFactory`` that splits it into its gate and up halves) at its place in the global
tensor. Under FSDP a rank holds only rows ``[start, stop)`` of that parameter (``optim/layout.py:
fsdp_row_range``), so each entry is cut to those rows: a ``ShardedTensor`` with the same key and global shape, its
global offset moved by ``start`` along the parameter's first axis, its data this rank's rows, written by every
data-parallel rank (replica 0 along DP). The cut is irregular (``torch.chunk`` shards need not divide the rows
evenly), which megatron's ``dist_checkpointing`` hands to torch DCP. Nothing else changes: the keys are the
non-FSDP ones, so an FSDP checkpoint loads at any layout, with or without FSDP, and the reverse.

megatron-core 0.19.2: its own FSDP2 checkpoint path (``is_torch_fsdp2_param`` in ``make_tp_sharded_tensor_for_
checkpoint``) assumes rows divisible by the data-parallel size, shards experts by the dense data-parallel group
and marks every expert-data-parallel rank but one a replica (``SequentialMLP.sharded_state_dict``), so experts'
other rows would never be written; and with this torch ``to_local()`` of a parameter returns a fresh view each
call, so megatron's optimizer-state mapping by ``id`` finds nothing. Hence this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

from megatron_muon.optim.layout import fsdp_row_range

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = ["FullyShardedEntries", "StateDict", "cut_to_held_rows"]

StateDict = dict[str, Any]
"""A (nested) state dict as megatron's ``dist_checkpointing`` saves and loads it: names to tensors, sharded
entries, plain values or further dicts."""

_NestedPath = tuple[str | int, ...]
"""Keys and list indices from the root of a nested state dict (or a factory's output) to one entry."""


def _data_parallel_writer(replica_id: Any) -> Any:
    """The replica id with its data-parallel component 0: every FSDP rank writes its own rows. megatron's ids are
    ``(PP, TP, DP)``; TP replicas (a norm every TP rank holds) stay replicas."""
    if isinstance(replica_id, tuple):
        return (*replica_id[:-1], 0)
    return 0


def _row_slice(
    template: ShardedTensor, local: torch.Tensor, held: tuple[int, int], start: int, first: int = 0
) -> ShardedTensor:
    """``template`` (the entry of the parameter's rows from ``first`` on: the whole TP-local parameter, or one
    half of a SwiGLU ``linear_fc1``) cut to the parameter rows ``held``; this rank's slice ``local`` of the
    parameter begins at parameter row ``start``."""
    axis = template.prepend_axis_num
    offset = list(template.global_offset)
    lo, hi = held
    offset[axis] += lo - first
    # megatron-core 0.19.2: an irregular shard goes to DCP with its local shape as the chunk size, which leaves out
    # the prepended (expert) axes its global offset counts; so they are folded into the local shape here.
    local_shape = (1,) * axis + (hi - lo, *template.local_shape[1:])
    return dataclasses.replace(
        template,
        data=local[lo - start : hi - start].view(local_shape),
        dtype=local.dtype,
        local_shape=local_shape,
        global_offset=tuple(offset),
        axis_fragmentations=None,
        prepend_axis_num=0,
        replica_id=_data_parallel_writer(template.replica_id),
    )


class FullyShardedEntries:
    """The cut entries of one model's sharded state dict, and which parameter each came from (for the optimizer
    state, which is cut the same way: :meth:`optimizer_entries`)."""

    def __init__(self) -> None:
        self.by_param: dict[int, tuple[torch.Tensor, Any]] = {}
        """``id(param)`` → (param, its cut entry: a ``ShardedTensor`` or a ``ShardedTensorFactory``)."""
        self.paths: list[tuple[tuple[str, ...], torch.Tensor]] = []
        """(path in the state dict, this rank's rows of the parameter) of every cut entry."""

    @torch.no_grad()
    def copy_loaded_(self, loaded: StateDict) -> None:
        """Write the values a load returned for the cut entries into the parameters' local rows."""
        for path, local in self.paths:
            value = _get_nested(loaded, path)
            if value is not local:
                local.copy_(value.reshape(local.shape))

    def optimizer_entries(self, param: torch.Tensor, state: DTensor, prefix: str) -> Any:
        """The entry of optimizer state ``state`` (an FSDP ``DTensor`` shaped like ``param``) under the key
        ``f"{prefix}.{model key}"`` (megatron's ``make_sharded_optimizer_tensor`` naming)."""
        _, entry = self.by_param[id(param)]
        local = state.to_local()
        if isinstance(entry, ShardedTensor):
            local = local.view(entry.data.shape)
        return dataclasses.replace(entry, key=f"{prefix}.{entry.key}", data=local)


def cut_to_held_rows(
    sharded_state_dict: StateDict, entries: FullyShardedEntries, path: tuple[str, ...] = ()
) -> StateDict:
    """``sharded_state_dict`` (megatron's, nested) with every entry of a fully sharded parameter cut to the rows
    this rank holds; other entries unchanged. Records each cut entry in ``entries``."""
    result: StateDict = {}
    for name, value in sharded_state_dict.items():
        if isinstance(value, dict):
            result[name] = cut_to_held_rows(value, entries, (*path, name))
            continue
        if isinstance(value, ShardedTensor) and fsdp_row_range(value.data) is not None:
            result[name] = _cut_tensor(value, entries)
        elif isinstance(value, ShardedTensorFactory) and fsdp_row_range(value.data) is not None:
            result[name] = _cut_factory(value, entries)
        else:
            result[name] = value
            continue
        entries.paths.append(((*path, name), result[name].data))
    return result


def _cut_tensor(value: ShardedTensor, entries: FullyShardedEntries) -> ShardedTensor:
    param = value.data
    rows = fsdp_row_range(param)
    assert rows is not None
    cut = _row_slice(value, param.to_local(), rows, rows[0])
    entries.by_param[id(param)] = (param, cut)
    return cut


def _cut_factory(value: ShardedTensorFactory, entries: FullyShardedEntries) -> ShardedTensorFactory:
    """A factory (megatron's SwiGLU split) over the rows held here: megatron's own ``build_fn`` is run once on a
    stand-in parameter whose values are its row numbers, to learn which rows each sub-tensor takes; each is then
    cut to the rows held here. ``merge_fn`` writes the loaded rows back into the local tensor."""
    param = value.data
    rows = fsdp_row_range(param)
    assert rows is not None
    start, stop = rows
    # An expanded view: O(rows) memory whatever the parameter's size.
    row_numbers = torch.arange(param.shape[0], dtype=torch.float64).view(-1, *([1] * (param.dim() - 1)))
    probe = value.build_fn(value.key, row_numbers.expand(param.shape), value.replica_id, None)
    # (sub-dict path, template, its first parameter row, the held rows [lo, hi) of it)
    spans: list[tuple[_NestedPath, ShardedTensor, int, int, int]] = []
    for path, template in _nested_items(probe):
        first = int(template.data.reshape(template.data.shape[0], -1)[0, 0])
        count = template.data.shape[0]
        lo, hi = max(first, start), min(first + count, stop)
        if lo < hi:
            spans.append((path, template, first, lo, hi))
    original_key = value.key

    def build_fn(
        key: str, local: torch.Tensor, replica_id: Any, flattened_range: Any
    ) -> dict[str | int, Any]:
        built: dict[str | int, Any] = {}
        for path, template, first, lo, hi in spans:
            renamed = dataclasses.replace(template, key=template.key.replace(original_key, key, 1))
            _set_nested(built, path, _row_slice(renamed, local, (lo, hi), start, first))
        return built

    def merge_fn(loaded: dict[str | int, Any]) -> torch.Tensor:
        target = torch.empty((stop - start, *param.shape[1:]), dtype=param.dtype)
        for path, _, _, lo, hi in spans:
            rows = target[lo - start : hi - start]
            rows.copy_(_get_nested(loaded, path).reshape(rows.shape))
        return target

    cut = ShardedTensorFactory(
        value.key,
        param.to_local(),
        build_fn,
        merge_fn,
        _data_parallel_writer(value.replica_id),
    )
    entries.by_param[id(param)] = (param, cut)
    return cut


def _nested_items(tree: Any, path: _NestedPath = ()) -> list[tuple[_NestedPath, ShardedTensor]]:
    if isinstance(tree, ShardedTensor):
        return [(path, tree)]
    if isinstance(tree, dict):
        return [item for k, v in tree.items() for item in _nested_items(v, (*path, k))]
    if isinstance(tree, (list, tuple)):
        return [item for i, v in enumerate(tree) for item in _nested_items(v, (*path, i))]
    raise TypeError(f"unexpected {type(tree).__name__} in a sharded tensor factory's output")


def _set_nested(tree: dict[str | int, Any], path: _NestedPath, value: Any) -> None:
    if not path:
        raise ValueError("a factory that builds one bare ShardedTensor is not supported under FSDP")
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_nested(tree: Any, path: Sequence[str | int]) -> Any:
    for key in path:
        tree = tree[key]
    return tree
