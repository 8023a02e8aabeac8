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


# On a GPU machine (CUDA pretended: tests/pretend_cuda, one GPU) the launcher tests' CPU-sized runs stay CPU runs:
# launcher_env sets MEGATRON_MUON_DEVICE=cpu. Without it the launcher takes the GPU path and counts GPUs.
PRETEND_ONE_GPU = str(REPO / "tests" / "pretend_cuda")


def test_on_a_gpu_machine_the_launcher_tests_start_cpu_processes(launcher_env):
    env = {**launcher_env, "PYTHONPATH": PRETEND_ONE_GPU}
    command = ["bash", "launch/pretrain_muon.sh", "launch/configs/tiny_cpu.yaml", *MOCK_DATA, "--dry-run"]
    as_cpu = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert as_cpu.returncode == 0, as_cpu.stderr
    assert "dry run: would start 4 processes (cpu) with torchrun" in as_cpu.stdout

    env.pop("MEGATRON_MUON_DEVICE")  # a real launch: it stops at the GPU count, before any process starts
    as_gpu = subprocess.run(command[:-1], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert as_gpu.returncode == 2
    assert as_gpu.stderr.strip().splitlines() == [
        "pretrain_muon.sh: error: parallel.world_size=4 needs 4 GPUs but this node has 1; run more nodes through "
        "SLURM (sbatch)"
    ]

    env["MEGATRON_MUON_DEVICE"] = "tpu"
    refused = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: MEGATRON_MUON_DEVICE='tpu' is not a device choice; valid: auto, cpu, cuda"
    ]
