"""tools/unigram_entropy.py: the entropy the default run's validation loss is compared with."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_muon.bench import unigram_entropy


@pytest.fixture(scope="module")
def tool():
    return unigram_entropy


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
