"""The one place where values computed on the device cross to the host.

A read of a GPU value on the host (``.item()``, ``float(t)``, ``.tolist()``) waits for every kernel queued before
it: the host stops feeding the GPU until the GPU is idle. A training step therefore reads what it must know (the
loss, the gradient norm and the skip decision) and what it logs in **one** transfer: :func:`read_on_host` stacks
every tensor of a mapping into one float64 vector and reads it with a single ``tolist()``. Metrics that exist only
after the update (Muon's update RMS, the optimizer time) are kept on the device and read with the *next* step's
transfer (:class:`DeferredMetrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["DeferredMetrics", "read_on_host"]


def read_on_host(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor replaced by its host value (a float for one element, a list of floats for
    more), read in one device→host transfer; other values (floats, None) pass through unchanged.

    Tensors on several devices (CPU scalars beside GPU ones) are gathered on the first tensor's device first."""
    tensors = {name: value for name, value in values.items() if isinstance(value, torch.Tensor)}
    result = {name: value for name, value in values.items() if name not in tensors}
    if not tensors:
        return result
    device = next(iter(tensors.values())).device
    flat = [t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors.values()]
    host = torch.cat(flat).tolist() if flat else []
    start = 0
    for (name, tensor), piece in zip(tensors.items(), flat, strict=True):
        count = piece.numel()
        chunk = host[start : start + count]
        start += count
        result[name] = chunk[0] if tensor.dim() == 0 or (count == 1 and tensor.dim() <= 1) else chunk
    return {name: result[name] for name in values}


class DeferredMetrics:
    """Device metrics of one iteration waiting to be read with the next iteration's transfer.

    ``hold(iteration, values)`` keeps them (tensors stay on the device; a callable is called at read time, after
    the transfer, e.g. a CUDA event's elapsed time); ``take()`` returns ``(iteration, values)`` and forgets them."""

    def __init__(self) -> None:
        self.iteration: int | None = None
        self.values: dict[str, Any] = {}

    def hold(self, iteration: int, values: Mapping[str, Any]) -> None:
        """Keep ``values`` (tensors, callables or plain values) of ``iteration``, replacing what was held."""
        self.iteration, self.values = iteration, dict(values)

    def take(self) -> tuple[int | None, dict[str, Any]]:
        """``(iteration, values)`` held, or ``(None, {})``; forgets them."""
        iteration, values = self.iteration, self.values
        self.iteration, self.values = None, {}
        return iteration, values
