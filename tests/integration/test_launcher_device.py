"""The launcher refuses what this machine cannot run in one line, before any training process starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
MOCK_DATA = ["data.mock=true", "data.blend=[]", "data.tokenizer_path=null"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.transformer_impl=transformer_engine"],
            "error: model.transformer_impl='transformer_engine' needs a CUDA GPU (torch.cuda.is_available() is False)",
        ),
        (
            ["parallel.cp=2", "parallel.world_size=8", "model.seq_length=128"],
            "error: context_parallel_size=2 needs transformer_impl='transformer_engine' (megatron's local attention "
            "has no context parallelism)",
        ),
    ],
)
def test_an_option_this_machine_cannot_run_stops_in_the_launcher(launcher_env, overrides, message):
    result = subprocess.run(
        ["bash", "launch/pretrain_muon.sh", "launch/configs/tiny_cpu.yaml", *MOCK_DATA, *overrides],
        cwd=REPO,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [message]
    assert "starting" not in result.stdout  # no torchrun


def test_a_dry_run_of_a_gpu_config_still_plans_on_a_cpu_machine(launcher_env):
    result = subprocess.run(
        ["bash", "launch/pretrain_muon.sh", "launch/configs/tiny_cpu.yaml", *MOCK_DATA,
         "model.transformer_impl=transformer_engine", "--dry-run"],
        cwd=REPO,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "dry run: would start 4 processes" in result.stdout
