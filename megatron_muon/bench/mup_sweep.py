"""The telescoping muP sweep: a full grid at the base width, then a finer window around the optimum at each doubling.

muP makes the optimal hyperparameters (nearly) width-independent, and its error shrinks as the width grows
(Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466, §5/Figure 1: the optimum drifts less at each doubling).
So the answer is refined as the model grows, and every stage costs a few runs:

1. at the first (base) width, a full grid: ``center · factor^k`` for k = −radius … radius, for every ``--param``
   (the product grid when there are several, e.g. the Muon LR and the AdamW LR or a weight decay);
2. at each next width, a window of ``--window-radius`` points each side of the previous width's optimum, with the
   spacing divided by ``--refine`` (in log space: ×2 → ×√2 → ×2^¼ …), so the final answer is resolved finer than
   the base grid;
3. at every width, when the best point lies on the window's edge (in any parameter) the window is re-centred on
   it and run again (the points it shares are not rerun), up to ``--max-recentres`` times: an optimum that moved
   further than the window is followed instead of being clipped;
4. at the last (target) width, the best trial is the final choice.

Every trial is a short training run of the config at that width (``local_run.width_overrides``: every hidden dim
keeps its ratio to d_model) through our Trainer, in this process; its score is the validation loss at the end.
A trial is identified by a hash of its *resolved* config (the file, the overrides, the width and the values, as the
trainer would see them): a trial of a changed config runs again, the same config is reused by any sweep writing to
the same ``OUT`` (other widths, centres or radii). Results go to ``OUT/trials.csv`` one row per trial, appended and
fsynced as each trial finishes, so an interrupted sweep resumes where it stopped; each trial's resolved config is
kept in ``OUT/trials/<key>/config.json``. Then ``OUT/best.json`` (best settings per width, compute),
``OUT/summary.md`` and ``OUT/loss_vs_<param>.png`` (loss against the first parameter, one curve per width).

Compute is counted in FLOPs (``local_run.trial_flops``) and reported relative to one run of the same length at the
target width, next to two full grids at the target width: the base grid's points, and the same range at the final
(refined) spacing — what it would cost to get the same answer without the narrow widths.

    .venv/bin/python tools/mup_sweep.py launch/configs/mup_shakespeare.yaml --widths 64 128 256 \\
        --param optimizer.muon.lr=0.02 --radius 3 --window-radius 2 --out runs/mup_sweep/mup
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Protocol

TRIAL_FIELDS = ["key", "width", "status", "validation_loss", "train_loss", "seconds", "flops"]

Point = tuple[Fraction, ...]
"""A grid point: per parameter, the exponent of its factor (value = center · factor^exponent)."""


@dataclass(frozen=True, slots=True)
class SweepParam:
    """One swept hyperparameter: values ``center · factor^exponent``; the exponent is a fraction once refined."""

    name: str
    """Dotted config key, e.g. optimizer.muon.lr."""
    center: float
    """The value at exponent 0 (the middle of the base-width grid)."""
    factor: float
    """Ratio between neighbouring points of the base grid."""

    def value(self, exponent: Fraction | int) -> float:
        return float(f"{self.center * self.factor ** float(exponent):.6g}")


def parse_param(text: str, factor: float, config_path: str, overrides: list[str]) -> SweepParam:
    """``name=center`` or ``name`` (centre: the config's own value)."""
    name, sep, center = text.partition("=")
    if sep:
        try:
            value = float(center)
        except ValueError:
            raise SystemExit(f"--param {text!r}: {center!r} is not a number") from None
    else:
        from omegaconf import OmegaConf

        from megatron_muon.config import load_config

        value = OmegaConf.select(OmegaConf.structured(load_config(config_path, overrides)), name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SystemExit(
                f"--param {name!r}: the config holds {value!r} there, not a number; give name=center"
            )
    if not value > 0:
        raise SystemExit(f"--param {text!r}: the centre must be > 0 (the grid is geometric)")
    return SweepParam(name=name, center=float(value), factor=factor)


@dataclass(frozen=True, slots=True)
class Stage:
    """The window of one width: ``radius`` points of ``spacing`` (in base grid steps) each side of its centre."""

    spacing: Fraction
    radius: int


def telescoping_stages(
    num_widths: int, *, radius: int, window_radius: int, refine: int, telescope: bool = True
) -> list[Stage]:
    """The base width's full grid (spacing 1, ``radius``), then per next width a window of ``window_radius``
    points whose spacing is the previous one / ``refine``. ``telescope=False``: the base grid at every width
    (the full-grid reference)."""
    if radius < 0 or window_radius < 0:
        raise ValueError(f"radius={radius}, window_radius={window_radius}: both must be >= 0")
    if refine < 1:
        raise ValueError(f"refine={refine} must be an integer >= 1")
    stages = [Stage(Fraction(1), radius)]
    for index in range(1, num_widths):
        stages.append(Stage(Fraction(1, refine**index), window_radius) if telescope else stages[0])
    return stages


def window(center: Point, stage: Stage) -> list[Point]:
    """Every point of the (product) window around ``center``."""
    offsets = range(-stage.radius, stage.radius + 1)
    return [
        tuple(c + k * stage.spacing for c, k in zip(center, ks, strict=True))
        for ks in itertools.product(offsets, repeat=len(center))
    ]


def edge_parameters(point: Point, center: Point, stage: Stage) -> list[int]:
    """Indices of the parameters for which ``point`` lies on the edge of the window around ``center``."""
    if stage.radius == 0:
        return []
    return [
        i
        for i, (p, c) in enumerate(zip(point, center, strict=True))
        if abs(p - c) == stage.radius * stage.spacing
    ]


def config_hash(resolved: dict) -> str:
    """Key of a trial: the first 16 hex digits of the SHA-256 of its resolved config (canonical JSON)."""
    text = json.dumps(resolved, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class TrialOutcome:
    status: str
    """ok | diverged."""
    validation_loss: float
    train_loss: float
    seconds: float
    flops: float


class Objective(Protocol):
    """What the sweep trains: the resolved config of a point, a run of it, and the cost of the final run."""

    def resolve(self, width: int, values: dict[str, float]) -> dict: ...

    def run(self, width: int, values: dict[str, float], trial_dir: Path) -> TrialOutcome: ...

    def final_run_flops(self, width: int, values: dict[str, float]) -> float: ...


class TrainerObjective:
    """Trials through our Trainer in this process (one gloo rank, started on the first trial that must run)."""

    def __init__(self, config: str, overrides: list[str], stack: contextlib.ExitStack) -> None:
        self.config, self.overrides, self._stack, self._world = config, overrides, stack, None

    def _overrides(self, width: int, values: dict[str, float]) -> list[str]:
        from megatron_muon.bench.local_run import width_overrides
        from megatron_muon.config import load_config

        base = load_config(self.config, self.overrides)
        return [*self.overrides, *width_overrides(base, width), *(f"{k}={v}" for k, v in values.items())]

    def _config(self, width: int, values: dict[str, float], tensorboard_dir: Path):
        from megatron_muon.bench.local_run import trial_config

        return trial_config(self.config, self._overrides(width, values), tensorboard_dir)

    def resolve(self, width: int, values: dict[str, float]) -> dict:
        from omegaconf import OmegaConf

        from megatron_muon.config import validate

        cfg = self._config(width, values, Path("tensorboard"))  # a fixed stand-in: the trial's dir is its key
        validate(cfg, world_size=1)
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def run(self, width: int, values: dict[str, float], trial_dir: Path) -> TrialOutcome:
        from megatron_muon.bench.local_run import run_trial, single_process_world, trial_flops

        if self._world is None:
            self._world = self._stack.enter_context(single_process_world())
        cfg = self._config(width, values, trial_dir / "tensorboard")
        result = run_trial(cfg, self._world)
        return TrialOutcome(
            result.status, result.validation_loss, result.train_loss, result.seconds, trial_flops(cfg)
        )

    def final_run_flops(self, width: int, values: dict[str, float]) -> float:
        from megatron_muon.bench.local_run import trial_flops
        from megatron_muon.config import load_config

        return trial_flops(load_config(self.config, self._overrides(width, values)))


class TrialTable:
    """``trials.csv``: one row per finished trial, appended and fsynced as it finishes; read back on resume.
    Rows cut short by a kill (a missing field) are ignored, so their trials run again."""

    def __init__(self, path: Path, params: list[SweepParam]) -> None:
        self.path, self.params = path, params
        self.fields = TRIAL_FIELDS[:2] + [p.name for p in params]
        self.fields += TRIAL_FIELDS[2:]
        self.rows: dict[str, dict] = {}
        if path.exists():
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                if reader.fieldnames != self.fields:
                    raise SystemExit(
                        f"{path} has columns {reader.fieldnames}, expected {self.fields}: another set of "
                        "--param; use another --out"
                    )
                for row in reader:
                    if None in row.values() or any(row[field] == "" for field in self.fields):
                        continue
                    self.rows[row["key"]] = row

    def append(self, row: dict) -> None:
        new_file = not self.path.exists()
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields)
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
        self.rows[row["key"]] = row

    def loss(self, key: str) -> float:
        return float(self.rows[key]["validation_loss"])


@dataclass(slots=True)
class TelescopingSweep:
    objective: Objective
    params: list[SweepParam]
    widths: list[int]
    stages: list[Stage]
    out: Path
    max_recentres: int = 3
    """Re-centrings per width when the best point is on its window's edge."""
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    ran: list[str] = field(default_factory=list)
    """Keys of the trials this sweep ran (not reused)."""

    def values(self, point: Point) -> dict[str, float]:
        return {p.name: p.value(e) for p, e in zip(self.params, point, strict=True)}

    def check_configs(self) -> None:
        """Every width's trial config must resolve (at the base grid's ends) before the first trial starts."""
        radius = self.stages[0].radius
        for width in self.widths:
            for step in {-radius, radius}:
                self.objective.resolve(width, self.values(tuple(Fraction(step) for _ in self.params)))

    def trial(self, table: TrialTable, width: int, point: Point) -> str:
        """The key of ``point`` at ``width``, run first unless a trial of the same resolved config is recorded."""
        values = self.values(point)
        resolved = self.objective.resolve(width, values)
        key = config_hash(resolved)
        if key in table.rows:
            return key
        trial_dir = self.out / "trials" / key
        shutil.rmtree(trial_dir, ignore_errors=True)  # leftovers of a killed attempt
        trial_dir.mkdir(parents=True)
        (trial_dir / "config.json").write_text(json.dumps(resolved, indent=1, sort_keys=True, default=str))
        outcome = self.objective.run(width, values, trial_dir)
        row = {"key": key, "width": width, **values}
        row |= {
            "status": outcome.status,
            "validation_loss": f"{outcome.validation_loss:.6f}",
            "train_loss": f"{outcome.train_loss:.6f}",
            "seconds": f"{outcome.seconds:.2f}",
            "flops": f"{outcome.flops:.6g}",
        }
        table.append(row)
        self.ran.append(key)
        self.log(
            f"[sweep] trial {key} (width {width}, {values}): {outcome.status}, "
            f"validation loss {outcome.validation_loss:.4f} ({outcome.seconds:.1f} s)"
        )
        return key

    def search_width(self, table: TrialTable, width: int, center: Point, stage: Stage) -> dict:
        """The window around ``center``, re-centred on its best point while that point is on the edge."""
        keys: dict[Point, str] = {}
        centers = [center]
        while True:
            for point in window(center, stage):
                if point not in keys:
                    keys[point] = self.trial(table, width, point)
            finite = [(table.loss(k), p) for p, k in keys.items() if math.isfinite(table.loss(k))]
            if not finite:
                raise SystemExit(f"every trial at width {width} diverged; move or widen the grid")
            best_loss, best = min(finite)
            edge = edge_parameters(best, center, stage)
            if not edge or len(centers) > self.max_recentres:
                break
            self.log(
                f"[sweep] width {width}: best {self.values(best)} on the window's edge; re-centring on it"
            )
            center = best
            centers.append(center)
        edge_names = [self.params[i].name for i in edge]
        if edge_names:
            self.log(
                f"[sweep] warning: width {width}: the best {edge_names} is still on the edge after "
                f"{self.max_recentres} re-centrings"
            )
        return {
            "width": width,
            "radius": stage.radius,
            "spacing": str(stage.spacing),
            "spacing_factor": {p.name: p.factor ** float(stage.spacing) for p in self.params},
            "recentres": len(centers) - 1,
            "trials": list(keys.values()),
            "best_key": keys[best],
            "best": self.values(best),
            "best_exponents": [str(e) for e in best],
            "validation_loss": best_loss,
            "best_on_grid_edge": edge_names,
        }

    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        self.check_configs()
        table = TrialTable(self.out / "trials.csv", self.params)
        center: Point = tuple(Fraction(0) for _ in self.params)
        per_width = []
        for width, stage in zip(self.widths, self.stages, strict=True):
            self.log(
                f"[sweep] width {width}: window of {(2 * stage.radius + 1) ** len(self.params)} points, "
                f"spacing {stage.spacing} base steps"
            )
            result = self.search_width(table, width, center, stage)
            per_width.append(result)
            center = tuple(Fraction(e) for e in result["best_exponents"])
        return self.summarize(table, per_width)

    def summarize(self, table: TrialTable, per_width: list[dict]) -> dict:
        target = self.widths[-1]
        final_run = self.objective.final_run_flops(target, per_width[-1]["best"])
        for width in per_width:
            width["flops"] = sum(float(table.rows[key]["flops"]) for key in width["trials"])
        sweep_flops = sum(width["flops"] for width in per_width)
        base, last = self.stages[0], self.stages[-1]
        dims = len(self.params)
        same_resolution = (2 * base.radius * base.spacing / last.spacing + 1) ** dims
        all_keys = [k for w in per_width for k in w["trials"]]
        summary = {
            "params": [asdict(p) for p in self.params],
            "stages": [{"spacing": str(s.spacing), "radius": s.radius} for s in self.stages],
            "widths": per_width,
            "final": {
                "width": target,
                **per_width[-1]["best"],
                "validation_loss": per_width[-1]["validation_loss"],
            },
            "compute": {
                "sweep_flops": sweep_flops,
                "final_run_flops": final_run,
                "sweep_in_final_runs": sweep_flops / final_run,
                # What the sweep's answer would cost at the target width alone: the base grid's points, and the
                # base grid's range at the final (refined) spacing. Trials at the target cost one final run each.
                "full_grid_at_target_in_final_runs": float((2 * base.radius + 1) ** dims),
                "full_grid_at_target_same_resolution_in_final_runs": float(same_resolution),
                "trials": len(all_keys),
                "trials_run_now": len(self.ran),
                "seconds": sum(float(table.rows[k]["seconds"]) for k in all_keys),
            },
        }
        (self.out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
        (self.out / "summary.md").write_text(summary_markdown(summary) + "\n")
        return summary


def summary_markdown(summary: dict) -> str:
    names = [p["name"] for p in summary["params"]]
    lines = [
        "| width | grid spacing | points (re-centred) | "
        + " | ".join(f"best {n}" for n in names)
        + " | validation loss | FLOPs (final runs) |",
        "|---:|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    final_flops = summary["compute"]["final_run_flops"]
    for width in summary["widths"]:
        edge = " (edge)" if width["best_on_grid_edge"] else ""
        spacing = ", ".join(f"×{f:.4g}" for f in width["spacing_factor"].values())
        lines.append(
            f"| {width['width']} | {spacing} | {len(width['trials'])} ({width['recentres']}) | "
            + " | ".join(f"{width['best'][n]:.4g}{edge}" for n in names)
            + f" | {width['validation_loss']:.4f} | {width['flops'] / final_flops:.2f} |"
        )
    compute = summary["compute"]
    lines.append("")
    lines.append(
        f"Sweep: {compute['trials']} trials ({compute['trials_run_now']} run now, the rest reused), "
        f"{compute['sweep_in_final_runs']:.2f} final-run equivalents of compute ({compute['seconds']:.0f} s of "
        f"trials). A full grid at width {summary['final']['width']} would cost "
        f"{compute['full_grid_at_target_in_final_runs']:.0f} at the base spacing, "
        f"{compute['full_grid_at_target_same_resolution_in_final_runs']:.0f} at the final spacing."
    )
    return "\n".join(lines)


def plot_loss(table: TrialTable, params: list[SweepParam], per_width: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = params[0].name
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for width in per_width:
        best_by_value: dict[float, float] = {}
        for key in width["trials"]:
            value, loss = float(table.rows[key][first]), table.loss(key)
            best_by_value[value] = min(best_by_value.get(value, math.inf), loss)
        points = sorted((v, loss) for v, loss in best_by_value.items() if math.isfinite(loss))
        if points:
            line = axis.plot(*zip(*points, strict=True), marker="o", label=f"width {width['width']}")[0]
            axis.plot(
                [width["best"][first]],
                [width["validation_loss"]],
                marker="*",
                markersize=14,
                color=line.get_color(),
            )
    axis.set_xscale("log", base=2)
    axis.set_xlabel(first)
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("loss vs " + first + " per width (star: best)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="YAML config of the base model (muP on for a muP sweep)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides for every trial, e.g. training.train_iters=40"
    )
    parser.add_argument("--widths", type=int, nargs="+", required=True, help="d_model per stage, base first")
    parser.add_argument(
        "--param",
        action="append",
        default=None,
        help="swept key, NAME=CENTER or NAME (centre from the config); repeat for a product grid "
        "(default: optimizer.muon.lr)",
    )
    parser.add_argument(
        "--factor", type=float, default=2.0, help="base grid: ratio between points (default 2)"
    )
    parser.add_argument("--radius", type=int, default=3, help="base grid: points each side of the centre")
    parser.add_argument(
        "--window-radius", type=int, default=2, help="points each side of the optimum at each next width"
    )
    parser.add_argument(
        "--refine", type=int, default=2, help="spacing divisor (in log space) at each next width (default 2)"
    )
    parser.add_argument(
        "--max-recentres",
        type=int,
        default=3,
        help="re-centrings per width of a window whose best is on its edge",
    )
    parser.add_argument(
        "--no-telescope",
        action="store_true",
        help="the base grid at every width (each centred on the previous width's optimum): the full-grid reference",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="results directory (trials.csv is resumed from here)"
    )
    args = parser.parse_args(argv)
    if args.factor <= 1:
        parser.error(f"--factor={args.factor} must be > 1")
    if args.radius < 0 or args.window_radius < 0 or args.max_recentres < 0:
        parser.error("--radius, --window-radius and --max-recentres must be >= 0")
    if args.refine < 1:
        parser.error(f"--refine={args.refine} must be >= 1")
    if any(w < 1 for w in args.widths) or len(set(args.widths)) != len(args.widths):
        parser.error(f"--widths={args.widths} must be distinct positive integers")
    params = [
        parse_param(text, args.factor, args.config, args.overrides)
        for text in args.param or ["optimizer.muon.lr"]
    ]
    if len({p.name for p in params}) != len(params):
        parser.error("each --param may be given once")
    stages = telescoping_stages(
        len(args.widths),
        radius=args.radius,
        window_radius=args.window_radius,
        refine=args.refine,
        telescope=not args.no_telescope,
    )
    start = time.perf_counter()
    from megatron_muon.config import ConfigError

    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "config": args.config,
        "overrides": list(args.overrides),
        "argv": sys.argv[1:] if argv is None else argv,
    }
    (args.out / "sweep.json").write_text(
        json.dumps(record, indent=2) + "\n"
    )  # a record; trials are keyed by content
    with contextlib.ExitStack() as stack:
        sweep = TelescopingSweep(
            objective=TrainerObjective(args.config, list(args.overrides), stack),
            params=params,
            widths=args.widths,
            stages=stages,
            out=args.out,
            max_recentres=args.max_recentres,
        )
        try:
            summary = sweep.run()
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    summary["config"], summary["overrides"] = args.config, list(args.overrides)
    (args.out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = TrialTable(args.out / "trials.csv", params)
    plot_loss(table, params, summary["widths"], args.out / f"loss_vs_{params[0].name.replace('.', '_')}.png")
    print(summary_markdown(summary))
    print(
        f"[sweep] done in {time.perf_counter() - start:.0f} s; wrote {args.out}/trials.csv, best.json, summary.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
