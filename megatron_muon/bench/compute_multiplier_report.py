"""The markdown section, figure and frontier data of ``bench/compute_multiplier.py``'s study, from its recorded rows
(the analysis: ``bench/scaling_fit.py``)."""

from __future__ import annotations

import contextlib
import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_muon.bench.launcher_runs import REPO
from megatron_muon.bench.report import cpu_description, rerun_command
from megatron_muon.bench.scaling_fit import (
    ComputeRatio,
    Point,
    PowerLaw,
    compute_ratios,
    frontier,
    shared_losses,
)
from megatron_muon.config import load_config

OPTIMIZERS = ("adamw", "muon")
NAMES = {"adamw": "AdamW", "muon": "Muon"}
COMPUTE = {"model": "model FLOPs", "with_ns": "model + Newton–Schulz FLOPs"}

Row = dict[str, str]
"""One recorded run (``compute_multiplier.FIELDS``)."""


@dataclass(frozen=True, slots=True)
class StudyRuns:
    """The recorded runs the section is written from."""

    grids: dict[str, list[Row]]
    """Per optimizer, its LR grid at the base width (the tuned LR is the grid's best)."""
    transfer: list[Row]
    """Every width × budget × seed × optimizer at the tuned LRs."""
    check: list[Row]
    """At the largest width: per optimizer the tuned LR ×½, ×1, ×2, in that order."""


def _lr(row: Row) -> float:
    return float(row["adamw_lr"] if row["optimizer"] == "adamw" else row["muon_lr"])


def _compute(row: dict[str, str], kind: str) -> float:
    return float(row["flops"]) + (float(row["ns_flops"]) if kind == "with_ns" else 0.0)


def run_points(transfer: Sequence[Row], optimizer: str, kind: str, seed: int | None = None) -> list[Point]:
    """(compute, loss) per width × budget of ``optimizer``: one seed's, or (``seed=None``) the mean over seeds."""
    by_run: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in transfer:
        if row["optimizer"] == optimizer and (seed is None or int(row["seed"]) == seed):
            point = (_compute(row, kind), float(row["val_loss"]))
            by_run.setdefault((row["width"], row["steps"]), []).append(point)
    return [(values[0][0], statistics.fmean(loss for _, loss in values)) for values in by_run.values()]


def comparison(
    transfer: Sequence[Row], kind: str, seed: int | None = None, losses: Sequence[float] | None = None
) -> tuple[PowerLaw, PowerLaw, list[ComputeRatio]]:
    """(AdamW law, Muon law, ratios at ``losses`` or at 3 losses both frontiers cover) for one seed or the mean."""
    adamw, muon = (frontier(run_points(transfer, o, kind, seed)) for o in OPTIMIZERS)
    return compute_ratios(adamw, muon, shared_losses(adamw, muon) if losses is None else losses)


def _seeds(transfer: Sequence[Row]) -> list[int]:
    return sorted({int(row["seed"]) for row in transfer})


def _best_marked(values: Sequence[float]) -> list[str]:
    best = min(values)
    return [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in values]


def markdown_section(
    found: StudyRuns,
    steps: Sequence[int],
    tune_steps: int,
    setting: dict[str, str],
    results: str,
    argv: Sequence[str] | None,
) -> str:
    """The section: setup, the base LR grids, the transfer check, every run, and the compute ratios."""
    grids, transfer, check = found.grids, found.transfer, found.check
    seeds = _seeds(transfer)
    rows_by_width: dict[int, Row] = {}
    for row in transfer:
        rows_by_width.setdefault(int(row["width"]), row)
    muon_adamw_lr = float(min(grids["muon"], key=lambda row: float(row["val_loss"]))["adamw_lr"])
    adamw_lr = _lr(min(grids["adamw"], key=lambda row: float(row["val_loss"])))
    if muon_adamw_lr == adamw_lr:
        muon_adamw = (
            f"at AdamW's tuned LR ({adamw_lr:g}; Moonlight's protocol: one LR for what AdamW updates)"
        )
    else:
        muon_adamw = (f"at {muon_adamw_lr:g}, the config's (tuned jointly with the Muon LR at the base, issue #16), "
                      f"not AdamW's tuned {adamw_lr:g}: Muon's runs have two tuned LRs, AdamW's one")  # fmt: skip
    widths = sorted(rows_by_width)
    cfg = load_config(REPO / setting["config"])
    model, training = cfg.model, cfg.training
    step_tokens = training.global_batch_size * model.seq_length
    architecture = f"{model.num_layers} layers" + (
        f", {model.num_moe_experts} experts top-{model.moe_router_topk} in its MoE layers"
        if model.num_moe_experts
        else ""
    )
    n_active = ", ".join(f"{w}: {int(rows_by_width[w]['active_params']) / 1e6:.2f} M" for w in widths)
    lines = [
        "<!-- compute_multiplier:start -->",
        "## Compute multiplier: Muon against AdamW across model sizes (issue #23 item 3)",
        "",
        f"Written by `tools/compute_multiplier.py` from `{results}` (it trains only what the file lacks for this code "
        "version; `--publish-only` trains nothing):",
        "",
        "```bash",
        rerun_command("compute_multiplier.py", None if argv is None else list(argv)),
        "```",
        "",
        f"- CPU: {cpu_description()}; one thread per run; code version `{setting['code_version']}`.",
        f"- Model: `{setting['config']}` (muP, base width {widths[0]}; {architecture}) at widths {', '.join(map(str, widths))}, every hidden dim in proportion; N_active = {n_active} "
        "(embedding and output layer included). Budgets: "
        f"{' / '.join(map(str, steps))} steps × {step_tokens:,} tokens, {cfg.optimizer.decay_style} with "
        f"{cfg.optimizer.warmup_iters} warm-up steps; seeds {seeds} (a seed changes the init and the data order). "
        f"Score: validation loss on the same {training.eval_iters} × {step_tokens:,} held-out tokens.",
        f"- LRs tuned once, at width {widths[0]}, {tune_steps} steps, seed {seeds[0]}, on grids ×2 apart "
        "(extended while the best was on an edge), then used at every width and budget (muP transfer). Muon's "
        f"AdamW part (embeddings, output layer, norms, router) {muon_adamw}. The router's LR is × "
        f"{cfg.optimizer.router_lr_multiplier:g} of that in Muon's runs (a base multiplier tuned with Muon, issue "
        "#16) and × 1 in AdamW's (the config refuses the multiplier without Muon).",
        "- Compute C = 6 · N_active · tokens + attention (`local_run.trial_flops`). Muon's Newton–Schulz FLOPs "
        f"(every logical matrix once per step) are shown separately: at {step_tokens:,} tokens per step they are "
        f"{_ns_share(transfer, widths[0])} of the model FLOPs at width {widths[0]} and "
        f"{_ns_share(transfer, widths[-1])} at {widths[-1]}, where at a real batch (millions of tokens per step) "
        "they are under 1 %; the model-FLOPs reading is the one comparable to Moonlight's.",
        "",
        f"### LR tuning at width {widths[0]} ({tune_steps} steps, seed {seeds[0]})",
        "",
        "| optimizer | LR | validation loss |",
        "|---|---:|---:|",
    ]
    for optimizer in OPTIMIZERS:
        grid = grids[optimizer]
        cells = _best_marked([float(row["val_loss"]) for row in grid])
        for row, cell in zip(grid, cells, strict=True):
            lines.append(f"| {NAMES[optimizer]} | {_lr(row):g} | {cell} |")
    edges = [NAMES[o] for o in OPTIMIZERS if _best_on_edge(grids[o])]
    if edges:
        lines += ["", f"(edge) {' and '.join(edges)}: the best LR is still the end of its grid after the "
                  "extensions; the optimum may lie beyond it."]  # fmt: skip
    lines += [
        "",
        f"### The transferred LR at width {widths[-1]} ({tune_steps} steps, seed {seeds[0]}): ×½, ×1, ×2",
        "",
        "| optimizer | LR ×½ | LR ×1 (transferred) | LR ×2 | transferred LR best of three |",
        "|---|---:|---:|---:|---|",
    ]
    for optimizer in OPTIMIZERS:
        points = [row for row in check if row["optimizer"] == optimizer]
        losses = [float(row["val_loss"]) for row in points]
        cells = [f"{c} ({_lr(row):g})" for c, row in zip(_best_marked(losses), points, strict=True)]
        verdict = "yes" if losses[1] == min(losses) else f"no: {min(losses) - losses[1]:+.4f} at the best"
        lines.append(f"| {NAMES[optimizer]} | {' | '.join(cells)} | {verdict} |")
    lines += _runs_table(transfer, widths, steps, seeds)
    lines += _fit_tables(transfer, seeds)
    lines += ["", "<!-- compute_multiplier:end -->"]
    return "\n".join(lines) + "\n"


def _best_on_edge(grid: Sequence[Row]) -> bool:
    """Whether the grid's (ordered by LR) best run is its first or last."""
    ordered = sorted(grid, key=_lr)
    best = min(range(len(ordered)), key=lambda i: float(ordered[i]["val_loss"]))
    return best in (0, len(ordered) - 1)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _ns_share(transfer: Sequence[Row], width: int) -> str:
    for row in transfer:
        if row["optimizer"] == "muon" and int(row["width"]) == width:
            return f"{float(row['ns_flops']) / float(row['flops']):.0%}"
    return "n/a"


def _runs_table(
    transfer: Sequence[Row], widths: Sequence[int], steps: Sequence[int], seeds: Sequence[int]
) -> list[str]:
    on_frontier = {o: set(frontier(run_points(transfer, o, "model"))) for o in OPTIMIZERS}
    lines = [
        "",
        f"### Every run (validation loss, mean over seeds {seeds}; *: on that optimizer's compute-optimal frontier)",
        "",
        "| width | steps | C (10¹² FLOPs) | AdamW | Muon | Muon − AdamW | Muon's C with Newton–Schulz |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for width in widths:
        for step in steps:
            cells: dict[str, tuple[float, str]] = {}
            compute, with_ns = 0.0, 0.0
            for optimizer in OPTIMIZERS:
                rows = [
                    r
                    for r in transfer
                    if (r["optimizer"], r["width"], r["steps"]) == (optimizer, str(width), str(step))
                ]
                loss = statistics.fmean(float(r["val_loss"]) for r in rows)
                compute = float(rows[0]["flops"])
                if optimizer == "muon":
                    with_ns = _compute(rows[0], "with_ns")
                mark = "*" if (compute, loss) in on_frontier[optimizer] else ""
                cells[optimizer] = (loss, mark)
            diff = cells["muon"][0] - cells["adamw"][0]
            lines.append(
                f"| {width} | {step} | {compute / 1e12:.3f} | {cells['adamw'][0]:.4f}{cells['adamw'][1]} | "
                f"{cells['muon'][0]:.4f}{cells['muon'][1]} | {diff:+.4f} | {with_ns / 1e12:.3f} |"
            )
    return lines


def _fit_tables(transfer: Sequence[Row], seeds: Sequence[int]) -> list[str]:
    lines: list[str] = []
    for kind in ("model", "with_ns"):
        try:
            adamw_law, muon_law, ratios = comparison(transfer, kind)
        except ValueError as error:
            lines += ["", f"### {COMPUTE[kind]}: no fit ({error})"]
            continue
        per_seed: dict[int, tuple[PowerLaw, PowerLaw, list[ComputeRatio]]] = {}
        for seed in seeds:
            try:
                per_seed[seed] = comparison(transfer, kind, seed, [r.loss for r in ratios])
            except ValueError:
                continue
        lines += [
            "",
            f"### C_Muon ÷ C_AdamW at equal loss, compute = {COMPUTE[kind]}",
            "",
            f"At {len(ratios)} loss(es) both frontiers reach (the ends of their shared range and its middle): read from the "
            "frontiers themselves (log–log interpolation between neighbouring runs, no model), and from power laws "
            f"L = a·C^−α fitted to each optimizer's frontier (seeds averaged): AdamW α = "
            f"{adamw_law.alpha:.4f} ({adamw_law.points} points), Muon α = {muon_law.alpha:.4f} ({muon_law.points} "
            "points)"
            + "".join(
                f"; seed {s}: AdamW α = {v[0].alpha:.4f}, Muon α = {v[1].alpha:.4f}"
                for s, v in per_seed.items()
            )
            + ".",
            "",
            "| loss | from the frontiers, no fit: seeds averaged | per seed | compute multiplier (1 / no fit) | "
            "power-law fits: seeds averaged | per seed |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for index, ratio in enumerate(ratios):
            fitted = ", ".join(f"{v[2][index].fitted:.2f}" for v in per_seed.values()) or "—"
            seeds_free = ", ".join(_ratio(v[2][index].interpolated) for v in per_seed.values()) or "—"
            multiplier = "—" if ratio.interpolated is None else f"{1 / ratio.interpolated:.2f}×"
            lines.append(
                f"| {ratio.loss:.4f} | {_ratio(ratio.interpolated)} | {seeds_free} | {multiplier} | "
                f"{ratio.fitted:.2f} | {fitted} |"
            )
        if not ratios:
            lines.append("| — | the two frontiers cover no common loss | | | | |")
    return lines


def write_figure_and_data(found: StudyRuns, out_dir: Path) -> None:
    """``loss_vs_compute.png`` (every run, each frontier and its law, log–log) and ``frontier.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transfer = found.transfer
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    with (out_dir / "frontier.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "compute", "flops", "val_loss_mean"])
        for kind in ("model", "with_ns"):
            laws: tuple[PowerLaw | None, PowerLaw | None] = (None, None)
            with contextlib.suppress(ValueError):
                laws = comparison(transfer, kind)[:2]
            for optimizer, law, colour in zip(OPTIMIZERS, laws, ("tab:blue", "tab:orange"), strict=True):
                points = run_points(transfer, optimizer, kind)
                edge = frontier(points)
                for compute, loss in edge:
                    writer.writerow([optimizer, kind, f"{compute:.6g}", f"{loss:.6f}"])
                if kind == "with_ns" and optimizer == "adamw":
                    continue  # the same as AdamW's model FLOPs
                style = "-" if kind == "model" else ":"
                label = NAMES[optimizer] + ("" if kind == "model" else " incl. Newton–Schulz")
                if kind == "model":
                    ax.scatter(
                        [c for c, _ in points], [loss for _, loss in points], s=12, color=colour, alpha=0.5
                    )
                ax.plot(
                    [c for c, _ in edge],
                    [loss for _, loss in edge],
                    style,
                    marker="o",
                    color=colour,
                    label=label,
                )
                if law is not None:
                    xs = [edge[0][0], edge[-1][0]]
                    ax.plot(xs, [law.loss(x) for x in xs], "--", color=colour, linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss (nats/token)",
           title="compute-optimal frontiers (dashed: fitted power laws)")  # fmt: skip
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 5.2, not 5.2 × 10⁰
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_compute.png", dpi=120)
    plt.close(fig)
