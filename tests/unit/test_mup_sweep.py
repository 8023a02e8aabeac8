"""The telescoping sweep's search (``megatron_muon/bench/mup_sweep.py``) on a synthetic objective: no training.

The objective is a parabola in log2 of the swept value whose optimum may move with the width; a trial's cost is
width² (so the compute accounting has exact answers)."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest

from megatron_muon.bench.mup_sweep import (
    Stage,
    SweepParam,
    TelescopingSweep,
    TrialOutcome,
    config_hash,
    edge_parameters,
    telescoping_stages,
    window,
)

REPO = Path(__file__).resolve().parents[2]


class Parabola:
    """loss = (log2(lr) − optimum(width))² + 1; ``version`` stands for the rest of the config's content."""

    def __init__(self, optimum: dict[int, float], version: int = 0, fail_after: int | None = None) -> None:
        self.optimum, self.version, self.fail_after = optimum, version, fail_after
        self.runs: list[tuple[int, float]] = []

    def resolve(self, width, values):
        return {"model": {"hidden_size": width}, "optimizer": dict(values), "version": self.version}

    def run(self, width, values, trial_dir):
        if self.fail_after is not None and len(self.runs) == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.runs.append((width, values["lr"]))
        loss = (math.log2(values["lr"]) - self.optimum[width]) ** 2 + 1.0
        return TrialOutcome("ok", loss, loss, 0.01, flops=float(width**2))

    def final_run_flops(self, width, values):
        return float(width**2)


def _sweep(objective, out, widths=(64, 128, 256), *, radius=2, window_radius=2, refine=2, max_recentres=3):
    return TelescopingSweep(
        objective=objective,
        params=[SweepParam("lr", center=1.0, factor=2.0)],
        widths=list(widths),
        stages=telescoping_stages(len(widths), radius=radius, window_radius=window_radius, refine=refine),
        out=out,
        max_recentres=max_recentres,
        log=lambda line: None,
    )


def test_stages_refine_the_spacing_at_each_width():
    stages = telescoping_stages(3, radius=3, window_radius=2, refine=2)
    assert stages == [Stage(Fraction(1), 3), Stage(Fraction(1, 2), 2), Stage(Fraction(1, 4), 2)]
    assert (
        telescoping_stages(3, radius=3, window_radius=2, refine=2, telescope=False)
        == [Stage(Fraction(1), 3)] * 3
    )
    points = window((Fraction(1),), Stage(Fraction(1, 2), 2))
    assert points == [(Fraction(0),), (Fraction(1, 2),), (Fraction(1),), (Fraction(3, 2),), (Fraction(2),)]
    assert edge_parameters((Fraction(2),), (Fraction(1),), Stage(Fraction(1, 2), 2)) == [0]
    assert edge_parameters((Fraction(3, 2),), (Fraction(1),), Stage(Fraction(1, 2), 2)) == []
    with pytest.raises(ValueError, match="refine=0"):
        telescoping_stages(2, radius=1, window_radius=1, refine=0)


def test_answer_is_refined_beyond_the_base_grid(tmp_path):
    """Optimum at log2(lr) = 0.3 at every width: the base grid (×2) can only say 0; the windows at ×√2 and ×2^¼
    find 0.25, a quarter of a base step."""
    summary = _sweep(Parabola({64: 0.3, 128: 0.3, 256: 0.3}), tmp_path).run()
    exponents = [w["best_exponents"] for w in summary["widths"]]
    assert exponents == [["0"], ["1/2"], ["1/4"]]
    assert summary["final"]["lr"] == pytest.approx(2**0.25, rel=1e-5)
    assert [w["recentres"] for w in summary["widths"]] == [0, 0, 0]
    assert summary["widths"][2]["spacing_factor"]["lr"] == pytest.approx(2**0.25)


def test_window_recentres_and_extends_when_the_optimum_is_on_its_edge(tmp_path):
    """The optimum jumps from 0 at width 64 to log2 = 2.5 at 128; the ±1 window (spacing ½) follows it."""
    objective = Parabola({64: 0.0, 128: 2.5})
    summary = _sweep(objective, tmp_path / "follow", widths=(64, 128)).run()
    at_128 = summary["widths"][1]
    assert (
        at_128["best_exponents"] == ["5/2"] and at_128["recentres"] == 2 and not at_128["best_on_grid_edge"]
    )
    # Windows around 0, 1, 2 (spacing ½, ±2 points): 5 + 2 + 2 distinct points; none is run twice.
    assert len(at_128["trials"]) == 9 and len([r for r in objective.runs if r[0] == 128]) == 9

    clipped = _sweep(
        Parabola({64: 0.0, 128: 2.5}), tmp_path / "clipped", widths=(64, 128), max_recentres=0
    ).run()
    assert clipped["widths"][1]["best_exponents"] == ["1"] and clipped["widths"][1]["best_on_grid_edge"] == [
        "lr"
    ]


def test_base_grid_recentres_too(tmp_path):
    summary = _sweep(Parabola({64: -4.0, 128: -4.0}), tmp_path, widths=(64, 128), radius=1).run()
    assert summary["widths"][0]["best_exponents"] == ["-4"] and summary["widths"][0]["recentres"] == 3


def test_trials_are_keyed_by_resolved_config_content(tmp_path):
    optimum = {64: 0.3, 128: 0.3, 256: 0.3}
    first = Parabola(optimum)
    summary = _sweep(first, tmp_path).run()
    assert summary["compute"]["trials_run_now"] == len(first.runs) == summary["compute"]["trials"]

    same = Parabola(optimum)  # the same config again: every trial reused, nothing runs
    again = _sweep(same, tmp_path).run()
    assert same.runs == [] and again["compute"]["trials_run_now"] == 0 and again["final"] == summary["final"]

    changed = Parabola(optimum, version=1)  # same widths and values, other config content: all rerun
    _sweep(changed, tmp_path).run()
    assert sorted(changed.runs) == sorted(first.runs)

    # A sweep killed mid-way resumes: the trials it finished are not rerun.
    killed = Parabola(optimum, version=2, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        _sweep(killed, tmp_path).run()
    resumed = Parabola(optimum, version=2)
    _sweep(resumed, tmp_path).run()
    assert len(resumed.runs) == len(first.runs) - 4 and not set(killed.runs) & set(resumed.runs)


def test_compute_is_counted_against_full_grids_at_the_target(tmp_path):
    summary = _sweep(Parabola({64: 0.3, 128: 0.3, 256: 0.3}), tmp_path, radius=3).run()
    counts = [len(w["trials"]) for w in summary["widths"]]
    assert counts == [7, 5, 5]
    compute = summary["compute"]
    # Cost ∝ width²: a 64-wide trial is 1/16 of a 256-wide final run, a 128-wide one 1/4.
    assert compute["sweep_in_final_runs"] == pytest.approx(7 / 16 + 5 / 4 + 5)
    assert compute["full_grid_at_target_in_final_runs"] == 7
    # The base range (±3 steps of ×2) at the final spacing (¼ step): 25 points.
    assert compute["full_grid_at_target_same_resolution_in_final_runs"] == 25
    assert compute["trials"] == 17


def test_real_config_hash_follows_content_not_path(tmp_path):
    """Through the trainer's own config loading (no training): a copy of the config at another path has the same
    key; an edited field gives another key."""
    import contextlib

    from megatron_muon.bench.mup_sweep import TrainerObjective

    toy = ["data.mock=true", "data.blend=[]", "data.tokenizer_path=null", "model.vocab_size=256"]
    source = REPO / "launch/configs/mup_shakespeare.yaml"
    copy = tmp_path / "elsewhere.yaml"
    copy.write_text(source.read_text())
    with contextlib.ExitStack() as stack:
        keys = [
            config_hash(TrainerObjective(str(path), toy, stack).resolve(128, {"optimizer.muon.lr": 0.01}))
            for path in (source, copy)
        ]
        assert keys[0] == keys[1]
        copy.write_text(source.read_text() + "\n# a comment changes nothing\n")
        assert (
            config_hash(TrainerObjective(str(copy), toy, stack).resolve(128, {"optimizer.muon.lr": 0.01}))
            == keys[0]
        )
        assert "seed: 1234" in source.read_text()
        copy.write_text(source.read_text().replace("seed: 1234", "seed: 7"))  # the config file edited
        edited = TrainerObjective(str(copy), toy, stack)
        assert config_hash(edited.resolve(128, {"optimizer.muon.lr": 0.01})) != keys[0]
        assert (
            config_hash(TrainerObjective(str(copy), toy, stack).resolve(256, {"optimizer.muon.lr": 0.01}))
            != keys[0]
        )
