"""The optimizer at cluster scale, predicted per rank: logical matrices, plan, memory, communication and time.

Where the facts come from:

* **Matrices**: one rank per pipeline stage (TP, EP and expert-TP rank 0) is built on meta
  (``meta_build.build_rank_on_meta``: megatron's model, our routing and ``optim/layout.py``). Every other rank of
  the stage holds the same pieces with its own shard index (its TP / expert-TP rank) and, for routed experts, the
  global expert ids ``ep_rank · local + i`` (megatron's contiguous expert placement). The tests check this
  derivation against ranks built on meta.
* **Rank coordinates**: megatron's own ``RankGenerator`` (order ``tp-cp-ep-dp-pp``), so groups are megatron's.
* **Plan**: ``optim/plan.build_muon_plan`` on the records of every grid rank, once for the dense and once for the
  expert Muon optimizer of each stage (as ``optim/build.py`` builds them), with ``CostModel.for_gpu``.

The memory, communication and time formulas are in ``cost.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from megatron_muon.optim.layout import MatrixPiece
from megatron_muon.optim.options import MuonPlanSettings
from megatron_muon.optim.plan import GPU_PROFILES, CostModel, MuonPlan, PieceRecord, build_muon_plan
from megatron_muon.planning.rank_params import RankParameters, parameters_of_stage

if TYPE_CHECKING:
    from megatron_muon.config.schema import ParallelDims, PretrainConfig
    from megatron_muon.planning.meta_build import MetaRank

__all__ = ["LayoutFacts", "StageMatrices", "collect_layout", "derive_stage", "rank_coordinates"]

_EXPERT_ID = re.compile(r"local_experts\.(\d+)\.")

_Templates = dict[str, list[tuple[MatrixPiece, int | None]]]
"""dense / expert → the pieces of a rank built on meta, each with its local expert index (None for dense)."""


def rank_coordinates(dims: ParallelDims) -> list[dict[str, int]]:
    """Per global rank: pp, tp, cp, dp, ep, etp, edp and its index in the stage's grid group, from megatron's
    ``RankGenerator`` (the groups ``initialize_model_parallel`` creates)."""
    from megatron.core.parallel_state import RankGenerator

    order = "tp-cp-ep-dp-pp"
    decoder = RankGenerator(tp=dims.tp, ep=1, dp=dims.dp, pp=dims.pp, cp=dims.cp, order=order)
    expert = RankGenerator(tp=dims.etp, ep=dims.ep, dp=dims.expert_dp, pp=dims.pp, cp=1, order=order)
    coordinates: list[dict[str, int]] = [{} for _ in range(dims.world_size)]
    for generator, names in ((decoder, ("tp", "cp", "dp", "pp")), (expert, ("ep",))):
        for name in names:
            for group in generator.get_ranks(name):
                for index, rank in enumerate(group):
                    coordinates[rank][name] = index
    for name, token in (("etp", "tp"), ("edp", "dp")):
        for group in expert.get_ranks(token):
            for index, rank in enumerate(group):
                coordinates[rank][name] = index
    for rank, coordinate in enumerate(coordinates):
        coordinate["grid"] = rank - coordinate["pp"] * dims.stage_size
    return coordinates


@dataclass(slots=True)
class StageMatrices:
    """The Muon pieces of one pipeline stage, per grid rank, and the plans built from them."""

    pp_rank: int
    parameters: RankParameters
    """Parameter elements of every rank of the stage (formula, checked against the meta build)."""
    muon_elements: dict[str, int]
    """dense / expert: elements of the Muon parameters one rank holds."""
    records: dict[str, list[list[PieceRecord]]]
    """dense / expert → per grid rank, the pieces it announces."""
    plans: dict[str, MuonPlan] = field(default_factory=dict)


@dataclass(slots=True)
class LayoutFacts:
    """What ``cost.py`` predicts from: a config at a layout on a GPU kind, every rank's coordinates and every
    pipeline stage's Muon matrices and plans."""

    cfg: PretrainConfig
    dims: ParallelDims
    gpu: str
    """A key of ``GPU_PROFILES``."""
    coordinates: list[dict[str, int]]
    """Per global rank: its pp, tp, cp, dp, ep, etp, edp and grid index (:func:`rank_coordinates`)."""
    stages: list[StageMatrices]
    cost_model: CostModel
    """The cost model the plan chose modes with (bandwidth of the links the grid group spans)."""

    @property
    def gpus_per_node(self) -> int:
        """GPUs in one node of this GPU kind (NVLink inside, InfiniBand between nodes)."""
        return GPU_PROFILES[self.gpu].gpus_per_node


def _template_records(meta_rank: MetaRank) -> tuple[_Templates, dict[str, int]]:
    """(kind → [(piece, local expert index or None)], kind → Muon elements) of a rank built on meta."""
    templates: _Templates = {"dense": [], "expert": []}
    elements = {"dense": 0, "expert": 0}
    expert_names = {name for name, _, is_expert in meta_rank.muon_pieces if is_expert}
    for routed in meta_rank.routing.muon:
        elements["expert" if routed.name in expert_names else "dense"] += routed.param.numel()
    for name, pieces, is_expert in meta_rank.muon_pieces:
        for piece in pieces:
            if not is_expert:
                templates["dense"].append((piece, None))
                continue
            match = _EXPERT_ID.search(piece.key)
            if match is None:
                raise ValueError(f"expert parameter {name!r} has no expert id in its key {piece.key!r}")
            templates["expert"].append((piece, int(match.group(1))))
    return templates, elements


def _records_for(
    templates: _Templates, kind: str, coordinate: dict[str, int], experts_per_rank: int
) -> list[PieceRecord]:
    records = []
    for piece, template_expert in templates[kind]:
        key = piece.key
        if kind == "dense":
            shard_index = coordinate["tp"] if piece.num_shards > 1 else 0
        else:
            assert template_expert is not None  # every expert template has its local index
            expert_id = template_expert + coordinate["ep"] * experts_per_rank
            key = _EXPERT_ID.sub(f"local_experts.{expert_id}.", key, count=1)
            shard_index = coordinate["etp"] if piece.num_shards > 1 else 0
        records.append(
            PieceRecord(
                key=key,
                shape=piece.shape,
                shard_dim=piece.shard_dim,
                num_shards=piece.num_shards,
                shard_index=shard_index,
                shard_group="tp" if kind == "dense" else "expert_tp",
            )
        )
    return records


def derive_stage(
    cfg: PretrainConfig, dims: ParallelDims, pp_rank: int, coordinates: list[dict[str, int]]
) -> StageMatrices:
    """Build stage ``pp_rank``'s first rank on meta and derive every grid rank's pieces from it."""
    from megatron_muon.planning.meta_build import build_rank_on_meta

    if cfg.optimizer.muon.qkv_per_head:
        raise ValueError(
            "optimizer.muon.qkv_per_head=true: per-head keys depend on the TP rank and are not derived at scale; "
            "plan with qkv_per_head=false"
        )
    first = pp_rank * dims.stage_size
    meta_rank = build_rank_on_meta(cfg, dims, first)
    templates, elements = _template_records(meta_rank)
    parameters = parameters_of_stage(cfg.model, dims, pp_rank, transformer_impl="local")  # what meta builds
    if parameters.total != meta_rank.parameter_count:
        raise RuntimeError(
            f"stage {pp_rank}: the parameter formula gives {parameters.total:,} but the model built on meta holds "
            f"{meta_rank.parameter_count:,}"
        )
    experts_per_rank = cfg.model.num_moe_experts // dims.ep if cfg.model.num_moe_experts else 0
    stage_ranks = range(first, first + dims.stage_size)
    # Replicas (ranks with the same TP, resp. EP and expert-TP, coordinates) share one list object, which the
    # cost model uses to compute each distinct rank once.
    records: dict[str, list[list[PieceRecord]]] = {}
    for kind, axes in (("dense", ("tp",)), ("expert", ("ep", "etp"))):
        distinct: dict[tuple[int, ...], list[PieceRecord]] = {}
        records[kind] = []
        for rank in stage_ranks:
            position = tuple(coordinates[rank][a] for a in axes)
            if position not in distinct:
                distinct[position] = _records_for(templates, kind, coordinates[rank], experts_per_rank)
            records[kind].append(distinct[position])
    return StageMatrices(pp_rank=pp_rank, parameters=parameters, muon_elements=elements, records=records)


def collect_layout(cfg: PretrainConfig, dims: ParallelDims, gpu: str) -> LayoutFacts:
    """Every stage's matrices and our plans for ``cfg`` at ``dims`` on ``gpu`` (a key of ``GPU_PROFILES``)."""
    if gpu not in GPU_PROFILES:
        raise ValueError(f"gpu={gpu!r} is unknown; valid: {sorted(GPU_PROFILES)}")
    across_nodes = dims.stage_size > GPU_PROFILES[gpu].gpus_per_node
    cost_model = CostModel.for_gpu(gpu, across_nodes=across_nodes)
    coordinates = rank_coordinates(dims)
    stages = [derive_stage(cfg, dims, p, coordinates) for p in range(dims.pp)]
    muon = cfg.optimizer.muon
    for stage in stages:
        for kind, records in stage.records.items():
            if any(records):
                stage.plans[kind] = build_muon_plan(
                    records,
                    MuonPlanSettings(
                        tp_mode=muon.tp_mode,
                        ns_steps=muon.ns_steps,
                        ns_algorithm=muon.planned_ns_algorithm,
                        gram_restarts=tuple(muon.ns_gram_restarts),
                    ),
                    cost_model=cost_model,
                )
    return LayoutFacts(
        cfg=cfg, dims=dims, gpu=gpu, coordinates=coordinates, stages=stages, cost_model=cost_model
    )
