"""The collectives of the parallel-aware Muon. Every function takes its process group as an argument
(``None`` means a world of one: no communication), so nothing here reads megatron's global state."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def group_rank(group) -> int:
    return dist.get_rank(group) if group is not None else 0


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_gather_objects(obj, group) -> list:
    """Every rank's ``obj`` (picklable), indexed by rank in ``group``."""
    if group is None:
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def check_agreement(fingerprint: str, group, what: str) -> None:
    """Fail loudly, on every rank, if the ranks of ``group`` computed different ``what``."""
    fingerprints = all_gather_objects(fingerprint, group)
    if len(set(fingerprints)) > 1:
        by_value: dict[str, list[int]] = {}
        for rank, value in enumerate(fingerprints):
            by_value.setdefault(value, []).append(rank)
        groups = "; ".join(f"ranks {ranks}: {value[:12]}" for value, ranks in by_value.items())
        raise RuntimeError(f"ranks built different {what} ({groups}); every rank must see the same model")


def _empty_send_device(group) -> torch.device:
    """Where a rank with nothing to send puts its (empty) send and its receive buffer: on the GPU when the group
    reduces CUDA tensors with NCCL (which takes no CPU tensors, and with a ``cpu:gloo,cuda:nccl`` group a CPU
    buffer would put this rank on another backend than its peers), else on the CPU."""
    if group is not None and torch.cuda.is_available() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Exchange:
    """One bucketed all-to-all of fp32 tensors over ``group``: each rank sends a list of tensors to each other
    rank and receives a list of tensors of known shapes. Started asynchronously; ``wait`` returns the received
    tensors per source rank (views into one buffer)."""

    def __init__(
        self,
        sends: dict[int, list[torch.Tensor]],
        recv_shapes: dict[int, list[tuple[int, ...]]],
        group,
    ) -> None:
        world = group_size(group)
        me = group_rank(group)
        if me in sends or me in recv_shapes:
            raise ValueError("an exchange never sends to its own rank")
        in_splits = [sum(t.numel() for t in sends.get(r, [])) for r in range(world)]
        out_splits = [sum(_numel(s) for s in recv_shapes.get(r, [])) for r in range(world)]
        flat = [t.reshape(-1).to(torch.float32) for r in range(world) for t in sends.get(r, [])]
        self._input = torch.cat(flat) if flat else torch.empty(0, device=_empty_send_device(group))
        self._output = torch.empty(sum(out_splits), dtype=torch.float32, device=self._input.device)
        self._out_splits = out_splits
        self._recv_shapes = recv_shapes
        self._work = None
        if world > 1:
            # Every rank of the group enters the collective, even with nothing to move.
            self._work = dist.all_to_all_single(
                self._output, self._input, out_splits, in_splits, group=group, async_op=True
            )

    def wait(self) -> dict[int, list[torch.Tensor]]:
        if self._work is not None:
            self._work.wait()
        received: dict[int, list[torch.Tensor]] = {}
        offset = 0
        for source in range(len(self._out_splits)):
            tensors = []
            for shape in self._recv_shapes.get(source, []):
                n = _numel(shape)
                tensors.append(self._output[offset : offset + n].view(shape))
                offset += n
            if tensors:
                received[source] = tensors
        return received


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def all_reduce_sum_fn(group) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable that sums a tensor in place over ``group`` and returns it (Newton–Schulz's Gram hook).
    Reduced in fp32: a bf16 sum of Gram matrices loses the precision the iteration relies on."""

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype in (torch.float32, torch.float64):
            dist.all_reduce(tensor, group=group)
            return tensor
        widened = tensor.float()
        dist.all_reduce(widened, group=group)
        tensor.copy_(widened)
        return tensor

    return all_reduce_sum
