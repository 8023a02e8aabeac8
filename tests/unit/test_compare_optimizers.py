"""The comparison's arithmetic and its order of runs (``megatron_muon/bench/compare_optimizers.py``) on synthetic
loss curves: no training (the runs themselves are an experiment, not a test)."""

from __future__ import annotations

import argparse
import csv
import math
from types import SimpleNamespace

import pytest

from megatron_muon.bench import compare_optimizers as tool

ALPHA, BETA, GAMMA = 60.0, 0.3, 3.0


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tool.tokens_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert tool.tokens_to_reach(curve, 6.0) == 100.0  # the first evaluation already reaches it
    assert tool.tokens_to_reach(curve, 2.0) is None


def test_power_law_fit_recovers_known_parameters_and_the_mapping_inverts_it():
    budgets = [2**15, 2**16, 2**17, 2**18, 2**19]
    law = tool.PowerLaw(ALPHA, BETA, GAMMA)
    fit = tool.fit_power_law(budgets, [law.loss(d) for d in budgets])
    assert (fit.alpha, fit.beta, fit.gamma) == pytest.approx((ALPHA, BETA, GAMMA), rel=1e-4)
    # Muon's loss at T mapped to the AdamW budget that reaches it: exactly the budget that produced it.
    for tokens in (2**16, 3 * 2**18, 2**21):
        assert fit.tokens_for(law.loss(tokens)) == pytest.approx(tokens, rel=1e-3)
    assert fit.tokens_for(GAMMA - 0.01) == math.inf  # below the asymptote no budget reaches it
    # With noise of 1e-3 nats (a seed's spread) the exponent is still found to within a few percent.
    noisy = tool.fit_power_law(budgets, [law.loss(d) + 1e-3 * (-1) ** i for i, d in enumerate(budgets)])
    assert noisy.beta == pytest.approx(BETA, rel=0.1)


def test_power_law_fit_keeps_the_floor_at_or_above_zero():
    """Losses straight in log D (a few budgets, as the study has) make the free fit run to β → 0 with a large
    negative γ; the floor is bounded at 0, a pure power law through the points, which still maps losses back."""
    budgets = [2**17, 2**18, 2**19, 2**20]
    losses = [6.0 - 0.3 * math.log2(d / 2**17) for d in budgets]
    fit = tool.fit_power_law(budgets, losses)
    assert fit.gamma == 0.0 and fit.alpha > 0 and fit.beta > 0
    assert [fit.loss(d) for d in budgets] == pytest.approx(losses, abs=0.02)
    assert fit.tokens_for(losses[2]) == pytest.approx(budgets[2], rel=0.05)


def test_power_law_fit_refuses_what_it_cannot_fit():
    with pytest.raises(ValueError, match="2 distinct token budgets"):
        tool.fit_power_law([1e5, 2e5, 2e5], [4.0, 3.9, 3.9])
    with pytest.raises(ValueError, match="do not fall with tokens"):
        tool.fit_power_law([1e5, 2e5, 4e5], [3.0, 3.5, 4.0])


def test_grid_is_extended_only_when_the_best_is_on_an_edge():
    grid = [1e-3, 3e-3, 1e-2, 3e-2]
    loss = lambda best: {tool.lr_text(lr): abs(math.log(lr / best)) for lr in grid}  # noqa: E731
    assert tool.next_learning_rate(grid, loss(3e-3)) is None
    assert tool.next_learning_rate(grid, loss(1e-1)) == pytest.approx(9e-2)  # one step of ×3 beyond 3e-2
    assert tool.next_learning_rate(grid, loss(1e-4)) == pytest.approx(1e-3 / 3, rel=1e-5)


class SyntheticRuns:
    """Loss curves of known shape: AdamW α·t^−β + γ; Muon α·(k·t)^−β + γ (k: its data efficiency, per seed);
    plus a penalty (log of the LR's distance to its optimum)² for each optimizer's LR and for the Muon runs'
    AdamW part, and a per-seed offset."""

    def __init__(
        self, adamw_optimum: dict[int, float], muon_optimum: float, k: dict[int, float], args
    ) -> None:
        self.adamw_optimum, self.muon_optimum, self.k, self.args = adamw_optimum, muon_optimum, k, args
        self.specs: list[tool.RunSpec] = []

    def __call__(self, spec: tool.RunSpec) -> list[tuple[int, float]]:
        self.specs.append(spec)
        iters = spec.budget // (spec.batch_size * self.args.seq_length)
        interval = max(1, iters // self.args.evals)
        penalty = 0.05 * math.log(spec.adamw_lr / self.adamw_optimum[spec.batch_size]) ** 2
        k = 1.0
        if spec.optimizer == "muon":
            penalty += 0.05 * math.log(spec.lr / self.muon_optimum) ** 2
            k = self.k[spec.seed]
        offset = 0.01 * spec.seed + getattr(self, "penalty_offset", 0.0)
        points = []
        for iteration in range(interval, iters + 1, interval):
            tokens = iteration * spec.batch_size * self.args.seq_length
            points.append((iteration, ALPHA * (k * tokens) ** (-BETA) + GAMMA + penalty + offset))
        return points


def _args(**changes):
    args = dict(
        batch_sizes=[8, 32],
        tokens=32 * 64 * 256,  # 256 steps at batch 32
        seq_length=64,
        evals=8,
        seeds=[1, 2],
        adamw_lrs=[1e-3, 3e-3, 1e-2, 3e-2],
        muon_lrs=[2.5e-3, 5e-3, 1e-2, 2e-2],
        budget_fractions=[0.125, 0.25, 0.5],
        max_extensions=2,
    )
    return argparse.Namespace(**(args | changes))


def test_study_is_fair_and_reports_both_readings():
    args = _args()
    # AdamW's optimum: inside the grid at batch 8; beyond its top at batch 32 (the grid must follow it).
    runs = SyntheticRuns(adamw_optimum={8: 3e-3, 32: 9e-2}, muon_optimum=5e-3, k={1: 2.0, 2: 2.5}, args=args)
    study = tool.Study(args, runs, rows=[], results=None)
    study.run()

    adamw_32 = sorted({s.lr for s in runs.specs if s.optimizer == "adamw" and s.batch_size == 32})
    assert adamw_32 == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 9e-2, 0.27])  # extended twice, optimum inside
    # Every Muon run's AdamW part is at the AdamW sweep's best LR for its batch.
    for spec in runs.specs:
        if spec.optimizer == "muon":
            assert spec.adamw_lr == pytest.approx({8: 3e-3, 32: 9e-2}[spec.batch_size])
    # Two seeds of each point, no run twice.
    assert len({s.key for s in runs.specs}) == len(runs.specs)
    assert all({s.seed for s in runs.specs if s.key[:4] == spec.key[:4]} == {1, 2} for spec in runs.specs)

    small, large = tool.summarize(study.rows, args.batch_sizes, args.tokens, args.seq_length)
    assert (small["adamw_lr"], large["adamw_lr"], large["muon_lr"]) == pytest.approx((3e-3, 9e-2, 5e-3))
    assert large["steps"] == 256 and large["seeds"] == 2
    # Muon reaches AdamW's final loss with 1/k of the tokens (exactly 1/2 at an evaluation; 1/2.5 interpolated).
    assert large["token_ratios"][0] == pytest.approx(0.5, rel=1e-6)
    assert large["token_ratios"][1] == pytest.approx(0.4, rel=0.05)
    spread = large["token_ratio"]
    assert spread["n"] == 2 and spread["min"] < spread["mean"] < spread["max"] and spread["std"] > 0.05
    # Marin's reading: the AdamW fit (per seed, 4 budgets) maps Muon's final loss to k·T, so T / D_eq = 1/k.
    assert large["marin_ratios"] == pytest.approx([0.5, 0.4], rel=1e-3)
    assert large["fits"][0] == pytest.approx((ALPHA, BETA, GAMMA + 0.01), rel=1e-3)

    # A rerun over the rows it wrote runs nothing (the study resumes).
    again = tool.Study(args, lambda spec: pytest.fail(f"reran {spec}"), rows=list(study.rows), results=None)
    again.run()
    assert again.made == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "262144", "--batch-sizes", "8", "32"], "gives 128 optimizer steps at batch 32"),
        (
            ["--adamw-lrs", "1e-3", "1e-2", "1e-1", "--muon-lrs", "1e-2", "2e-2", "4e-2"],
            "at least 4 distinct",
        ),
        (["--seeds", "1"], "at least 2 distinct seeds"),
        (["--budget-fractions", "0.5"], "none (no Marin reading) or at least 2 distinct fractions"),
        (["--muon-lrs", "1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2"], "equal tuning effort"),
    ],
)
def test_unfair_or_too_short_studies_are_refused(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        tool.main([*argv, "--seq-length", "64", "--out-dir", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_command_line_writes_the_table_plots_and_resumes(tmp_path, monkeypatch, capsys):
    """main() end to end with the synthetic runs in place of the launcher: summary, plots, the markdown section."""
    args = _args()
    runs = SyntheticRuns(adamw_optimum={8: 3e-3, 32: 3e-3}, muon_optimum=5e-3, k={1: 2.0, 2: 2.0}, args=args)
    monkeypatch.setattr(tool, "trial_overrides", lambda spec, _: spec)
    monkeypatch.setattr(tool, "run_training", lambda _, spec: SimpleNamespace(validation=runs(spec)))
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\n{tool.START}\nold\n{tool.END}\n\nafter\n")
    argv = [
        "--tokens",
        str(args.tokens),
        "--seq-length",
        "64",
        "--seeds",
        "1",
        "2",
        "--out-dir",
        str(tmp_path / "out"),
    ]
    assert tool.main([*argv, "--markdown", str(page)]) == 0
    text = page.read_text()
    assert "old" not in text and text.endswith("after\n")
    row = next(line for line in text.splitlines() if line.startswith("| 32 |"))
    assert "| 256 |" in row and "0.50 ± 0.00 [0.50–0.50] (2/2)" in row
    for name in ("summary.csv", "loss_vs_tokens.png", "token_ratio.png", "evaluations.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    made = len(runs.specs)
    assert tool.main(argv) == 0 and len(runs.specs) == made  # resumed from evaluations.csv: nothing reruns


def test_runs_are_reused_only_in_their_setting_and_reported_from_one(tmp_path, monkeypatch, capsys):
    """A run is reused only when everything it depends on is unchanged (here the code version); the rows of the
    older setting stay in the file, and a report takes the latest setting's runs only."""
    args = _args()
    runs = SyntheticRuns(adamw_optimum={8: 3e-3, 32: 3e-3}, muon_optimum=5e-3, k={1: 2.0, 2: 2.0}, args=args)
    monkeypatch.setattr(tool, "trial_overrides", lambda spec, _: spec)
    monkeypatch.setattr(tool, "run_training", lambda _, spec: SimpleNamespace(validation=runs(spec)))
    out = tmp_path / "out"
    argv = ["--tokens", str(args.tokens), "--seq-length", "64", "--seeds", "1", "2", "--out-dir", str(out)]
    assert tool.main(argv) == 0
    made = len(runs.specs)
    with (out / "evaluations.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["code_version"] for row in rows} == {tool.code_version()}
    assert {row["config_sha"] for row in rows} == {tool.file_sha(tool.REPO / "launch/configs/tiny_cpu.yaml")}
    assert {row["model_overrides"] for row in rows} == {" ".join(tool.MODEL)}

    monkeypatch.setattr(tool, "code_version", lambda: "another-version")
    runs.penalty_offset = 1.0  # the new code's runs end 1 nat higher: a report mixing settings would show it
    assert tool.main(argv) == 0
    assert len(runs.specs) == 2 * made  # every run again, in the new setting
    page = tmp_path / "benchmarks.md"
    # Published from the latest setting's runs, described by what they recorded (sequence 64, not the 32 asked).
    assert tool.main([*argv[:3], "32", *argv[4:], "--publish-only", "--markdown", str(page)]) == 0
    text = page.read_text()
    assert f"reused {made} from `evaluations.csv`" in text and "sequence 64;" in text
    row = next(line for line in text.splitlines() if line.startswith("| 32 |"))
    final = float(row.split("|")[4])
    assert final > GAMMA + 1.0  # the new setting's losses only


def test_a_study_from_before_the_setting_was_recorded_is_reported_not_extended(tmp_path, monkeypatch, capsys):
    """A results file with the legacy columns (docs/compare_optimizers_16/) is reported from as it is; training into
    it is refused, since its runs' setting is unknown."""
    args = _args()
    runs = SyntheticRuns(adamw_optimum={8: 3e-3, 32: 3e-3}, muon_optimum=5e-3, k={1: 2.0, 2: 2.0}, args=args)
    out = tmp_path / "out"
    out.mkdir()
    study = tool.Study(args, runs, rows=[], results=None)
    study.run()
    with (out / "evaluations.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, tool.LEGACY_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(study.rows)
    argv = ["--tokens", str(args.tokens), "--seq-length", "64", "--seeds", "1", "2", "--out-dir", str(out)]
    monkeypatch.setattr(tool, "run_training", lambda *_: pytest.fail("trained in --publish-only"))
    page = tmp_path / "benchmarks.md"
    assert tool.main([*argv, "--publish-only", "--markdown", str(page)]) == 0
    assert "0.50 ± 0.00 [0.50–0.50] (2/2)" in next(
        line for line in page.read_text().splitlines() if line.startswith("| 32 |")
    )
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    assert "--publish-only rewrites its report" in capsys.readouterr().err


def test_without_budget_fractions_no_marin_runs_are_made(tmp_path, monkeypatch):
    args = _args(budget_fractions=[])
    runs = SyntheticRuns(adamw_optimum={8: 3e-3, 32: 3e-3}, muon_optimum=5e-3, k={1: 2.0, 2: 2.0}, args=args)
    study = tool.Study(args, runs, rows=[], results=None)
    study.run()
    assert {spec.budget for spec in runs.specs} == {args.tokens}
    (_, large) = tool.summarize(study.rows, args.batch_sizes, args.tokens, args.seq_length)
    assert large["token_ratios"][0] == pytest.approx(0.5, rel=1e-6) and large["marin_ratios"] == [None, None]
