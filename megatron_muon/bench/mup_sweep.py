"""The telescoping muP sweep: tune at the base width, then re-check a shrinking window at each doubling.

muP makes the optimal hyperparameters (nearly) width-independent, and its error shrinks as the width grows
(Yang et al. 2022, "Tensor Programs V", arXiv:2203.03466). So:

1. at the first (base) width, a full grid: ``center · factor^k`` for k = −radius … radius, for every ``--param``
   (the product grid when there are several, e.g. the Muon LR and the AdamW LR or a weight decay);
2. at each next width, a narrower grid centred on the previous width's optimum: the radius halves (rounded up)
   down to ``--min-radius``;
3. at the last (target) width, the best trial is the final choice.

Every trial is a short training run of the config at that width (``local_run.width_overrides``: every hidden dim
keeps its ratio to d_model) through our Trainer, in this process; its score is the validation loss at the end.
Results go to ``OUT/trials.csv`` one row per trial, appended as each trial finishes, so an interrupted sweep
resumes where it stopped (finished trials are never rerun; a sweep over other widths or radii in the same
``OUT`` reuses the trials it shares). Then ``OUT/best.json`` (best settings per width, compute), ``OUT/summary.md``
and ``OUT/loss_vs_<param>.png`` (loss against the first parameter, one curve per width).

Compute is counted in FLOPs (``local_run.trial_flops``) and reported relative to one run of the same length at the
target width, next to a full grid at the target width.

    .venv/bin/python tools/mup_sweep.py launch/configs/mup_shakespeare.yaml --widths 64 128 256 \\
        --param optimizer.muon.lr=0.02 --radius 3 --out runs/mup_sweep/mup
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

TRIAL_FIELDS = ["key", "width", "status", "validation_loss", "train_loss", "seconds", "flops"]


@dataclass(frozen=True, slots=True)
class SweepParam:
    """One swept hyperparameter: values ``center · factor^step`` for integer steps."""

    name: str
    """Dotted config key, e.g. optimizer.muon.lr."""
    center: float
    """The value at step 0 (the middle of the base-width grid)."""
    factor: float
    """Ratio between neighbouring grid points."""

    def value(self, step: int) -> float:
        return float(f"{self.center * self.factor**step:.6g}")


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

        from megatron_muon.training.config import load_config

        value = OmegaConf.select(OmegaConf.structured(load_config(config_path, overrides)), name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SystemExit(
                f"--param {name!r}: the config holds {value!r} there, not a number; give name=center"
            )
    if not value > 0:
        raise SystemExit(f"--param {text!r}: the centre must be > 0 (the grid is geometric)")
    return SweepParam(name=name, center=float(value), factor=factor)


def window_radii(num_widths: int, radius: int, min_radius: int, telescope: bool) -> list[int]:
    """Grid radius per width: ``radius`` at the base, then halved (rounded up) down to ``min_radius`` at each next
    width when telescoping; ``radius`` everywhere otherwise."""
    radii = [radius]
    for _ in range(num_widths - 1):
        radii.append(max(min_radius, math.ceil(radii[-1] / 2)) if telescope else radius)
    return radii


def trial_key(width: int, values: tuple[float, ...]) -> str:
    """``w256_0.005``: the width and the parameter values, so sweeps with other centres or radii in the same
    directory share the trials they have in common."""
    return f"w{width}_" + "_".join(f"{value:.6g}" for value in values)


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
                    raise SystemExit(f"{path} has columns {reader.fieldnames}, expected {self.fields}")
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
class Sweep:
    config: str
    overrides: list[str]
    params: list[SweepParam]
    widths: list[int]
    radii: list[int]
    out: Path

    def overrides_for(self, width: int, steps: tuple[int, ...]) -> list[str]:
        from megatron_muon.training.config import load_config
        from megatron_muon.training.local_run import width_overrides

        base = load_config(self.config, self.overrides)
        values = [f"{p.name}={p.value(step)}" for p, step in zip(self.params, steps, strict=True)]
        return [*self.overrides, *width_overrides(base, width), *values]

    def check_settings(self) -> None:
        """The trials in ``out`` are reusable only by a sweep of the same config, overrides and parameter names."""
        settings = {
            "config": str(self.config),
            "overrides": self.overrides,
            "params": [p.name for p in self.params],
        }
        path = self.out / "sweep.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved != settings:
                raise SystemExit(
                    f"{path} records another sweep ({saved}); use a new --out for {settings} or delete it"
                )
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings, indent=2) + "\n")

    def check_configs(self) -> None:
        """Every width's trial config must validate (at the base grid's ends) before the first trial starts."""
        from megatron_muon.training.config import validate
        from megatron_muon.training.local_run import trial_config

        radius = self.radii[0]
        for width in self.widths:
            for step in {-radius, radius}:
                steps = tuple(step for _ in self.params)
                validate(trial_config(self.config, self.overrides_for(width, steps), self.out), world_size=1)

    def run(self) -> dict:
        from megatron_muon.training.local_run import (
            run_trial,
            single_process_world,
            trial_config,
            trial_flops,
        )

        self.check_settings()
        self.check_configs()
        table = TrialTable(self.out / "trials.csv", self.params)
        center = tuple(0 for _ in self.params)
        per_width, world = [], None
        with contextlib.ExitStack() as stack:  # the process world starts only if some trial is left to run
            for width, radius in zip(self.widths, self.radii, strict=True):
                grid = [
                    tuple(c + k for c, k in zip(center, offsets, strict=True))
                    for offsets in itertools.product(range(-radius, radius + 1), repeat=len(self.params))
                ]
                keys = [
                    trial_key(width, tuple(p.value(s) for p, s in zip(self.params, steps, strict=True)))
                    for steps in grid
                ]
                done = sum(key in table.rows for key in keys)
                print(
                    f"[sweep] width {width}: {len(grid)} trials (radius {radius}), {done} already done",
                    flush=True,
                )
                for steps, key in zip(grid, keys, strict=True):
                    if key in table.rows:
                        continue
                    if world is None:
                        world = stack.enter_context(single_process_world())
                    trial_dir = self.out / "trials" / key
                    shutil.rmtree(trial_dir, ignore_errors=True)  # leftovers of a killed attempt
                    cfg = trial_config(
                        self.config, self.overrides_for(width, steps), trial_dir / "tensorboard"
                    )
                    result = run_trial(cfg, world)
                    row = {"key": key, "width": width}
                    row |= {p.name: p.value(s) for p, s in zip(self.params, steps, strict=True)}
                    row |= {
                        "status": result.status,
                        "validation_loss": f"{result.validation_loss:.6f}",
                        "train_loss": f"{result.train_loss:.6f}",
                        "seconds": f"{result.seconds:.2f}",
                        "flops": f"{trial_flops(cfg):.6g}",
                    }
                    table.append(row)
                    print(
                        f"[sweep] trial {key}: {result.status}, validation loss {result.validation_loss:.4f} "
                        f"({result.seconds:.1f} s)",
                        flush=True,
                    )
                finite = [
                    (table.loss(k), s, k)
                    for s, k in zip(grid, keys, strict=True)
                    if math.isfinite(table.loss(k))
                ]
                if not finite:
                    raise SystemExit(f"every trial at width {width} diverged; move or widen the grid")
                best_loss, best_steps, best_key = min(finite)
                at_edge = [
                    p.name
                    for p, s, c in zip(self.params, best_steps, center, strict=True)
                    if abs(s - c) == radius and radius > 0
                ]
                if at_edge:
                    print(
                        f"[sweep] warning: width {width}: the best {at_edge} is on the edge of the grid",
                        flush=True,
                    )
                per_width.append(
                    {
                        "width": width,
                        "radius": radius,
                        "trials": keys,
                        "best_key": best_key,
                        "best": {p.name: p.value(s) for p, s in zip(self.params, best_steps, strict=True)},
                        "best_steps": list(best_steps),
                        "validation_loss": best_loss,
                        "best_on_grid_edge": at_edge,
                    }
                )
                center = best_steps
        return self.summarize(table, per_width)

    def summarize(self, table: TrialTable, per_width: list[dict]) -> dict:
        from megatron_muon.training.config import load_config
        from megatron_muon.training.local_run import trial_flops

        target = self.widths[-1]
        final_run = trial_flops(
            load_config(self.config, self.overrides_for(target, tuple(per_width[-1]["best_steps"])))
        )
        for width in per_width:
            width["flops"] = sum(float(table.rows[key]["flops"]) for key in width["trials"])
        sweep_flops = sum(width["flops"] for width in per_width)
        full_grid_points = (2 * self.radii[0] + 1) ** len(self.params)
        summary = {
            "config": self.config,
            "overrides": self.overrides,
            "params": [asdict(p) for p in self.params],
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
                "full_grid_at_target_in_final_runs": float(full_grid_points),
                "trials": sum(len(w["trials"]) for w in per_width),
                "seconds": sum(float(table.rows[k]["seconds"]) for w in per_width for k in w["trials"]),
            },
        }
        (self.out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
        markdown = summary_markdown(summary)
        (self.out / "summary.md").write_text(markdown + "\n")
        plot_loss(
            table, self.params, per_width, self.out / f"loss_vs_{self.params[0].name.replace('.', '_')}.png"
        )
        return summary


def summary_markdown(summary: dict) -> str:
    names = [p["name"] for p in summary["params"]]
    lines = [
        "| width | grid points | "
        + " | ".join(f"best {n}" for n in names)
        + " | validation loss | FLOPs (final runs) |",
        "|---:|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    final_flops = summary["compute"]["final_run_flops"]
    for width in summary["widths"]:
        flops = width["flops"]
        edge = " (edge)" if width["best_on_grid_edge"] else ""
        lines.append(
            f"| {width['width']} | {len(width['trials'])} | "
            + " | ".join(f"{width['best'][n]:.4g}{edge}" for n in names)
            + f" | {width['validation_loss']:.4f} | {flops / final_flops:.2f} |"
        )
    compute = summary["compute"]
    lines.append("")
    lines.append(
        f"Sweep: {compute['trials']} trials, {compute['sweep_in_final_runs']:.2f} final-run equivalents of compute "
        f"({compute['seconds']:.0f} s of trials); a full grid at width {summary['final']['width']} would cost "
        f"{compute['full_grid_at_target_in_final_runs']:.0f}."
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
    parser.add_argument("--factor", type=float, default=2.0, help="ratio between grid points (default 2)")
    parser.add_argument(
        "--radius", type=int, default=3, help="grid points each side of the centre at the base width"
    )
    parser.add_argument("--min-radius", type=int, default=1, help="smallest radius of the telescoped windows")
    parser.add_argument(
        "--no-telescope",
        action="store_true",
        help="the same --radius at every width (each width's grid still centred on the previous width's optimum)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="results directory (trials.csv is resumed from here)"
    )
    args = parser.parse_args(argv)
    if args.factor <= 1:
        parser.error(f"--factor={args.factor} must be > 1")
    if args.radius < 0 or args.min_radius < 0:
        parser.error("--radius and --min-radius must be >= 0")
    if any(w < 1 for w in args.widths) or len(set(args.widths)) != len(args.widths):
        parser.error(f"--widths={args.widths} must be distinct positive integers")
    params = [
        parse_param(text, args.factor, args.config, args.overrides)
        for text in args.param or ["optimizer.muon.lr"]
    ]
    if len({p.name for p in params}) != len(params):
        parser.error("each --param may be given once")
    sweep = Sweep(
        config=args.config,
        overrides=list(args.overrides),
        params=params,
        widths=args.widths,
        radii=window_radii(len(args.widths), args.radius, args.min_radius, not args.no_telescope),
        out=args.out,
    )
    start = time.perf_counter()
    from megatron_muon.training.config import ConfigError

    try:
        summary = sweep.run()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    print(
        f"[sweep] done in {time.perf_counter() - start:.0f} s; wrote {args.out}/trials.csv, best.json, summary.md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
