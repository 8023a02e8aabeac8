"""Muon's compute multiplier over AdamW across model sizes (issue #23 item 3; the reading of Moonlight, "Muon is
Scalable": the compute AdamW needs for the loss Muon reaches, from loss-against-compute laws over several sizes):

    .venv/bin/python tools/compute_multiplier.py --jobs 2 --markdown docs/benchmarks.md

The model is ``launch/configs/mup_shakespeare.yaml`` (2 layers, dense then MoE with 4 experts top-2; muP with base
width 64), widened with every hidden dim in proportion (``local_run.width_overrides``) to each of ``--widths``, and
trained for each of ``--steps`` (steps of 8 × 64 tokens, cosine to the config's minimum) by each optimizer:
Muon (hidden matrices; AdamW for the rest) and AdamW for everything (``optimizer.use_muon=false``; muP gives its
hidden matrices LR / m through megatron's own overrides; the router multiplier, a base multiplier of Muon's runs,
is 1 there because the config refuses it without Muon). Three phases:

1. **tune** at the base width, the middle budget and the first seed: each optimizer's LR on a grid ×2 apart
   (``--grid-points``, centred on the config's value; extended by a point while the best is on an edge, at most
   ``--max-extensions`` times), AdamW first; Muon's AdamW part at AdamW's tuned LR (``--muon-adamw-part adamw``,
   Moonlight's protocol and #16's) or at the config's ``optimizer.lr`` (``config``: tuned jointly with the Muon LR
   at the base in issue #16, which gives Muon's runs two tuned LRs and AdamW's one);
2. **transfer**: every width × budget × seed × optimizer at its base-tuned LR (muP's promise: the same numbers at
   every width);
3. **check** at the largest width (middle budget, first seed): each tuned LR ×½ and ×2, so a reader sees whether
   the transferred LR is still the best of three there.

Every run is one in-process training (``local_run.run_trial``: validation loss on the same 8 × 512 held-out tokens
at the end), spread over ``--jobs`` worker processes of one thread each. Each is one row of ``--results`` keyed by
the config's path and SHA-256, the code version (``launcher_runs.code_version``), optimizer, width, steps, seed and
LRs: a rerun trains only what is missing; rows of another config or code version stay unused.

Compute per run: C = ``local_run.trial_flops`` (6 · N_active + attention, per token, × tokens; N_active includes the
embedding and output layer as the MFU does), and for Muon also C + steps × the Newton–Schulz FLOPs of one step
(every logical matrix once: ``pareto_frontier.newton_schulz_flops_of``), which at 512 tokens per step is a large
share here and a negligible one at a real batch; the section reports both. The analysis (``bench/scaling_fit.py``),
per optimizer: the compute-optimal frontier of its runs (seeds averaged, and each seed alone), a power law
L = a·C^−α fitted to it, and at losses both frontiers cover, C_Muon / C_AdamW from the fits and from the frontiers
themselves (log–log interpolation, no fit).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import inspect
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from megatron_muon.bench.compute_multiplier_report import StudyRuns, markdown_section, write_figure_and_data
from megatron_muon.bench.launcher_runs import REPO, append_rows, code_version, file_sha, lr_text, read_rows
from megatron_muon.bench.report import publish

CONFIG = "launch/configs/mup_shakespeare.yaml"
KEY_FIELDS = (
    "config",
    "config_sha",
    "run_rules",
    "code_version",
    "optimizer",
    "width",
    "steps",
    "seed",
    "adamw_lr",
    "muon_lr",
)
FIELDS = [
    *KEY_FIELDS,
    "phase",
    "status",
    "val_loss",
    "train_loss",
    "active_params",
    "flops",
    "ns_flops",
    "seconds",
]
OPTIMIZERS = ("adamw", "muon")
START, END = "<!-- compute_multiplier:start -->", "<!-- compute_multiplier:end -->"


@dataclass(frozen=True, slots=True)
class Trial:
    """One training run of the study."""

    optimizer: str
    width: int
    steps: int
    seed: int
    adamw_lr: float
    """``optimizer.lr``: everything under AdamW alone, the non-hidden parameters beside Muon."""
    muon_lr: float | None
    """``optimizer.muon.lr`` (None for AdamW)."""
    phase: str

    def key(self, setting: dict[str, str]) -> tuple[str, ...]:
        """What identifies this run in the results within ``setting`` (config, its SHA-256, code version)."""
        values = {**setting, "optimizer": self.optimizer, "width": str(self.width), "steps": str(self.steps),
                  "seed": str(self.seed), "adamw_lr": lr_text(self.adamw_lr),
                  "muon_lr": "" if self.muon_lr is None else lr_text(self.muon_lr)}  # fmt: skip
        return tuple(values[name] for name in KEY_FIELDS)


def run_rules() -> str:
    """SHA-256 (16 hex digits) of what turns a trial into a run outside the code version (which leaves ``bench/``
    out): :func:`trial_overrides` and ``local_run.py`` (how a trial is configured, trained and scored)."""
    from megatron_muon.bench import local_run

    digest = hashlib.sha256(inspect.getsource(trial_overrides).encode())
    digest.update(Path(local_run.__file__).read_bytes())
    return digest.hexdigest()[:16]


def _in(row: dict[str, str], setting: dict[str, str]) -> bool:
    return all(row[name] == value for name, value in setting.items())


def row_key(row: dict[str, str]) -> tuple[str, ...]:
    """A recorded row's key (:meth:`Trial.key`)."""
    return tuple(row[name] for name in KEY_FIELDS)


def trial_overrides(trial: Trial, width_dims: Sequence[str], min_lr_ratio: float) -> list[str]:
    """The config overrides of one run. AdamW alone keeps the config's LR schedule shape (min_lr / lr) and drops
    the router multiplier, a Muon-only base multiplier (the config refuses it without Muon)."""
    common = [*width_dims, f"training.train_iters={trial.steps}", f"training.seed={trial.seed}",
              f"optimizer.lr={lr_text(trial.adamw_lr)}", f"optimizer.min_lr={lr_text(trial.adamw_lr * min_lr_ratio)}"]  # fmt: skip
    if trial.optimizer == "adamw":
        return [*common, "optimizer.use_muon=false", "optimizer.router_lr_multiplier=1.0"]
    assert trial.muon_lr is not None
    return [*common, "optimizer.use_muon=true", f"optimizer.muon.lr={lr_text(trial.muon_lr)}"]


# ---------------------------------------------------------------------------------------------------------------
# Worker processes: each holds one single-process world and trains the trials it is sent, one after another.

_WORLD = contextlib.ExitStack()
_GROUPS: list[object] = []  # the worker's ProcessGroupCollection, once started


def _start_worker() -> None:
    from megatron_muon.bench.local_run import single_process_world

    _GROUPS.append(_WORLD.enter_context(single_process_world(num_threads=1)))
    atexit.register(_WORLD.close)


def _train(config: str, overrides: list[str]) -> dict[str, object]:
    from megatron_muon.bench.local_run import run_trial, trial_config, trial_flops
    from megatron_muon.config.param_count import count_parameters

    with tempfile.TemporaryDirectory() as tensorboard:
        cfg = trial_config(REPO / config, overrides, Path(tensorboard))
        result = run_trial(cfg, _GROUPS[0])
    return {"status": result.status, "val_loss": result.validation_loss, "train_loss": result.train_loss,
            "active_params": count_parameters(cfg.model)[1], "flops": trial_flops(cfg),
            "seconds": round(result.seconds, 1)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------


class Study:
    """The runs of one setting (config and code version) in ``results``; trains what is missing."""

    def __init__(self, config: str, results: Path, jobs: int, publish_only: bool) -> None:
        from megatron_muon.config import load_config

        self.config, self.results, self.jobs, self.publish_only = config, results, jobs, publish_only
        self.base = load_config(REPO / config)
        self.setting = {
            "config": config,
            "config_sha": file_sha(REPO / config),
            "run_rules": run_rules(),
            "code_version": code_version(),
        }
        recorded = [row for row in read_rows(results) if row["config"] == config]
        if publish_only and recorded and not any(_in(row, self.setting) for row in recorded):
            self.setting = {name: recorded[-1][name] for name in self.setting}  # the file's latest setting
        self.min_lr_ratio = self.base.optimizer.min_lr / self.base.optimizer.lr
        self._ns_per_step: dict[int, float] = {}
        self._executor: ProcessPoolExecutor | None = None

    def width_dims(self, width: int) -> list[str]:
        """The overrides that widen the config to ``width`` (``local_run.width_overrides``)."""
        from megatron_muon.bench.local_run import width_overrides

        return width_overrides(self.base, width)

    def rows(self) -> dict[tuple[str, ...], dict[str, str]]:
        """Every recorded row by its key."""
        return {row_key(row): row for row in read_rows(self.results)}

    def loss(self, trial: Trial) -> float | None:
        """The recorded validation loss of ``trial`` in this setting (None: not run)."""
        row = self.rows().get(trial.key(self.setting))
        return None if row is None else float(row["val_loss"])

    def ns_flops_per_step(self, width: int) -> float:
        """Newton–Schulz FLOPs of one Muon step at ``width`` (the model built on meta once per width)."""
        if width not in self._ns_per_step:
            from megatron_muon.bench.pareto_frontier import newton_schulz_flops_of
            from megatron_muon.config import load_config

            cfg = load_config(REPO / self.config, [*self.width_dims(width), "optimizer.use_muon=true"])
            self._ns_per_step[width] = newton_schulz_flops_of(cfg)[0]
        return self._ns_per_step[width]

    def ensure(self, trials: Iterable[Trial]) -> None:
        """Train the trials not in the results yet (largest first), appending each row as it finishes."""
        done = self.rows()
        first: dict[tuple[str, ...], Trial] = {}
        for trial in trials:  # a run asked for twice is trained once, under the phase that asked first
            first.setdefault(trial.key(self.setting), trial)
        missing = [trial for key, trial in first.items() if key not in done]
        if not missing:
            return
        if self.publish_only:
            raise SystemExit(f"--publish-only: {len(missing)} runs of this study are not in {self.results}")
        missing.sort(key=lambda t: -t.width * t.width * t.steps)
        print(f"[compute_multiplier] training {len(missing)} runs on {self.jobs} processes", file=sys.stderr)
        for trial, outcome in self.train(missing):
            ns = trial.steps * self.ns_flops_per_step(trial.width) if trial.optimizer == "muon" else 0.0
            values = dict(zip(KEY_FIELDS, trial.key(self.setting), strict=True))
            append_rows(self.results, [{**values, "phase": trial.phase, **outcome, "ns_flops": ns}], FIELDS)
            print(f"[compute_multiplier] {trial.phase} {trial.optimizer} width {trial.width} steps {trial.steps} "
                  f"seed {trial.seed} lr {lr_text(trial.adamw_lr)}/{trial.muon_lr}: {outcome['val_loss']:.4f} "
                  f"({outcome['seconds']} s)", file=sys.stderr)  # fmt: skip

    def train(self, trials: Sequence[Trial]) -> Iterator[tuple[Trial, dict[str, object]]]:
        """Train ``trials`` on the worker processes; yields each with its outcome as it finishes."""
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                self.jobs, mp_context=get_context("spawn"), initializer=_start_worker
            )
        futures = {
            self._executor.submit(_train, self.config, trial_overrides(t, self.width_dims(t.width), self.min_lr_ratio)): t
            for t in trials
        }  # fmt: skip
        for future in as_completed(futures):
            yield futures[future], future.result()

    def close(self) -> None:
        """Stop the worker processes."""
        if self._executor is not None:
            self._executor.shutdown()

    def tune(
        self,
        optimizer: str,
        width: int,
        steps: int,
        seed: int,
        points: int,
        extensions: int,
        adamw_part: float | None = None,
    ) -> tuple[Trial, list[Trial]]:
        """The best trial of ``optimizer``'s LR grid (×2 apart around the config's LR, extended by a point while its
        best is on an edge, at most ``extensions`` times) and the grid. ``adamw_part``: Muon's AdamW LR (default:
        the config's ``optimizer.lr``)."""
        adamw_center, muon_center = self.base.optimizer.lr, self.base.optimizer.muon.lr
        center = adamw_center if optimizer == "adamw" else muon_center
        beside_muon = adamw_center if adamw_part is None else adamw_part

        def trial(exponent: int) -> Trial:
            lr = center * 2.0**exponent
            if optimizer == "adamw":
                return Trial("adamw", width, steps, seed, lr, None, "tune")
            return Trial("muon", width, steps, seed, beside_muon, lr, "tune")

        low, high = -(points // 2), points - 1 - points // 2
        for _ in range(extensions + 1):
            grid = [trial(k) for k in range(low, high + 1)]
            self.ensure(grid)
            losses = [self.loss(t) for t in grid]
            best = min(range(len(grid)), key=lambda i: losses[i])  # type: ignore[arg-type, return-value]
            if 0 < best < len(grid) - 1:
                break
            if best == 0:
                low -= 1
            else:
                high += 1
        grid = [trial(k) for k in range(low, high + 1) if self.loss(trial(k)) is not None]
        return min(grid, key=lambda t: self.loss(t)), grid  # type: ignore[arg-type, return-value]


@dataclass(frozen=True, slots=True)
class Plan:
    """The study's sizes, budgets, seeds and base grid."""

    widths: list[int]
    steps: list[int]
    seeds: list[int]
    grid_points: int
    max_extensions: int = 2
    muon_adamw_part: str = "adamw"
    """``adamw``: Muon's AdamW part at AdamW's tuned LR (Moonlight's protocol, and #16's); ``config``: at the
    config's ``optimizer.lr`` (tuned jointly with the Muon LR at the base, issue #16)."""

    @property
    def tune_steps(self) -> int:
        """The middle budget: where the LRs are tuned and checked."""
        return sorted(self.steps)[len(self.steps) // 2]


def run_study(study: Study, plan: Plan) -> StudyRuns:
    """The three phases (training what is missing); returns the recorded rows the report is written from."""
    base, largest, seed = min(plan.widths), max(plan.widths), plan.seeds[0]
    tuned: dict[str, Trial] = {}
    grids: dict[str, list[Trial]] = {}
    for optimizer in OPTIMIZERS:  # AdamW first: Muon's AdamW part may take its LR
        adamw_part = (
            tuned["adamw"].adamw_lr if optimizer == "muon" and plan.muon_adamw_part == "adamw" else None
        )
        tuned[optimizer], grids[optimizer] = study.tune(
            optimizer, base, plan.tune_steps, seed, plan.grid_points, plan.max_extensions, adamw_part
        )
    transfer = [
        replace(tuned[o], width=w, steps=s, seed=sd, phase="transfer")
        for o in OPTIMIZERS for w in plan.widths for s in plan.steps for sd in plan.seeds
    ]  # fmt: skip
    check = []
    for optimizer in OPTIMIZERS:
        at_largest = replace(tuned[optimizer], width=largest, steps=plan.tune_steps, seed=seed, phase="check")
        for factor in (0.5, 1.0, 2.0):
            if optimizer == "adamw":
                check.append(replace(at_largest, adamw_lr=at_largest.adamw_lr * factor))
            else:
                check.append(replace(at_largest, muon_lr=(at_largest.muon_lr or 0.0) * factor))
    study.ensure([*transfer, *check])
    rows = study.rows()

    def recorded(trials: Sequence[Trial]) -> list[dict[str, str]]:
        return [rows[trial.key(study.setting)] for trial in trials]

    return StudyRuns(
        grids={optimizer: recorded(grids[optimizer]) for optimizer in OPTIMIZERS},
        transfer=recorded(transfer),
        check=recorded(check),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Train what is missing, then write the figure, the frontier data and the section."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG, help="a muP config (model.mup_base_hidden_size set)")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="+",
        default=[64, 96, 128, 192, 256],
        help="d_model; the smallest is where the LRs are tuned",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[200, 400, 800],
        help="training budgets in optimizer steps; the middle one tunes",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1234, 1235], help="the first one tunes and checks"
    )
    parser.add_argument(
        "--grid-points", type=int, default=5, help="LR grid points per optimizer at the base (x2 apart)"
    )
    parser.add_argument(
        "--max-extensions",
        type=int,
        default=2,
        help="points added to a base grid while its best is on an edge",
    )
    parser.add_argument(
        "--muon-adamw-part",
        choices=("adamw", "config"),
        default="adamw",
        help="Muon's AdamW LR (embeddings, output, norms, router): AdamW's tuned LR (Moonlight's protocol), or the "
        "config's optimizer.lr (tuned with Muon at the base)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    parser.add_argument("--results", default="docs/compute_multiplier/evaluations.csv")
    parser.add_argument(
        "--publish-only", action="store_true", help="train nothing: write from the finished runs"
    )
    parser.add_argument(
        "--markdown", default=None, help="write the section into this file (default: print it)"
    )
    args = parser.parse_args(argv)  # fmt: skip
    config = REPO / args.config
    if not config.is_file():
        parser.error(f"--config {args.config}: not a file under {REPO}")
    for name, values, least in (
        ("--widths", args.widths, 4),
        ("--steps", args.steps, 2),
        ("--seeds", args.seeds, 1),
    ):
        if (
            len(set(values)) != len(values)
            or min(values) < (0 if name == "--seeds" else 1)
            or len(values) < least
        ):
            parser.error(f"{name} {' '.join(map(str, values))}: >= {least} distinct positive integers")
    if args.max_extensions < 0:
        parser.error(f"--max-extensions {args.max_extensions}: >= 0")
    if args.grid_points < 3:
        parser.error(f"--grid-points {args.grid_points}: >= 3 (an optimum needs a point each side)")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: >= 1")
    from megatron_muon.config import load_config

    if load_config(config).model.mup_base_hidden_size != min(args.widths):
        parser.error(f"--widths {' '.join(map(str, args.widths))}: the smallest must be {args.config}'s "
                     f"model.mup_base_hidden_size ({load_config(config).model.mup_base_hidden_size})")  # fmt: skip
    results = REPO / args.results
    existing = read_rows(results)
    if existing and list(existing[0]) != FIELDS:
        parser.error(f"--results {args.results}: its columns are not {FIELDS}; use another file")
    study = Study(args.config, results, args.jobs, args.publish_only)
    plan = Plan(sorted(args.widths), sorted(args.steps), args.seeds, args.grid_points, args.max_extensions,
                args.muon_adamw_part)  # fmt: skip
    try:
        found = run_study(study, plan)
    finally:
        study.close()
    write_figure_and_data(found, results.parent)
    section = markdown_section(found, plan.steps, plan.tune_steps, study.setting, args.results, argv)
    publish(section, args.markdown, START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
