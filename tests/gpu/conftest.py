"""GPU tests: every test here is marked ``gpu`` and skipped without CUDA; Transformer Engine and FP8 tests also skip,
saying why, when TE is not installed or the GPU has no FP8 tensor cores (compute capability < 8.9).

Run on the GPU machine (see README.md, "GPU tests")::

    .venv/bin/python -m pytest tests/gpu -v -rs
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
NO_TE_REASON = "needs transformer_engine (the `te` extra in pyproject.toml; not in the GPU image)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def transformer_engine():
    """The ``transformer_engine`` module; skips the test without it."""
    return pytest.importorskip("transformer_engine", reason=NO_TE_REASON)


@pytest.fixture(scope="session")
def fp8_gpu() -> torch.device:
    """The current CUDA device if it has FP8 tensor cores; skips the test otherwise."""
    from megatron_muon.ops.newton_schulz_fp8 import fp8_unavailable_reason

    device = torch.device("cuda", torch.cuda.current_device())
    reason = fp8_unavailable_reason(device)
    if reason is not None:
        pytest.skip(reason)
    return device


@pytest.fixture(scope="session")
def cuda_world():
    """A one-process world on GPU 0 with megatron's parallel state (TP = PP = EP = 1); yields its
    ``ProcessGroupCollection``. The backend is ``cpu:gloo,cuda:nccl``: the training step reduces a few CPU
    scalars (loss totals, timings) besides the CUDA tensors."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    )
    torch.cuda.set_device(0)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(minutes=10),
    )
    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)
    try:
        yield ProcessGroupCollection.use_mpu_process_groups()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
