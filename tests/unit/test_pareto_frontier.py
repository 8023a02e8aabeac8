"""tools/pareto_frontier.py over a small synthetic study written in compare_optimizers' own format.

The study (sequence length 4, budget 128 tokens; evaluations at 32, 64, 96 and 128 tokens, two seeds):

    B = 2  AdamW lr 0.01 (best)      seeds [4.0 3.5 3.2 3.0], [4.2 3.7 3.4 3.2]  mean final 3.1 = the target
           AdamW lr 0.03             both  [4.5 4.0 3.8 3.6]
           Muon  lr 0.005 (best)     seeds [3.8 3.2 2.9 2.7], [3.8 3.4 2.9 2.7]  mean 3.3 @ 64, 2.9 @ 96 -> 80 tokens
           Muon  lr 0.02             both  [3.9 3.5 3.2 3.0]
           Muon  lr 0.005 with its AdamW part at 0.03 (not AdamW's best: ignored, however low)
    B = 4  AdamW lr 0.03             both  [4.4 3.9 3.5 3.2]                    never reaches 3.1
           Muon  lr 0.01             both  [3.6 3.2 3.0 2.8]                    3.2 @ 64, 3.0 @ 96 -> 80 tokens

With step times AdamW 0.5 s, Muon 0.65 s, 100 FLOPs per token and 1,000 Newton–Schulz FLOPs per Muon step:

    AdamW B=2: T 128, S = 128 / (2·4) = 16, time 8.0 s,  compute 12,800             (the reference)
    Muon  B=2: T  80, S = 10,               time 6.5 s,  compute 8,000 + 10,000 = 18,000 -> 0.8125, 1.40625
    Muon  B=4: T  80, S = 5,                time 3.25 s, compute 8,000 +  5,000 = 13,000 -> 0.40625, 1.015625
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from megatron_muon.bench import compare_optimizers as study_tool
from megatron_muon.bench import pareto_frontier as tool
from megatron_muon.bench import step_time

SEQ, BUDGET = 4, 128
FAST = ["--flops-per-token", "100", "--ns-flops-per-step", "1000"]
STEP_SECONDS = ["--step-seconds", "adamw=0.5", "muon=0.65"]
# (optimizer, batch, lr, adamw_lr) -> per seed the losses at the 4 evaluations
CURVES = {
    ("adamw", 2, 0.01, 0.01): {1: [4.0, 3.5, 3.2, 3.0], 2: [4.2, 3.7, 3.4, 3.2]},
    ("adamw", 2, 0.03, 0.03): {1: [4.5, 4.0, 3.8, 3.6], 2: [4.5, 4.0, 3.8, 3.6]},
    ("muon", 2, 0.005, 0.01): {1: [3.8, 3.2, 2.9, 2.7], 2: [3.8, 3.4, 2.9, 2.7]},
    ("muon", 2, 0.02, 0.01): {1: [3.9, 3.5, 3.2, 3.0], 2: [3.9, 3.5, 3.2, 3.0]},
    ("muon", 2, 0.005, 0.03): {1: [2.0, 1.9, 1.8, 1.7], 2: [2.0, 1.9, 1.8, 1.7]},
    ("adamw", 4, 0.03, 0.03): {1: [4.4, 3.9, 3.5, 3.2], 2: [4.4, 3.9, 3.5, 3.2]},
    ("muon", 4, 0.01, 0.03): {1: [3.6, 3.2, 3.0, 2.8], 2: [3.6, 3.2, 3.0, 2.8]},
}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """The study's evaluations.csv, written by compare_optimizers' own Study (its header first, as main does)."""
    path = tmp_path / "study" / "evaluations.csv"
    path.parent.mkdir()
    with path.open("w", newline="") as f:
        csv.DictWriter(f, study_tool.FIELDS).writeheader()

    def runner(spec: study_tool.RunSpec) -> list[tuple[int, float]]:
        losses = CURVES[(spec.optimizer, spec.batch_size, spec.lr, spec.adamw_lr)][spec.seed]
        iterations = BUDGET // (spec.batch_size * SEQ)
        return [(iterations * (i + 1) // 4, loss) for i, loss in enumerate(losses)]

    study = study_tool.Study(argparse.Namespace(seq_length=SEQ), runner, rows=[], results=path)
    for (optimizer, batch, lr, adamw_lr), seeds in CURVES.items():
        for seed in seeds:
            study.ensure(study_tool.RunSpec(optimizer, batch, lr, adamw_lr, seed, BUDGET))
    return path


def _points(results: Path, target: float | None = None) -> list[tool.FrontierPoint]:
    rows = tool.read_evaluations(results)
    costs = tool.FrontierCosts({"adamw": 0.5, "muon": 0.65}, 1, 100.0, 1000.0)
    if target is None:
        target, _ = tool.default_target(rows, BUDGET)
    return tool.frontier_points(rows, target, costs, BUDGET, tool.sequence_length(rows))


def _point(points: list[tool.FrontierPoint], optimizer: str, batch: int) -> tool.FrontierPoint:
    return next(p for p in points if (p.optimizer, p.batch_size) == (optimizer, batch))


def test_default_target_is_adamws_best_final_loss_at_the_smallest_batch(results):
    rows = tool.read_evaluations(results)
    assert tool.sequence_length(rows) == SEQ
    target, batch = tool.default_target(rows, BUDGET)
    # lr 0.01 at B=2, mean of 3.0 and 3.2; not lr 0.03 (3.6) nor B=4 (3.2)
    assert (target, batch) == (pytest.approx(3.1, abs=1e-12), 2)
    # AdamW at B=2 reaches it exactly at its last evaluation
    assert _point(_points(results), "adamw", 2).tokens == pytest.approx(128.0)
    # At the largest batch instead: lr 0.03 at B=4 ends at 3.2 (both seeds), which B=2's AdamW also reaches.
    target, batch = tool.default_target(rows, BUDGET, 4)
    assert (target, batch) == (pytest.approx(3.2, abs=1e-12), 4)
    assert all(p.reached for p in _points(results, target) if p.optimizer == "adamw")
    with pytest.raises(ValueError, match="no adamw runs at batch 8 at budget 128 tokens.*runs: 2, 4"):
        tool.default_target(rows, BUDGET, 8)


def test_tokens_to_target_interpolate_the_seed_mean_at_the_best_lr(results):
    points = _points(results)
    assert [(p.optimizer, p.batch_size, p.lr, p.seeds) for p in points] == [
        ("adamw", 2, "0.01", 2),
        ("adamw", 4, "0.03", 2),
        ("muon", 2, "0.005", 2),  # at AdamW's best LR for the AdamW part: the lower 0.03 runs do not count
        ("muon", 4, "0.01", 2),
    ]
    muon_2 = _point(points, "muon", 2)
    assert muon_2.tokens == pytest.approx(80.0)  # mean 3.3 at 64, 2.9 at 96: halfway
    assert muon_2.steps == pytest.approx(10.0)  # 80 / (2 · 4)
    assert _point(points, "muon", 4).steps == pytest.approx(5.0)
    # A target in the first segment: 3.675 = 3.8 − 0.25 · (3.8 − 3.3) → 32 + 0.25 · 32 = 40 tokens
    assert _point(_points(results, target=3.675), "muon", 2).tokens == pytest.approx(40.0)


def test_a_curve_that_never_reaches_the_target_is_reported_and_left_off(results):
    adamw_4 = _point(_points(results), "adamw", 4)
    assert not adamw_4.reached and adamw_4.tokens is adamw_4.steps is adamw_4.seconds is adamw_4.flops is None
    assert adamw_4.evaluated_tokens == 128
    assert not any(p.reached for p in _points(results, target=1.0))


def test_relative_wall_clock_and_compute_follow_the_hand_computed_example(results):
    points = _points(results)
    reference, relative = tool.relative_to_reference(points)
    assert (reference.optimizer, reference.batch_size) == ("adamw", 2)
    assert (reference.seconds, reference.flops) == (pytest.approx(8.0), pytest.approx(12_800.0))
    muon_2, muon_4 = _point(points, "muon", 2), _point(points, "muon", 4)
    assert (muon_2.seconds, muon_2.flops) == (pytest.approx(6.5), pytest.approx(18_000.0))
    assert (muon_4.seconds, muon_4.flops) == (pytest.approx(3.25), pytest.approx(13_000.0))
    assert relative[0] == pytest.approx((1.0, 1.0))
    assert relative[2] == pytest.approx((0.8125, 1.40625))
    assert relative[3] == pytest.approx((0.40625, 1.015625))
    assert all(value != value for value in relative[1])  # not reached: nan


def test_newton_schulz_flops_per_step_sum_the_plans_cost_per_matrix():
    # standard, 5 steps: 5 · (4·k²·K + 2·k³): 64×64 → 7,864,320; 32×64 → 1,638,400
    assert tool.newton_schulz_flops_per_step([(64, 64), (32, 64)], 5, "standard", ()) == 9_502_720


def test_command_line_prints_the_table_and_writes_the_figure(results, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--results", str(results), *STEP_SECONDS, *FAST, "--micro-batch-per-device", "2"]
    assert tool.main([*argv, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("| optimizer |") : printed.index(tool.END)].strip().splitlines()
    assert table == [
        "| optimizer | B | LR | tokens to target | steps | devices | wall-clock (relative) | compute (relative) "
        "| reached? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        "| adamw | 2 | 0.01 | 128 | 16 | 1 | 1.00 | 1.00 | yes |",
        "| adamw | 4 | 0.03 | not reached within 128 tokens | — | 2 | — | — | no |",
        "| muon | 2 | 0.005 | 80 | 10 | 1 | 0.81 | 1.41 | yes |",
        "| muon | 4 | 0.01 | 80 | 5 | 2 | 0.41 | 1.02 | yes |",
    ]
    assert "validation loss 3.1000 (AdamW's best final loss at the smallest batch, B = 2" in printed
    assert "perfect data-parallel scaling assumed" in printed and "adamw 0.5 s, muon 0.65 s" in printed
    assert "T(B) × 100 FLOPs per token" in printed and "S(B) × 1,000 Newton–Schulz FLOPs" in printed
    assert (out / "pareto_frontier.png").stat().st_size > 0
    with (out / "pareto_frontier.csv").open() as f:
        data = list(csv.DictReader(f))
    assert [(r["optimizer"], r["batch_size"], r["reached"]) for r in data] == [
        ("adamw", "2", "True"), ("adamw", "4", "False"), ("muon", "2", "True"), ("muon", "4", "True"),
    ]  # fmt: skip
    assert float(data[2]["compute_relative"]) == pytest.approx(1.40625)


def test_markdown_section_goes_between_its_markers(results, tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text(f"# Benchmarks\n\n{tool.START}\nold\n{tool.END}\n\nafter\n")
    argv = [
        "--results",
        str(results),
        *STEP_SECONDS,
        *FAST,
        "--target-loss",
        "3.675",
        "--markdown",
        str(page),
    ]
    assert tool.main(argv) == 0
    text = page.read_text()
    assert "old" not in text and text.endswith("after\n")
    assert "python tools/pareto_frontier.py --results" in text
    assert "validation loss 3.6750 (given by --target-loss)" in text
    assert (results.parent / "pareto_frontier.png").exists()  # default --out-dir: beside the results


def test_flops_per_token_come_from_the_config_by_default(results, tmp_path, capsys):
    argv = ["--results", str(results), *STEP_SECONDS, "--ns-flops-per-step", "0", "--out-dir", str(tmp_path)]
    assert tool.main(argv) == 0
    # tiny_cpu.yaml with compare_optimizers' model overrides: 647,744 active parameters
    assert "T(B) × 3,886,464 FLOPs per token (6 · N_active, N_active = 647,744" in capsys.readouterr().out


def _write_rows(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (["--results", "{tmp}/missing.csv"], "--results {tmp}/missing.csv: no such file"),
        (["--results", "{tmp}/other.csv"], "has columns ['optimizer', 'loss']; compare_optimizers writes"),
        (
            ["--step-seconds", "adamw=0.5", "muon=0"],
            "--step-seconds muon=0: SECONDS must be a positive number",
        ),
        (
            ["--step-seconds", "adamw=0.5", "muon=fast"],
            "--step-seconds muon=fast: SECONDS must be a positive",
        ),
        (["--step-seconds", "adamw", "muon=1"], "--step-seconds adamw: expected OPTIMIZER=SECONDS"),
        (
            ["--step-seconds", "adamw=0.5", "muon=1", "sgd=1"],
            "--step-seconds sgd=1: sgd has no runs in {results}; optimizers with runs: adamw, muon",
        ),
        (["--step-seconds", "adamw=0.5"], "--step-seconds has no time for muon; give one for each optimizer"),
        (["--micro-batch-per-device", "0"], "--micro-batch-per-device 0: must be a positive integer"),
        (["--micro-batch-per-device", "4"], "--micro-batch-per-device 4 does not divide global batch size 2"),
        (["--target-loss", "-1"], "--target-loss -1.0: must be a positive validation loss"),
        (["--target-loss", "3", "--target-batch", "4"], "--target-batch and --target-loss: give one of them"),
        (["--target-batch", "3"], "no adamw runs at batch 3 at budget 128 tokens for the target"),
        (["--config", "{tmp}/none.yaml"], "--config {tmp}/none.yaml: no such file"),
    ],
)
def test_bad_input_is_refused_in_one_line_with_status_2(results, tmp_path, capsys, change, message):
    _write_rows(tmp_path / "other.csv", ["optimizer", "loss"], [["adamw", "3.0"]])
    argv = ["--results", str(results), *STEP_SECONDS, *FAST, "--out-dir", str(tmp_path / "out")]
    names = {"tmp": tmp_path, "results": results}
    argv += [part.format(**names) for part in change]  # argparse keeps the last of a repeated option
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.format(**names) in error
    assert not (tmp_path / "out").exists()


def test_a_study_without_adamw_needs_a_target(tmp_path, capsys):
    rows = [["muon", "2", "0.005", "0.01", "1", "128", "4", "32", "3.8"]]
    results = _write_rows(tmp_path / "evaluations.csv", study_tool.LEGACY_FIELDS, rows)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--results", str(results), "--step-seconds", "muon=1", *FAST])
    assert exit_info.value.code == 2
    assert (
        "no adamw runs at budget 128 tokens for the target; batch sizes with runs: 2; or give --target-loss"
        in capsys.readouterr().err
    )


def test_the_config_is_the_one_the_study_recorded():
    sha = study_tool.file_sha(tool.REPO / "launch/configs/tiny_cpu.yaml")
    recorded = {"config": "launch/configs/tiny_cpu.yaml", "model_overrides": " ".join(study_tool.MODEL),
                "config_sha": sha}  # fmt: skip
    assert tool.study_config([recorded], None) == "launch/configs/tiny_cpu.yaml"
    assert tool.study_config([recorded], "launch/configs/tiny_cpu.yaml") == "launch/configs/tiny_cpu.yaml"
    with pytest.raises(ValueError, match="the study ran launch/configs/tiny_cpu.yaml"):
        tool.study_config([recorded], "launch/configs/moe_1b_8gpu.yaml")
    with pytest.raises(ValueError, match="not compare_optimizers'"):
        tool.study_config([{**recorded, "model_overrides": "model.hidden_size=128"}], None)
    with pytest.raises(ValueError, match="several configs"):
        tool.study_config([recorded, {**recorded, "config": "launch/configs/moe_1b_8gpu.yaml"}], None)
    changed = {**recorded, "config_sha": "0123456789abcdef"}  # the config was edited after the study
    with pytest.raises(ValueError, match="has changed since the study ran it"):
        tool.study_config([changed], None)
    assert tool.study_config([changed], None, unchanged=False) == "launch/configs/tiny_cpu.yaml"
    legacy = {"optimizer": "adamw"}  # a study from before rows recorded their config
    assert tool.study_config([legacy], None) == tool.LEGACY_CONFIG
    assert tool.study_config([legacy], "launch/configs/moe_1b_8gpu.yaml") == "launch/configs/moe_1b_8gpu.yaml"


def test_step_seconds_can_be_measured_here(results, tmp_path, capsys, monkeypatch):
    """--step-seconds measure times each optimizer at the study's sequence length and the device's micro-batch."""
    asked = []

    def measure(config, model_overrides, seq_length, micro_batch, optimizers, iterations):
        asked.append((seq_length, micro_batch, tuple(optimizers), iterations))
        return step_time.StepTimes({"adamw": 0.5, "muon": 0.65}, iterations, ("0.10", "0.20"))

    monkeypatch.setattr(tool, "measure_step_seconds", measure)
    argv = ["--results", str(results), "--step-seconds", "measure", "--measure-iterations", "7", *FAST]
    assert tool.main([*argv, "--out-dir", str(tmp_path)]) == 0
    assert asked == [(SEQ, 1, ("adamw", "muon"), 7)]
    out = capsys.readouterr().out
    assert (
        "adamw 0.5 s, muon 0.65 s; measured by this command through the launcher: median of 7 iterations"
        in out
    )
    assert "load average 0.10 before, 0.20 after" in out


def test_only_the_latest_settings_runs_are_read(results):
    """Rows of an earlier setting (other code) stay in the file and are left out of the frontier."""
    rows = tool.read_evaluations(results)
    with results.open("a", newline="") as f:
        writer = csv.DictWriter(f, study_tool.FIELDS)
        writer.writerows([{**row, "code_version": "newer", "val_loss": "9.0"} for row in rows[:4]])
    latest = tool.read_evaluations(results)
    assert len(latest) == 4 and {row["val_loss"] for row in latest} == {"9.0"}
