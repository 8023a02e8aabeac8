"""Shared pytest setup. The package is installed editable; nothing is added to sys.path here."""

import os
from pathlib import Path

import pytest
import torch

from megatron_muon.testing import keep_rank_processes

UNIT_TESTS = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests under ``tests/unit`` are marked ``unit`` (CI's first stage runs ``unit and not slow``, its second
    ``slow or not unit``); tests marked ``gpu`` are skipped on machines without CUDA (both markers are declared in
    pyproject.toml)."""
    for item in items:
        if item.path.is_relative_to(UNIT_TESTS):
            item.add_marker(pytest.mark.unit)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _rank_processes_kept_between_tests():
    """run_distributed keeps clean rank processes for the next test of the same world size (saves ~6 CPU-seconds
    of imports per rank and test); ``MEGATRON_MUON_FRESH_RANKS=1`` starts fresh ones for every call instead."""
    if os.environ.get("MEGATRON_MUON_FRESH_RANKS") == "1":
        yield
        return
    with keep_rank_processes():
        yield
