"""Shared pytest setup. The package is installed editable; nothing is added to sys.path here."""

from pathlib import Path

import pytest
import torch

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
