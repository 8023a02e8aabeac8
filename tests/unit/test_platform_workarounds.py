"""Which of our patches of megatron-core apply where: the logic workarounds (``platform/megatron_fixes.py``) on
every device, the hardware stand-ins (``platform/cpu.py``) only on a machine without CUDA (or when forced, for CPU
ranks on a GPU machine); and no ``torch.cuda.is_available()`` branch elsewhere that would change megatron's logic.

Each case runs in a fresh interpreter: the patches are process-wide and other tests install the CPU stand-ins."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import torch
torch.cuda.is_available = lambda: {cuda}
torch.cuda.set_device = lambda index: None
from megatron.core.tensor_parallel import layers
from megatron.core.transformer import torch_norm
from megatron_muon.platform import cpu_stand_ins_active, megatron_fixes
from megatron_muon.platform.device import Device, use_device
{call}
print("logic", megatron_fixes.is_fixed(torch_norm.WrappedTorchNorm.__dict__["__new__"]))
print("hardware", cpu_stand_ins_active(), layers.torch is not torch)
"""

USE_GPU = "use_device(Device(type='cuda', index=0, backend='cpu:gloo,cuda:nccl'))"
USE_CPU = "use_device(Device(type='cpu'))"
FORCED = "from megatron_muon.platform import apply_cpu_stand_ins; apply_cpu_stand_ins(force=True)"


@pytest.mark.parametrize(
    ("cuda", "call", "hardware"),
    [
        (True, USE_GPU, False),  # a GPU rank: megatron's logic fixed, nothing of the CPU stand-ins
        (False, USE_CPU, True),  # a CPU rank: both
        (True, FORCED, True),  # CPU ranks on a GPU machine (the multi-process test harness): both
    ],
    ids=["a-gpu-rank", "a-cpu-rank", "cpu-ranks-on-a-gpu-machine"],
)
def test_logic_workarounds_apply_on_every_device_and_hardware_stand_ins_only_without_cuda(
    cuda, call, hardware
):
    done = subprocess.run(
        [sys.executable, "-c", _PROBE.format(cuda=cuda, call=call)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["logic"] == "True"
    assert lines["hardware"] == f"{hardware} {hardware}"


def test_a_sequence_parallel_norm_builds_with_the_fix_alone():
    """The default config's failure on a GPU host: megatron asserts in WrappedTorchNorm under sequence parallelism."""
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_muon.platform.megatron_fixes import apply_megatron_fixes

    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        sequence_parallel=True,
        tensor_model_parallel_size=2,
    )
    apply_megatron_fixes()
    norm = torch_norm.WrappedTorchNorm(config, 8)
    assert all(p.sequence_parallel for p in norm.parameters())


# Files that may ask torch.cuda.is_available(), and why none of them changes megatron's logic.
ALLOWED_CUDA_QUERIES = {
    "megatron_muon/platform/device.py": "the device decision itself",
    "megatron_muon/platform/cpu.py": "the hardware stand-ins are skipped where a GPU exists",
    "megatron_muon/optim/comm.py": "where an empty send lives when no tensor was seen (a device, not logic)",
    "megatron_muon/rehearsal/fake_gpu.py": "the fake GPU makes it answer True (the rehearsal's premise)",
    "megatron_muon/models/gpt_moe.py": "Transformer Engine refused without a GPU (one-line error)",
    "megatron_muon/logging_setup.py": "which third-party warnings are benign on this device",
    "megatron_muon/bench/newton_schulz_gpu.py": "the GPU benchmark refuses without a GPU",
    "megatron_muon/bench/gpu_check.py": "the one-call GPU check refuses without a GPU",
    "megatron_muon/optim/plan.py": "the cost model's default speeds (GPU or CPU numbers; MEGATRON_MUON_DEVICE=cpu)",
}


def test_no_other_module_branches_on_cuda_availability():
    found = set()
    for path in sorted((REPO / "megatron_muon").rglob("*.py")):
        if re.search(r"torch\.cuda\.is_available\(\)", path.read_text()):
            found.add(path.relative_to(REPO).as_posix())
    assert found <= set(ALLOWED_CUDA_QUERIES), sorted(found - set(ALLOWED_CUDA_QUERIES))
