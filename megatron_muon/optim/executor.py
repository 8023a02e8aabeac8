"""Runs a Muon plan for one step: gather shards to the ranks that orthogonalize, momentum, batched
Newton–Schulz, and send every holder its shard of the direction.

Math (``momentum_input_``, ``newton_schulz``, ``update_scale``) lives elsewhere; this file only moves pieces
between them. With no grid group (one process) every matrix is local and no collective runs, so the
single-process and the parallel paths are the same code.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch

from megatron_muon.ops.newton_schulz import newton_schulz, orthogonality_error
from megatron_muon.ops.scaling import update_scale
from megatron_muon.optim.comm import (
    Exchange,
    all_gather_objects,
    all_reduce_sum_fn,
    check_agreement,
    group_rank,
)
from megatron_muon.optim.layout import MatrixPiece
from megatron_muon.optim.muon import momentum_input_
from megatron_muon.optim.plan import CostModel, MatrixPlan, PieceRecord, build_plan

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Local:
    """A piece this rank holds, with its parameter and param group, during one step."""

    param: torch.Tensor
    group: dict
    piece: MatrixPiece
    grad: torch.Tensor | None = None


def _record(piece: MatrixPiece, shard_group: str) -> PieceRecord:
    return PieceRecord(
        key=piece.key,
        shape=tuple(piece.shape),
        shard_dim=piece.shard_dim,
        num_shards=piece.num_shards,
        shard_index=piece.shard_index,
        shard_group=shard_group,
    )


def _shard(full: torch.Tensor, matrix: MatrixPlan, shard: int) -> torch.Tensor:
    return full.chunk(matrix.num_shards, dim=matrix.shard_dim)[shard]


class MatrixOrthogonalizer:
    """Computes Muon directions for the pieces of one Muon optimizer under a plan shared by a grid of ranks.

    Args:
        pieces: every logical-matrix piece this rank's optimizer holds.
        grid_group: all ranks of this pipeline stage (megatron's ``tp_dp_cp`` group); ``None`` for one process.
        shard_groups: name → process group of the ranks that hold the other shards of a matrix in the same
            replica (``{"tp": tp, "expert_tp": expt_tp}``); needed by the ``distributed`` mode only.
        shard_group_of: piece key → name in ``shard_groups`` (default ``"tp"``).
        mode: ``auto`` | ``owner`` | ``duplicated`` | ``distributed`` (see ``plan.py``).
        ns_steps, cost_model: inputs of the cost model that picks modes under ``auto``.
        num_buckets: exchange buckets per step; communication of one overlaps Newton–Schulz of the next.

    Builds the plan collectively at construction and checks that every rank of the grid derived the same one.
    """

    def __init__(
        self,
        pieces: list[MatrixPiece],
        *,
        grid_group=None,
        shard_groups: dict | None = None,
        shard_group_of: dict[str, str] | None = None,
        mode: str = "auto",
        ns_steps: int = 5,
        cost_model: CostModel | None = None,
        num_buckets: int = 4,
    ) -> None:
        self.grid_group = grid_group
        self.stats: dict[str, float] = {}
        """Diagnostics of the last step (update RMS per matrix kind, a sampled NS orthogonality error)."""
        self.shard_groups = shard_groups or {}
        shard_group_of = shard_group_of or {}
        counts = Counter(p.key for p in pieces)
        duplicates = sorted(k for k, n in counts.items() if n > 1)
        if duplicates:
            raise ValueError(f"two pieces share the matrix keys {duplicates[:5]}")
        records = [_record(p, shard_group_of.get(p.key, "tp")) for p in pieces]
        self.plan = build_plan(
            all_gather_objects(records, grid_group),
            mode=mode,
            ns_steps=ns_steps,
            cost_model=cost_model,
            num_buckets=num_buckets,
        )
        check_agreement(self.plan.fingerprint(), grid_group, "Muon plans")
        self.rank = group_rank(grid_group)
        self._by_key = {m.key: m for m in self.plan.matrices}
        exchanged = [m for m in self.plan.matrices if m.mode != "distributed"]
        self._buckets = [[m for m in exchanged if m.bucket == b] for b in range(num_buckets)]
        for matrix in self.plan.matrices:
            if matrix.mode == "distributed" and self.rank in matrix.all_holders:
                if matrix.shard_group not in self.shard_groups:
                    raise ValueError(
                        f"matrix {matrix.key!r} runs in distributed mode but no process group was given for "
                        f"shard group {matrix.shard_group!r} (have {sorted(self.shard_groups)})"
                    )
        logger.info("Muon plan: %s", self.plan.summary())

    def state_bytes(self, optimizer) -> int:
        """Bytes of Muon state (momentum) this rank keeps."""
        total = 0
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, dict):
                    total += sum(t.numel() * t.element_size() for t in value.values() if torch.is_tensor(t))
        return total

    @torch.no_grad()
    def directions(self, optimizer, work) -> list[torch.Tensor | None]:
        """The direction (already scaled) for each ``(param, group, pieces)`` of ``work``, shaped like the param.

        Collective over the grid group: every rank of the grid must call it in the same step.
        """
        local: dict[str, _Local] = {}
        without_grad: set[str] = set()
        for param, group, pieces in work:
            for piece in pieces:
                if param.grad is not None:
                    grad = piece.read(param.grad).to(torch.float32)
                else:  # a parameter without gradient still takes part in its matrices' collectives
                    grad = torch.zeros(piece.local_shape, dtype=torch.float32, device=param.device)
                    without_grad.add(piece.key)
                local[piece.key] = _Local(param=param, group=group, piece=piece, grad=grad)
        # A matrix held only here and without gradient keeps its momentum as it is (torch optimizers skip
        # parameters whose grad is None); megatron always provides grads, so shared matrices always have one.
        self._skip = {k for k in without_grad if self._matrix(k).all_holders == [self.rank]}

        me = self.rank
        buckets = self._buckets

        # 1. Gradient shards travel to the ranks that orthogonalize whole matrices (all buckets in flight).
        gathers = [self._start(bucket, "gather", lambda m, shard: local[m.key].grad) for bucket in buckets]

        # 2. Matrices orthogonalized on shards (Gram all-reduced over their shard group) meanwhile.
        distributed = [m for m in self.plan.matrices if m.mode == "distributed" and me in m.computers]
        shard_directions = self._momentum_and_orthogonalize(optimizer, distributed, local, {}, sharded=True)

        # 3. Bucket by bucket: wait for its gradient shards, orthogonalize, send the direction shards out.
        full_directions: dict[str, torch.Tensor] = {}
        scatters = []
        for bucket, gather in zip(buckets, gathers, strict=True):
            gathered = gather.wait()
            mine = [m for m in bucket if me in m.computers]
            computed = self._momentum_and_orthogonalize(optimizer, mine, local, gathered, sharded=False)
            full_directions.update(computed)
            scatters.append(
                self._start(bucket, "scatter", lambda m, shard, c=computed: _shard(c[m.key], m, shard))
            )
        scattered: dict[str, dict[int, torch.Tensor]] = {}
        for scatter in scatters:
            scattered.update(scatter.wait())

        self._sample_orthogonality(full_directions)

        # 4. Assemble each parameter's direction from its pieces, scaled per logical matrix.
        update_sq: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        results: list[torch.Tensor | None] = []
        for param, group, pieces in work:
            if not pieces or param.grad is None:
                results.append(None)
                continue
            direction = torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            for piece in pieces:
                if piece.key in shard_directions:
                    value = shard_directions[piece.key]
                elif piece.key in full_directions:
                    matrix = self._matrix(piece.key)
                    value = _shard(full_directions[piece.key], matrix, piece.shard_index)
                else:
                    value = scattered[piece.key][piece.shard_index]
                scale = update_scale(group["scale_mode"], piece.shape[0], piece.shape[1])
                scaled = value * (scale * group["scale_multiplier"])
                piece.write(direction, scaled)
                totals = update_sq[matrix_kind(piece.key)]
                totals[0] += float(scaled.square().sum())
                totals[1] += scaled.numel()
            results.append(direction)
        # RMS of the (lr-free) update per kind of matrix, over the pieces this rank holds.
        self.stats.update({f"update_rms/{k}": (s / max(n, 1)) ** 0.5 for k, (s, n) in update_sq.items()})
        return results

    def _sample_orthogonality(self, full_directions: dict[str, torch.Tensor]) -> None:
        """Orthogonality error of one matrix this rank orthogonalized, a different one each step."""
        self._step_count = getattr(self, "_step_count", 0) + 1
        if not full_directions:
            return
        keys = sorted(full_directions)
        key = keys[self._step_count % len(keys)]
        self.stats["ns_orthogonality_error"] = float(orthogonality_error(full_directions[key]))

    def _matrix(self, key: str) -> MatrixPlan:
        return self._by_key[key]

    def _start(self, matrices, kind, payload) -> _PendingExchange:
        """Start one bucketed all-to-all of the ``kind`` ("gather" | "scatter") transfers of ``matrices``."""
        sends: dict[int, list[torch.Tensor]] = defaultdict(list)
        recv_shapes: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        recv_order: dict[int, list[tuple[str, int]]] = defaultdict(list)
        for matrix in matrices:
            for shard, sender, receiver in getattr(matrix, kind):
                if sender == self.rank:
                    sends[receiver].append(payload(matrix, shard))
                if receiver == self.rank:
                    recv_shapes[sender].append(_shard_shape(matrix))
                    recv_order[sender].append((matrix.key, shard))
        return _PendingExchange(Exchange(dict(sends), dict(recv_shapes), self.grid_group), recv_order)

    def _momentum_and_orthogonalize(self, optimizer, matrices, local, gathered, *, sharded: bool):
        """Momentum (kept in ``optimizer.state``) and Newton–Schulz for ``matrices`` this rank computes;
        returns key → direction (the whole matrix, or this rank's shard when ``sharded``)."""
        inputs = []
        for matrix in matrices:
            if matrix.key in self._skip:
                continue
            mine = local[matrix.key]
            if sharded:
                grad = mine.grad
            else:
                shards = dict(gathered.get(matrix.key, {}))
                shards[mine.piece.shard_index] = mine.grad
                grad = torch.cat([shards[i] for i in range(matrix.num_shards)], dim=matrix.shard_dim)
            state = optimizer.matrix_state(mine.param, matrix.key)
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(grad)
            hyper = mine.group
            inputs.append(
                (
                    matrix,
                    momentum_input_(state["momentum"], grad, hyper["momentum"], hyper["nesterov"]),
                    state,
                )
            )
        return {m.key: d for m, d in self._orthogonalize(optimizer, inputs, sharded=sharded)}

    def _orthogonalize(self, optimizer, inputs, *, sharded: bool):
        """Newton–Schulz on ``(matrix, input, state)`` triples, one batched call per shape (and shard group),
        then the optimizer's ``post_orthogonalize`` plug-in (NorMuon) on the same batch."""
        buckets: dict[tuple, list[tuple[MatrixPlan, torch.Tensor, dict]]] = defaultdict(list)
        for matrix, tensor, state in inputs:
            shard_dim = matrix.shard_dim if sharded else -1
            bucket = (tuple(tensor.shape), matrix.shape, matrix.shard_group if sharded else "", shard_dim)
            buckets[bucket].append((matrix, tensor, state))
        post_orthogonalize = getattr(optimizer, "post_orthogonalize", None)
        for (_, full_shape, shard_group, shard_dim), items in sorted(buckets.items()):
            stack = torch.stack([tensor for _, tensor, _ in items])
            kwargs, reductions = {}, {}
            if sharded:
                all_reduce_sum = all_reduce_sum_fn(self.shard_groups[shard_group])
                kwargs["all_reduce_sum"] = all_reduce_sum
                kwargs["transpose"] = full_shape[0] > full_shape[1]
                # NorMuon's row statistics: rows split -> sum the totals; columns split -> sum each row.
                reductions["total_all_reduce" if shard_dim == 0 else "row_sum_all_reduce"] = all_reduce_sum
            result = newton_schulz(
                stack,
                steps=optimizer.ns_steps,
                coefficients=optimizer.coefficients,
                compute_dtype=optimizer.compute_dtype,
                fp8_steps=getattr(optimizer, "ns_fp8_steps", 0),
                **kwargs,
            )
            if post_orthogonalize is not None:
                result = post_orthogonalize(
                    result, [state for _, _, state in items], full_shape=full_shape, **reductions
                )
            for (matrix, _, _), direction in zip(items, result.unbind(0), strict=True):
                yield matrix, direction


def matrix_kind(key: str) -> str:
    """A short name for the kind of a logical matrix, for diagnostics: ``attention.q``, ``mlp.gate``,
    ``expert.fc2`` ... (from its layout key)."""
    module, _, part = key.partition("/")
    name = module.rsplit(".", 2)[-2] if module.endswith(".weight") else module.rsplit(".", 1)[-1]
    if "shared_expert" in module:
        prefix = "shared_expert"
    elif "experts" in module:
        prefix = "expert"
    elif "attention" in module:
        prefix = "attention"
    elif ".mlp." in module:
        prefix = "mlp"
    else:
        prefix = "matrix"
    name = name.removeprefix("linear_")
    return f"{prefix}.{part.split('.')[0]}" if part else f"{prefix}.{name}"


def _shard_shape(matrix: MatrixPlan) -> tuple[int, int]:
    rows, cols = matrix.shape
    if matrix.shard_dim == 0:
        return rows // matrix.num_shards, cols
    return rows, cols // matrix.num_shards


class _PendingExchange:
    """An exchange in flight; ``wait`` returns the received tensors keyed by matrix key and shard index."""

    def __init__(self, exchange: Exchange, recv_order: dict[int, list[tuple[str, int]]]) -> None:
        self._exchange, self._recv_order = exchange, recv_order

    def wait(self) -> dict[str, dict[int, torch.Tensor]]:
        result: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
        for source, tensors in self._exchange.wait().items():
            for (key, shard), tensor in zip(self._recv_order[source], tensors, strict=True):
                result[key][shard] = tensor
        return result
