"""tools/unigram_entropy.py: the entropy the default run's validation loss is compared with."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "tool_unigram_entropy", REPO / "tools" / "unigram_entropy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entropy_and_smoothed_cross_entropy(tool):
    assert tool.entropy_nats(np.array([5.0, 5.0, 5.0, 5.0, 0.0])) == pytest.approx(math.log(4))
    assert tool.entropy_nats(np.array([7.0, 0.0])) == 0.0
    # Training frequencies 3:1 over 2 tokens, smoothed to 4/6 and 2/6; evaluated on one token of each.
    expected = -(math.log(4 / 6) + math.log(2 / 6)) / 2
    assert tool.cross_entropy_nats(np.array([3.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(expected)


def test_missing_dataset_is_a_one_line_error(tool, tmp_path, capsys):
    assert tool.main([str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the indexed dataset") and "\n" not in err
