"""A default run prints the launcher's lines, the iteration lines and real problems, not the known benign
third-party warnings (megatron_muon/logging_setup.py); ``logging.verbose=true`` brings those back.

One short run on the default config (4 CPU processes, TP2·PP2·EP2): one iteration, with a validation pass and
a checkpoint save, so the warnings of start-up, model building, training, validation and saving all have their
chance to appear; and one verbose run in one process.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
LAUNCHER = REPO / "launch" / "pretrain_muon.sh"

# Python warnings ("...: UserWarning: ...", "FutureWarning"), logging records at WARNING, and torch's glog-style
# "W1204 21:20:37.065000 ..." lines.
WARNING_LINE = re.compile(r"Warning\b|\bWARNING\b|^W\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def short_run(env: dict[str, str], tmp_path: Path, *overrides: str) -> str:
    result = subprocess.run(
        [
            "bash",
            str(LAUNCHER),
            "launch/configs/tiny_cpu.yaml",
            "training.train_iters=1",
            "optimizer.warmup_iters=0",
            "training.eval_interval=1",
            "training.eval_iters=1",
            f"checkpoint.save_dir={tmp_path / 'checkpoints'}",
            "logging.log_interval=1",
            "logging.tensorboard_dir=null",
            *overrides,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert re.search(r"^ iteration\s+1/1 \|", output, re.MULTILINE), output[-4000:]
    assert "saved checkpoint" in output, output[-4000:]
    return output


def test_a_default_run_prints_no_warning_lines(launcher_env, shakespeare_data, tmp_path):
    output = short_run(launcher_env, tmp_path)
    warning_lines = [line for line in output.splitlines() if WARNING_LINE.search(line)]
    assert not warning_lines, "\n".join(warning_lines)


def test_verbose_brings_the_known_warnings_back(launcher_env, shakespeare_data, tmp_path):
    # One process is enough to show that the filters are off (and costs a quarter of the start-up).
    one_process = [
        "parallel.world_size=1",
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.ep=1",
        "parallel.etp=1",
    ]
    output = short_run(
        launcher_env, tmp_path, *one_process, "training.global_batch_size=2", "logging.verbose=true"
    )
    warning_lines = [line for line in output.splitlines() if WARNING_LINE.search(line)]
    # Megatron's import-time fallback notices (optimizer, clip_grads, norms: 4 or more) and its GPTModel record.
    assert sum("Apex" in line for line in warning_lines) >= 4, "\n".join(warning_lines)
    assert any("GPTModel IS DEPRECATED" in line for line in warning_lines), "\n".join(warning_lines)
