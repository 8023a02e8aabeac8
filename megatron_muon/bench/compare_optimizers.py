"""Muon vs AdamW data efficiency on the Shakespeare MoE: Essential AI's token ratio and Marin's L(D) reading.

    .venv/bin/python tools/compare_optimizers.py --batch-sizes 8 32 --tokens 524288 --seq-length 64 \\
        --seeds 1234 1235 --out-dir results/compare_optimizers --markdown docs/benchmarks.md

For every global batch size B, the same model is trained on the same token budget T, each run one process
through ``launch/pretrain_muon.sh``, every run evaluating the same validation samples at ``--evals`` points:

1. **AdamW sweep** (AdamW for every parameter): ``--adamw-lrs`` (≥ 4 points) × ``--seeds``. The best LR is the one
   with the lowest final validation loss averaged over the seeds; when it is the smallest or largest of the grid
   the grid is extended by one more step beyond it (the grid's own spacing) and run, up to ``--max-extensions``.
2. **Muon sweep**: ``--muon-lrs`` (as many points) × seeds, extended the same way; the parameters AdamW manages in
   a Muon run (embeddings, output layer, norms, router) use **the AdamW sweep's best LR for that batch** — chosen,
   not swept jointly: a joint grid would cost points², and the AdamW optimum is a property of those parameters
   that the Muon runs share. (Before issue #16 they kept the config's 3e-3 while AdamW's own optimum moved to
   3e-2 at batch 32: an unfair comparison.)
3. **Token ratio** (Essential AI, "Practical Efficiency of Muon for Pretraining", 2025), per seed s: L_A(s) = the
   final loss of AdamW's best LR; T_M(s) = the tokens at which Muon's best LR first reaches L_A(s) (linear
   interpolation between evaluations); ratio(s) = T_M(s) / T (< 1: Muon needs fewer tokens). Reported as the mean
   over seeds with its standard deviation and range. Conservative by construction: every run follows its own
   warm-up + cosine schedule over the whole budget, so Muon is measured mid-schedule against AdamW's annealed end.
4. **Marin's reading** (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find Them", arXiv:2509.02046):
   AdamW at its best LR is also trained to shorter budgets ``--budget-fractions`` · T (each its own full schedule);
   per seed, its final losses are fitted with L(D) = α·D^−β + γ (:func:`fit_power_law`, least squares in numpy),
   and Muon's final loss at T is mapped to the AdamW budget D_eq that would reach it. Reported as T / D_eq
   (comparable to the token ratio) and D_eq / T (Muon's speed-up in data); beyond γ the fit gives no budget.

The budget must give at least ``--min-steps`` optimizer steps at the largest batch (256 by default: with 64 steps
the warm-up and the schedule dominated the batch-32 result of the first study).

Results: ``<out-dir>/evaluations.csv`` (one row per evaluation of every run), ``summary.csv``,
``loss_vs_tokens.png``, ``token_ratio.png``, and a section of ``--markdown``. A rerun skips every finished run made
in the same setting (:func:`study_setting`: config path and SHA-256, model overrides, sequence length, micro-batch,
evaluations, the rules of :func:`trial_overrides`, code version), so a killed study resumes; runs of another
setting stay in the file but are neither reused nor reported. ``--publish-only`` trains nothing and reports the runs
of the file's latest setting, described by the setting they recorded (a study written before runs were keyed by
their setting, ``LEGACY_FIELDS``: all its runs, described by the command line).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_muon.bench.launcher_runs import REPO, code_version, file_sha, lr_text, run_training
from megatron_muon.bench.report import cpu_description, load_average, rerun_command, write_section

START, END = "<!-- compare_optimizers:start -->", "<!-- compare_optimizers:end -->"
RUN_FIELDS = ["optimizer", "batch_size", "lr", "adamw_lr", "seed", "budget"]  # what the study varies
# What the study holds fixed and a rerun must match to reuse a run (:func:`study_setting`): the model, the data
# shapes, the evaluations and the code a run executes.
SETTING_FIELDS = ["config", "config_sha", "model_overrides", "seq_length", "micro_batch_size", "evals",
                  "eval_samples", "run_rules", "code_version"]  # fmt: skip
FIELDS = [*RUN_FIELDS, *SETTING_FIELDS, "iteration", "tokens", "val_loss"]
# Studies written before runs were keyed by their setting (docs/compare_optimizers*/): read for reports only.
LEGACY_FIELDS = [*RUN_FIELDS, "iteration", "tokens", "val_loss"]
# A smaller MoE than tiny_cpu.yaml (hidden 64, 2 layers: 1 dense + 1 MoE with 4 experts top-2), one process.
MODEL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=256",
    "model.moe_ffn_hidden_size=128",
    "model.num_moe_experts=4",
    "model.moe_layer_freq=1",
    "model.first_k_dense_layers=1",
    "parallel.world_size=1",
    "parallel.tp=1",
    "parallel.pp=1",
    "parallel.ep=1",
    "parallel.etp=1",
]


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One training run of the study."""

    optimizer: str
    """adamw (every parameter) | muon (hidden matrices; AdamW for the rest at ``adamw_lr``)."""
    batch_size: int
    lr: float
    """AdamW's LR for an AdamW run, Muon's for a Muon run."""
    adamw_lr: float
    """LR of the AdamW-managed parameters (equal to ``lr`` in an AdamW run)."""
    seed: int
    budget: int
    """Training tokens."""

    @property
    def key(self) -> tuple[str, ...]:
        return (
            self.optimizer,
            str(self.batch_size),
            lr_text(self.lr),
            lr_text(self.adamw_lr),
            str(self.seed),
            str(self.budget),
        )


def row_key(row: dict) -> tuple[str, ...]:
    """The run a row belongs to, in :attr:`RunSpec.key`'s spelling."""
    return (
        row["optimizer"],
        str(int(row["batch_size"])),
        lr_text(row["lr"]),
        lr_text(row["adamw_lr"]),
        str(int(row["seed"])),
        str(int(row["budget"])),
    )


def study_setting(args) -> dict[str, str]:
    """Everything a run's result depends on besides :data:`RUN_FIELDS`: the config (path and SHA-256), the model
    overrides, sequence length, micro-batch, evaluations, the rules that turn a run into launcher overrides
    (:func:`trial_overrides`' source: schedule, warm-up, final LR, evaluation spacing) and the code version
    (``launcher_runs.code_version``: the code a training run executes)."""
    return dict(
        config=os.path.normpath(args.config),
        config_sha=file_sha(REPO / args.config),
        model_overrides=" ".join(MODEL),
        seq_length=str(args.seq_length),
        micro_batch_size=str(args.micro_batch_size),
        evals=str(args.evals),
        eval_samples=str(args.eval_samples),
        run_rules=hashlib.sha256(inspect.getsource(trial_overrides).encode()).hexdigest()[:16],
        code_version=code_version(),
    )


def in_setting(rows: list[dict], setting: dict[str, str]) -> list[dict]:
    """The rows of runs made in ``setting`` (every field equal)."""
    return [row for row in rows if all(row.get(k) == v for k, v in setting.items())]


def latest_setting(rows: list[dict]) -> dict[str, str]:
    """The setting of the last row (the study's latest runs); empty for a file from before rows recorded one."""
    if not rows or SETTING_FIELDS[0] not in rows[-1]:
        return {}
    return {field: rows[-1][field] for field in SETTING_FIELDS}


def trial_overrides(spec: RunSpec, args) -> list[str]:
    """The launcher overrides of one run."""
    seq, batch = args.seq_length, spec.batch_size
    iters = spec.budget // (batch * seq)
    micro = min(batch, args.micro_batch_size)
    overrides = MODEL + [
        f"model.seq_length={seq}",
        f"training.global_batch_size={batch}",
        f"training.micro_batch_size={micro}",
        f"training.train_iters={iters}",
        f"training.eval_interval={max(1, iters // args.evals)}",
        f"training.eval_iters={max(1, args.eval_samples // batch)}",
        f"training.seed={spec.seed}",
        f"optimizer.warmup_iters={max(1, iters // 20)}",
        "optimizer.decay_style=cosine",
        "logging.log_interval=1000000",
        "checkpoint.resume=none",
        "checkpoint.save_interval=0",
        f"optimizer.lr={spec.adamw_lr}",
        f"optimizer.min_lr={spec.adamw_lr / 10}",
    ]
    if spec.optimizer == "adamw":
        overrides += ["optimizer.use_muon=false"]
    else:
        overrides += [f"optimizer.muon.lr={spec.lr}", f"optimizer.muon.min_lr={spec.lr / 10}"]
    return overrides


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Fewest tokens at which the (tokens, loss) curve reaches ``target``, interpolating linearly between
    evaluations (from the start when the first evaluation already reaches it); None when it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            (t0, l0), (t1, l1) = previous, (tokens, loss)
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
        previous = (tokens, loss)
    return None


@dataclass(frozen=True, slots=True)
class PowerLaw:
    """L(D) = α·D^−β + γ: final loss against training tokens D (γ: the loss no budget goes below)."""

    alpha: float
    beta: float
    gamma: float

    def loss(self, tokens: float) -> float:
        return self.alpha * tokens ** (-self.beta) + self.gamma

    def tokens_for(self, loss: float) -> float:
        """The budget D with L(D) = ``loss``: (α / (loss − γ))^(1/β); inf at or below γ."""
        if loss <= self.gamma:
            return math.inf
        return (self.alpha / (loss - self.gamma)) ** (1.0 / self.beta)


def fit_power_law(tokens: list[float], losses: list[float], beta_range=(1e-3, 4.0)) -> PowerLaw:
    """Least-squares fit of L(D) = α·D^−β + γ with γ ≥ 0 (variable projection: for a fixed β the model is linear
    in α and γ, solved exactly — on the bound γ = 0, a pure power law, when the free solution puts the floor below
    zero; β is found by a log-spaced scan of ``beta_range`` refined by golden-section search).
    Needs ≥ 3 distinct budgets (3 parameters) and a loss that falls with D (α > 0).

    Why the bound: a cross-entropy has no negative floor, and with a few budgets the free fit of a nearly straight
    L(log D) runs to β → 0 with a large negative γ (a log-law in disguise), whose extrapolation beyond the largest
    budget — where Muon's loss maps — is then a straight line in log D rather than a saturating power law."""
    budgets, values = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if budgets.shape != values.shape or len(set(budgets.tolist())) < 3:
        raise ValueError(
            f"{len(set(budgets.tolist()))} distinct token budgets {sorted(set(budgets.tolist()))}: "
            "L(D) = α·D^−β + γ needs >= 3"
        )
    if not (np.all(budgets > 0) and np.all(np.isfinite(values))):
        raise ValueError(f"budgets {budgets.tolist()} must be > 0 and losses {values.tolist()} finite")
    scale = budgets.max()
    x = budgets / scale  # conditioning: the design matrix's columns stay O(1)

    def solve(beta: float) -> tuple[float, np.ndarray]:
        design = np.stack([x ** (-beta), np.ones_like(x)], axis=1)
        coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
        if coefficients[1] < 0:  # the floor on its bound: L = α·x^−β (a convex problem's minimum lies on it)
            column = design[:, 0]
            coefficients = np.array([float(column @ values) / float(column @ column), 0.0])
        residual = design @ coefficients - values
        return float(residual @ residual), coefficients

    betas = np.geomspace(*beta_range, 400)
    errors = [solve(b)[0] for b in betas]
    i = int(np.argmin(errors))
    low, high = betas[max(0, i - 1)], betas[min(len(betas) - 1, i + 1)]
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        left, right = high - golden * (high - low), low + golden * (high - low)
        if solve(left)[0] < solve(right)[0]:
            high = right
        else:
            low = left
    beta = (low + high) / 2
    _, (alpha_scaled, gamma) = solve(beta)
    if not alpha_scaled > 0:
        raise ValueError(
            f"final losses {values.tolist()} do not fall with tokens {budgets.tolist()}: no power law"
        )
    return PowerLaw(alpha=float(alpha_scaled * scale**beta), beta=float(beta), gamma=float(gamma))


def next_learning_rate(grid: list[float], mean_final: dict[str, float]) -> float | None:
    """The point to add to ``grid`` when its best (lowest mean final loss, ``mean_final`` keyed by :func:`~megatron_muon.bench.launcher_runs.lr_text`)
    is its smallest or largest: one more step of the grid's own spacing beyond it; None when the best is inside."""
    grid = sorted(grid)
    finite = {
        lr: mean_final[lr_text(lr)] for lr in grid if math.isfinite(mean_final.get(lr_text(lr), math.nan))
    }
    if not finite:
        raise SystemExit(f"every run of the grid {grid} diverged or is missing; move the grid")
    best = min(finite, key=finite.get)
    if best == grid[0]:
        return float(lr_text(grid[0] ** 2 / grid[1]))
    if best == grid[-1]:
        return float(lr_text(grid[-1] ** 2 / grid[-2]))
    return None


Runner = Callable[[RunSpec], list[tuple[int, float]]]


class Study:
    """The runs of the comparison, in order, each run at most once (``rows`` holds the finished ones; new ones are
    appended to ``results`` as they finish, so a killed study resumes)."""

    def __init__(
        self,
        args,
        runner: Runner,
        rows: list[dict],
        results: Path | None,
        setting: dict[str, str] | None = None,
    ) -> None:
        """``rows``: the results file's rows; only those made in ``setting`` (:func:`study_setting`; None: the
        study holds nothing fixed, as on synthetic runs) are reused and decide the sweeps."""
        self.args, self.runner, self.results = args, runner, results
        self.setting = setting or {}
        self.rows = in_setting(rows, self.setting)
        self.done = {row_key(r) for r in self.rows}
        self.made = 0

    def ensure(self, spec: RunSpec) -> None:
        if spec.key in self.done:
            return
        began = time.time()
        points = self.runner(spec)
        new = [
            dict(
                optimizer=spec.optimizer,
                batch_size=spec.batch_size,
                lr=lr_text(spec.lr),
                adamw_lr=lr_text(spec.adamw_lr),
                seed=spec.seed,
                budget=spec.budget,
                **self.setting,
                iteration=i,
                tokens=i * spec.batch_size * self.args.seq_length,
                val_loss=loss,
            )
            for i, loss in points
        ]
        if self.results is not None:
            with self.results.open(
                "a", newline=""
            ) as f:  # one run's rows at once: a killed study resumes cleanly
                csv.DictWriter(f, FIELDS).writerows(new)  # setting fields blank without one
        self.rows += [{k: str(v) for k, v in row.items()} for row in new]
        self.done.add(spec.key)
        self.made += 1
        print(
            f"[run] {spec.optimizer} batch {spec.batch_size} lr {spec.lr:g} (AdamW part {spec.adamw_lr:g}) seed "
            f"{spec.seed} budget {spec.budget:,}: final validation loss {points[-1][1]:.4f} "
            f"({time.time() - began:.0f} s)",
            flush=True,
        )

    def mean_final(self, optimizer: str, batch: int, adamw_lr: float | None, budget: int) -> dict[str, float]:
        """lr → final validation loss averaged over the seeds (inf when a seed diverged)."""
        finals: dict[str, dict[str, tuple[int, float]]] = {}
        for row in self.rows:
            if (row["optimizer"], int(row["batch_size"]), int(row["budget"])) != (optimizer, batch, budget):
                continue
            if adamw_lr is not None and lr_text(row["adamw_lr"]) != lr_text(adamw_lr):
                continue
            last = finals.setdefault(lr_text(row["lr"]), {}).get(row["seed"], (-1, math.nan))
            if int(row["tokens"]) > last[0]:
                finals[lr_text(row["lr"])][row["seed"]] = (int(row["tokens"]), float(row["val_loss"]))
        return {
            lr: (sum(v for _, v in per_seed.values()) / len(per_seed))
            if all(math.isfinite(v) for _, v in per_seed.values())
            else math.inf
            for lr, per_seed in finals.items()
        }

    def sweep(self, optimizer: str, batch: int, grid: list[float], adamw_lr: float | None) -> float:
        """Run ``grid`` × seeds, extend it while its best is on an edge; the best LR."""
        grid = sorted(grid)
        for extension in range(self.args.max_extensions + 1):
            for lr in grid:
                for seed in self.args.seeds:
                    part = lr if adamw_lr is None else adamw_lr
                    self.ensure(RunSpec(optimizer, batch, lr, part, seed, self.args.tokens))
            finals = self.mean_final(optimizer, batch, adamw_lr, self.args.tokens)
            beyond = next_learning_rate(grid, finals)
            if beyond is None or extension == self.args.max_extensions:
                break
            print(
                f"[study] {optimizer} batch {batch}: best LR on the grid's edge; adding {beyond:g}",
                flush=True,
            )
            grid = sorted([*grid, beyond])
        scored = {lr: finals[lr_text(lr)] for lr in grid}
        return min(scored, key=scored.get)

    def run(self) -> None:
        args = self.args
        best_adamw = {b: self.sweep("adamw", b, args.adamw_lrs, None) for b in args.batch_sizes}
        for batch in args.batch_sizes:
            self.sweep("muon", batch, args.muon_lrs, best_adamw[batch])
        for batch in args.batch_sizes:  # Marin's L(D): AdamW at its best LR on shorter budgets
            for fraction in args.budget_fractions:
                budget = int(round(args.tokens * fraction))
                for seed in args.seeds:
                    self.ensure(RunSpec("adamw", batch, best_adamw[batch], best_adamw[batch], seed, budget))


def _spread(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return dict(mean=None, std=None, min=None, max=None, n=0)
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1)) if len(finite) > 1 else 0.0
    return dict(mean=mean, std=std, min=min(finite), max=max(finite), n=len(finite))


def _canonical(row: dict) -> dict[str, str]:
    """A row's identifying fields in one spelling (learning rates by :func:`~megatron_muon.bench.launcher_runs.lr_text`, integers without decoration)."""
    return dict(
        optimizer=row["optimizer"],
        batch_size=str(int(row["batch_size"])),
        lr=lr_text(row["lr"]),
        adamw_lr=lr_text(row["adamw_lr"]),
        seed=str(int(row["seed"])),
        budget=str(int(row["budget"])),
    )


def _curves(rows: list[dict], **match: str) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(lr, seed) → sorted (tokens, loss) of the rows whose canonical fields equal ``match``."""
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for row in rows:
        fields = _canonical(row)
        if all(fields[k] == v for k, v in match.items()):
            key = (fields["lr"], fields["seed"])
            curves.setdefault(key, []).append((int(row["tokens"]), float(row["val_loss"])))
    return {key: sorted(curve) for key, curve in curves.items()}


@dataclass(frozen=True, slots=True)
class Sweep:
    """One optimizer's runs at one batch size and budget, and the learning rate the study reports for it."""

    curves: dict[tuple[str, str], list[tuple[int, float]]]
    """(lr, seed) → sorted (tokens, validation loss); lr spelled by :func:`~megatron_muon.bench.launcher_runs.lr_text`, seed a decimal string."""
    mean_final: dict[str, float]
    """lr → final validation loss averaged over the seeds (inf when a seed diverged)."""
    best_lr: str
    """The lr with the lowest ``mean_final`` (its :func:`~megatron_muon.bench.launcher_runs.lr_text` spelling)."""

    def best_curves(self) -> dict[str, list[tuple[int, float]]]:
        """seed → (tokens, validation loss) of the runs at ``best_lr``."""
        return {seed: curve for (lr, seed), curve in self.curves.items() if lr == self.best_lr}


def best_sweeps(rows: list[dict], batch: int, budget: int) -> dict[str, Sweep]:
    """The AdamW and Muon sweeps at ``batch`` and ``budget`` with the best LR each, as the summary picks them:
    AdamW's lowest mean final loss over seeds, then Muon's among the runs whose AdamW part ran at that LR.

    Args:
        rows: rows of ``evaluations.csv``.
        batch: global batch size (sequences).
        budget: training tokens of the runs.

    Returns:
        ``adamw`` and ``muon`` → their :class:`Sweep`, each only where it has runs (no Muon without AdamW)."""
    sweeps: dict[str, Sweep] = {}
    match = dict(batch_size=str(batch), budget=str(budget))
    for optimizer in ("adamw", "muon"):
        curves = _curves(rows, optimizer=optimizer, **match)
        finals = _mean_by_lr(curves)
        if not finals:
            break
        sweeps[optimizer] = Sweep(
            curves=curves, mean_final=finals, best_lr=min(finals, key=finals.__getitem__)
        )
        match["adamw_lr"] = sweeps[optimizer].best_lr  # Muon's runs count at AdamW's best LR only
    return sweeps


def summarize(rows: list[dict], batch_sizes: list[int], budget: int, seq_length: int) -> list[dict]:
    """Per batch size: each optimizer's best LR (lowest mean final loss over seeds), the per-seed token ratio with
    its spread, and Marin's reading (AdamW's L(D) fit per seed, Muon's final loss mapped onto it)."""
    summary = []
    for batch in batch_sizes:
        sweeps = best_sweeps(rows, batch, budget)
        if "muon" not in sweeps:
            continue
        adamw_sweep, muon_sweep = sweeps["adamw"], sweeps["muon"]
        adamw, adamw_finals, adamw_lr = adamw_sweep.curves, adamw_sweep.mean_final, adamw_sweep.best_lr
        muon, muon_finals, muon_lr = muon_sweep.curves, muon_sweep.mean_final, muon_sweep.best_lr
        if not math.isfinite(adamw_finals[adamw_lr]):
            continue
        seeds = sorted(
            {seed for lr, seed in adamw if lr == adamw_lr} & {seed for lr, seed in muon if lr == muon_lr}
        )
        ratios, marin, fits = [], [], []
        for seed in seeds:
            reference = adamw[(adamw_lr, seed)][-1][1]
            reached = tokens_to_reach(muon[(muon_lr, seed)], reference)
            ratios.append(None if reached is None else reached / budget)
            finals = {  # budget -> this seed's final loss at AdamW's best LR
                int(b): curve[-1][1]
                for b in {r["budget"] for r in rows}
                for (lr, s), curve in _curves(
                    rows, optimizer="adamw", batch_size=str(batch), adamw_lr=adamw_lr, budget=str(int(b))
                ).items()
                if lr == adamw_lr and s == seed
            }
            try:
                law = fit_power_law(list(finals), list(finals.values()))
            except ValueError:
                marin.append(None)
                continue
            fits.append(law)
            equivalent = law.tokens_for(muon[(muon_lr, seed)][-1][1])
            marin.append(
                None if math.isinf(equivalent) else budget / equivalent
            )  # None: below the asymptote γ
        grid = lambda curves: sorted({float(lr) for lr, _ in curves})  # noqa: E731
        summary.append(
            dict(
                batch_size=batch,
                steps=budget // (batch * seq_length),
                seeds=len(seeds),
                adamw_lr=float(adamw_lr),
                adamw_grid=grid(adamw),
                adamw_final_loss=adamw_finals[adamw_lr],
                muon_lr=float(muon_lr),
                muon_grid=grid(muon),
                muon_final_loss=muon_finals[muon_lr],
                token_ratios=ratios,
                token_ratio=_spread(ratios),
                marin_ratios=marin,
                marin_ratio=_spread(marin),
                fits=[(f.alpha, f.beta, f.gamma) for f in fits],
                budget=budget,
            )
        )
    return summary


def _mean_by_lr(curves: dict[tuple[str, str], list[tuple[int, float]]]) -> dict[str, float]:
    by_lr: dict[str, list[float]] = {}
    for (lr, _), curve in curves.items():
        by_lr.setdefault(lr, []).append(curve[-1][1])
    return {
        lr: (sum(v) / len(v) if all(math.isfinite(x) for x in v) else math.inf) for lr, v in by_lr.items()
    }


def plot(rows: list[dict], summary: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not summary:  # no batch has both sweeps yet: nothing to draw
        return
    fig, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for ax, entry in zip(axes[0], summary, strict=True):
        batch, budget = str(entry["batch_size"]), str(entry["budget"])
        for optimizer, lr, adamw_lr, style in (
            ("adamw", entry["adamw_lr"], entry["adamw_lr"], "-"),
            ("muon", entry["muon_lr"], entry["adamw_lr"], "--"),
        ):
            curves = _curves(
                rows,
                optimizer=optimizer,
                batch_size=batch,
                budget=budget,
                lr=lr_text(lr),
                adamw_lr=lr_text(adamw_lr),
            )
            for (_, seed), points in sorted(curves.items()):
                ax.plot(
                    *zip(*points, strict=True), style, marker="o", label=f"{optimizer} lr={lr:g} seed {seed}"
                )
        ax.axhline(entry["adamw_final_loss"], color="gray", linewidth=0.8)
        ax.set(title=f"global batch {entry['batch_size']}", xlabel="tokens", ylabel="validation loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "loss_vs_tokens.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, label in (
        ("token_ratio", "token ratio (Essential AI)"),
        ("marin_ratio", "T / D_eq (Marin's L(D))"),
    ):
        measured = [e for e in summary if e[key]["mean"] is not None]
        ax.errorbar(
            [e["batch_size"] for e in measured],
            [e[key]["mean"] for e in measured],
            yerr=[e[key]["std"] for e in measured],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(xlabel="global batch size (sequences)", ylabel="Muon ÷ AdamW tokens (mean ± std over seeds)")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "token_ratio.png", dpi=120)
    plt.close(fig)


def _spread_cell(spread: dict, seeds: int) -> str:
    if spread["mean"] is None:
        return f"— (0/{seeds})"
    return (
        f"{spread['mean']:.2f} ± {spread['std']:.2f} [{spread['min']:.2f}–{spread['max']:.2f}] "
        f"({spread['n']}/{seeds})"
    )


def markdown(
    summary: list[dict], args, command: str, runs: tuple[int, int], seconds: float, load: tuple[str, str]
) -> str:
    lines = [
        START,
        "## Data efficiency: Muon vs AdamW token ratio (Shakespeare MoE, CPU)",
        "",
        "Written by `tools/compare_optimizers.py`; rerun it to refresh this section:",
        "",
        f"```bash\n{command}\n```",
        "",
        f"- CPU: {cpu_description()}; one process per run; the last invocation made {runs[0]} runs in "
        f"{seconds / 60:.0f} min and reused {runs[1]} from `evaluations.csv`; load average {load[0]} before, "
        f"{load[1]} after.",
        f"- Model: `{Path(args.config).name}` with hidden 64, 2 layers (1 dense, 1 MoE: 4 experts top-2), sequence "
        f"{args.seq_length}; budget T = {args.tokens:,} tokens per run; warm-up 5 % + cosine to lr/10; "
        f"{args.evals} evaluations on the same {args.eval_samples} validation sequences; seeds {args.seeds}.",
        f"- Sweeps (equal effort, extended by one grid step while the best is on an edge): AdamW lr "
        f"{args.adamw_lrs}; Muon lr {args.muon_lrs} with its AdamW part at the AdamW sweep's best LR for the batch.",
        "- Token ratio = tokens Muon's best LR needs to reach AdamW's best final loss ÷ T, per seed: mean ± std "
        "[range] (seeds where Muon reached it / seeds). Conservative: Muon is measured mid-schedule.",
        f"- Marin's reading: AdamW at its best LR also trained to {args.budget_fractions} · T; per seed "
        "L(D) = α·D^−β + γ fitted to its final losses; T / D_eq, D_eq = the AdamW budget that reaches Muon's final "
        "loss (< 1: Muon is worth more data than it saw; — when Muon's loss is below the fit's γ)."
        if args.budget_fractions
        else "- Marin's reading: not made (`--budget-fractions` empty: no shorter AdamW budgets were trained).",
        "",
        "| global batch | steps | AdamW best lr (grid) | AdamW final loss | Muon best lr (grid) | Muon final loss "
        "| token ratio | T / D_eq (Marin) | fit α, β, γ (first seed) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def lr_cell(lr: float, grid: list[float]) -> str:  # an optimum on the grid's edge may lie beyond it
        edge = " (edge)" if lr in (min(grid), max(grid)) else ""
        return f"{lr:g}{edge} ({len(grid)} pts)"

    for e in summary:
        fit = "—" if not e["fits"] else "{:.3g}, {:.3f}, {:.3f}".format(*e["fits"][0])
        lines.append(
            f"| {e['batch_size']} | {e['steps']} | {lr_cell(e['adamw_lr'], e['adamw_grid'])} | "
            f"{e['adamw_final_loss']:.4f} | {lr_cell(e['muon_lr'], e['muon_grid'])} | {e['muon_final_loss']:.4f} | "
            f"{_spread_cell(e['token_ratio'], e['seeds'])} | {_spread_cell(e['marin_ratio'], e['seeds'])} | {fit} |"
        )
    lines += [
        "",
        "(edge): the best learning rate is still the smallest or largest of its (extended) sweep.",
        "Goal (issues #8, #16): ratio ≤ 0.6, and not worse at 4× the smallest batch.",
        END,
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="launch/configs/tiny_cpu.yaml")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tokens", type=int, default=524_288, help="training tokens per run (T)")
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
    parser.add_argument("--eval-samples", type=int, default=64, help="validation sequences per evaluation")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[2.5e-3, 5e-3, 1e-2, 2e-2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235])
    parser.add_argument(
        "--budget-fractions",
        type=float,
        nargs="*",
        default=[0.125, 0.25, 0.5],
        help="shorter AdamW budgets (fractions of --tokens) for the L(D) fit; with T, >= 3 budgets; none: no "
        "Marin reading (its runs skipped)",
    )
    parser.add_argument(
        "--min-steps", type=int, default=256, help="optimizer steps required at the largest batch"
    )
    parser.add_argument(
        "--max-extensions",
        type=int,
        default=2,
        help="grid points added per sweep while its best is on an edge",
    )
    parser.add_argument("--out-dir", default="results/compare_optimizers")
    parser.add_argument(
        "--markdown", default=None, help="markdown file whose compare_optimizers section is rewritten"
    )
    parser.add_argument(
        "--publish-only",
        action="store_true",
        help="train nothing: write the summary, figures and section from --out-dir's evaluations.csv as it is",
    )
    args = parser.parse_args(argv)
    check_arguments(parser, args)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / "evaluations.csv"
    rows = []
    if results.exists():
        with results.open(newline="") as f:
            reader = csv.DictReader(f)
            legacy = reader.fieldnames == LEGACY_FIELDS
            if reader.fieldnames != FIELDS and not (legacy and args.publish_only):
                parser.error(
                    f"{results} has columns {reader.fieldnames}, not {FIELDS}"
                    + (" (a study from before runs were keyed by their setting: --publish-only rewrites its report)"
                       if legacy else "") + ": use another --out-dir"
                )  # fmt: skip
            rows = list(reader)
    elif args.publish_only:
        parser.error(f"--publish-only: {results} does not exist")
    else:
        with results.open("w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()
    start, load_before = time.time(), load_average()
    if args.publish_only:  # the latest setting's runs, described by what they recorded
        setting = latest_setting(rows)
        if setting:
            args.config, args.micro_batch_size = setting["config"], int(setting["micro_batch_size"])
            args.seq_length, args.evals = int(setting["seq_length"]), int(setting["evals"])
            args.eval_samples = int(setting["eval_samples"])
        study = Study(args, runner=_no_training, rows=rows, results=None, setting=setting)
    else:
        study = Study(
            args,
            lambda spec: run_training(args.config, trial_overrides(spec, args)).validation,
            rows,
            results,
            setting=study_setting(args),
        )
        study.run()
    summary = summarize(study.rows, args.batch_sizes, args.tokens, args.seq_length)
    with (out_dir / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(summary[0]) if summary else ["batch_size"])
        writer.writeheader()
        writer.writerows(summary)
    plot(study.rows, summary, out_dir)
    command = rerun_command("compare_optimizers.py", argv)
    runs = (study.made, len(study.done) - study.made)
    section = markdown(
        summary, args, command.strip(), runs, time.time() - start, (load_before, load_average())
    )
    print(section)
    if args.markdown:
        write_section(Path(args.markdown), section, START, END)
    return 0


def _no_training(spec: RunSpec) -> list[tuple[int, float]]:
    raise AssertionError(f"--publish-only trains nothing, yet {spec} was asked for")


def check_arguments(parser: argparse.ArgumentParser, args) -> None:
    """Refuse a study that cannot be fair or conclusive, before any run."""
    for name in ("adamw_lrs", "muon_lrs"):
        grid = getattr(args, name)
        if len(grid) < 4 or len(set(grid)) != len(grid) or min(grid) <= 0:
            parser.error(f"--{name.replace('_', '-')} {grid}: at least 4 distinct positive learning rates")
    if len(args.adamw_lrs) != len(args.muon_lrs):
        parser.error("equal tuning effort: --adamw-lrs and --muon-lrs need the same number of points")
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        parser.error(
            f"--seeds {args.seeds}: at least 2 distinct seeds (the ratio is reported with its spread)"
        )
    fractions = args.budget_fractions
    if fractions and (len({f for f in fractions if 0 < f < 1}) < 2 or any(not 0 < f < 1 for f in fractions)):
        parser.error(
            f"--budget-fractions {fractions}: none (no Marin reading) or at least 2 distinct fractions in (0, 1)"
        )
    largest = max(args.batch_sizes)
    steps = args.tokens // (largest * args.seq_length)
    if steps < args.min_steps:
        parser.error(
            f"--tokens={args.tokens} gives {steps} optimizer steps at batch {largest} × {args.seq_length} tokens; "
            f"--min-steps={args.min_steps} needs --tokens >= {args.min_steps * largest * args.seq_length}"
        )
    for batch in args.batch_sizes:
        shortest = int(round(args.tokens * min(args.budget_fractions, default=1.0)))
        if batch < 1 or shortest < batch * args.seq_length * args.evals:
            parser.error(
                f"--batch-sizes {batch}: the shortest budget {shortest} must hold at least --evals={args.evals} "
                f"steps of {batch} x {args.seq_length} tokens"
            )
        if batch > args.micro_batch_size and batch % args.micro_batch_size:
            parser.error(
                f"--batch-sizes {batch} is not a multiple of --micro-batch-size={args.micro_batch_size}"
            )


if __name__ == "__main__":
    sys.exit(main())
