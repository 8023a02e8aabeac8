"""The markdown of ``tools/bench_muon_step.py`` (``muon_step.py`` measures): one table per model and layout, and
a summary of ours against megatron-core's best exact mode, side by side."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
from typing import Any

from megatron_muon.bench.report import cpu_description

START_MARKER = "<!-- bench_muon_step:start -->"
END_MARKER = "<!-- bench_muon_step:end -->"
WORLD_SIZE = 4
LAYOUT_TITLES = {
    "tp2_dp2": "TP2·DP2 (experts: ETP1·EP1·EDP4)",
    "tp2_ep2": "TP2·EP2 (dense DP2; experts: ETP1·EP2·EDP2)",
}
REFERENCE = "ours auto"
GOAL = 0.75
"""Issue #22 item 5: ours auto ÷ megatron-core's best exact mode."""


def best_exact_megatron(rows: dict[str, dict[str, Any]], *, as_shipped: bool = False) -> str | None:
    """The fastest megatron contender that computes the exact update (``as_shipped``: without the layer-wise
    workaround), or ``None`` when none ran."""
    candidates = {
        name: row["median_s"]
        for name, row in rows.items()
        if row["contender"]["family"] == "megatron"
        and row["contender"]["exact"]
        and row["error"] is None
        and not (as_shipped and row["contender"]["layer_wise"])
    }
    return min(candidates, key=candidates.__getitem__) if candidates else None


def summary_table(measured: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Ours auto against megatron's best exact mode, one row per model and layout, from one run."""
    lines = [
        "### Side by side: ours auto ÷ megatron-core's best exact mode",
        "",
        f"| model | layout | ours auto (ms) | megatron's best exact mode | its step (ms) | ÷ (goal ≤ {GOAL}) |",
        "|---|---|---:|---|---:|---:|",
    ]
    for (model_name, layout_name), result in measured.items():
        rows = result["rows"]
        best = best_exact_megatron(rows)
        ours = rows[REFERENCE].get("median_s")
        if best is None or ours is None:
            lines.append(f"| {model_name} | {layout_name} | {ours} | none ran | | |")
            continue
        theirs = rows[best]["median_s"]
        ratio = ours / theirs
        verdict = "met" if ratio <= GOAL else "**not met**"
        label = best + (" (workaround)" if rows[best]["contender"]["layer_wise"] else "")
        lines.append(
            f"| {model_name} | {LAYOUT_TITLES[layout_name].split(' ')[0]} | {ours * 1e3:.0f} | {label} "
            f"| {theirs * 1e3:.0f} | {ratio:.2f} ({verdict}) |"
        )
    lines.append("")
    return lines


def format_bytes(count: int) -> str:
    """``count`` bytes in MiB, two decimals."""
    return f"{count / 2**20:.2f}"


def render_layout_table(
    layout_name: str, measured: dict[str, Any], grid_size: int, model_name: str
) -> list[str]:
    """The markdown table of one model at one layout: every mode's measured step beside the reference's."""
    rows = measured["rows"]
    reference = rows[REFERENCE]
    lines = [
        f"### {LAYOUT_TITLES[layout_name]}, {model_name} model",
        "",
        "| optimizer | Newton–Schulz placement | exact | step median (ms) | min–max (ms) | ÷ ours auto "
        "| Muon state per rank, min–max (MiB) | max rel. diff vs ours auto (all but fc1) "
        "| max rel. diff vs single-process reference |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        contender = row["contender"]
        if contender["family"] == "ours":
            placement = ", ".join(f"{mode} ×{count}" for mode, count in sorted(row.get("modes", {}).items()))
            if row.get("ns_flops_per_rank"):
                loads = row["ns_flops_per_rank"]
                placement += f"; NS {loads[0] / 1e9:.1f}–{loads[-1] / 1e9:.1f} GFLOP per rank"
        else:
            placement = contender["tp_mode"] + (
                " + layer-wise DP sharding" if contender["layer_wise"] else ""
            )
        exact = "yes" if contender["exact"] else "**no**"
        label = name + (" (workaround)" if contender["layer_wise"] else "")
        if row["error"] is not None:
            lines.append(f"| {label} | {placement} | {exact} | failed: `{row['error']}` | | | | | |")
            continue
        ratio = row["median_s"] / reference["median_s"] if reference.get("median_s") else float("nan")
        state = row["state_bytes"]
        agreement = row["agreement"]
        vs_ours = (
            "—" if name == REFERENCE else f"{agreement['vs_ours']:.1e}" if "vs_ours" in agreement else "n/a"
        )
        vs_reference = f"{agreement['vs_reference']:.1e}" if "vs_reference" in agreement else "n/a"
        lines.append(
            f"| {label} | {placement} | {exact} | {row['median_s'] * 1e3:.0f} "
            f"| {row['min_s'] * 1e3:.0f}–{row['max_s'] * 1e3:.0f} | {ratio:.2f} "
            f"| {format_bytes(min(state))}–{format_bytes(max(state))} | {vs_ours} | {vs_reference} |"
        )
    shipped = [(name, row["shipped_error"]) for name, row in rows.items() if row["shipped_error"]]
    lines.append("")
    for name, error in shipped:
        lines.append(f"- `{name}` as shipped (no workaround) failed: `{error}`")
    for as_shipped, what in (
        (False, "best exact mode"),
        (True, "best exact mode that runs as shipped (no layer-wise)"),
    ):
        best = best_exact_megatron(rows, as_shipped=as_shipped)
        if best is not None and reference.get("median_s"):
            lines.append(
                f"- **ours auto ÷ megatron's {what} ({best}) = "
                f"{reference['median_s'] / rows[best]['median_s']:.2f}** (goal ≤ {GOAL})"
            )
    same_plan: dict[tuple[Any, ...], list[str]] = {}
    for name, row in rows.items():
        if row["contender"]["family"] == "ours" and row.get("modes"):
            same_plan.setdefault(
                (tuple(sorted(row["modes"].items())), tuple(row["ns_flops_per_rank"])), []
            ).append(name)
    for names in same_plan.values():
        if len(names) > 1:
            medians = [rows[name]["median_s"] for name in names]
            lines.append(
                f"- Noise: {' and '.join(f'`{n}`' for n in names)} run the same plan; their medians differ by "
                f"{(max(medians) / min(medians) - 1) * 100:.0f}%."
            )
    flops = measured.get("stage_flops")
    if flops:
        lines.append(
            f"- Newton–Schulz work of one step over the stage's Muon matrices, each once: ours "
            f"{flops['ours'] / 1e9:.1f} GFLOP (fc1 split), megatron {flops['megatron'] / 1e9:.1f} GFLOP (fc1 "
            f"fused); spread evenly over the {grid_size} ranks that is {flops['ours'] / grid_size / 1e9:.1f} / "
            f"{flops['megatron'] / grid_size / 1e9:.1f} GFLOP per rank, the floor for any exact mode."
        )
    if reference.get("stage_muon_state_bytes"):
        target = reference["stage_muon_state_bytes"] / grid_size
        lines.append(
            f"- Muon state target for ours: the stage's Muon state "
            f"({format_bytes(reference['stage_muon_state_bytes'])} MiB, every logical matrix once, fp32) ÷ "
            f"(TP·DP = {grid_size}) = {format_bytes(int(target))} MiB per rank; ours auto keeps "
            f"{format_bytes(min(reference['state_bytes']))}–{format_bytes(max(reference['state_bytes']))} MiB"
        )
    lines.append(
        f"- wall time of this layout's run (all contenders, start-up included): {measured['wall_s']:.0f} s; "
        f"load average before: {measured['load_before']}, after: {measured['load_after']}"
    )
    lines.append("")
    return lines


def render_section(
    args: argparse.Namespace,
    command: str,
    models: dict[str, dict[str, Any]],
    measured: dict[tuple[str, str], dict[str, Any]],
) -> str:
    """The whole benchmarks.md section: the command, the machine and versions, every table and the summary."""
    versions = {
        name: importlib.metadata.version(name) for name in ("torch", "megatron-core", "emerging-optimizers")
    }
    lines = [
        START_MARKER,
        "## One Muon optimizer step: ours vs megatron-core's own Muon (CPU, 4 gloo ranks)",
        "",
        "Written by `tools/bench_muon_step.py`; rerun it to refresh this section:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"- CPU: {cpu_description()}. **4 gloo ranks share these cores** (`torch.set_num_threads(1)` per rank): "
        "timings are contended — with more ranks than cores, work one rank saves frees a core for another, so "
        "ratios are indicative, not what a GPU cluster would show.",
        f"- torch {versions['torch']}, megatron-core {versions['megatron-core']}, emerging-optimizers "
        f"{versions['emerging-optimizers']}, Python {platform.python_version()}",
        *(
            f"- {name} model: `ModelConfig({', '.join(f'{k}={v}' for k, v in model.items())})`, "
            f"MoE layers 1–{model['num_layers'] - 1} (layer 0 dense), fp32 params and gradients."
            for name, model in models.items()
        ),
        f"- Step time: median over {args.steps} rounds after {args.warmup} warm-up rounds (plus one agreement "
        "step) of the slowest rank's `optimizer.step()` (whole chained optimizer: Muon + AdamW), between two "
        "`barrier()`s; canonical gradients are written into `main_grad` before each step, outside the clock. "
        "Every round steps every contender once (round-robin), so load from other processes on the machine "
        "hits all of them alike; load average (1/5/15 min) per layout is listed under its table.",
        f"- Matched settings: lr {args.lr}, decoupled weight decay {args.weight_decay}, momentum "
        f"{args.momentum} Nesterov, {args.ns_steps} Newton–Schulz steps of Keller Jordan's quintic "
        "(3.4445, −4.7750, 2.0315) (ours `quintic` = EO's `simple`), scale √(fan_out/fan_in) (ours `spectral` = "
        'EO\'s `unit_rms_norm`), fp32 Newton–Schulz (megatron `muon_fp32_matmul_prec="highest"`; its default '
        '`"medium"` makes Emerging-Optimizers cast the iterate to bf16, on CPU too), Q/K/V split '
        '(`muon_split_qkv=True`), router in Muon (megatron\'s routing; ours `router="muon"`). Not matchable: '
        "megatron orthogonalizes SwiGLU `linear_fc1` as one fused [gate; up] matrix, ours as two (our layout "
        "refuses a fused fc1 under TP); for these square gate/up blocks ours does ~20% more Newton–Schulz FLOPs "
        "on fc1.",
        "- Max rel. diff: after one step from the same canonical weights and gradients, the largest over Muon "
        "matrices (router not collected) of ‖W − W_x‖_F / ‖W_x − W₀‖_F, i.e. relative to the weight change, for "
        "W_x = ours auto (on the matrices both define alike: all but fc1) and W_x = a single-process Muon "
        "(`ReferenceMuon`, fp32) on the contender's own matrices (fc1 fused for megatron). `blockwise` "
        "orthogonalizes each TP shard separately and is not the same update.",
        "- `ours auto` picks a mode per matrix with its default cost model, `CostModel.for_this_machine()` (on "
        "a CPU-only machine: 20 GFLOP/s, 1 GB/s, 100 µs per collective). `ours auto, H100 cost model` is given "
        "the GPU defaults `CostModel()` (400 TFLOP/s, 100 GB/s) instead: they make Newton–Schulz look cheaper "
        "than moving a matrix, so every replica of an expert matrix orthogonalizes it itself (`duplicated`).",
        "- Layer-wise: megatron's `LayerWiseDistributedOptimizer` fails with fp32 params as shipped (error below). "
        "The rows marked *workaround* run it under two benchmark-local patches (`_layer_wise_cpu_workarounds`): "
        "its base optimizers wrapped in megatron's `FP32Optimizer` (as its non-layer-wise path does), and "
        "`torch.distributed.all_gather` padding the uneven per-rank shards its parameter all-gather sends (NCCL "
        "takes uneven sizes, gloo does not). The padding adds one copy of the gathered parameters per step.",
        "",
    ]
    lines += summary_table(measured)
    for (model_name, layout_name), result in measured.items():
        grid = WORLD_SIZE  # the pipeline stage's TP x DP grid (PP = 1)
        lines += render_layout_table(layout_name, result, grid, model_name)
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"
