"""Shared pytest setup. The package is installed editable; nothing is added to sys.path here."""

import os
from pathlib import Path

import pytest
import torch

from megatron_muon.testing import keep_rank_processes

UNIT_TESTS = Path(__file__).parent / "unit"
# The longest test files (wall seconds in CI, 2 cores), run first: CI's second stage hands whole files to two test
# processes in collection order (`pytest -n 2 --dist loadfile --no-loadscope-reorder`, .ci/run), so a long file
# started last would run alone at the end. Only the order depends on this list.
LONGEST_FILES_FIRST = (
    "distributed/test_parallel_muon.py",
    "integration/test_checkpoint_faults.py",
    "integration/test_launcher.py",
    "integration/test_slurm.py",
    "distributed/test_checkpoint_layouts.py",
    "distributed/test_convert_checkpoint.py",
    "integration/test_launcher_lifetime.py",
    "distributed/test_sync_free_step.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first; tests under ``tests/unit`` are marked ``unit`` (CI's first stage runs ``unit and not
    slow``, its second ``slow or not unit``); tests marked ``gpu`` are skipped on machines without CUDA (both markers
    are declared in pyproject.toml)."""
    tests = Path(__file__).parent
    rank = {tests / name: position for position, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path, len(rank)))  # stable: the rest keep their order
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
