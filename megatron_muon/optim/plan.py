"""Who orthogonalizes what: the Muon plan every rank of a pipeline stage derives identically from the same facts
(not the scale plan of ``megatron_muon/planning/``, which predicts a whole run's memory and time).

Each rank of the stage's grid group (TP × CP × DP; for experts the same ranks read as expert-TP × EP × expert-DP)
announces the matrix pieces it holds (``layout.MatrixPiece``: key, full shape, which shard). From the union of
those announcements every rank computes the same plan, with no further communication:

* a mode per logical matrix — ``owner`` (shards gathered to one owner rank, which keeps the momentum, runs
  Newton–Schulz and sends every holder its shard back), ``duplicated`` (every holder gathers the whole matrix
  and runs Newton–Schulz itself; for an unsharded matrix that is plain local work) or ``distributed`` (every
  holder keeps its shard's momentum and Newton–Schulz runs on shards with the Gram matrix all-reduced over the
  shard group; only when the shards split the long side) — chosen by ``auto`` from a cost model;
* an algorithm per logical matrix — standard or Gram Newton–Schulz (``ops/gram_newton_schulz.py``), the one with
  fewer FLOPs on the rank that runs it (a ``distributed`` shard: its own slice of the long side) under ``auto`` —
  counted in every FLOP figure below, so the mode choice and the owners' balance see the algorithm that runs;
* owners by longest-processing-time bin packing on Newton–Schulz cost over all ranks holding the matrix, so
  each matrix is orthogonalized exactly once in the grid;
* for every transfer, who sends which shard to whom, so the exchange is one bucketed all-to-all.

Pure Python: unit-tested without processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from dataclasses import dataclass, field

from megatron_muon.ops.newton_schulz import DEFAULT_GRAM_RESTARTS, choose_ns_algorithm, ns_algorithm_flops
from megatron_muon.optim.layout import RowRuns, shard_shape
from megatron_muon.optim.options import MODES, MuonPlanSettings  # noqa: F401  (MODES re-exported)

NO_ROWS: tuple[tuple[int, int], ...] = ((0, 0),)
"""``PieceRecord.rows_held`` of an FSDP part this rank holds no row of: announced, not a holder."""


def held_rows(part: RowRuns, shard_rows: int) -> tuple[tuple[int, int], ...]:
    """What a record announces of an FSDP part: its runs of the shard, ``()`` when it is the whole shard,
    ``NO_ROWS`` when this rank's slice missed the matrix."""
    if part.num_rows == 0:
        return NO_ROWS
    return part.shard_rows if part.num_rows < shard_rows else ()


@dataclass(frozen=True, slots=True)
class PieceRecord:
    """What one rank announces about one piece it holds."""

    key: str
    shape: tuple[int, int]
    shard_dim: int
    num_shards: int
    shard_index: int
    shard_group: str
    rows_held: tuple[tuple[int, int], ...] = ()
    """A fully sharded (FSDP) parameter's part of the shard: ``(first row, rows)`` runs of the shard; ``()``: the
    whole shard."""
    fsdp_cut: tuple[int, ...] = ()
    """How a fully sharded part was cut: (parameter rows, FSDP ranks, and the piece's rows of the parameter as
    ``RowBlocks`` offset, length, period, repeats), so a peer's part can be derived (the GPU rehearsal)."""


@dataclass(kw_only=True, slots=True)
class CostModel:
    """Rough per-rank time of each mode, to pick one per matrix. Defaults: an H100 with bf16 Newton–Schulz
    (~400 TFLOP/s achieved on large GEMMs) and ~100 GB/s per GPU between ranks; adjust for other machines."""

    flops_per_s: float = 4e14
    """Achieved Newton–Schulz FLOP/s on one rank."""
    bytes_per_s: float = 1e11
    """Point-to-point bandwidth per rank for the bucketed exchanges (bytes/s)."""
    latency_s: float = 2e-5
    """Latency of one collective (the distributed mode pays one per Newton–Schulz step)."""
    bytes_per_element: int = 4
    """Shards travel in fp32 (the main-grad dtype)."""

    @classmethod
    def for_gpu(cls, name: str, *, across_nodes: bool = False) -> CostModel:
        """The cost model of one GPU of ``GPU_PROFILES`` (``name``: h100 | h200 | b200 | cpu): achieved FLOP/s =
        peak dense bf16 × efficiency; exchanges at NVLink speed inside a node, InfiniBand speed across nodes."""
        if name not in GPU_PROFILES:
            raise ValueError(f"gpu={name!r} is unknown; valid: {sorted(GPU_PROFILES)}")
        profile = GPU_PROFILES[name]
        return cls(
            flops_per_s=profile.achieved_flops_per_s,
            bytes_per_s=profile.inter_node_bytes_per_s if across_nodes else profile.intra_node_bytes_per_s,
            latency_s=profile.latency_s,
        )

    @classmethod
    def for_this_machine(cls) -> CostModel:
        """The defaults on a GPU; on the CPU rough CPU numbers (fp32 Newton–Schulz at ~20 GFLOP/s per rank, gloo
        over loopback at ~1 GB/s, ~100 µs per collective), measured on our 2-core CI machines. The device is the
        one this process computes on: ``MEGATRON_MUON_DEVICE=cpu`` (``platform.device.choose_device``'s override,
        read here so that optim imports nothing of platform) makes CPU ranks on a GPU machine plan as CPU ranks."""
        import os

        import torch

        if torch.cuda.is_available() and os.environ.get("MEGATRON_MUON_DEVICE", "").strip().lower() != "cpu":
            return cls()
        return cls(flops_per_s=2e10, bytes_per_s=1e9, latency_s=1e-4)

    def mode_costs(
        self,
        shape: tuple[int, int],
        num_shards: int,
        num_holders: int,
        long_side_sharded: bool,
        ns_steps: int,
        *,
        group_duplicated_s: float | None = None,
        ns_algorithm: str = "standard",
        gram_restarts: tuple[int, ...] = DEFAULT_GRAM_RESTARTS,
    ) -> dict[str, float]:
        """Seconds each mode adds to the busiest rank of the matrix's holders, per mode that applies.

        ``owner``: the owner receives the ``num_shards - 1`` shards it lacks and sends a direction shard to each of
        the other ``num_holders - 1`` holders (every replica of every shard: without the distributed optimizer each
        DP replica holds the matrix), so its link carries ``(num_holders - 1) / num_shards`` of the matrix out:
        one job of receive, compute, send on one rank, in that order. The bin packing
        spreads owners' jobs over the holders, so a job costs the busiest rank 1 / ``num_holders`` of itself; but
        one job cannot be split, and if it is longer than ``group_duplicated_s`` (what each holder spends when every
        matrix it shares with the same holders runs ``duplicated``; default: this matrix's own) it sets the step by
        itself and costs all of it. That is the fan-out bottleneck: at large DP one owner sends a shard to hundreds
        of replicas.

        Newton–Schulz compute counts the FLOPs of ``ns_algorithm`` (``auto``: the cheaper of standard and Gram
        for the shape each mode computes on); ``distributed`` pays one Gram all-reduce per step (standard) or per
        restart segment (Gram)."""
        rows, cols = shape
        size = rows * cols * self.bytes_per_element
        flops = ns_algorithm_flops(rows, cols, ns_steps, ns_algorithm, gram_restarts)
        compute = flops / self.flops_per_s
        owner_receives = (num_shards - 1) / num_shards * size / self.bytes_per_s
        owner_sends = (num_holders - 1) / num_shards * size / self.bytes_per_s
        duplicated = compute + owner_receives  # every holder gathers the shards it lacks and computes
        owner_job = owner_receives + compute + owner_sends
        bound = duplicated if group_duplicated_s is None else group_duplicated_s
        costs = {
            "duplicated": duplicated,
            "owner": owner_job / num_holders if owner_job <= bound else owner_job,
        }
        if num_shards > 1 and long_side_sharded:
            small = min(rows, cols)
            gram_bytes = small * small * self.bytes_per_element * 2 * (num_shards - 1) / num_shards
            algorithm = choose_ns_algorithm(
                rows, cols, ns_steps, ns_algorithm, gram_restarts, shards=num_shards
            )
            shard_flops = ns_algorithm_flops(
                rows, cols, ns_steps, algorithm, gram_restarts, shards=num_shards
            )
            all_reduces = ns_steps if algorithm == "standard" else 1 + len(gram_restarts)
            costs["distributed"] = shard_flops / self.flops_per_s + all_reduces * (
                gram_bytes / self.bytes_per_s + self.latency_s
            )
        return costs


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuProfile:
    """What the cost model needs to know about one accelerator and its links. Vendor peak figures, times stated
    efficiencies; a prediction, not a measurement."""

    name: str
    peak_bf16_flops_per_s: float
    """Dense bf16 tensor-core peak (no sparsity)."""
    efficiency: float
    """Fraction of the peak Newton–Schulz GEMMs achieve (hidden-size matrices, batched)."""
    memory_bytes: int
    """Device memory."""
    intra_node_bytes_per_s: float
    """Achieved point-to-point bandwidth per GPU inside a node (NVLink), one direction."""
    inter_node_bytes_per_s: float
    """Achieved bandwidth per GPU across nodes (one InfiniBand NIC per GPU), one direction."""
    latency_s: float
    """Latency of one collective."""
    gpus_per_node: int = 8

    @property
    def achieved_flops_per_s(self) -> float:
        return self.peak_bf16_flops_per_s * self.efficiency


# H100 SXM: 989 TFLOP/s dense bf16, NVLink 4 (450 GB/s per direction), ConnectX-7 400 Gb/s per GPU;
# 80 % of the link peaks and 60 % of the FLOP peak are what well-tuned collectives / GEMMs reach.
_H100 = GpuProfile(
    name="H100 SXM 80 GB",
    peak_bf16_flops_per_s=989e12,
    efficiency=0.6,
    memory_bytes=80 * 10**9,
    intra_node_bytes_per_s=0.8 * 450e9,
    inter_node_bytes_per_s=0.8 * 50e9,
    latency_s=2e-5,
)

GPU_PROFILES: dict[str, GpuProfile] = {
    "h100": _H100,
    # H200: the H100's compute and links with 141 GB of HBM3e.
    "h200": dataclasses.replace(_H100, name="H200 SXM 141 GB", memory_bytes=141 * 10**9),
    # B200: 2.25 PFLOP/s dense bf16, NVLink 5 (900 GB/s per direction), ConnectX-8 800 Gb/s per GPU, 180 GB.
    "b200": GpuProfile(
        name="B200 180 GB",
        peak_bf16_flops_per_s=2250e12,
        efficiency=0.6,
        memory_bytes=180 * 10**9,
        intra_node_bytes_per_s=0.8 * 900e9,
        inter_node_bytes_per_s=0.8 * 100e9,
        latency_s=2e-5,
    ),
    # Our 2-core CI machine with 4 gloo ranks over loopback (the world-4 benchmark): the FLOP rate and bandwidth of
    # CostModel.for_this_machine() on a CPU; the latency is what one collective costs when 4 ranks share 2 cores,
    # mostly waiting for a descheduled peer (tools/bench_contended_collective.py: 10-50 ms at load 7-16; 15 ms at
    # the benchmark's load), not the 100 us of an idle loopback. The planner's own CPU figure stays 100 us: it
    # prices only the distributed mode, and the benchmark's plan is the same under both (owner x94).
    "cpu": GpuProfile(
        name="CPU (2 cores, 4 gloo ranks)",
        peak_bf16_flops_per_s=2e10,
        efficiency=1.0,
        memory_bytes=24 * 2**30,
        intra_node_bytes_per_s=1e9,
        inter_node_bytes_per_s=1e9,
        latency_s=1.5e-2,
        gpus_per_node=1 << 30,
    ),
}


@dataclass(slots=True)
class MatrixPlan:
    """The plan for one logical matrix."""

    key: str
    shape: tuple[int, int]
    shard_dim: int
    num_shards: int
    shard_group: str
    holders: dict[int, list[int]]
    """shard index → grid ranks holding that shard (sorted)."""
    mode: str
    cost_flops: float
    """Newton–Schulz FLOPs of one rank that computes it (a ``distributed`` shard: of its slice)."""
    computers: list[int] = field(default_factory=list)
    """Ranks that run Newton–Schulz on the whole matrix (owner: one; duplicated: all holders)."""
    gather: list[tuple[int, int, int]] = field(default_factory=list)
    """(shard, sender, receiver) transfers of gradient shards to computers that lack them."""
    scatter: list[tuple[int, int, int]] = field(default_factory=list)
    """(shard, sender, receiver) transfers of direction shards from a computer to holders that did not compute."""
    bucket: int = 0
    """Exchange bucket: the shards of bucket b travel while the computers orthogonalize bucket b + 1. Buckets hold
    runs of same-shape matrices (``_assign_buckets``), so one batched call covers a shape across layers."""
    momentum_with_shards: bool = False
    """``owner`` mode with the momentum kept by the holders, each of its own shard (the distributed optimizer: one
    holder per shard): they send the owner Newton–Schulz inputs instead of gradients."""
    ns_algorithm: str = "standard"
    """``standard`` or ``gram`` Newton–Schulz (chosen by ``build_muon_plan``'s ``ns_algorithm``)."""
    row_parts: dict[int, dict[int, tuple[tuple[int, int], ...]]] = field(default_factory=dict)
    """Fully sharded (FSDP) matrices: shard index → holder → the ``(first row, rows)`` runs of the shard it holds;
    the holders of a shard partition its rows. Empty when every holder holds whole shards (replicas)."""

    @property
    def all_holders(self) -> list[int]:
        return sorted({r for ranks in self.holders.values() for r in ranks})

    @property
    def partitioned(self) -> bool:
        """Whether the holders hold parts of shards (FSDP) rather than replicas of whole shards."""
        return bool(self.row_parts)

    @property
    def shard_shape(self) -> tuple[int, int]:
        return shard_shape(self.shape, self.shard_dim, self.num_shards)

    def piece_shape(self, shard: int, holder: int) -> tuple[int, int]:
        """Shape of what ``holder`` holds of shard ``shard``: the shard, or its part of the rows."""
        if not self.row_parts:
            return self.shard_shape
        return sum(n for _, n in self.row_parts[shard][holder]), self.shard_shape[1]

    def gram_all_reduces(self, ns_steps: int, gram_restarts: tuple[int, ...]) -> int:
        """All-reduces of the Gram per optimizer step in the ``distributed`` mode: one per Newton–Schulz step
        (standard) or per restart segment (Gram)."""
        return ns_steps if self.ns_algorithm == "standard" else 1 + len(gram_restarts)

    @property
    def long_side_sharded(self) -> bool:
        rows, cols = self.shape
        return (self.shard_dim == 1) == (cols >= rows)


@dataclass(slots=True)
class MuonPlan:
    matrices: list[MatrixPlan]
    loads: dict[int, float]
    """Newton–Schulz FLOPs each grid rank runs per step."""

    def fingerprint(self) -> str:
        text = repr(
            [
                (
                    m.key,
                    m.shape,
                    m.shard_dim,
                    m.num_shards,
                    m.shard_group,
                    m.holders,
                    m.mode,
                    m.computers,
                    m.gather,
                    m.scatter,
                    m.bucket,
                    m.momentum_with_shards,
                    m.ns_algorithm,
                    m.row_parts,
                )
                for m in self.matrices
            ]
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def algorithm_totals(self) -> dict[str, tuple[int, float]]:
        """Newton–Schulz algorithm → (matrices, FLOPs of orthogonalizing each once: a ``distributed`` matrix
        counts all its shards)."""
        totals: dict[str, tuple[int, float]] = {}
        for m in self.matrices:
            count, flops = totals.get(m.ns_algorithm, (0, 0.0))
            copies = m.num_shards if m.mode == "distributed" else 1
            totals[m.ns_algorithm] = (count + 1, flops + m.cost_flops * copies)
        return totals

    def summary(self) -> str:
        counts: defaultdict[str, int] = defaultdict(int)
        for m in self.matrices:
            counts[m.mode] += 1
        loads = sorted(self.loads.values())
        spread = f"{loads[0]:.3g}..{loads[-1]:.3g}" if loads else "-"
        totals = self.algorithm_totals()
        all_flops = sum(flops for _, flops in totals.values()) or 1.0
        algorithms = ", ".join(
            f"{name} {count} ({flops / all_flops:.0%} of FLOPs)"
            for name, (count, flops) in sorted(totals.items())
        )
        return (
            f"{len(self.matrices)} matrices, modes {dict(counts)}, NS algorithms {algorithms or '-'}, "
            f"NS FLOPs per rank {spread}"
        )


def build_muon_plan(
    records_by_rank: list[list[PieceRecord]],
    settings: MuonPlanSettings | None = None,
    *,
    cost_model: CostModel | None = None,
) -> MuonPlan:
    """Build the plan from every grid rank's announced pieces (index = rank in the grid group), as ``settings``
    say (``options.MuonPlanSettings``, validated there; default: its defaults).

    ``settings.num_buckets``: the gathered/orthogonalized/scattered matrices are cut into this many exchange buckets
    of about equal Newton–Schulz cost, so communication of one bucket overlaps computation of the next.
    ``settings.replicate_state=False`` (the distributed optimizer): a sharded matrix never runs ``duplicated``, whose
    every holder would keep the whole momentum; ``auto`` chooses between ``owner`` and ``distributed`` for it, and
    ``distributed`` falls back to ``owner`` where the shards cannot run it. A whole matrix several TP ranks hold
    (the router, MLA's down-projections) is duplicated under ``auto``, as its parameter and fp32 main param are.
    ``settings.momentum_with_shards``: an ``owner`` matrix whose every shard has one holder keeps its momentum with
    the shards (``MatrixPlan.momentum_with_shards``), so the state is spread as the parameters are.
    ``settings.ns_algorithm``: ``auto`` | ``standard`` | ``gram`` (``ops.newton_schulz.choose_ns_algorithm``), chosen
    per matrix once its mode is known; ``settings.gram_restarts`` enter the Gram FLOP count.
    """
    settings = settings or MuonPlanSettings()
    mode, ns_steps, num_buckets = settings.tp_mode, settings.ns_steps, settings.num_buckets
    replicate_state, momentum_with_shards = settings.replicate_state, settings.momentum_with_shards
    ns_algorithm, gram_restarts = settings.ns_algorithm, settings.gram_restarts
    cost_model = cost_model or CostModel.for_this_machine()
    by_key: dict[str, list[tuple[int, PieceRecord]]] = defaultdict(list)
    for rank, records in enumerate(records_by_rank):
        for record in records:
            if record.rows_held != NO_ROWS:
                by_key[record.key].append((rank, record))

    matrices = []
    for key in sorted(by_key):
        entries = by_key[key]
        first = entries[0][1]
        holders: dict[int, list[int]] = defaultdict(list)
        parts: dict[int, dict[int, tuple[tuple[int, int], ...]]] = defaultdict(dict)
        for rank, record in entries:
            same = (record.shape, record.shard_dim, record.num_shards, record.shard_group)
            if same != (first.shape, first.shard_dim, first.num_shards, first.shard_group):
                raise RuntimeError(f"ranks disagree about matrix {key!r}: {first} vs rank {rank}'s {record}")
            holders[record.shard_index].append(rank)
            parts[record.shard_index][rank] = record.rows_held
        missing = sorted(set(range(first.num_shards)) - set(holders))
        if missing:
            raise RuntimeError(f"matrix {key!r}: no rank holds shard(s) {missing} of {first.num_shards}")
        plan = MatrixPlan(
            key=key,
            shape=first.shape,
            shard_dim=first.shard_dim,
            num_shards=first.num_shards,
            shard_group=first.shard_group,
            holders={i: sorted(r) for i, r in sorted(holders.items())},
            mode="",
            cost_flops=0.0,
        )
        if any(runs for by_rank in parts.values() for runs in by_rank.values()):
            plan.row_parts = _check_row_parts(plan, parts)
        matrices.append(plan)
    if mode in ("duplicated", "distributed") and any(m.partitioned for m in matrices):
        raise ValueError(
            f"tp_mode={mode!r} with fully sharded (FSDP) matrices; valid: auto, owner (each matrix is gathered "
            "once to an owner)"
        )

    # What each group of matrices sharing the same holders costs every holder when all run duplicated: the
    # longest single owner job the bin packing can hide (CostModel.mode_costs).
    group_duplicated: defaultdict[tuple[int, ...], float] = defaultdict(float)
    if mode == "auto":
        for matrix in matrices:
            group_duplicated[tuple(matrix.all_holders)] += cost_model.mode_costs(
                matrix.shape,
                matrix.num_shards,
                len(matrix.all_holders),
                matrix.long_side_sharded,
                ns_steps,
                ns_algorithm=ns_algorithm,
                gram_restarts=gram_restarts,
            )["duplicated"]
    for matrix in matrices:
        matrix.mode = _choose_mode(
            matrix,
            mode,
            cost_model,
            ns_steps,
            group_duplicated[tuple(matrix.all_holders)],
            replicate_state,
            ns_algorithm=ns_algorithm,
            gram_restarts=gram_restarts,
        )
        shards = matrix.num_shards if matrix.mode == "distributed" else 1
        rows, cols = matrix.shape
        matrix.ns_algorithm = choose_ns_algorithm(
            rows, cols, ns_steps, ns_algorithm, gram_restarts, shards=shards
        )
        matrix.cost_flops = ns_algorithm_flops(
            rows, cols, ns_steps, matrix.ns_algorithm, gram_restarts, shards=shards
        )

    loads = {rank: 0.0 for rank in range(len(records_by_rank))}
    for matrix in matrices:
        if matrix.mode == "duplicated":
            matrix.computers = matrix.all_holders
        elif matrix.mode == "distributed":
            matrix.computers = matrix.all_holders
        for rank in matrix.computers:
            loads[rank] += matrix.cost_flops

    # Longest-processing-time bin packing of owner matrices over their holders.
    owned = [m for m in matrices if m.mode == "owner"]
    owned.sort(key=lambda m: (-m.cost_flops, m.key))
    for matrix in owned:
        owner = min(matrix.all_holders, key=lambda r: (loads[r], r))
        matrix.computers = [owner]
        loads[owner] += matrix.cost_flops

    for matrix in matrices:
        if matrix.mode != "distributed":
            _assign_transfers(matrix)
    _assign_buckets([m for m in matrices if m.mode != "distributed"], num_buckets)
    if momentum_with_shards:
        for matrix in matrices:
            one_holder_each = all(len(ranks) == 1 for ranks in matrix.holders.values())
            spread = matrix.num_shards > 1 or matrix.partitioned
            matrix.momentum_with_shards = (
                matrix.mode == "owner" and spread and (one_holder_each or matrix.partitioned)
            )
    return MuonPlan(matrices=matrices, loads=loads)


def _check_row_parts(
    matrix: MatrixPlan, parts: dict[int, dict[int, tuple[tuple[int, int], ...]]]
) -> dict[int, dict[int, tuple[tuple[int, int], ...]]]:
    """The holders' runs of each shard of a fully sharded matrix, checked: the distinct parts cover every row
    exactly once (ranks announcing the same runs are replicas of one part: TP ranks of a matrix TP does not split;
    a holder announcing ``()`` holds the whole shard)."""
    shard_rows = matrix.shard_shape[0]
    checked: dict[int, dict[int, tuple[tuple[int, int], ...]]] = {}
    for shard, by_rank in sorted(parts.items()):
        full = {rank: runs or ((0, shard_rows),) for rank, runs in by_rank.items()}
        covered: list[int] = []
        for runs in set(full.values()):
            for start, length in runs:
                covered.extend(range(start, start + length))
        if sorted(covered) != list(range(shard_rows)):
            raise RuntimeError(
                f"matrix {matrix.key!r} shard {shard}: the holders' rows {dict(sorted(full.items()))} do not "
                f"cover rows 0..{shard_rows - 1} exactly once"
            )
        checked[shard] = dict(sorted(full.items()))
    return checked


def part_replicas(matrix: MatrixPlan, shard: int, rank: int) -> list[int]:
    """The holders of shard ``shard`` of a fully sharded matrix that hold the same rows as ``rank`` (sorted)."""
    runs = matrix.row_parts[shard][rank]
    return [r for r, other in matrix.row_parts[shard].items() if other == runs]


def batch_class(matrix: MatrixPlan) -> tuple[tuple[int, int], str]:
    """What the step batches whole matrices by: one batched Newton–Schulz call per (shape, algorithm) and bucket."""
    return matrix.shape, matrix.ns_algorithm


def _assign_buckets(matrices: list[MatrixPlan], num_buckets: int) -> None:
    """Consecutive runs of about equal total Newton–Schulz cost, over ``matrices`` ordered by ``batch_class``.

    The step orthogonalizes each bucket in one batched call per class, so the order decides how many calls a class
    takes: in key order a class (the experts' fc2 of every MoE layer, say) spreads over every bucket, one call per
    bucket; ordered by class, only the ``num_buckets - 1`` bucket boundaries can cut a class, so the same-shape
    matrices of all layers run as one call (two where a boundary falls inside the class)."""
    total = sum(m.cost_flops for m in matrices) or 1.0
    done = 0.0
    for matrix in sorted(matrices, key=lambda m: (batch_class(m), m.key)):
        matrix.bucket = min(num_buckets - 1, int(done / total * num_buckets))
        done += matrix.cost_flops


def _choose_mode(
    matrix: MatrixPlan,
    mode: str,
    cost_model: CostModel,
    ns_steps: int,
    group_duplicated_s: float,
    replicate_state: bool = True,
    *,
    ns_algorithm: str = "standard",
    gram_restarts: tuple[int, ...] = DEFAULT_GRAM_RESTARTS,
) -> str:
    holders = matrix.all_holders
    shared = len(holders) > 1
    sharded = matrix.num_shards > 1
    if mode == "distributed":
        # Only a sharded matrix split along its long side can run the Gram iteration on shards; everything
        # else falls back to duplicated, which is exact too (a matrix held whole needs no communication).
        if sharded and matrix.long_side_sharded:
            return "distributed"
        return "owner" if sharded and not replicate_state else "duplicated"
    if mode != "auto":
        return mode
    if not shared:
        return "duplicated"  # held whole by one rank: local work, nothing to share
    if matrix.partitioned:
        return "owner"  # FSDP: no rank holds a whole shard, so one owner gathers the parts
    if not sharded and not replicate_state:
        # Held whole by several TP ranks of one data-parallel index (the distributed optimizer): its param and
        # fp32 main param are replicated over them anyway; computing it on each moves no bytes (as megatron does).
        return "duplicated"
    costs = cost_model.mode_costs(
        matrix.shape,
        matrix.num_shards,
        len(holders),
        matrix.long_side_sharded,
        ns_steps,
        group_duplicated_s=group_duplicated_s,
        ns_algorithm=ns_algorithm,
        gram_restarts=gram_restarts,
    )
    if sharded and not replicate_state:
        del costs["duplicated"]
    return min(sorted(costs), key=lambda name: costs[name])


def _assign_transfers(matrix: MatrixPlan) -> None:
    """Pick a sender for every shard a computer lacks and a computer for every holder that did not compute.
    Senders rotate over the holders of a shard so no replica sends everything."""
    computers = set(matrix.computers)
    if matrix.partitioned:
        # Every distinct part travels once to the owner (from one of its replicas, in turn), and every holder gets
        # its rows back.
        (owner,) = matrix.computers
        turn = 0
        for shard, by_rank in matrix.row_parts.items():
            mine = by_rank.get(owner)
            for runs in dict.fromkeys(by_rank.values()):
                if runs == mine:
                    continue
                replicas = [rank for rank, other in by_rank.items() if other == runs]
                matrix.gather.append((shard, replicas[turn % len(replicas)], owner))
                turn += 1
            matrix.scatter.extend((shard, owner, rank) for rank in by_rank if rank != owner)
        return
    shard_of = {rank: shard for shard, ranks in matrix.holders.items() for rank in ranks}
    turn = 0
    for receiver in matrix.computers:
        for shard, ranks in matrix.holders.items():
            if shard_of.get(receiver) == shard:
                continue
            sender = ranks[turn % len(ranks)]
            turn += 1
            matrix.gather.append((shard, sender, receiver))
    sources = sorted(computers)
    for shard, ranks in matrix.holders.items():
        for receiver in ranks:
            if receiver in computers:
                continue
            matrix.scatter.append((shard, sources[turn % len(sources)], receiver))
            turn += 1
