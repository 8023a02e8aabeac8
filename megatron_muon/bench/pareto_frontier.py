"""Muon vs AdamW on the compute / wall-clock plane: what reaching a target loss costs at each global batch size.

    .venv/bin/python tools/pareto_frontier.py --results docs/compare_optimizers_16/evaluations.csv \\
        --step-seconds adamw=0.53 muon=0.73 --micro-batch-per-device 8

Reads the evaluations ``tools/compare_optimizers.py`` wrote (``evaluations.csv``: one row per evaluation of every
run; nothing is trained here). The target loss is ``--target-loss``, by default AdamW's best final validation loss
(its best LR, averaged over the seeds) at the smallest batch size, or at ``--target-batch``: at the largest batch,
every batch whose AdamW ends no higher at the same budget reaches it. Per optimizer and global batch B (sequences):

1. its best LR at B, as ``compare_optimizers`` picks it (:func:`~megatron_muon.bench.compare_optimizers.best_sweeps`:
   the lowest final loss averaged over seeds; Muon's among the runs whose AdamW part ran at AdamW's best LR);
2. its validation loss averaged over the seeds at each evaluation, and T(B) = the tokens at which that mean curve
   first reaches the target (linear interpolation between evaluations); S(B) = T(B) / (B · sequence length), the
   optimizer steps. A curve that never reaches it is reported as "not reached within N tokens" and left off the
   figure.

**The model of time and compute** (a model built on one-process measurements, not a measurement of parallel runs):

- devices = B / m, with m = ``--micro-batch-per-device`` sequences per device per step, the same at every B;
- wall-clock = S(B) × t_step: t_step is one optimizer's measured step time at that per-device micro-batch
  (``--step-seconds``), taken as the same at every B, i.e. perfect data-parallel scaling is assumed (no
  communication that grows with the device count). Muon's t_step includes its optimizer overhead (Newton–Schulz
  and its communication);
- compute = T(B) × F_token + S(B) × F_NS: F_token = 6 · N_active FLOPs per token (forward and backward GEMMs;
  N_active from ``config/param_count.py: count_parameters``, the input embedding included as the MFU of
  ``training/metrics.py`` counts it, attention's sequence-length term left out), F_NS = the Newton–Schulz FLOPs of
  one Muon step (0 for AdamW): ``ops/newton_schulz.py: ns_algorithm_flops`` (the Muon plan's cost per matrix)
  summed over every logical matrix Muon orthogonalizes, each once (no duplicated work counted). AdamW's
  elementwise update is not counted for either optimizer.

Both are reported relative to the first row that reaches the target (AdamW at the smallest batch when it does).

Where the numbers come from: the step times are inputs, each optimizer's seconds per step at the per-device
micro-batch m on the hardware the frontier is drawn for, or with ``--step-seconds measure`` timed here through the
launcher at the study's model and sequence length (``bench/step_time.py``; on an otherwise idle machine). N_active and the logical
matrices come from the config the study's rows record (a study written before they recorded it: ``--config``,
default ``launch/configs/tiny_cpu.yaml``) with ``compare_optimizers``' model overrides, the matrices from the model
built on the meta device (``planning/meta_build.py``, ~30 s on 2 cores); ``--flops-per-token`` and
``--ns-flops-per-step`` replace them.

Writes ``pareto_frontier.png`` (compute against wall-clock, one curve per optimizer, points labelled by B) and
``pareto_frontier.csv`` (the table's numbers, absolute and relative) to ``--out-dir`` (default: beside the results),
and prints the markdown section, or writes it into ``--markdown`` between its markers.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_muon.bench.compare_optimizers import (
    FIELDS,
    LEGACY_FIELDS,
    MODEL,
    best_sweeps,
    in_setting,
    latest_setting,
    tokens_to_reach,
)
from megatron_muon.bench.launcher_runs import file_sha
from megatron_muon.bench.report import publish, rerun_command
from megatron_muon.bench.step_time import measure_step_seconds
from megatron_muon.config import PretrainConfig

REPO = Path(__file__).resolve().parents[2]
START, END = "<!-- pareto_frontier:start -->", "<!-- pareto_frontier:end -->"
REFERENCE_OPTIMIZER = "adamw"
MEASURE = "measure"  # --step-seconds measure: time each optimizer's step here


@dataclasses.dataclass(frozen=True, slots=True)
class FrontierCosts:
    """What turns tokens and steps into wall-clock and compute (module docstring: the model)."""

    step_seconds: dict[str, float]
    """optimizer → measured seconds per optimizer step at ``micro_batch_per_device``."""
    micro_batch_per_device: int
    """Sequences each device processes per step, the same at every global batch."""
    flops_per_token: float
    """Training FLOPs per token (6 · N_active)."""
    ns_flops_per_step: float
    """Newton–Schulz FLOPs of one Muon step (whole model); AdamW's steps count none."""


@dataclasses.dataclass(frozen=True, slots=True)
class FrontierPoint:
    """One optimizer at one global batch size: what reaching the target took, or that it did not."""

    optimizer: str
    batch_size: int
    """Global batch size (sequences)."""
    lr: str
    """The best learning rate at this batch (``compare_optimizers``' spelling)."""
    seeds: int
    """Seeds averaged."""
    evaluated_tokens: float
    """Tokens at the last evaluation of the mean curve (how far it was followed)."""
    devices: float
    """B / micro-batch per device."""
    tokens: float | None = None
    """Tokens to first reach the target; None when it never did."""
    steps: float | None = None
    """Optimizer steps to the target: tokens / (B · sequence length)."""
    seconds: float | None = None
    """Modelled wall-clock seconds: steps × step time."""
    flops: float | None = None
    """Modelled compute: tokens × FLOPs per token + steps × Newton–Schulz FLOPs per step (Muon)."""

    @property
    def reached(self) -> bool:
        """Whether the mean curve reached the target within its evaluations."""
        return self.tokens is not None


def read_evaluations(path: Path) -> list[dict[str, str]]:
    """The rows of a ``compare_optimizers`` ``evaluations.csv``.

    Raises:
        ValueError: the file is missing, has other columns than ``compare_optimizers.FIELDS`` (or its
            ``LEGACY_FIELDS``), or no rows.

    Returns:
        The rows of the file's latest setting (``compare_optimizers.latest_setting``; every row of a legacy file).
    """
    if not path.is_file():
        raise ValueError(
            f"--results {path}: no such file (the evaluations.csv of tools/compare_optimizers.py)"
        )
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames not in (FIELDS, LEGACY_FIELDS):
            raise ValueError(
                f"--results {path} has columns {reader.fieldnames}; compare_optimizers writes {FIELDS}"
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"--results {path} has no evaluations (only its header)")
    return in_setting(rows, latest_setting(rows))  # runs of an older setting stay in the file, unreported


def sequence_length(rows: list[dict[str, str]]) -> int:
    """Tokens per sequence of the study: every row has tokens = iteration × batch size × sequence length.

    Raises:
        ValueError: the rows imply more than one sequence length.
    """
    lengths = {int(r["tokens"]) / (int(r["iteration"]) * int(r["batch_size"])) for r in rows}
    if len(lengths) != 1 or not next(iter(lengths)).is_integer():
        raise ValueError(
            f"tokens / (iteration × batch_size) gives {sorted(lengths)}: not one sequence length"
        )
    return int(next(iter(lengths)))


def mean_curve(curves_by_seed: dict[str, list[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The validation loss averaged over seeds at each evaluation every seed has (seeds in sorted order)."""
    seeds = sorted(curves_by_seed)
    by_seed = [dict(curves_by_seed[seed]) for seed in seeds]
    common = sorted(set.intersection(*(set(losses) for losses in by_seed)))
    return [(tokens, sum(losses[tokens] for losses in by_seed) / len(seeds)) for tokens in common]


def batch_sizes(rows: list[dict[str, str]], budget: int) -> list[int]:
    """The global batch sizes with runs at ``budget``, ascending."""
    return sorted({int(r["batch_size"]) for r in rows if int(r["budget"]) == budget})


def default_target(rows: list[dict[str, str]], budget: int, batch: int | None = None) -> tuple[float, int]:
    """(loss, batch): AdamW's best final validation loss (mean over seeds) at ``batch``, by default the smallest
    batch with AdamW runs.

    Raises:
        ValueError: no AdamW runs at ``budget`` (at ``batch``, when given).
    """
    candidates = batch_sizes(rows, budget) if batch is None else [batch]
    for candidate in candidates:
        sweep = best_sweeps(rows, candidate, budget).get("adamw")
        if sweep is not None:
            return mean_curve(sweep.best_curves())[-1][1], candidate
    where = "" if batch is None else f" at batch {batch}"
    raise ValueError(
        f"no adamw runs{where} at budget {budget:,} tokens for the target; batch sizes with runs: "
        f"{', '.join(map(str, batch_sizes(rows, budget)))}; or give --target-loss"
    )


def frontier_points(
    rows: list[dict[str, str]], target: float, costs: FrontierCosts, budget: int, seq_length: int
) -> list[FrontierPoint]:
    """Every optimizer at every batch size of the study, AdamW first, batches ascending (module docstring).

    Args:
        rows: rows of ``evaluations.csv``.
        target: the validation loss to reach.
        costs: step times, micro-batch per device and FLOPs.
        budget: training tokens of the runs compared (the study's T).
        seq_length: tokens per sequence.

    Returns:
        One point per optimizer with runs at each batch size."""
    points = []
    for batch in batch_sizes(rows, budget):
        for optimizer, sweep in best_sweeps(rows, batch, budget).items():
            curves = sweep.best_curves()
            curve = mean_curve(curves)
            tokens = tokens_to_reach(curve, target)
            point = FrontierPoint(
                optimizer=optimizer,
                batch_size=batch,
                lr=sweep.best_lr,
                seeds=len(curves),
                evaluated_tokens=curve[-1][0],
                devices=batch / costs.micro_batch_per_device,
            )
            if tokens is not None:
                steps = tokens / (batch * seq_length)
                ns_flops = costs.ns_flops_per_step if optimizer == "muon" else 0.0
                point = dataclasses.replace(
                    point,
                    tokens=tokens,
                    steps=steps,
                    seconds=steps * costs.step_seconds[optimizer],
                    flops=tokens * costs.flops_per_token + steps * ns_flops,
                )
            points.append(point)
    return sorted(points, key=lambda p: (p.optimizer != REFERENCE_OPTIMIZER, p.optimizer, p.batch_size))


def relative_to_reference(
    points: list[FrontierPoint],
) -> tuple[FrontierPoint | None, list[tuple[float, float]]]:
    """(the first reached point, per point (wall-clock, compute) divided by that point's; nan where not reached)."""
    reference = next((p for p in points if p.reached), None)
    relative = []
    for point in points:
        if reference is None or point.seconds is None or point.flops is None:
            relative.append((math.nan, math.nan))
        else:
            assert reference.seconds is not None and reference.flops is not None  # reached
            relative.append((point.seconds / reference.seconds, point.flops / reference.flops))
    return reference, relative


def newton_schulz_flops_per_step(
    shapes: Sequence[tuple[int, int]], steps: int, algorithm: str, restarts: Sequence[int]
) -> float:
    """Newton–Schulz FLOPs of one Muon step: the plan's per-matrix cost (``ns_algorithm_flops``) summed over the
    logical matrices ``shapes`` (rows, cols), each orthogonalized once with ``steps`` iterations of ``algorithm``."""
    from megatron_muon.ops.newton_schulz import ns_algorithm_flops

    return float(
        sum(ns_algorithm_flops(rows, cols, steps, algorithm, tuple(restarts)) for rows, cols in shapes)
    )


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFlops:
    """Per-token and per-step FLOPs of the study's model, with where they came from (for the printed section)."""

    flops_per_token: float
    flops_source: str
    ns_flops_per_step: float
    ns_source: str


def model_flops(
    config: Path, flops_per_token: float | None, ns_flops_per_step: float | None, muon_in_results: bool
) -> ModelFlops:
    """F_token and F_NS: the given values, else from ``config`` with ``compare_optimizers``' model overrides
    (N_active by ``count_parameters``; the logical matrices from the model built on meta, only when needed).

    Raises:
        ConfigError: the config does not load or the model cannot be built.
    """
    label = f"`{config.relative_to(REPO) if config.is_relative_to(REPO) else config}` with compare_optimizers' model"
    cfg = None
    if flops_per_token is None or (ns_flops_per_step is None and muon_in_results):
        from megatron_muon.config import load_config

        cfg = load_config(config, MODEL)
    if flops_per_token is not None:
        per_token, per_token_source = flops_per_token, "given by --flops-per-token"
    else:
        from megatron_muon.config.param_count import count_parameters

        assert cfg is not None
        active = count_parameters(cfg.model)[1]
        per_token, per_token_source = 6.0 * active, f"6 · N_active, N_active = {active:,} for {label}"
    if ns_flops_per_step is not None:
        return ModelFlops(per_token, per_token_source, ns_flops_per_step, "given by --ns-flops-per-step")
    if not muon_in_results:
        return ModelFlops(per_token, per_token_source, 0.0, "no Muon runs")
    assert cfg is not None
    ns, matrices = newton_schulz_flops_of(cfg)
    source = (
        f"Σ ns_algorithm_flops over the {matrices} logical matrices Muon orthogonalizes in {label}, "
        f"{cfg.optimizer.muon.ns_steps} steps, algorithm {cfg.optimizer.muon.planned_ns_algorithm}"
    )
    return ModelFlops(per_token, per_token_source, ns, source)


def newton_schulz_flops_of(cfg: PretrainConfig) -> tuple[float, int]:
    """(Newton–Schulz FLOPs of one Muon step, how many logical matrices) of ``cfg``'s model, built on the meta
    device as one process sees it (every logical matrix whole, counted once)."""
    from megatron_muon.config import validate
    from megatron_muon.planning.meta_build import build_rank_on_meta

    built = build_rank_on_meta(cfg, validate(cfg), 0)
    shapes = [piece.shape for _, pieces, _ in built.muon_pieces for piece in pieces]
    muon = cfg.optimizer.muon
    ns = newton_schulz_flops_per_step(
        shapes, muon.ns_steps, muon.planned_ns_algorithm, muon.planned_gram_restarts
    )
    return ns, len(shapes)


def _count(value: float) -> str:
    return f"{value:,.0f}"


def frontier_table(points: list[FrontierPoint]) -> list[str]:
    """The markdown table of ``points``, relative columns against :func:`relative_to_reference`'s point."""
    _, relative = relative_to_reference(points)
    lines = [
        "| optimizer | B | LR | tokens to target | steps | devices | wall-clock (relative) | compute (relative) "
        "| reached? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for point, (seconds, flops) in zip(points, relative, strict=True):
        devices = f"{point.devices:g}"
        if point.tokens is None or point.steps is None:
            cells = [
                f"not reached within {_count(point.evaluated_tokens)} tokens",
                "—",
                devices,
                "—",
                "—",
                "no",
            ]
        else:
            cells = [
                _count(point.tokens),
                _count(point.steps),
                devices,
                f"{seconds:.2f}",
                f"{flops:.2f}",
                "yes",
            ]
        lines.append(
            f"| {point.optimizer} | {point.batch_size} | {float(point.lr):g} | {' | '.join(cells)} |"
        )
    return lines


@dataclasses.dataclass(frozen=True, slots=True)
class SectionFacts:
    """What the printed section states beside the table."""

    command: str
    results: str
    target: float
    target_source: str
    budget: int
    seq_length: int
    costs: FrontierCosts
    timing: str
    """Where the step times came from."""
    flops: ModelFlops
    figure: str
    data: str


def markdown_section(points: list[FrontierPoint], facts: SectionFacts) -> str:
    """The ``pareto_frontier`` section: how to rerun it, the target, the model of time and compute, the table."""
    reference, _ = relative_to_reference(points)
    times = ", ".join(f"{name} {seconds:g} s" for name, seconds in sorted(facts.costs.step_seconds.items()))
    seeds = sorted({p.seeds for p in points})
    if reference is None:
        relative = "No row reaches the target: nothing to compare."
    else:
        relative = (
            f"Wall-clock and compute are relative to {reference.optimizer} at B = {reference.batch_size} (= 1.00), "
            "the first row that reaches the target."
        )
    m = facts.costs.micro_batch_per_device
    lines = [
        START,
        "## Pareto frontier: compute vs wall-clock to a target loss (Muon vs AdamW)",
        "",
        f"Written by `tools/pareto_frontier.py` from `{facts.results}` (the evaluations of "
        "`tools/compare_optimizers.py`); rerun it to refresh this section:",
        "",
        f"```bash\n{facts.command}\n```",
        "",
        f"- Target: validation loss {facts.target:.4f} ({facts.target_source}).",
        "- Per optimizer and global batch B (sequences of "
        f"{facts.seq_length} tokens): its best LR at B as `compare_optimizers` picks it, the validation loss averaged "
        f"over the seeds ({'/'.join(map(str, seeds))}) at each evaluation, T(B) = the tokens where that mean first "
        "reaches the target (linear interpolation between evaluations), S(B) = T(B) / (B × sequence length) steps. "
        f"Budget: {facts.budget:,} tokens per run; a row that never reaches the target says so and is left off the "
        "figure.",
        f"- Model of time: wall-clock = S(B) × the measured step time at a fixed micro-batch of {m} sequences per "
        f"device ({times}; {facts.timing}; Muon's includes its optimizer overhead), on B / {m} devices: "
        "perfect data-parallel scaling assumed.",
        f"- Model of compute: compute = T(B) × {facts.flops.flops_per_token:,.0f} FLOPs per token "
        f"({facts.flops.flops_source}) + S(B) × {facts.flops.ns_flops_per_step:,.0f} Newton–Schulz FLOPs per Muon "
        f"step ({facts.flops.ns_source}).",
        f"- {relative} Figure: `{facts.figure}` (one curve per optimizer, points labelled by B); data: "
        f"`{facts.data}`.",
        "",
        *frontier_table(points),
        END,
    ]
    return "\n".join(lines)


def write_frontier_data(points: list[FrontierPoint], path: Path) -> None:
    """The table's numbers, absolute and relative, one row per point (the figure's data)."""
    _, relative = relative_to_reference(points)
    columns = ["optimizer", "batch_size", "lr", "seeds", "evaluated_tokens", "devices", "tokens_to_target",
               "steps", "wall_clock_s", "flops", "wall_clock_relative", "compute_relative", "reached"]  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for p, (seconds, flops) in zip(points, relative, strict=True):
            absolute = [p.tokens, p.steps, p.seconds, p.flops]
            writer.writerow(
                [p.optimizer, p.batch_size, p.lr, p.seeds, p.evaluated_tokens, p.devices]
                + ["" if v is None else v for v in absolute]
                + (["", ""] if math.isnan(seconds) else [seconds, flops])
                + [p.reached]
            )


def plot_frontier(points: list[FrontierPoint], target: float, path: Path) -> None:
    """Compute against wall-clock (both relative, log-log), one curve per optimizer, each point labelled by B."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    _, relative = relative_to_reference(points)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for optimizer in dict.fromkeys(p.optimizer for p in points):
        reached = [
            (p, r) for p, r in zip(points, relative, strict=True) if p.optimizer == optimizer and p.reached
        ]
        if not reached:
            continue
        xs, ys = [r[0] for _, r in reached], [r[1] for _, r in reached]
        ax.plot(xs, ys, marker="o", label=optimizer)
        for (point, _), x, y in zip(reached, xs, ys, strict=True):
            ax.annotate(
                f"B={point.batch_size}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
            )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="wall-clock to target (relative)",
        ylabel="compute to target (relative)",
        title=f"to validation loss {target:.4f} (relative to the first row that reaches it)",
    )
    plain = FuncFormatter(lambda value, _: f"{value:g}")  # 0.4, not 4 × 10⁻¹
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_step_seconds(values: list[str]) -> dict[str, float]:
    """``["adamw=0.8", "muon=0.9"]`` → {optimizer: seconds}.

    Raises:
        ValueError: an entry is not OPTIMIZER=SECONDS, names an optimizer twice, or its seconds are not > 0.
    """
    seconds: dict[str, float] = {}
    for value in values:
        name, equals, number = value.partition("=")
        if not equals or not name:
            raise ValueError(f"--step-seconds {value}: expected OPTIMIZER=SECONDS, e.g. muon=0.9")
        if name in seconds:
            raise ValueError(f"--step-seconds names {name} twice")
        try:
            seconds[name] = float(number)
        except ValueError:
            seconds[name] = math.nan
        if not (math.isfinite(seconds[name]) and seconds[name] > 0):
            raise ValueError(f"--step-seconds {value}: SECONDS must be a positive number")
    return seconds


def _check_inputs(
    args: argparse.Namespace, rows: list[dict[str, str]], budget: int
) -> dict[str, float] | None:
    """The step times (None: ``--step-seconds measure``), once every value is checked against the results
    (ValueError: one line)."""
    with_runs = sorted({r["optimizer"] for r in rows})
    measure = args.step_seconds == [MEASURE]
    step_seconds = {} if measure else parse_step_seconds(args.step_seconds)
    if args.measure_iterations < 1:
        raise ValueError(f"--measure-iterations {args.measure_iterations}: must be a positive integer")
    for name in step_seconds:
        if name not in with_runs:
            raise ValueError(
                f"--step-seconds {name}={step_seconds[name]:g}: {name} has no runs in {args.results}; "
                f"optimizers with runs: {', '.join(with_runs)}"
            )
    missing = [name for name in with_runs if name not in step_seconds]
    if missing and not measure:
        raise ValueError(
            f"--step-seconds has no time for {', '.join(missing)}; give one for each optimizer with runs: "
            f"{', '.join(with_runs)}"
        )
    m = args.micro_batch_per_device
    if m < 1:
        raise ValueError(f"--micro-batch-per-device {m}: must be a positive integer")
    for batch in batch_sizes(rows, budget):
        if batch % m:
            raise ValueError(
                f"--micro-batch-per-device {m} does not divide global batch size {batch} "
                f"(batch sizes in the results: {', '.join(map(str, batch_sizes(rows, budget)))})"
            )
    if args.target_loss is not None and not (math.isfinite(args.target_loss) and args.target_loss > 0):
        raise ValueError(f"--target-loss {args.target_loss}: must be a positive validation loss")
    if args.target_batch is not None and args.target_loss is not None:
        raise ValueError("--target-batch and --target-loss: give one of them")
    if args.flops_per_token is not None and not (
        math.isfinite(args.flops_per_token) and args.flops_per_token > 0
    ):
        raise ValueError(f"--flops-per-token {args.flops_per_token}: must be a positive number")
    if args.ns_flops_per_step is not None and not (
        math.isfinite(args.ns_flops_per_step) and args.ns_flops_per_step >= 0
    ):
        raise ValueError(f"--ns-flops-per-step {args.ns_flops_per_step}: must be a number >= 0")
    return None if measure else step_seconds


LEGACY_CONFIG = (
    "launch/configs/tiny_cpu.yaml"  # compare_optimizers' default before its rows recorded the config
)


def study_config(rows: list[dict[str, str]], given: str | None, unchanged: bool = True) -> str:
    """The config the study ran: the one its rows record (``--config``, when given, must name the same), or for a
    study written before rows recorded it, ``given`` (default :data:`LEGACY_CONFIG`).

    Raises:
        ValueError: the rows record several configs or other model overrides than this code's, ``given`` differs
            from the recorded config, or (``unchanged``: the FLOPs are counted from it) the file's SHA-256 is not
            the recorded one.
    """
    recorded = {row.get("config") or "" for row in rows} - {""}
    overrides = {row.get("model_overrides") or "" for row in rows} - {""}
    if overrides and overrides != {" ".join(MODEL)}:
        raise ValueError(
            f"the study ran model overrides {sorted(overrides)}, not compare_optimizers' {' '.join(MODEL)!r}: "
            "count its FLOPs with --flops-per-token and --ns-flops-per-step"
        )
    if len(recorded) > 1:
        raise ValueError(
            f"the study's rows record several configs {sorted(recorded)}: one study per results file"
        )
    if recorded:
        (config,) = recorded
        if given is not None and _resolve_config(given) != _resolve_config(config):
            raise ValueError(
                f"--config {given}: the study ran {config} (its rows record it); leave --config out"
            )
        shas = {row.get("config_sha") or "" for row in rows}
        if unchanged and shas != {file_sha(_resolve_config(config))}:
            raise ValueError(
                f"{config} has changed since the study ran it (recorded SHA-256 {', '.join(sorted(shas))}): "
                "give --flops-per-token and --ns-flops-per-step, or restore the file"
            )
        return config
    return given or LEGACY_CONFIG


def _resolve_config(config: str) -> Path:
    """``config`` as given, else under the repository (as the launcher resolves it for compare_optimizers)."""
    path = Path(config)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    if not path.is_file():
        raise ValueError(f"--config {config}: no such file (the config the compare_optimizers study ran)")
    return path.resolve()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--results",
        default="results/compare_optimizers/evaluations.csv",
        help="compare_optimizers' evaluations.csv",
    )
    parser.add_argument(
        "--step-seconds",
        nargs="+",
        required=True,
        metavar="OPTIMIZER=SECONDS",
        help="measured seconds per step of each optimizer at --micro-batch-per-device, e.g. adamw=0.8 muon=0.9; "
        f"or {MEASURE}: time them here through the launcher (bench/step_time.py; on an idle machine)",
    )
    parser.add_argument(
        "--measure-iterations",
        type=int,
        default=100,
        help=f"with --step-seconds {MEASURE}: timed iterations per optimizer (after 10 of warm-up)",
    )
    parser.add_argument(
        "--micro-batch-per-device",
        type=int,
        default=1,
        help="sequences per device per step (devices = B / this)",
    )
    parser.add_argument(
        "--target-loss",
        type=float,
        default=None,
        help="default: AdamW's best final loss at the smallest batch (or at --target-batch)",
    )
    parser.add_argument(
        "--target-batch",
        type=int,
        default=None,
        help="the target is AdamW's best final loss at this global batch (default: the smallest); the largest "
        "batch gives a target every batch's AdamW reaches when a larger batch ends higher at the same budget",
    )
    parser.add_argument(
        "--config",
        default=None,
        help=f"the config the study ran (for the FLOPs): default the one its rows record, else {LEGACY_CONFIG}",
    )
    parser.add_argument(
        "--flops-per-token", type=float, default=None, help="replaces 6 · N_active from --config"
    )
    parser.add_argument(
        "--ns-flops-per-step", type=float, default=None, help="replaces the NS FLOPs counted from --config"
    )
    parser.add_argument(
        "--out-dir", default=None, help="figure and its data (default: the results' directory)"
    )
    parser.add_argument(
        "--markdown",
        default=None,
        help="markdown file whose pareto_frontier section is rewritten (else printed)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Read the study, place every optimizer and batch size on the frontier, write the figure and the section.

    Returns:
        The exit status (bad input exits with 2 through ``parser.error``).
    """
    from megatron_muon.config import ConfigError

    parser = _parser()
    args = parser.parse_args(argv)
    results = Path(args.results)
    try:
        rows = read_evaluations(results)
        budget = max(int(r["budget"]) for r in rows)
        seq_length = sequence_length(rows)
        step_seconds = _check_inputs(args, rows, budget)
        if args.target_loss is None:
            target, batch = default_target(rows, budget, args.target_batch)
            which = "the smallest batch" if args.target_batch is None else "batch"
            target_source = f"AdamW's best final loss at {which}, B = {batch}, mean over seeds"
        else:
            target, target_source = args.target_loss, "given by --target-loss"
        counted = args.flops_per_token is None or args.ns_flops_per_step is None or step_seconds is None
        config = _resolve_config(study_config(rows, args.config, unchanged=counted))
        timing = "given by --step-seconds"
        if step_seconds is None:
            measured = measure_step_seconds(
                str(config), MODEL, seq_length, args.micro_batch_per_device,
                sorted({r["optimizer"] for r in rows}), args.measure_iterations,
            )  # fmt: skip
            step_seconds, timing = (
                measured.seconds,
                (
                    f"measured by this command through the launcher: median of {measured.timed_iterations} iterations "
                    f"after 10 of warm-up, one process; load average {measured.load[0]} before, {measured.load[1]} after"
                ),
            )
        flops = model_flops(
            config, args.flops_per_token, args.ns_flops_per_step, any(r["optimizer"] == "muon" for r in rows)
        )
    except (ValueError, ConfigError) as error:
        parser.error(str(error).splitlines()[0])
    costs = FrontierCosts(
        step_seconds, args.micro_batch_per_device, flops.flops_per_token, flops.ns_flops_per_step
    )
    points = frontier_points(rows, target, costs, budget, seq_length)
    out_dir = Path(args.out_dir) if args.out_dir else results.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    figure, data = out_dir / "pareto_frontier.png", out_dir / "pareto_frontier.csv"
    write_frontier_data(points, data)
    plot_frontier(points, target, figure)
    facts = SectionFacts(
        command=rerun_command("pareto_frontier.py", argv),
        results=str(results),
        target=target,
        target_source=target_source,
        budget=budget,
        seq_length=seq_length,
        costs=costs,
        timing=timing,
        flops=flops,
        figure=str(figure),
        data=str(data),
    )
    publish(markdown_section(points, facts), args.markdown, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
