"""The collectives of the parallel-aware Muon. Every function takes its process group as an argument
(``None`` means a world of one: no communication), so nothing here reads megatron's global state.

:class:`MatrixTransport` is Muon's transport: it gathers the pieces of logical matrices into whole matrices on
the ranks a plan names, and sends each holder its piece of the results. It knows shapes, ranks and the plan's
transfers, nothing of optimizers, momentum or Newton–Schulz.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from megatron_muon.optim.plan import MatrixPlan


def group_rank(group: Any) -> int:
    return dist.get_rank(group) if group is not None else 0


def group_size(group: Any) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_gather_objects(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank in ``group``."""
    if group is None:
        return [obj]
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


def check_agreement(fingerprint: str, group: Any, what: str) -> None:
    """Fail loudly, on every rank, if the ranks of ``group`` computed different ``what``."""
    fingerprints = all_gather_objects(fingerprint, group)
    if len(set(fingerprints)) > 1:
        by_value: dict[str, list[int]] = {}
        for rank, value in enumerate(fingerprints):
            by_value.setdefault(value, []).append(rank)
        groups = "; ".join(f"ranks {ranks}: {value[:12]}" for value, ranks in by_value.items())
        raise RuntimeError(f"ranks built different {what} ({groups}); every rank must see the same model")


def _empty_send_device(group: Any) -> torch.device:
    """Where a rank that has seen no tensor of its own puts an empty send: on the GPU when the group reduces CUDA
    tensors with NCCL, else on the CPU. Transports pass the device of the pieces they move instead (below)."""
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
        group: Any,
        device: torch.device | None = None,
    ) -> None:
        world = group_size(group)
        me = group_rank(group)
        if me in sends or me in recv_shapes:
            raise ValueError("an exchange never sends to its own rank")
        in_splits = [sum(t.numel() for t in sends.get(r, [])) for r in range(world)]
        out_splits = [sum(_numel(s) for s in recv_shapes.get(r, [])) for r in range(world)]
        flat = [t.reshape(-1).to(torch.float32) for r in range(world) for t in sends.get(r, [])]
        # A rank with nothing to send still enters the collective, with an empty buffer on the device of the
        # tensors the exchange moves (NCCL takes CUDA tensors only; a CPU buffer would also put this rank on
        # another backend of a ``cpu:gloo,cuda:nccl`` group than its peers).
        empty_device = device if device is not None else _empty_send_device(group)
        self._input = torch.cat(flat) if flat else torch.empty(0, device=empty_device)
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


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def all_reduce_sum_fn(group: Any) -> Callable[[torch.Tensor], torch.Tensor]:
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


class MatrixTransport:
    """Moves the pieces of logical matrices between the ranks of ``group`` as a plan says.

    Args:
        matrices: the plan's matrices (``plan.MatrixPlan``: shape, shard dim, holders, transfers, bucket); those in
            ``distributed`` mode never travel and are ignored.
        rank: this rank's index in ``group``.
        group: the process group the plan's ranks index (``None``: one process, nothing travels).
        num_buckets: the plan's exchange buckets; each is one all-to-all, so one bucket's transfer overlaps the
            caller's work on another.

    Tensors travel in fp32 (``Exchange``).
    """

    def __init__(
        self,
        matrices: Sequence[MatrixPlan],
        *,
        rank: int,
        group: Any,
        num_buckets: int,
        device: torch.device | None = None,
    ) -> None:
        self.rank, self.group = rank, group
        self.device = device
        """Where this rank's empty sends live: the model's device (the builder passes it; else the device of the
        pieces of the first gather)."""
        travelling = [m for m in matrices if m.mode != "distributed"]
        self.buckets: list[list[MatrixPlan]] = [
            [m for m in travelling if m.bucket == b] for b in range(num_buckets)
        ]
        self._my_shard = {
            m.key: shard for m in matrices for shard, ranks in m.holders.items() if rank in ranks
        }

    def start_gathers(self, pieces: Mapping[str, torch.Tensor]) -> list[PendingWholeMatrices]:
        """Start, for every bucket at once, sending this rank's ``pieces`` (matrix key → the shard it holds, or its
        part of the shard's rows for a fully sharded matrix) to the ranks that need the whole matrix. ``wait()`` on
        the b-th result returns the whole matrices of bucket b that this rank is named to compute (matrix key →
        full tensor)."""
        if pieces:
            self.device = next(iter(pieces.values())).device
        pending = []
        for bucket in self.buckets:
            exchange, order = self._start(bucket, "gather", lambda matrix, shard, peer: pieces[matrix.key])
            wanted = [m for m in bucket if self.rank in m.computers]
            pending.append(PendingWholeMatrices(exchange, order, wanted, pieces, self._my_shard, self.rank))
        return pending

    def start_return(self, bucket: int, whole: Mapping[str, torch.Tensor]) -> PendingPieces:
        """Start sending every holder of the matrices of ``bucket`` its piece of the results in ``whole`` (matrix
        key → full tensor, for the matrices this rank computed). ``wait()`` returns this rank's piece of every
        matrix of the bucket it holds (matrix key → tensor): received, or cut from its own result."""
        matrices = self.buckets[bucket]
        exchange, order = self._start(
            matrices, "scatter", lambda matrix, shard, peer: _piece(whole[matrix.key], matrix, shard, peer)
        )
        own = {
            matrix.key: _piece(whole[matrix.key], matrix, self._my_shard[matrix.key], self.rank)
            for matrix in matrices
            if matrix.key in whole
        }
        return PendingPieces(exchange, order, own)

    def _start(
        self,
        matrices: Sequence[MatrixPlan],
        kind: str,
        payload: Callable[[MatrixPlan, int, int], torch.Tensor],
    ) -> tuple[Exchange, dict[int, list[tuple[str, int]]]]:
        """One all-to-all of the ``kind`` ("gather" | "scatter") transfers of ``matrices``. ``payload(matrix,
        shard, receiver)`` is what this rank sends."""
        sends: dict[int, list[torch.Tensor]] = defaultdict(list)
        recv_shapes: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        recv_order: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for matrix in matrices:
            transfers = matrix.gather if kind == "gather" else matrix.scatter
            for shard, sender, receiver in transfers:
                if sender == self.rank:
                    sends[receiver].append(payload(matrix, shard, receiver))
                if receiver == self.rank:
                    # A gather brings the sender's piece, a return this rank's own.
                    recv_shapes[sender].append(
                        matrix.piece_shape(shard, sender if kind == "gather" else receiver)
                    )
                    recv_order[sender].append((matrix.key, shard))
        return Exchange(dict(sends), dict(recv_shapes), self.group, self.device), recv_order


def _piece(full: torch.Tensor, matrix: MatrixPlan, shard: int, holder: int) -> torch.Tensor:
    """What ``holder`` holds of ``full``: shard ``shard``, or (fully sharded) its rows of it."""
    piece = full.chunk(matrix.num_shards, dim=matrix.shard_dim)[shard]
    if not matrix.row_parts:
        return piece
    runs = matrix.row_parts[shard][holder]
    return torch.cat([piece[start : start + length] for start, length in runs])


def _received(
    exchange: Exchange, order: dict[int, list[tuple[str, int]]]
) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """Matrix key → (shard, sending rank) → the received tensor."""
    result: dict[str, dict[tuple[int, int], torch.Tensor]] = defaultdict(dict)
    for source, tensors in exchange.wait().items():
        for (key, shard), tensor in zip(order[source], tensors, strict=True):
            result[key][(shard, source)] = tensor
    return result


def _assemble(
    matrix: MatrixPlan,
    received: dict[tuple[int, int], torch.Tensor],
    own: torch.Tensor,
    me: int,
    my_shard: int,
) -> torch.Tensor:
    """The whole matrix from the pieces of it received (``(shard, sender)`` → tensor) and this rank's own."""
    pieces = dict(received)
    pieces[(my_shard, me)] = own
    if not matrix.row_parts:
        by_shard = {shard: tensor for (shard, _), tensor in pieces.items()}
        return torch.cat([by_shard[i] for i in range(matrix.num_shards)], dim=matrix.shard_dim)
    shards = []
    for shard in range(matrix.num_shards):
        rows = torch.empty(matrix.shard_shape, dtype=own.dtype, device=own.device)
        placed = set()
        for holder, runs in matrix.row_parts[shard].items():
            if runs in placed or (shard, holder) not in pieces:  # a replica of a part already placed
                continue
            placed.add(runs)
            tensor, offset = pieces[(shard, holder)], 0
            for start, length in runs:
                rows[start : start + length].copy_(tensor[offset : offset + length])
                offset += length
        if len(placed) != len(set(matrix.row_parts[shard].values())):
            raise RuntimeError(f"matrix {matrix.key!r} shard {shard}: a part of its rows never arrived")
        shards.append(rows)
    return torch.cat(shards, dim=matrix.shard_dim)


class PendingWholeMatrices:
    """A gather in flight (``MatrixTransport.start_gathers``)."""

    def __init__(
        self,
        exchange: Exchange,
        order: dict[int, list[tuple[str, int]]],
        wanted: list[MatrixPlan],
        pieces: Mapping[str, torch.Tensor],
        my_shard: dict[str, int],
        rank: int,
    ) -> None:
        self._exchange, self._order, self._wanted = exchange, order, wanted
        self._pieces, self._my_shard, self._rank = pieces, my_shard, rank

    def wait(self) -> dict[str, torch.Tensor]:
        received = _received(self._exchange, self._order)
        whole = {}
        for matrix in self._wanted:
            if matrix.key not in self._pieces:  # the caller left it out (held only here, no gradient)
                continue
            whole[matrix.key] = _assemble(
                matrix,
                received.get(matrix.key, {}),
                self._pieces[matrix.key],
                self._rank,
                self._my_shard[matrix.key],
            )
        return whole


class PendingPieces:
    """A return in flight (``MatrixTransport.start_return``)."""

    def __init__(
        self, exchange: Exchange, order: dict[int, list[tuple[str, int]]], own: dict[str, torch.Tensor]
    ) -> None:
        self._exchange, self._order, self._own = exchange, order, own

    def wait(self) -> dict[str, torch.Tensor]:
        result = dict(self._own)
        for key, shards in _received(self._exchange, self._order).items():
            (result[key],) = shards.values()
        return result
