"""tests/distributed on a machine where CUDA is available: run_distributed's gloo ranks still compute on the CPU
(``MEGATRON_MUON_DEVICE=cpu``, the CPU stand-ins forced on), whatever CUDA says, and train as they do on a CPU
machine.

CUDA is pretended in every process of the run (``tests/pretend_cuda/sitecustomize.py`` on ``PYTHONPATH``: one device,
as on the project's one-GPU image); there is no CUDA runtime behind it, so a rank that took a GPU path (an unforced
stand-in install, a device chosen from ``LOCAL_RANK``, megatron allocating on ``torch.cuda.current_device()``)
crashes instead of training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PRETEND_CUDA = REPO / "tests" / "pretend_cuda"
LAYOUT = dict(tp=2, pp=1, ep=1, etp=1)
STEPS = 3

TWO_RANKS = f"""\
import json, sys

sys.path.insert(0, {str(HERE)!r})
import torch
from test_muon_training import MODEL, _train_on_rank

from megatron_muon.testing import run_distributed

if __name__ == "__main__":
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1  # the pretence holds here
    per_rank = run_distributed(
        _train_on_rank, 2, tp=2, etp=1, args=({LAYOUT!r}, MODEL, ("auto",), {STEPS}, True), timeout_s=300
    )
    print(json.dumps(per_rank[0]["auto"]))
"""


def _losses_on_a_cpu_machine() -> list[float]:
    from test_muon_training import MODEL, _train_on_rank

    per_rank = run_distributed(_train_on_rank, 2, tp=2, etp=1, args=(LAYOUT, MODEL, ("auto",), STEPS, True))
    return per_rank[0]["auto"]


def test_gloo_ranks_train_on_the_cpu_where_cuda_is_available(tmp_path):
    (tmp_path / "two_ranks.py").write_text(TWO_RANKS)
    env = {key: value for key, value in os.environ.items() if key != "MEGATRON_MUON_DEVICE"}
    # torch.compile consults the CUDA runtime where CUDA is available (a real GPU has one, the pretence not): eager.
    env.update(PYTHONPATH=str(PRETEND_CUDA), OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "two_ranks.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, textwrap.shorten(result.stderr[-4000:], 4000)
    pretended = json.loads(result.stdout.strip().splitlines()[-1])
    assert pretended == pytest.approx(_losses_on_a_cpu_machine(), abs=1e-6)
