"""tools/gpu_check.sh stops in one line, before installing anything, where it cannot run: no CUDA GPU, a wheel it
needs missing from the carried folder, a bad option. (Its GPU run itself needs the GPU machine.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PRETEND_ONE_GPU = str(REPO / "tests" / "pretend_cuda")


def gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "tools/gpu_check.sh", str(tmp_path / "out"), *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    result = gpu_check(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu_check.sh: error: no CUDA GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); "
        "run it on the GPU machine"
    ]
    assert not (tmp_path / "out").exists()


def test_a_missing_wheel_is_named_before_anything_runs(tmp_path):
    empty = tmp_path / "wheels"
    empty.mkdir()
    result = gpu_check(tmp_path, PYTHONPATH=PRETEND_ONE_GPU, GPU_WHEELS=str(empty))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gpu_check.sh: error: no wheel for megatron-core==0.19.2 in {empty} (make them with: bash "
        "tools/fetch_gpu_wheels.sh)"
    ]


def test_a_bad_option_is_one_line(tmp_path):
    result = gpu_check(tmp_path, "--iters")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["gpu_check.sh: error: --iters needs a value"]
