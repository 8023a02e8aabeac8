"""Per-rank memory, Newton–Schulz FLOPs, optimizer communication and predicted step time, for our plan and for
megatron-core 0.19.2's Muon modes, from the same logical matrices (``at_scale.LayoutFacts``).

Formulas (B = bytes; p = parameter elements this rank holds; a = of them AdamW's, u = Muon's):

* parameters: p × 2 B (bf16) or 4 B (fp32); gradients: p × 4 B (megatron's fp32 grad buffer,
  ``grad_reduce_in_fp32``; kept whole with the distributed optimizer too); master weights: p × 4 B under bf16
  (distributed optimizer on: only for the params this rank owns, below).
* optimizer state, distributed optimizer **off**: AdamW 8 B × a; Muon momentum 4 B per element of every matrix the
  rank orthogonalizes (ours: the owner keeps the whole matrix, ``duplicated`` every holder the whole matrix,
  ``distributed`` its shard; megatron's duplicated / distributed modes: the rank's own shard).
* distributed optimizer **on** (ours, docs/distributed_optimizer.md): AdamW on megatron's element-sharded
  ``DistributedOptimizer``: (4 B master + 8 B state) × a / d, i.e. 6 + 12/d B per param with params and grads
  (d: dense DP·CP, experts expert-DP); Muon on megatron's shard-aligned layer-wise layout: each DP rank owns
  whole TP-local params (balanced by Newton–Schulz cost) and keeps the fp32 master (4 B, bf16 only) of those;
  the momentum (4 B) is kept where the built optimizer keeps it (``momentum_elements``, the plan of
  ``optim/build.py``: configured mode, no replicated state, ``momentum_with_shards`` unless NorMuon): each TP rank
  its own shard of an ``owner`` or ``distributed`` matrix, every holder the whole of a ``duplicated`` one (a whole
  matrix several TP ranks hold, like the router); with NorMuon the owner the whole matrix. 6 + 8/d B per param on
  average. Megatron's ``LayerWiseDistributedOptimizer`` holds the same bytes (its TP-split matrices' momentum
  per shard on every TP rank of the DP owner).
* ``parallel.fsdp`` (ours + FSDP, ``training/fsdp.py``): parameters and gradients as fp32 shards, 4 B + 4 B per
  parameter / d (the shards are the master weights: no separate copy), AdamW state 8 B / d, Muon momentum with each
  rank's rows of the matrices (the plan over FSDP parts, ``_ours_fsdp``); plus what FSDP gathers for compute: the
  unsharded parameters (model dtype) and gradients (fp32) of about two transformer layers at a time (the one
  computing and the one prefetched), counted as 2 × (stage parameters / layers on the stage) × (2 or 4 + 4) B.
  Traffic outside the step: the parameter all-gathers of forward and backward, 2 × P × (2 or 4 B) × (d−1)/d,
  and the fp32 gradient reduce-scatter, 4·P·(d−1)/d.
* activations (megatron's theoretical estimate, Korthikanti et al. 2022, selective recompute, sequence parallel):
  per layer s·b·h·(18 + 4·F/h)/TP bytes with F the dense FFN size, or top-k × expert FFN + shared FFN for an MoE
  layer (tokens balanced over experts); × the micro-batches in flight on pipeline rank r under 1F1B,
  min(PP − r, micro-batches) (× (1 + (PP−1)/(PP·VPP)) interleaved); plus 4·s·b·V/TP bytes of fp32 logits on the
  last stage.
* Newton–Schulz FLOPs: ``ns_algorithm_flops`` per whole matrix; a shard of the ``distributed`` mode runs
  steps × (4k²K/n + 2k³) (k × k Gram work is repeated on every shard). Ours counts the algorithm the plan chose
  per matrix (``optimizer.muon.ns_algorithm``: standard or Gram Newton–Schulz, the same ``build_muon_plan`` and
  FLOP formulas as the optimizer); megatron's modes run standard Newton–Schulz.
* communication in the optimizer step (fp32 gradients / directions, 4 B): ours, the plan's gather and scatter
  transfers (one all-to-all per bucket each way) and the ``distributed`` mode's Gram all-reduce (ring: 2(n−1)/n of
  k² × 4 B per NS step, or per restart segment under Gram Newton–Schulz); megatron duplicated: a ring all-gather of every TP-sharded matrix ((n−1)/n of it);
  distributed: the Gram all-reduce. With a distributed optimizer (ours, megatron layer-wise) the plan or the TP
  gathers cover only the owned params, then the updated params of every param (Muon and AdamW) are all-gathered
  over DP: ring, 2 B (bf16; fp32: 4 B) × P·(d−1)/d sent.
* gradient sync (backward pass, overlapped with it, not part of the optimizer step; ``grad_sync``): fp32 grads
  all-reduced over DP without a distributed optimizer, 8·P·(d−1)/d sent; reduce-scattered with one,
  4·P·(d−1)/d.
* time: NS FLOPs / (peak × efficiency) + bytes / bandwidth (NVLink when both ends are in one node of
  ``gpus_per_node``, else InfiniBand; the larger of send and receive) + latency per collective. Ours overlaps
  bucket b's exchange with bucket b+1's Newton–Schulz: max(compute, exchange) + min(...)/buckets. Megatron's
  step runs its collectives and Newton–Schulz one after the other. The step is the slowest rank's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_muon.ops.newton_schulz import newton_schulz_flops, ns_algorithm_flops
from megatron_muon.optim.options import MuonConfig
from megatron_muon.optim.plan import GPU_PROFILES, MatrixPlan, PieceRecord

if TYPE_CHECKING:
    from megatron_muon.config.schema import ModelConfig, ParallelDims, TrainingConfig
    from megatron_muon.planning.at_scale import LayoutFacts, StageMatrices

__all__ = ["MODES", "RankCost", "activation_bytes", "layout_costs"]

MODES = (
    "ours",
    "ours + distributed optimizer",
    "ours + FSDP",
    "megatron duplicated",
    "megatron distributed",
    "megatron layer-wise",
)
_FP32 = 4
_NUM_BUCKETS = 4


@dataclass(slots=True)
class RankCost:
    """One rank under one optimizer mode."""

    rank: int
    ns_flops: float = 0.0
    muon_state_elements: float = 0.0
    """Elements of Muon momentum this rank keeps."""
    owned_elements: float = 0.0
    """Elements of the Muon matrices whose master/momentum live here with the distributed optimizer on."""
    owned_adamw_elements: float | None = None
    """Layer-wise: AdamW elements this rank updates (None: element-sharded over DP)."""
    sent: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    received: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    send_seconds: float = 0.0
    receive_seconds: float = 0.0
    collectives: int = 0
    """Collectives this rank starts per step (each pays the latency)."""
    overlapped: bool = False
    param_gather_seconds: float = 0.0
    """Of the send/receive seconds: the all-gather of updated bf16 parameters over DP (distributed optimizers),
    which megatron can overlap with the next forward (``overlap_param_gather``)."""
    grad_sync: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Bytes this rank sends (and receives) in the gradient sync of the backward pass, by collective: not part of
    the optimizer step's time."""

    def add(self, other: RankCost) -> None:
        """Accumulate ``other``'s work and traffic (a distinct rank's figures applied to one of its replicas)."""
        self.ns_flops += other.ns_flops
        self.muon_state_elements += other.muon_state_elements
        self.owned_elements += other.owned_elements
        for name, count in other.sent.items():
            self.sent[name] += count
        for name, count in other.received.items():
            self.received[name] += count
        self.send_seconds += other.send_seconds
        self.receive_seconds += other.receive_seconds
        self.collectives += other.collectives
        self.param_gather_seconds += other.param_gather_seconds
        for name, count in other.grad_sync.items():
            self.grad_sync[name] += count

    def step_seconds(self, flops_per_s: float, latency_s: float, *, param_gather: bool = True) -> float:
        """Predicted seconds of this rank's optimizer step; ``param_gather=False`` leaves out the DP all-gather
        of updated parameters (and its latency)."""
        compute = self.ns_flops / flops_per_s
        hidden = 0.0 if param_gather else self.param_gather_seconds
        exchange = max(self.send_seconds - hidden, self.receive_seconds - hidden)
        if self.overlapped:
            moving = max(compute, exchange) + min(compute, exchange) / _NUM_BUCKETS
        else:
            moving = compute + exchange
        collectives = self.collectives - (0 if param_gather or not self.param_gather_seconds else 1)
        return moving + collectives * latency_s


def activation_bytes(model: ModelConfig, dims: ParallelDims, training: TrainingConfig, pp_rank: int) -> float:
    """Activation memory of pipeline rank ``pp_rank`` (formula in the module docstring)."""
    from megatron_muon.planning.rank_params import stage_layers

    s, b, h = model.seq_length, training.micro_batch_size, model.hidden_size
    pattern = model.moe_layer_pattern()
    total = 0.0
    for layer in stage_layers(model.num_layers, dims.pp, dims.vpp, pp_rank):
        ffn = (
            model.moe_router_topk * model.moe_ffn_hidden_size + model.moe_shared_expert_intermediate_size
            if pattern[layer]
            else model.ffn_hidden_size
        )
        total += s * b * h * (18 + 4 * ffn / h) / (dims.tp * dims.cp)
    microbatches = training.global_batch_size // (training.micro_batch_size * dims.dp)
    in_flight: float = min(dims.pp - pp_rank, microbatches)
    if dims.vpp:
        in_flight *= 1 + (dims.pp - 1) / (dims.pp * dims.vpp)
    total *= in_flight
    if pp_rank == dims.pp - 1:
        total += 4 * s * b * model.vocab_size / dims.tp
    return total


class _Links:
    def __init__(self, gpu: str) -> None:
        profile = GPU_PROFILES[gpu]
        self.per_node = profile.gpus_per_node
        self.intra, self.inter = profile.intra_node_bytes_per_s, profile.inter_node_bytes_per_s

    def seconds(self, a: int, b: int, count: float) -> float:
        return count / (self.intra if a // self.per_node == b // self.per_node else self.inter)

    def group_bandwidth(self, ranks: list[int]) -> float:
        return self.intra if len({r // self.per_node for r in ranks}) == 1 else self.inter


def _transfer(
    costs: dict[int, RankCost], links: _Links, sender: int, receiver: int, count: float, collective: str
) -> None:
    costs[sender].sent[collective] += count
    costs[receiver].received[collective] += count
    seconds = links.seconds(sender, receiver, count)
    costs[sender].send_seconds += seconds
    costs[receiver].receive_seconds += seconds


def _exchanges(
    costs: dict[int, RankCost], links: _Links, matrix: MatrixPlan, global_rank: Callable[[int], int]
) -> None:
    """The plan's gather (gradient shards to the computers) and scatter (direction shards back) of ``matrix``;
    ``global_rank`` maps the plan's rank indices to global ranks."""
    for transfers, collective, gathering in (
        (matrix.gather, "gather (all-to-all)", True),
        (matrix.scatter, "scatter (all-to-all)", False),
    ):
        for shard, sender, receiver in transfers:
            # An FSDP part travels alone: the sender's rows gathered, the receiver's rows returned.
            rows, cols = matrix.piece_shape(shard, sender if gathering else receiver)
            _transfer(
                costs, links, global_rank(sender), global_rank(receiver), rows * cols * _FP32, collective
            )


def _ring(cost: RankCost, count_each_way: float, bandwidth: float, collective: str, calls: int) -> None:
    cost.sent[collective] += count_each_way
    cost.received[collective] += count_each_way
    cost.send_seconds += count_each_way / bandwidth
    cost.receive_seconds += count_each_way / bandwidth
    cost.collectives += calls


def _sharded_flops(shape: tuple[int, int], num_shards: int, steps: int) -> float:
    k, big = min(shape), max(shape)
    return steps * (4 * k * k * big / num_shards + 2 * k**3)


def _long_side_sharded(record: PieceRecord) -> bool:
    rows, cols = record.shape
    return (record.shard_dim == 1) == (cols >= rows)


def momentum_elements(matrix: MatrixPlan) -> dict[int, float]:
    """Plan rank index → elements of ``matrix``'s Muon momentum that rank keeps, where the built optimizer keeps it
    (``Muon._momentum_input``): each holder its own shard when the momentum stays with the shards (``distributed``
    mode; ``owner`` with ``momentum_with_shards``, the distributed optimizer's default), else every rank that
    computes the matrix the whole of it (the owner; every holder under ``duplicated``)."""
    full = matrix.shape[0] * matrix.shape[1]
    if matrix.momentum_with_shards and matrix.partitioned:  # FSDP: each holder its rows
        return {
            rank: float(matrix.piece_shape(shard, rank)[0] * matrix.piece_shape(shard, rank)[1])
            for shard, ranks in matrix.holders.items()
            for rank in ranks
        }
    if matrix.mode == "distributed" or matrix.momentum_with_shards:
        return {rank: full / matrix.num_shards for ranks in matrix.holders.values() for rank in ranks}
    return {rank: float(full) for rank in matrix.computers}


def _gram_all_reduce(
    costs: dict[int, RankCost],
    links: _Links,
    matrix: MatrixPlan,
    muon: MuonConfig,
    global_rank: Callable[[int], int],
) -> int:
    """The ``distributed`` mode's Gram all-reduce of ``matrix`` on each holder (ring over its shard group);
    returns the all-reduces per step (one batched call per shape pays them once)."""
    k = min(matrix.shape)
    all_reduces: int = matrix.gram_all_reduces(muon.ns_steps, tuple(muon.ns_gram_restarts))
    each_way = 2 * (matrix.num_shards - 1) / matrix.num_shards * k * k * _FP32 * all_reduces
    for grid in matrix.all_holders:
        _ring(costs[global_rank(grid)], each_way, links.intra, "gram all-reduce", 0)
    return all_reduces


def _grid_to_global(first: int) -> Callable[[int], int]:
    """Grid rank of a stage (the plan's rank index) → global rank, for the stage whose first rank is ``first``."""
    return lambda grid: first + grid


def _ours(facts: LayoutFacts, links: _Links) -> dict[int, RankCost]:
    dims, muon = facts.dims, facts.cfg.optimizer.muon
    costs = {r: RankCost(rank=r, overlapped=True) for r in range(dims.world_size)}
    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        for plan in stage.plans.values():
            for grid, load in plan.loads.items():
                costs[first + grid].ns_flops += load
            shapes_distributed: dict[int, set[tuple[tuple[int, int], int, int]]] = defaultdict(set)
            for matrix in plan.matrices:
                for grid, elements in momentum_elements(matrix).items():
                    costs[first + grid].muon_state_elements += elements
                    costs[first + grid].owned_elements += elements
                if matrix.mode == "distributed":
                    all_reduces = _gram_all_reduce(costs, links, matrix, muon, _grid_to_global(first))
                    for grid in matrix.all_holders:
                        shapes_distributed[first + grid].add((matrix.shape, matrix.shard_dim, all_reduces))
                    continue
                _exchanges(costs, links, matrix, _grid_to_global(first))
            for rank in range(first, first + dims.stage_size):
                # One batched call (all-reduces of one Gram shape) per shape and algorithm (``Muon._orthogonalize``).
                costs[rank].collectives += 2 * _NUM_BUCKETS + sum(n for *_, n in shapes_distributed[rank])
    return costs


def _fsdp_index(facts: LayoutFacts, global_rank: int, kind: str) -> tuple[int, int]:
    """(this rank's index, size) of the group FSDP shards ``kind`` parameters over: dense DP·CP, experts
    expert-DP."""
    c, dims = facts.coordinates[global_rank], facts.dims
    if kind == "dense":
        return c["dp"] * dims.cp + c["cp"], dims.dp * dims.cp
    return c["edp"], dims.expert_dp


def _fsdp_records(
    facts: LayoutFacts, first: int, kind: str, records_by_rank: list[list[PieceRecord]]
) -> list[list[PieceRecord]]:
    """Each grid rank's records as FSDP parts: every TP shard's rows cut evenly over the FSDP group
    (``torch.chunk``), the part of this rank's index. (The optimizer cuts the TP-local *parameter*, fused parts
    and all; per matrix that moves the cut points, not the bytes.)"""
    import dataclasses

    from megatron_muon.optim.layout import RowRuns, fsdp_chunk, shard_shape
    from megatron_muon.optim.plan import held_rows

    result = []
    for grid, records in enumerate(records_by_rank):
        index, size = _fsdp_index(facts, first + grid, kind)
        parts = []
        for record in records:
            rows = shard_shape(record.shape, record.shard_dim, record.num_shards)[0]
            start, stop = fsdp_chunk(rows, size, index)
            part = RowRuns(((0, start, stop - start),) if stop > start else ())
            parts.append(dataclasses.replace(record, rows_held=held_rows(part, rows)))
        result.append(parts)
    return result


def _ours_fsdp(facts: LayoutFacts, links: _Links) -> dict[int, RankCost]:
    """Ours with ``parallel.fsdp`` (``training/fsdp.py``): every matrix's rows spread over the FSDP group, gathered
    to one owner of the stage's grid (``owner`` mode, the plan ``optim/build.py`` builds: no replicated state, the
    momentum with the parts unless NorMuon)."""
    from megatron_muon.optim.options import MuonPlanSettings
    from megatron_muon.optim.plan import build_muon_plan

    dims, muon = facts.dims, facts.cfg.optimizer.muon
    costs = {r: RankCost(rank=r, overlapped=True) for r in range(dims.world_size)}
    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        for kind, records_by_rank in stage.records.items():
            if not any(records_by_rank):
                continue
            plan = build_muon_plan(
                _fsdp_records(facts, first, kind, records_by_rank),
                MuonPlanSettings(
                    tp_mode="auto" if muon.tp_mode not in ("auto", "owner") else muon.tp_mode,
                    ns_steps=muon.ns_steps,
                    replicate_state=False,
                    momentum_with_shards=not muon.normuon,
                    ns_algorithm=muon.planned_ns_algorithm,
                    gram_restarts=tuple(muon.ns_gram_restarts),
                ),
                cost_model=facts.cost_model,
            )
            for grid, load in plan.loads.items():
                costs[first + grid].ns_flops += load
            for matrix in plan.matrices:
                for grid, elements in momentum_elements(matrix).items():
                    costs[first + grid].muon_state_elements += elements
                _exchanges(costs, links, matrix, _grid_to_global(first))
        for rank in range(first, first + dims.stage_size):
            costs[rank].collectives += 2 * _NUM_BUCKETS
    return costs


def _fused_gate_up(records: list[PieceRecord]) -> list[PieceRecord]:
    """Megatron orthogonalizes a SwiGLU fc1 as one [gate; up] matrix: merge our split halves back."""
    merged: list[PieceRecord] = []
    seen: set[str] = set()
    for record in records:
        if record.key.endswith(("/gate", "/up")):
            base = record.key.rsplit("/", 1)[0]
            if base in seen:
                continue
            seen.add(base)
            rows, cols = record.shape
            merged.append(
                PieceRecord(
                    key=base,
                    shape=(2 * rows, cols),
                    shard_dim=record.shard_dim,
                    num_shards=record.num_shards,
                    shard_index=record.shard_index,
                    shard_group=record.shard_group,
                )
            )
        else:
            merged.append(record)
    return merged


def _dp_owners(
    facts: LayoutFacts,
    first: int,
    kind: str,
    records_by_rank: list[list[PieceRecord]],
    steps: int,
    algorithm: str = "standard",
) -> Iterator[tuple[list[int], dict[str, list[PieceRecord]], dict[str, int]]]:
    """Layer-wise DP sharding (megatron's ``LayerWiseDistributedOptimizer``, and ours with the distributed
    optimizer): in each DP group (dense: ranks sharing tp, cp; experts: sharing ep, etp) every whole parameter (all
    pieces of one tensor) goes to one member, longest-processing-time first by Newton–Schulz cost. Yields
    (members, params: name → records, owner_of: name → member). ``algorithm``: the Newton–Schulz FLOPs counted
    (megatron: standard; ours: ``optimizer.muon.ns_algorithm``)."""
    dims, coordinates = facts.dims, facts.coordinates
    replica = ("tp",) if kind == "dense" else ("ep", "etp")  # dense DP group: DP × CP (megatron's dp_cp)
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for grid in range(dims.stage_size):
        groups[tuple(coordinates[first + grid][c] for c in replica)].append(grid)
    for members in groups.values():
        params: dict[str, list[PieceRecord]] = defaultdict(list)
        for record in records_by_rank[members[0]]:
            params[record.key.split("/")[0]].append(record)
        cost = {
            name: sum(_ns_flops(r.shape, steps, algorithm, facts) for r in recs)
            for name, recs in params.items()
        }
        load = {m: 0.0 for m in members}
        owner_of: dict[str, int] = {}
        for name in sorted(params, key=lambda n: (-cost[n], n)):
            owner = min(members, key=lambda m: (load[m], m))
            owner_of[name] = owner
            load[owner] += cost[name]
        yield members, params, owner_of


def _ns_flops(shape: tuple[int, int], steps: int, algorithm: str, facts: LayoutFacts) -> float:
    if algorithm == "standard":
        return newton_schulz_flops(*shape, steps)
    return ns_algorithm_flops(*shape, steps, algorithm, tuple(facts.cfg.optimizer.muon.ns_gram_restarts))


def _param_bytes(facts: LayoutFacts) -> int:
    return 2 if facts.cfg.model.precision == "bf16" else 4


def _param_all_gather(
    facts: LayoutFacts,
    links: _Links,
    costs: dict[int, RankCost],
    first: int,
    members: list[int],
    elements: float,
) -> None:
    """Updated parameters (``elements`` per rank: every param of the DP group's buffers, Muon and AdamW) gathered
    from their DP owners: a ring all-gather over the DP group."""
    if len(members) < 2:
        return
    each_way = (len(members) - 1) / len(members) * elements * _param_bytes(facts)
    bandwidth = links.group_bandwidth([first + m for m in members])
    for member in members:
        _ring(costs[first + member], each_way, bandwidth, "DP all-gather (params)", 1)
        costs[first + member].param_gather_seconds += each_way / bandwidth


def _ours_distributed_optimizer(facts: LayoutFacts, links: _Links) -> dict[int, RankCost]:
    """Ours with the distributed optimizer (docs/distributed_optimizer.md): megatron's layer-wise DP sharding of
    whole parameters, then our plan in ``owner`` mode over each TP (expert-TP) group for the owned matrices."""
    from megatron_muon.optim.options import MuonPlanSettings
    from megatron_muon.optim.plan import build_muon_plan

    dims, muon = facts.dims, facts.cfg.optimizer.muon
    costs = {r: RankCost(rank=r, overlapped=True) for r in range(dims.world_size)}
    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        for kind, records_by_rank in stage.records.items():
            if not any(records_by_rank):
                continue
            owned_names: dict[int, set[str]] = defaultdict(set)
            algorithm = muon.planned_ns_algorithm
            owners = _dp_owners(facts, first, kind, records_by_rank, muon.ns_steps, algorithm)
            for members, _params, owner_of in owners:
                for name, owner in owner_of.items():
                    owned_names[owner].add(name)
                _param_all_gather(facts, links, costs, first, members, _kind_elements(stage, kind))
            # The shard groups: the ranks of one DP index that hold the other shards of the same matrices.
            same = ("cp", "dp") if kind == "dense" else ("ep", "edp")
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
            for grid in range(dims.stage_size):
                groups[tuple(facts.coordinates[first + grid][c] for c in same)].append(grid)
            for members in groups.values():
                records = [
                    [r for r in records_by_rank[m] if r.key.split("/")[0] in owned_names[m]] for m in members
                ]
                for member, held in zip(members, records, strict=True):
                    costs[first + member].owned_elements += sum(
                        r.shape[0] * r.shape[1] / r.num_shards for r in held
                    )
                if not any(records):
                    continue
                if len(members) == 1:  # nothing sharded: every owned matrix is local work
                    cost = costs[first + members[0]]
                    for record in records[0]:
                        cost.ns_flops += _ns_flops(record.shape, muon.ns_steps, algorithm, facts)
                        cost.muon_state_elements += record.shape[0] * record.shape[1]
                    continue
                # As optim/build.py builds it: the configured mode without replicated state, the momentum with
                # the shards (NorMuon keeps it whole on the owner).
                plan = build_muon_plan(
                    records,
                    MuonPlanSettings(
                        # tp_mode duplicated is refused with the distributed optimizer (optim/build.py): show owner.
                        tp_mode="owner" if muon.tp_mode == "duplicated" else muon.tp_mode,
                        ns_steps=muon.ns_steps,
                        replicate_state=False,
                        momentum_with_shards=not muon.normuon,
                        ns_algorithm=algorithm,
                        gram_restarts=tuple(muon.ns_gram_restarts),
                    ),
                    cost_model=facts.cost_model,
                )
                for index, load in plan.loads.items():
                    costs[first + members[index]].ns_flops += load

                def global_rank(index: int, first: int = first, members: list[int] = members) -> int:
                    return first + members[index]

                distributed_calls: dict[int, set[tuple[tuple[int, int], int, int]]] = defaultdict(set)
                for matrix in plan.matrices:
                    for index, elements in momentum_elements(matrix).items():
                        costs[global_rank(index)].muon_state_elements += elements
                    if matrix.mode == "distributed":
                        all_reduces = _gram_all_reduce(costs, links, matrix, muon, global_rank)
                        for index in matrix.all_holders:
                            distributed_calls[index].add((matrix.shape, matrix.shard_dim, all_reduces))
                        continue
                    _exchanges(costs, links, matrix, global_rank)
                for index in range(len(members)):
                    calls = sum(n for _, _, n in distributed_calls[index])
                    costs[global_rank(index)].collectives += 2 * _NUM_BUCKETS + calls
    return costs


def _megatron(facts: LayoutFacts, links: _Links, mode: str) -> dict[int, RankCost]:
    """megatron-core's Muon (``TensorParallelMuon``): duplicated or distributed TP mode, or layer-wise."""
    dims, muon = facts.dims, facts.cfg.optimizer.muon
    steps = muon.ns_steps
    costs = {r: RankCost(rank=r) for r in range(dims.world_size)}
    layer_wise = mode == "megatron layer-wise"
    tp_bandwidth = links.intra if max(dims.tp, dims.etp) <= links.per_node else links.inter

    def matrix_work(cost: RankCost, record: PieceRecord) -> None:
        full = record.shape[0] * record.shape[1]
        n = record.num_shards
        cost.muon_state_elements += full / n
        cost.owned_elements += full / n
        if n == 1:
            cost.ns_flops += newton_schulz_flops(*record.shape, steps)
        elif mode == "megatron distributed" and _long_side_sharded(record):
            cost.ns_flops += _sharded_flops(record.shape, n, steps)
            k = min(record.shape)
            _ring(cost, 2 * (n - 1) / n * k * k * _FP32 * steps, tp_bandwidth, "gram all-reduce", steps)
        else:
            cost.ns_flops += newton_schulz_flops(*record.shape, steps)
            _ring(cost, (n - 1) / n * full * _FP32, tp_bandwidth, "TP all-gather", 1)

    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        for kind, records_by_rank in stage.records.items():
            fused_of: dict[int, list[PieceRecord]] = {}
            for records in records_by_rank:
                if id(records) not in fused_of:
                    fused_of[id(records)] = _fused_gate_up(records)
            fused = [fused_of[id(records)] for records in records_by_rank]
            if not layer_wise:
                distinct: dict[int, RankCost] = {}
                for grid, records in enumerate(fused):
                    if id(records) not in distinct:
                        distinct[id(records)] = RankCost(rank=-1)
                        for record in records:
                            matrix_work(distinct[id(records)], record)
                    costs[first + grid].add(distinct[id(records)])
                continue
            for members, params, owner_of in _dp_owners(facts, first, kind, fused, steps):
                for name, owner in owner_of.items():
                    for record in params[name]:
                        matrix_work(costs[first + owner], record)
                _param_all_gather(facts, links, costs, first, members, _kind_elements(stage, kind))
    return costs


def _kind_elements(stage: StageMatrices, kind: str) -> int:
    """Parameter elements of one rank of ``stage`` in the DP buffers of ``kind``: dense (everything but the routed
    experts, AdamW params included) or expert."""
    return stage.parameters.dense if kind == "dense" else stage.parameters.expert


def _grad_sync(facts: LayoutFacts, costs: dict[int, RankCost], sharded: bool) -> None:
    """The backward pass's gradient sync over DP (dense: DP·CP, experts: expert-DP), fp32: a ring all-reduce, or a
    reduce-scatter with a distributed optimizer."""
    dims = facts.dims
    name = "DP reduce-scatter (grads)" if sharded else "DP all-reduce (grads)"
    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        sent = sum(
            _kind_elements(stage, kind) * _FP32 * (d - 1) / d * (1 if sharded else 2)
            for kind, d in (("dense", dims.dp * dims.cp), ("expert", dims.expert_dp))
        )
        for rank in range(first, first + dims.stage_size):
            costs[rank].grad_sync[name] += sent


def _fsdp_gathers(facts: LayoutFacts, costs: dict[int, RankCost]) -> None:
    """FSDP's parameter all-gathers of forward and backward (bf16, or the fp32 model's dtype), beside its gradient
    reduce-scatter: traffic of the forward and backward passes, like the gradient sync, not of the step."""
    dims = facts.dims
    for stage in facts.stages:
        first = stage.pp_rank * dims.stage_size
        sent = sum(
            2 * _kind_elements(stage, kind) * _param_bytes(facts) * (d - 1) / d
            for kind, d in (("dense", dims.dp * dims.cp), ("expert", dims.expert_dp))
        )
        for rank in range(first, first + dims.stage_size):
            costs[rank].grad_sync["FSDP all-gather (params, forward + backward)"] += sent


def layout_costs(facts: LayoutFacts) -> dict[str, dict[int, RankCost]]:
    """mode → rank → its cost, for ``MODES``."""
    links = _Links(facts.gpu)
    result = {
        "ours": _ours(facts, links),
        "ours + distributed optimizer": _ours_distributed_optimizer(facts, links),
        "ours + FSDP": _ours_fsdp(facts, links),
    }
    for mode in MODES[3:]:
        result[mode] = _megatron(facts, links, mode)
    for mode, costs in result.items():
        sharded = mode in ("ours + distributed optimizer", "ours + FSDP", "megatron layer-wise")
        _grad_sync(facts, costs, sharded=sharded)
    _fsdp_gathers(facts, result["ours + FSDP"])
    return result
