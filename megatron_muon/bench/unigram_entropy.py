"""Unigram entropy of a tokenized corpus: the loss (nats/token) of a model that ignores all context and predicts
every token from its corpus frequency. A language model's validation loss should end clearly below it.

    .venv/bin/python tools/unigram_entropy.py data/shakespeare/shakespeare_text_document

Reads a megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``). ``--split 949,50,1`` reports the entropy of
the validation documents' tokens under the training documents' frequencies as well (add-one smoothed): the loss a
unigram model trained on the training split gets on the validation split, which is what the trainer's validation
loss should be compared with.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from megatron.core.datasets.indexed_dataset import IndexedDataset


def entropy_nats(counts: np.ndarray) -> float:
    """H = −Σ p log p of the distribution proportional to ``counts``."""
    total = counts.sum()
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def cross_entropy_nats(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Mean −log q(token) over the evaluated tokens, q = add-one smoothed training frequencies."""
    q = (train_counts + 1.0) / (train_counts.sum() + train_counts.size)
    return float(-(eval_counts * np.log(q)).sum() / eval_counts.sum())


def _token_counts(dataset: IndexedDataset, first: int, last: int, vocab: int) -> np.ndarray:
    """Occurrences of every token id in documents ``first`` .. ``last`` - 1 of an indexed dataset."""
    total = np.zeros(vocab, dtype=np.float64)
    for i in range(first, last):
        total += np.bincount(dataset[i], minlength=vocab)
    return total


def _vocabulary(dataset: IndexedDataset) -> int:
    """One more than the largest token id in the dataset."""
    return int(max(int(dataset[i].max()) for i in range(len(dataset)) if len(dataset[i])) + 1)


def validation_unigram_nats(prefix: str | Path, split: str) -> float:
    """The loss (nats/token) on the validation documents of a unigram model of the training documents (add-one
    smoothed), the documents divided by ``split`` as the trainer divides them.

    Raises:
        ValueError: the dataset is missing or ``split`` leaves no validation documents.
    """
    missing = [f"{prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{prefix}{ext}").is_file()]
    if missing:
        raise ValueError(f"cannot read the indexed dataset {str(prefix)!r}: missing {', '.join(missing)}")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_muon.data.datasets import split_document_counts

    dataset = IndexedDataset(str(prefix), mmap=True)
    vocab = _vocabulary(dataset)
    train, valid, _ = split_document_counts(len(dataset), split)
    valid_counts = _token_counts(dataset, train, train + valid, vocab)
    if valid_counts.sum() == 0:
        raise ValueError(f"split {split!r} leaves no validation documents")
    return cross_entropy_nats(_token_counts(dataset, 0, train, vocab), valid_counts)


def main(argv: list[str] | None = None) -> int:
    """Print the corpus's unigram entropy (with ``--split``, the validation split's under the training split's
    frequencies too); the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefix", help="indexed dataset prefix (without .bin/.idx)")
    parser.add_argument(
        "--split", default=None, help="train,valid,test weights as in data.split, e.g. 949,50,1"
    )
    args = parser.parse_args(argv)

    missing = [f"{args.prefix}{ext}" for ext in (".bin", ".idx") if not Path(f"{args.prefix}{ext}").is_file()]
    if missing:
        print(
            f"error: cannot read the indexed dataset {args.prefix!r}: missing {', '.join(missing)}",
            file=sys.stderr,
        )
        return 2
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_muon.data.datasets import split_document_counts

    dataset = IndexedDataset(args.prefix, mmap=True)
    documents = len(dataset)
    vocab = _vocabulary(dataset)

    def counts(first: int, last: int) -> np.ndarray:
        return _token_counts(dataset, first, last, vocab)

    everything = counts(0, documents)
    print(
        f"{documents:,} documents, {int(everything.sum()):,} tokens, {int((everything > 0).sum()):,} distinct"
    )
    print(
        f"unigram entropy of the whole corpus: {entropy_nats(everything):.4f} nats/token "
        f"(perplexity {math.exp(entropy_nats(everything)):.1f})"
    )
    if args.split:
        try:
            train, valid, _ = split_document_counts(documents, args.split)
        except ValueError as error:
            print(f"error: --split {args.split!r}: {error}", file=sys.stderr)
            return 2
        train_counts, valid_counts = counts(0, train), counts(train, train + valid)
        if valid_counts.sum() == 0:
            print(f"error: --split {args.split!r} leaves no validation documents", file=sys.stderr)
            return 2
        cross = cross_entropy_nats(train_counts, valid_counts)
        print(
            f"unigram model of the {train:,} training documents on the {valid:,} validation documents: "
            f"{cross:.4f} nats/token (perplexity {math.exp(cross):.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
