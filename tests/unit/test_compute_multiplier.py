"""tools/compute_multiplier.py with training replaced by a known loss surface: what it tunes, trains, reuses and
reports."""

from __future__ import annotations

import math
import sys

import pytest

from megatron_muon.bench import compute_multiplier as tool

ARGS = ["--widths", "64", "96", "128", "192", "--steps", "100", "200", "400", "--seeds", "1", "2"]


ADAMW_BEST = {"lr": 0.012}


def fake_loss(trial) -> float:
    """A smooth surface: AdamW best at LR 0.012, Muon at 0.04 and 0.3 nats lower; larger and longer is better."""
    if trial.optimizer == "adamw":
        lr_term, offset = math.log2(trial.adamw_lr / ADAMW_BEST["lr"]) ** 2, 0.0
    else:
        lr_term, offset = math.log2(trial.muon_lr / 0.04) ** 2, -0.3
    size = (trial.width**2 * trial.steps) ** -0.15
    return 4.0 + 30.0 * size + 0.01 * lr_term + offset + 0.001 * trial.seed


@pytest.fixture
def trained(monkeypatch):
    calls = []

    def train(self, trials):
        for trial in trials:
            calls.append(trial)
            yield trial, {"status": "ok", "val_loss": fake_loss(trial), "train_loss": 0.0,
                          "active_params": trial.width * 1000, "flops": 1e6 * trial.width**2 * trial.steps,
                          "seconds": 1.0}  # fmt: skip

    monkeypatch.setattr(tool.Study, "train", train)
    monkeypatch.setattr(tool.Study, "ns_flops_per_step", lambda self, width: 1e6 * width**2)
    monkeypatch.setattr(tool, "code_version", lambda: "version-a")
    return calls


def test_tunes_at_the_base_transfers_checks_and_reports(tmp_path, trained, monkeypatch):
    results, page = tmp_path / "evaluations.csv", tmp_path / "benchmarks.md"
    argv = [*ARGS, "--results", str(results), "--markdown", str(page)]
    assert tool.main(argv) == 0
    tuning = [t for t in trained if t.phase == "tune"]
    adamw_lrs = sorted(t.adamw_lr for t in tuning if t.optimizer == "adamw")
    # Centre 0.048 x 2^-2..2: the best (0.012) sits on the low edge, so the grid is extended once to 0.006.
    assert adamw_lrs == pytest.approx([0.006, 0.012, 0.024, 0.048, 0.096, 0.192])
    assert sorted(t.muon_lr for t in tuning if t.optimizer == "muon") == pytest.approx(
        [0.005, 0.01, 0.02, 0.04, 0.08]
    )
    assert all((t.width, t.steps, t.seed) == (64, 200, 1) for t in tuning)
    # Muon's AdamW part at AdamW's tuned LR (Moonlight's protocol), from its grid on.
    assert {round(t.adamw_lr, 9) for t in trained if t.optimizer == "muon"} == {0.012}
    transfer = [t for t in trained if t.phase == "transfer"]
    # 4 widths x 3 budgets x 2 seeds x 2 optimizers, minus the two already trained while tuning (64, 200, seed 1).
    assert len(transfer) == 4 * 3 * 2 * 2 - 2
    assert {round(t.adamw_lr, 9) for t in transfer if t.optimizer == "adamw"} == {0.012}
    assert {round(t.muon_lr, 9) for t in transfer if t.optimizer == "muon"} == {0.04}
    check = [t for t in trained if t.phase == "check"]
    assert sorted((t.optimizer, t.width, round(t.adamw_lr, 9), t.muon_lr and round(t.muon_lr, 9)) for t in check) == [
        ("adamw", 192, 0.006, None), ("adamw", 192, 0.024, None), ("muon", 192, 0.012, 0.02), ("muon", 192, 0.012, 0.08),
    ]  # fmt: skip
    text = page.read_text()
    assert "| AdamW | 0.012 | **" in text and "| Muon | 0.04 | **" in text
    assert (
        text.count("| yes |") == 2 and "(edge)" not in text
    )  # the transferred LR is the best of three at 192 for both
    assert (
        "code version `version-a`" in text
        and "### C_Muon ÷ C_AdamW at equal loss, compute = model FLOPs" in text
    )
    assert (tmp_path / "loss_vs_compute.png").exists() and (tmp_path / "frontier.csv").exists()

    count = len(trained)
    assert tool.main(argv) == 0 and len(trained) == count  # everything is reused
    monkeypatch.setattr(tool, "code_version", lambda: "version-b")
    assert tool.main([*argv, "--publish-only"]) == 0 and len(trained) == count  # the file's latest setting
    assert "code version `version-a`" in page.read_text()
    with pytest.raises(SystemExit, match="not in"):
        tool.main([*ARGS, "--widths", "64", "96", "128", "256", "--results", str(results), "--publish-only"])
    assert tool.main(argv) == 0 and len(trained) == 2 * count  # new code: everything again, old rows kept
    assert len(tool.read_rows(results)) == 2 * count
    monkeypatch.setattr(tool, "run_rules", lambda: "other-rules")  # trial_overrides or local_run.py changed
    assert tool.main(argv) == 0 and len(trained) == 3 * count


def test_muons_adamw_part_can_stay_at_the_configs_lr(tmp_path, trained):
    page = tmp_path / "page.md"
    argv = [
        *ARGS,
        "--muon-adamw-part",
        "config",
        "--results",
        str(tmp_path / "e.csv"),
        "--markdown",
        str(page),
    ]
    assert tool.main(argv) == 0
    assert {t.adamw_lr for t in trained if t.optimizer == "muon"} == {
        0.048
    }  # mup_shakespeare.yaml's optimizer.lr
    assert "at 0.048, the config's (tuned jointly with the Muon LR" in page.read_text()


def test_the_compute_ratio_is_read_from_the_recorded_runs(tmp_path, trained, monkeypatch):
    """Muon's runs score what AdamW's score with twice the FLOPs: the ratio is 1/2 at every shared loss."""

    def adamw_like(trial) -> float:
        size = trial.width**2 * trial.steps * (2 if trial.optimizer == "muon" else 1)
        lr = trial.adamw_lr if trial.optimizer == "adamw" else trial.muon_lr
        best = 0.012 if trial.optimizer == "adamw" else 0.04
        return 4.0 + 30.0 * size**-0.15 + 0.01 * math.log2(lr / best) ** 2 + 0.001 * trial.seed

    monkeypatch.setattr(sys.modules[__name__], "fake_loss", adamw_like)
    results = tmp_path / "evaluations.csv"
    assert tool.main([*ARGS, "--results", str(results), "--markdown", str(tmp_path / "page.md")]) == 0
    from megatron_muon.bench.compute_multiplier_report import comparison

    study = tool.Study(tool.CONFIG, results, 1, publish_only=True)
    found = tool.run_study(study, tool.Plan([64, 96, 128, 192], [100, 200, 400], [1, 2], 5))
    _, _, ratios = comparison(found.transfer, "model")
    assert len(ratios) == 3
    assert ratios[1].interpolated == pytest.approx(0.5, rel=0.1)  # read off the frontiers, no model
    for ratio in ratios:  # a power law only approximates 4 + 30·C^-0.15 (its offset): close, not exact
        assert 0.4 < ratio.fitted < 0.6
        assert ratio.interpolated is None or ratio.interpolated == pytest.approx(0.5, rel=0.15)


def test_an_optimum_above_the_grid_extends_it_upwards(tmp_path, trained, monkeypatch):
    monkeypatch.setitem(ADAMW_BEST, "lr", 0.3)
    assert tool.main([*ARGS, "--results", str(tmp_path / "e.csv"), "--markdown", str(tmp_path / "p.md")]) == 0
    adamw_lrs = sorted(t.adamw_lr for t in trained if t.phase == "tune" and t.optimizer == "adamw")
    # 0.192 (the top) is best, so 0.384 is added; it is better, so 0.768 too, which is worse: 0.384 is inside.
    assert adamw_lrs[-2:] == pytest.approx([0.384, 0.768]) and len(adamw_lrs) == 7


def test_an_optimum_beyond_the_extended_grid_is_flagged(tmp_path, trained, monkeypatch):
    monkeypatch.setitem(ADAMW_BEST, "lr", 0.0005)
    page = tmp_path / "page.md"
    assert tool.main([*ARGS, "--results", str(tmp_path / "e.csv"), "--markdown", str(page)]) == 0
    adamw_lrs = sorted(t.adamw_lr for t in trained if t.phase == "tune" and t.optimizer == "adamw")
    assert adamw_lrs[0] == pytest.approx(0.003) and len(adamw_lrs) == 7  # two extensions, then it stops
    assert "(edge) AdamW: the best LR is still the end of its grid" in page.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--widths", "64", "96", "128"], "--widths 64 96 128: >= 4"),
        (["--widths", "96", "128", "192", "256"], "the smallest must be"),
        (["--steps", "200"], "--steps 200: >= 2"),
        (["--grid-points", "2"], "--grid-points 2"),
        (["--jobs", "0"], "--jobs 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_value(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        tool.main([*argv, "--results", str(tmp_path / "e.csv")])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e.csv").exists()
