"""tools/unigram_entropy.py: the entropy the default run's validation loss is compared with."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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


def test_validation_unigram_nats_scores_the_validation_documents_under_the_training_ones(tool, tmp_path):
    """Ten documents split 8 / 2: the eight training documents hold tokens 0 and 1 as 24 : 8, the two validation
    documents one of each; the training frequencies are add-one smoothed."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    training = [[0, 0, 0, 1]] * 8
    for document in [*training, [0, 1], [0, 1]]:
        builder.add_document(torch.tensor(document, dtype=torch.int32), [len(document)])
    builder.finalize(f"{prefix}.idx")
    train_counts = np.array([24.0, 8.0])
    expected = tool.cross_entropy_nats(train_counts, np.array([2.0, 2.0]))
    assert tool.validation_unigram_nats(prefix, "80,20,0") == pytest.approx(expected)
    with pytest.raises(ValueError, match="missing"):
        tool.validation_unigram_nats(tmp_path / "none", "80,20,0")
