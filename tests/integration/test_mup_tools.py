"""The muP tools end to end (one process each, CPU): the coordinate check shows muP's width-flat activations and
standard parametrization's growth; the telescoping sweep finishes, survives a kill and resumes without rerunning
finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "launch" / "configs" / "mup_shakespeare.yaml"

# Activations proper (outputs of layers and of the model); router logits are measured too but not held to this
# bound: docs/mup.md ("Coordinate check") explains why they are not a clean coordinate after a few steps.
ACTIVATIONS = ("embedding", "attention", "mlp", "moe", "block_output", "logits")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_coord_check_mup_is_flat_in_width_and_standard_is_not(tmp_path, shakespeare_data, launcher_env):
    out = tmp_path / "coord"
    result = subprocess.run(
        [
            sys.executable,
            "tools/coord_check.py",
            str(CONFIG),
            "--widths",
            "64",
            "256",
            "--steps",
            "5",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    act = {
        (r["parametrization"], r["layer_type"], int(r["width"])): float(r["act_rms"])
        for r in _rows(out / "coord_check.csv")
    }
    assert (out / "coord_check.png").stat().st_size > 0
    mup_ratio = {kind: act[("mup", kind, 256)] / act[("mup", kind, 64)] for kind in ACTIVATIONS}
    standard_ratio = {
        kind: act[("standard", kind, 256)] / act[("standard", kind, 64)] for kind in ACTIVATIONS
    }
    assert all(abs(r - 1) < 0.25 for r in mup_ratio.values()), f"muP activation RMS w256/w64: {mup_ratio}"
    # The same setup without muP: the residual stream and the hidden layers' outputs grow with the width.
    assert standard_ratio["block_output"] > 1.5, f"standard parametrization w256/w64: {standard_ratio}"
    assert max(standard_ratio.values()) > 2.0, f"standard parametrization w256/w64: {standard_ratio}"


TOY = [
    "data.mock=true",
    "data.blend=[]",
    "data.tokenizer_path=null",
    "model.vocab_size=256",
    "model.mup_base_hidden_size=32",
    "optimizer.warmup_iters=0",
    "training.train_iters=20",  # ~0.5 s per trial: long enough to kill the sweep between trials
    "training.eval_iters=1",
    "logging.log_interval=1000",
]


def _sweep_command(out: Path) -> list[str]:
    return [
        sys.executable,
        "tools/mup_sweep.py",
        str(CONFIG),
        *TOY,
        "--widths",
        "32",
        "64",
        "--radius",
        "1",
        "--window-radius",
        "1",
        "--max-recentres",
        "0",
        "--out",
        str(out),
    ]


@pytest.mark.extended  # the sweep tool's resume after a kill: the full suite only
def test_sweep_resumes_after_a_kill_without_redoing_trials(tmp_path, launcher_env):
    out = tmp_path / "sweep"
    trials_csv = out / "trials.csv"
    process = subprocess.Popen(
        _sweep_command(out),
        cwd=REPO,
        env=launcher_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if trials_csv.exists() and len(_rows(trials_csv)) >= 2:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the sweep ended before it could be killed mid-way"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    before = _rows(trials_csv)
    assert 2 <= len(before) < 6, f"{len(before)} trials were finished when the sweep was killed"

    resumed = subprocess.run(
        _sweep_command(out), cwd=REPO, env=launcher_env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _rows(trials_csv)
    assert len(after) == 6 and len({r["key"] for r in after}) == 6, [r["key"] for r in after]
    assert after[: len(before)] == before  # finished trials kept as they were, not rerun
    ran = [line for line in resumed.stdout.splitlines() if line.startswith("[sweep] trial ")]
    assert len(ran) == 6 - len(before), ran
    assert all(r["status"] == "ok" for r in after)

    summary = json.loads((out / "best.json").read_text())
    assert [w["width"] for w in summary["widths"]] == [32, 64]
    assert all(len(w["trials"]) == 3 for w in summary["widths"])
    # The 64-wide window (spacing ×√2) is centred on the 32-wide optimum: its middle point is that Muon LR.
    rows = {row["key"]: row for row in after}
    middle = rows[summary["widths"][1]["trials"][1]]
    assert float(middle["optimizer.muon.lr"]) == summary["widths"][0]["best"]["optimizer.muon.lr"]
    assert summary["compute"]["trials"] == 6 and summary["compute"]["full_grid_at_target_in_final_runs"] == 3
    assert (out / "summary.md").exists() and (out / "loss_vs_optimizer_muon_lr.png").stat().st_size > 0

    again = subprocess.run(
        _sweep_command(out), cwd=REPO, env=launcher_env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "[sweep] trial " not in again.stdout  # all done: nothing reruns
    assert len(_rows(trials_csv)) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--param", "optimizer.muon.lr=-1"], "the centre must be > 0"),
        (["--param", "optimizer.muon.scale_mode"], "not a number"),
    ],
)
def test_sweep_refuses_bad_parameters(tmp_path, launcher_env, extra, message):
    result = subprocess.run(
        [*_sweep_command(tmp_path / "bad"), *extra],
        cwd=REPO,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
