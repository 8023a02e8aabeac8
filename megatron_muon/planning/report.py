"""The cluster-scale plan as figures: per rank class and per optimizer mode, memory (distributed optimizer off /
on), Newton–Schulz FLOPs, bytes moved by collective and predicted optimizer-step time; a table and a JSON
document. Formulas: ``cost.py``. Everything here is predicted, not measured."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from megatron_muon.optim.plan import GPU_PROFILES
from megatron_muon.planning.at_scale import LayoutFacts, StageMatrices, collect_layout
from megatron_muon.planning.cost import MODES, RankCost, activation_bytes, layout_costs

if TYPE_CHECKING:
    from megatron_muon.config.schema import ParallelDims, PretrainConfig

__all__ = ["itemized_memory_lines", "plan_at_scale", "render_table"]

_GB = 1e9

JsonObject = dict[str, Any]
"""A JSON-ready dict: the report of :func:`plan_at_scale` and its parts (``json.dumps`` writes it as is)."""


_SHARDED = ("ours + distributed optimizer", "megatron layer-wise")
"""Modes whose master weights and optimizer state are sharded over data parallelism."""
FSDP_MODE = "ours + FSDP"
"""The mode whose parameters and gradients are sharded too (``parallel.fsdp``)."""


def _memory(
    facts: LayoutFacts, stage: StageMatrices, cost: RankCost, mode: str, pp_rank: int
) -> dict[str, float]:
    """Bytes per rank: params, grads, master weights, optimizer state (AdamW + Muon), activations, total
    (``cost.py``)."""
    model, dims = facts.cfg.model, facts.dims
    bf16 = model.precision == "bf16"
    p = stage.parameters
    adamw_dense = p.dense - stage.muon_elements["dense"]
    adamw_expert = p.expert - stage.muon_elements["expert"]
    memory: dict[str, float] = {
        "params": p.total * (2 if bf16 else 4),
        "grads": p.total * 4,
        "activations": activation_bytes(model, dims, facts.cfg.training, pp_rank),
    }
    master_bytes = 4 if bf16 else 0
    if mode == FSDP_MODE:  # fp32 shards of parameters (the masters) and gradients, AdamW state sharded alike
        dense_d, expert_d = dims.dp * dims.cp, dims.expert_dp
        sharded = p.dense / dense_d + p.expert / expert_d
        layers_here = max(1, model.num_layers // dims.pp)
        # What FSDP holds unsharded at a time: about two layers' parameters (model dtype) and gradients (fp32).
        memory["params"] = 4 * sharded + 2 * p.total / layers_here * (2 if bf16 else 4)
        memory["grads"] = 4 * sharded + 2 * p.total / layers_here * 4
        memory["master"] = 0.0
        adamw = adamw_dense / dense_d + adamw_expert / expert_d
    elif mode in _SHARDED:  # megatron's element-sharded DistributedOptimizer for AdamW
        adamw = adamw_dense / (dims.dp * dims.cp) + adamw_expert / dims.expert_dp
        memory["master"] = master_bytes * (adamw + cost.owned_elements)
    else:
        adamw = adamw_dense + adamw_expert
        memory["master"] = master_bytes * p.total
    memory["adamw_state"] = 8 * adamw
    memory["muon_state"] = 4 * cost.muon_state_elements
    memory["optimizer_state"] = memory["adamw_state"] + memory["muon_state"]
    memory["total"] = sum(memory[k] for k in ("params", "grads", "master", "optimizer_state", "activations"))
    return memory


def plan_at_scale(
    cfg: PretrainConfig, dims: ParallelDims, gpu: str, *, with_matrices: bool = True
) -> JsonObject:
    """Everything the tool reports for ``cfg`` at ``dims`` on ``gpu``, as a JSON-ready dict."""
    started = time.perf_counter()
    facts = collect_layout(cfg, dims, gpu)
    costs = layout_costs(facts)
    profile = GPU_PROFILES[gpu]
    flops_per_s, latency = profile.achieved_flops_per_s, profile.latency_s
    stage_of = {s.pp_rank: s for s in facts.stages}
    classes: dict[tuple[int, int, int, int], list[int]] = defaultdict(list)
    for rank, c in enumerate(facts.coordinates):
        classes[(c["pp"], c["tp"], c["ep"], c["etp"])].append(rank)

    modes: dict[str, JsonObject] = {}
    for mode in MODES:
        per_rank = costs[mode]
        memory = {
            r: _memory(
                facts, stage_of[facts.coordinates[r]["pp"]], per_rank[r], mode, facts.coordinates[r]["pp"]
            )
            for r in range(dims.world_size)
        }
        seconds = {r: per_rank[r].step_seconds(flops_per_s, latency) for r in range(dims.world_size)}
        flops = [per_rank[r].ns_flops for r in range(dims.world_size)]

        class_rows: list[JsonObject] = []
        for (pp, tp, ep, etp), ranks in sorted(classes.items()):
            worst = max(ranks, key=lambda r: seconds[r])
            cost = per_rank[worst]
            class_rows.append(
                {
                    "pp": pp,
                    "tp": tp,
                    "ep": ep,
                    "etp": etp,
                    "ranks": len(ranks),
                    "example_rank": worst,
                    "matrices_held": sum(
                        len(v[worst - pp * dims.stage_size]) for v in stage_of[pp].records.values()
                    ),
                    "ns_flops_max": max(per_rank[r].ns_flops for r in ranks),
                    "step_seconds_max": seconds[worst],
                    "bytes_sent": dict(cost.sent),
                    "bytes_received": dict(cost.received),
                    "grad_sync_bytes_sent": dict(cost.grad_sync),
                    "memory_bytes": memory[worst],
                }
            )
        modes[mode] = {
            "step_seconds": max(seconds.values()),
            "step_seconds_without_param_gather": max(
                per_rank[r].step_seconds(flops_per_s, latency, param_gather=False)
                for r in range(dims.world_size)
            ),
            "ns_flops_max": max(flops),
            "ns_flops_mean": sum(flops) / len(flops),
            "bytes_sent_max": max(sum(per_rank[r].sent.values()) for r in range(dims.world_size)),
            "bytes_received_max": max(sum(per_rank[r].received.values()) for r in range(dims.world_size)),
            "grad_sync_bytes_sent_max": max(
                sum(per_rank[r].grad_sync.values()) for r in range(dims.world_size)
            ),
            "memory_max_bytes": max(m["total"] for m in memory.values()),
            "distributed_optimizer": mode in _SHARDED,
            "fsdp": mode == FSDP_MODE,
            "muon_state_bytes": [4 * per_rank[r].muon_state_elements for r in range(dims.world_size)],
            "classes": class_rows,
        }

    plans: dict[str, JsonObject] = {}
    for stage in facts.stages:
        for kind, plan in stage.plans.items():
            first = stage.pp_rank * dims.stage_size
            entry: JsonObject = {"summary": plan.summary()}
            if with_matrices:
                entry["matrices"] = [
                    [
                        m.key,
                        list(m.shape),
                        m.num_shards,
                        m.mode,
                        [first + c for c in m.computers[:4]],
                        len(m.computers),
                    ]
                    for m in plan.matrices
                ]
            plans[f"stage{stage.pp_rank}/{kind}"] = entry
    return {
        "predicted": "every figure is predicted from formulas (megatron_muon/planning/cost.py), not measured",
        "layout": dims.describe(),
        "world_size": dims.world_size,
        "gpu": {"key": gpu, "name": profile.name, "memory_bytes": profile.memory_bytes},
        "cost_model": {
            "flops_per_s": flops_per_s,
            "intra_node_bytes_per_s": profile.intra_node_bytes_per_s,
            "inter_node_bytes_per_s": profile.inter_node_bytes_per_s,
            "latency_s": latency,
            "gpus_per_node": profile.gpus_per_node,
            "plan_bytes_per_s": facts.cost_model.bytes_per_s,
        },
        "parameters_per_rank": {
            f"stage{s.pp_rank}": {
                "total": s.parameters.total,
                "dense": s.parameters.dense,
                "expert": s.parameters.expert,
                "muon": sum(s.muon_elements.values()),
            }
            for s in facts.stages
        },
        "modes": modes,
        "plans": plans,
        "seconds_to_plan": time.perf_counter() - started,
    }


def itemized_memory_lines(report: JsonObject, configured: str) -> list[str]:
    """Our bytes per GPU (the largest rank), item by item, with the distributed optimizer off and on and with
    FSDP; the configured mode (``ours``, ``ours + distributed optimizer`` or ``ours + FSDP``) marked."""
    lines = [
        "memory per GPU, ours, largest rank (PREDICTED; cuda context, NCCL buffers and fragmentation not counted):"
    ]
    labels = {
        "ours": "distributed_optimizer off",
        "ours + distributed optimizer": "distributed_optimizer on",
        FSDP_MODE: "parallel.fsdp on",
    }
    for mode, label in labels.items():
        rows = report["modes"][mode]["classes"]
        mem = max(rows, key=lambda row: row["memory_bytes"]["total"])["memory_bytes"]
        items = " + ".join(
            f"{label} {mem[key] / 2**30:.2f}"
            for key, label in (
                ("params", "params"),
                ("grads", "grads"),
                ("master", "masters"),
                ("adamw_state", "AdamW state"),
                ("muon_state", "Muon momentum"),
                ("activations", "activations"),
            )
        )
        mark = " (configured)" if mode == configured else ""
        lines.append(
            f"  {label}{mark}: {items} = {mem['total'] / 2**30:.2f} GiB "
            f"({(mem['total'] - mem['activations']) / 2**30:.2f} GiB without activations)"
        )
    return lines


def _sharding(mode: JsonObject) -> str:
    if mode.get("fsdp"):
        return "params, grads, state (FSDP)"
    return "masters, state" if mode["distributed_optimizer"] else "no"


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value / _GB:.1f}"


def render_table(report: JsonObject) -> str:
    """A few lines per mode plus the per-class detail of ours."""
    gpu = report["gpu"]
    capacity = gpu["memory_bytes"]
    lines = [
        f"{report['layout']} on {gpu['name']} (PREDICTED, not measured)",
        "parameters per rank: "
        + ", ".join(
            f"{name} {v['total']:,} (Muon {v['muon']:,})" for name, v in report["parameters_per_rank"].items()
        ),
        "",
        "| optimizer | sharded over DP | step (ms) | without DP param all-gather (ms) | NS GFLOP max / mean per rank | sent / received max (GB) "
        f"| grad sync sent (GB) | memory max per rank (GB) | fits {capacity / _GB:.0f} GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, m in report["modes"].items():
        mem = m["memory_max_bytes"]
        fits = "yes" if mem <= capacity else "no"
        lines.append(
            f"| {mode} | {_sharding(m)} | {m['step_seconds'] * 1e3:.1f} | {m['step_seconds_without_param_gather'] * 1e3:.1f} | {m['ns_flops_max'] / 1e9:,.0f} / "
            f"{m['ns_flops_mean'] / 1e9:,.0f} | {m['bytes_sent_max'] / _GB:.2f} / {m['bytes_received_max'] / _GB:.2f} "
            f"| {m['grad_sync_bytes_sent_max'] / _GB:.2f} | {_gb(mem)} | {fits} |"
        )
    lines += ["", *[f"plan {name}: {entry['summary']}" for name, entry in report["plans"].items()]]
    lines += ["", "ours, per rank class (pp, tp, ep, etp; the slowest rank of each class):", ""]
    lines.append(
        "| pp tp ep etp | ranks | matrices | NS GFLOP | step (ms) | params+grads+master+state+act (GB) |"
    )
    lines.append("|---|---:|---:|---:|---:|---|")
    rows = report["modes"]["ours"]["classes"]
    shown = rows if len(rows) <= 16 else rows[:8] + rows[-8:]
    for row in shown:
        mem = row["memory_bytes"]
        parts = "+".join(_gb(mem[k]) for k in ("params", "grads", "master", "optimizer_state", "activations"))
        lines.append(
            f"| {row['pp']} {row['tp']} {row['ep']} {row['etp']} | {row['ranks']} | {row['matrices_held']} | "
            f"{row['ns_flops_max'] / 1e9:,.0f} | {row['step_seconds_max'] * 1e3:.1f} | {parts} = {_gb(mem['total'])} |"
        )
    if len(rows) > len(shown):
        lines.append(f"({len(rows) - len(shown)} more classes in the JSON)")
    lines.append(f"\nplanned in {report['seconds_to_plan']:.1f} s")
    return "\n".join(lines)
