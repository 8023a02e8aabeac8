"""The markdown section, figure and frontier data of ``bench/compute_multiplier.py``'s study, from its recorded rows
(the analysis: ``bench/scaling_fit.py``)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from megatron_muon.bench.report import cpu_description, rerun_command
from megatron_muon.bench.scaling_fit import Point, compute_ratios, frontier, shared_losses

OPTIMIZERS = ("adamw", "muon")
NAMES = {"adamw": "AdamW", "muon": "Muon"}
COMPUTE = {"model": "model FLOPs", "with_ns": "model + Newton–Schulz FLOPs"}


def _compute(row: dict[str, str], kind: str) -> float:
    return float(row["flops"]) + (float(row["ns_flops"]) if kind == "with_ns" else 0.0)


def run_points(transfer, optimizer: str, kind: str, seed: int | None = None) -> list[Point]:
    """(compute, loss) per width × budget of ``optimizer``: one seed's, or (``seed=None``) the mean over seeds."""
    by_run: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for trial, row in transfer:
        if trial.optimizer == optimizer and (seed is None or trial.seed == seed):
            by_run.setdefault((trial.width, trial.steps), []).append(
                (_compute(row, kind), float(row["val_loss"]))
            )
    return [(values[0][0], statistics.fmean(loss for _, loss in values)) for values in by_run.values()]


def comparison(transfer, kind: str, seed: int | None = None, losses: Sequence[float] | None = None):
    """(AdamW law, Muon law, ratios at ``losses`` or at 3 losses both frontiers cover) for one seed or the mean."""
    adamw, muon = (frontier(run_points(transfer, o, kind, seed)) for o in OPTIMIZERS)
    return compute_ratios(adamw, muon, shared_losses(adamw, muon) if losses is None else losses)


def _seeds(transfer) -> list[int]:
    return sorted({trial.seed for trial, _ in transfer})


def _best_marked(values: Sequence[float]) -> list[str]:
    best = min(values)
    return [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in values]


def markdown_section(found, plan, setting: dict[str, str], results: str, argv) -> str:
    """The section: setup, the base LR grids, the transfer check, every run, and the compute ratios."""
    tuned, grids, transfer, check = found["tuned"], found["grids"], found["transfer"], found["check"]
    seeds = _seeds(transfer)
    rows_by_width = {}
    for trial, row in transfer:
        rows_by_width.setdefault(trial.width, row)
    widths = sorted(rows_by_width)
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
        f"- Model: `{setting['config']}` (muP, base width {widths[0]}; 2 layers, dense then MoE with 4 experts "
        f"top-2) at widths {', '.join(map(str, widths))}, every hidden dim in proportion; N_active = {n_active} "
        "(embedding and output layer included). Budgets: "
        f"{' / '.join(map(str, plan.steps))} steps × 512 tokens, cosine with 10 warm-up steps; seeds {seeds} "
        "(a seed changes the init and the data order). Score: validation loss on the same 8 × 512 held-out tokens.",
        f"- LRs tuned once, at width {widths[0]}, {plan.tune_steps} steps, seed {seeds[0]}, on grids ×2 apart "
        "(extended while the best was on an edge), then used at every width and budget (muP transfer). Muon's "
        f"AdamW part (embeddings, output layer, norms, router) at the config's {tuned['muon'].adamw_lr:g}.",
        "- Compute C = 6 · N_active · tokens + attention (`local_run.trial_flops`). Muon's Newton–Schulz FLOPs "
        "(every logical matrix once per step) are shown separately: at 512 tokens per step they are "
        f"{_ns_share(transfer, widths[0])} of the model FLOPs at width {widths[0]} and "
        f"{_ns_share(transfer, widths[-1])} at {widths[-1]}, where at a real batch (millions of tokens per step) "
        "they are under 1 %; the model-FLOPs reading is the one comparable to Moonlight's.",
        "",
        f"### LR tuning at width {widths[0]} ({plan.tune_steps} steps, seed {seeds[0]})",
        "",
        "| optimizer | LR | validation loss |",
        "|---|---:|---:|",
    ]
    for optimizer in OPTIMIZERS:
        grid = grids[optimizer]
        cells = _best_marked([float(row["val_loss"]) for _, row in grid])
        for (trial, _), cell in zip(grid, cells, strict=True):
            lr = trial.adamw_lr if optimizer == "adamw" else trial.muon_lr
            lines.append(f"| {NAMES[optimizer]} | {lr:g} | {cell} |")
    lines += [
        "",
        f"### The transferred LR at width {widths[-1]} ({plan.tune_steps} steps, seed {seeds[0]}): ×½, ×1, ×2",
        "",
        "| optimizer | LR ×½ | LR ×1 (transferred) | LR ×2 | transferred LR best of three |",
        "|---|---:|---:|---:|---|",
    ]
    for optimizer in OPTIMIZERS:
        points = [(t, row) for t, row in check if t.optimizer == optimizer]
        losses = [float(row["val_loss"]) for _, row in points]
        lr = [t.adamw_lr if optimizer == "adamw" else t.muon_lr for t, _ in points]
        cells = [f"{c} ({v:g})" for c, v in zip(_best_marked(losses), lr, strict=True)]
        verdict = "yes" if losses[1] == min(losses) else f"no: {min(losses) - losses[1]:+.4f} at the best"
        lines.append(f"| {NAMES[optimizer]} | {' | '.join(cells)} | {verdict} |")
    lines += _runs_table(transfer, widths, plan.steps, seeds)
    lines += _fit_tables(transfer, seeds)
    lines += ["", "<!-- compute_multiplier:end -->"]
    return "\n".join(lines) + "\n"


def _ns_share(transfer, width: int) -> str:
    for trial, row in transfer:
        if trial.optimizer == "muon" and trial.width == width:
            return f"{float(row['ns_flops']) / float(row['flops']):.0%}"
    return "n/a"


def _runs_table(transfer, widths, steps, seeds) -> list[str]:
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
            cells, compute, with_ns = {}, 0.0, 0.0
            for optimizer in OPTIMIZERS:
                rows = [r for t, r in transfer if (t.optimizer, t.width, t.steps) == (optimizer, width, step)]
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


def _fit_tables(transfer, seeds) -> list[str]:
    lines = []
    for kind in ("model", "with_ns"):
        try:
            adamw_law, muon_law, ratios = comparison(transfer, kind)
        except ValueError as error:
            lines += ["", f"### {COMPUTE[kind]}: no fit ({error})"]
            continue
        per_seed = {}
        for seed in seeds:
            try:
                per_seed[seed] = comparison(transfer, kind, seed, [r.loss for r in ratios])
            except ValueError:
                continue
        lines += [
            "",
            f"### C_Muon ÷ C_AdamW at equal loss, compute = {COMPUTE[kind]}",
            "",
            f"Power laws L = a·C^−α fitted to each optimizer's frontier (seeds averaged): AdamW α = "
            f"{adamw_law.alpha:.4f} ({adamw_law.points} points), Muon α = {muon_law.alpha:.4f} ({muon_law.points} "
            "points)"
            + "".join(
                f"; seed {s}: AdamW α = {v[0].alpha:.4f}, Muon α = {v[1].alpha:.4f}"
                for s, v in per_seed.items()
            )
            + ".",
            "",
            "| loss | C_Muon ÷ C_AdamW (fits, seeds averaged) | per seed (fits) | from the frontiers (no fit) | "
            "compute multiplier (1 / fits) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for index, ratio in enumerate(ratios):
            seed_cells = ", ".join(f"{v[2][index].fitted:.2f}" for v in per_seed.values()) or "—"
            interpolated = "—" if ratio.interpolated is None else f"{ratio.interpolated:.2f}"
            lines.append(
                f"| {ratio.loss:.4f} | {ratio.fitted:.2f} | {seed_cells} | {interpolated} | "
                f"{1 / ratio.fitted:.2f}× |"
            )
        if not ratios:
            lines.append("| — | the two frontiers cover no common loss | | | |")
    return lines


def write_figure_and_data(found, out_dir: Path) -> None:
    """``loss_vs_compute.png`` (every run, each frontier and its law, log–log) and ``frontier.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transfer = found["transfer"]
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    with (out_dir / "frontier.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["optimizer", "compute", "flops", "val_loss_mean"])
        for kind in ("model", "with_ns"):
            try:
                laws = comparison(transfer, kind)[:2]
            except ValueError:
                laws = (None, None)
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
                    ax.scatter(*zip(*points, strict=True), s=12, color=colour, alpha=0.5)
                ax.plot(*zip(*edge, strict=True), style, marker="o", color=colour, label=label)
                if law is not None:
                    xs = [edge[0][0], edge[-1][0]]
                    ax.plot(xs, [law.loss(x) for x in xs], "--", color=colour, linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="validation loss (nats/token)",
           title="compute-optimal frontiers (dashed: fitted power laws)")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_compute.png", dpi=120)
    plt.close(fig)
