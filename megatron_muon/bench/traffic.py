"""Bytes a rank sends through ``torch.distributed`` while a block runs, by collective, counted at the calls.

Each collective is charged what one rank sends under the usual algorithm for it: a ring all-reduce 2·(n−1)/n of
the tensor, a ring reduce-scatter (n−1)/n of its input, a ring all-gather (n−1)/n of its output, an all-to-all the
parts addressed to other ranks, a point-to-point send its tensor, a broadcast (n−1)× its tensor on the source
(flat tree). ``n`` is the group's size; groups of one rank send nothing. Object collectives (plans, metadata) are
not counted. The counts are a model of the wire, not a packet capture: what two optimizers are compared on.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["count_sent_bytes"]


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _size(group: Any) -> int:
    return int(dist.get_world_size(group))


def _rank(group: Any) -> int:
    return int(dist.get_rank(group))


def _all_reduce(a: dict[str, Any]) -> int:
    n = _size(a.get("group"))
    return 2 * (n - 1) * _bytes(a["tensor"]) // n


def _reduce_scatter_tensor(a: dict[str, Any]) -> int:
    n = _size(a.get("group"))
    return (n - 1) * _bytes(a["input"]) // n


def _reduce_scatter(a: dict[str, Any]) -> int:
    rank = _rank(a.get("group"))
    return sum(_bytes(t) for i, t in enumerate(a["input_list"]) if i != rank)


def _all_gather_into_tensor(a: dict[str, Any]) -> int:
    n = _size(a.get("group"))
    return (n - 1) * _bytes(a["input_tensor"])


def _all_gather(a: dict[str, Any]) -> int:
    return (_size(a.get("group")) - 1) * _bytes(a["tensor"])


def _all_to_all_single(a: dict[str, Any]) -> int:
    group, source = a.get("group"), a["input"]
    n, rank = _size(group), _rank(group)
    splits = a.get("input_split_sizes")
    rows: list[int] = list(splits) if splits else [source.shape[0] // n] * n
    row_bytes: int = _bytes(source) // max(source.shape[0], 1)
    return sum(count for i, count in enumerate(rows) if i != rank) * row_bytes


def _all_to_all(a: dict[str, Any]) -> int:
    rank = _rank(a.get("group"))
    return sum(_bytes(t) for i, t in enumerate(a["input_tensor_list"]) if i != rank)


def _broadcast(a: dict[str, Any]) -> int:
    group = a.get("group")  # src is a global rank
    return (_size(group) - 1) * _bytes(a["tensor"]) if dist.get_rank() == a["src"] else 0


def _send(a: dict[str, Any]) -> int:
    return _bytes(a["tensor"])


def _batch_isend_irecv(a: dict[str, Any]) -> int:
    sends = ("isend", "send")
    return sum(
        _bytes(op.tensor) for op in a["p2p_op_list"] if getattr(op.op, "counted_as", op.op.__name__) in sends
    )


# torch.distributed function -> what one rank sends, from its bound arguments.
_CHARGES: dict[str, Callable[[dict[str, Any]], int]] = {
    "all_reduce": _all_reduce,
    "reduce_scatter_tensor": _reduce_scatter_tensor,
    "_reduce_scatter_base": _reduce_scatter_tensor,
    "reduce_scatter": _reduce_scatter,
    "all_gather_into_tensor": _all_gather_into_tensor,
    "_all_gather_base": _all_gather_into_tensor,
    "all_gather": _all_gather,
    "all_to_all_single": _all_to_all_single,
    "all_to_all": _all_to_all,
    "broadcast": _broadcast,
    "send": _send,
    "isend": _send,
    "batch_isend_irecv": _batch_isend_irecv,
}
_LABELS = {"_reduce_scatter_base": "reduce_scatter_tensor", "_all_gather_base": "all_gather_into_tensor"}
# megatron-core 0.19.2: DDP's buffers call the reduce-scatter / all-gather through names bound at import time.
_ALIASES = {
    "megatron.core.distributed.param_and_grad_buffer": {
        "dist_reduce_scatter_func": "reduce_scatter_tensor",
        "dist_all_gather_func": "all_gather_into_tensor",
    }
}


@contextlib.contextmanager
def count_sent_bytes() -> Iterator[Counter[str]]:
    """Inside the block, every call of a counted ``torch.distributed`` function adds what this rank sends to the
    yielded ``Counter`` (collective name → bytes). Calls through names bound before the block (``from
    torch.distributed import all_reduce``) are not seen; megatron-core and this package call ``torch.distributed.X``.
    Nested calls (a stand-in calling the original) are charged once."""
    counts: Counter[str] = Counter()
    targets: list[tuple[Any, str, str]] = [(dist, name, name) for name in _CHARGES if hasattr(dist, name)]
    for module_name, names in _ALIASES.items():
        module = sys.modules.get(module_name)
        targets += [
            (module, attribute, kind) for attribute, kind in names.items() if hasattr(module, attribute)
        ]
    originals = [(owner, attribute, kind, getattr(owner, attribute)) for owner, attribute, kind in targets]
    depth = [0]

    def wrapped(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[0] == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                counts[_LABELS.get(name, name)] += _CHARGES[name](dict(bound.arguments))
            depth[0] += 1
            try:
                return original(*args, **kwargs)
            finally:
                depth[0] -= 1

        call.counted_as = name  # type: ignore[attr-defined]
        return call

    for owner, attribute, kind, original in originals:
        setattr(owner, attribute, wrapped(kind, original))
    try:
        yield counts
    finally:
        for owner, attribute, _, original in originals:
            setattr(owner, attribute, original)
