"""GPT train/valid/test datasets from megatron indexed datasets (or mock data), validated before megatron
sees them, and a resumable microbatch iterator for one data-parallel rank.

Building (:func:`build_gpt_datasets`) goes through megatron-core's ``BlendedMegatronDatasetBuilder`` with
``GPTDataset`` / ``MockGPTDataset`` and a ``GPTDatasetConfig``. What megatron needs, and what we check first:

- **Documents per split.** Megatron divides each dataset prefix into train/valid/test by document
  (``split="969,30,1"`` gives documents ``[0, round(.969 n))`` to train, and so on). A split asked for
  samples that gets zero documents makes ``GPTDataset`` loop forever (it adds empty epochs until they hold
  enough tokens). :func:`split_document_counts` computes the counts as megatron does and the builder
  raises a one-line ``ValueError`` instead.
- **The index cache.** ``GPTDataset`` (and ``BlendedDataset`` for blends) store their document, sample and
  shuffle indices as ``.npy`` files in ``cache_dir``, named by an MD5 of the dataset description (prefix,
  split, seed, sequence length, sample count, tokenizer path). A later run with the same description
  reads them instead of rebuilding. When ``torch.distributed`` is initialized the builder is a collective
  over the default group: global rank 0 builds and writes the cache, all ranks meet at a barrier, then the
  other ranks read it; so ``cache_dir`` must be writable by rank 0 and visible to every rank (a shared
  filesystem across nodes). Without ``torch.distributed`` (or with one process) the process builds alone:
  megatron's code takes the rank-0 path when ``torch.distributed.is_initialized()`` is False.
- **Who holds a dataset.** ``is_built_on_rank`` (megatron's hook) says which ranks get dataset objects; the
  others get ``None`` but still join the barriers. Default: every rank, so each rank reads its own
  microbatches and no tensor-parallel broadcast is needed. It must be True on global rank 0, which builds
  the cache.

Samples are megatron's dicts: ``tokens``, ``labels`` (tokens shifted by one), ``loss_mask`` (float32, 0 on
padding and, with ``eod_mask_loss``, on EOD), ``position_ids``, each ``[seq_length]``. No attention mask is
built (``create_attention_mask=False``): the model gets an explicit causal mask from the trainer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.tokenizers import MegatronTokenizerBase

__all__ = [
    "BATCH_KEYS",
    "SPLIT_NAMES",
    "GPTSplits",
    "PretrainingSampler",
    "build_gpt_datasets",
    "build_microbatch_iterator",
    "check_vocab_size",
    "count_documents",
    "gpt_batch",
    "split_document_counts",
]

SPLIT_NAMES = ("train", "valid", "test")
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


class GPTSplits(NamedTuple):
    """One dataset (``GPTDataset``, ``BlendedDataset`` for weighted blends) or ``None`` per split."""

    train: Any
    valid: Any
    test: Any


def split_document_counts(num_documents: int, split: str) -> tuple[int, int, int]:
    """Documents each of train/valid/test gets from a dataset of ``num_documents`` documents under the
    split string ``split`` (e.g. ``"969,30,1"``), computed as megatron's builder does: normalized weights
    to book-ends, then ``round(end * n) - round(begin * n)``."""
    try:
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    except (AssertionError, ValueError, ZeroDivisionError) as error:
        raise ValueError(f"split={split!r} is not a list of up to 3 non-negative weights: {error}") from None
    counts = [
        0
        if bookends is None
        else int(round(bookends[1] * num_documents)) - int(round(bookends[0] * num_documents))
        for bookends in matrix
    ]
    return counts[0], counts[1], counts[2]


def count_documents(prefix: str) -> int:
    """Sequences in the indexed dataset ``prefix`` (one per document as written by
    ``tools/preprocess_data.py``; megatron's GPT split counts these). Raises ``FileNotFoundError`` naming a
    missing ``.bin`` / ``.idx``, ``ValueError`` for an unreadable index."""
    for path in (get_idx_path(prefix), get_bin_path(prefix)):
        if not os.path.isfile(path):
            hint = " (give the prefix, without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
            raise FileNotFoundError(f"dataset prefix {prefix!r}: {path} not found{hint}")
    try:
        return int(IndexedDataset(prefix, mmap=True).sequence_lengths.shape[0])
    except (AssertionError, ValueError, struct.error) as error:
        raise ValueError(f"{get_idx_path(prefix)} is not a megatron indexed dataset index: {error}") from None


def check_vocab_size(tokenizer: MegatronTokenizerBase, model_vocab_size: int) -> None:
    """Raise ``ValueError`` if the tokenizer emits ids the model's (padded) embedding cannot hold."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(
            f"tokenizer vocab_size={tokenizer.vocab_size} exceeds the model's padded vocab size "
            f"{model_vocab_size}: raise the model's vocab size to at least {tokenizer.vocab_size}"
        )


def _every_rank() -> bool:
    return True


def _check_sample_counts(sizes: Sequence[int | None], weighted: bool) -> None:
    for name, size in zip(SPLIT_NAMES, sizes, strict=True):
        if size is not None and size < 0:
            raise ValueError(
                f"{name}_samples={size} must be >= 0 (0: do not build the split) or None (one epoch)"
            )
        if size is None and weighted:
            raise ValueError(
                f"{name}_samples=None (one epoch) cannot be used with data_weights: give a sample count"
            )


def build_gpt_datasets(
    *,
    tokenizer: MegatronTokenizerBase,
    seq_length: int,
    train_samples: int | None,
    valid_samples: int | None = 0,
    test_samples: int | None = 0,
    data_paths: Sequence[str] = (),
    data_weights: Sequence[float] | None = None,
    split: str = "969,30,1",
    seed: int = 1234,
    mock: bool = False,
    cache_dir: str | None = None,
    model_vocab_size: int | None = None,
    eod_mask_loss: bool = False,
    reset_position_ids: bool = False,
    is_built_on_rank: Callable[[], bool] | None = None,
) -> GPTSplits:
    """Build the train, valid and test GPT datasets (see the module docstring for the cache and ranks).

    Args:
        tokenizer: from :func:`megatron_muon.data.load_tokenizer` (or ``null_tokenizer`` for mock data);
            gives the EOD id and the vocab size, and is part of the cache key.
        seq_length: tokens per sample (each sample reads ``seq_length + 1`` tokens: inputs and labels).
        train_samples, valid_samples, test_samples: samples to draw per split. ``0``: the split is not
            built (``None`` returned). ``None``: one epoch of that split's documents (not with weights).
            A count larger than one epoch repeats the split's documents (megatron's epochs, reshuffled).
        data_paths: indexed-dataset prefixes (``<prefix>.bin`` / ``.idx``), e.g. the one printed by
            ``tools/preprocess_data.py``.
        data_weights: one non-negative weight per prefix (normalized). ``None``: a single prefix, or
            several blended in proportion to their size, one epoch each (counts above that are an error).
        split: train/valid/test weights of each prefix's documents, e.g. ``"969,30,1"``.
        seed: shuffling seed (document order and sample order).
        mock: megatron's ``MockGPTDataset`` (synthetic token runs ending in EOD; no ``data_paths``;
            megatron's own split ``1,1,1`` of its 100,000 synthetic documents replaces ``split``).
        cache_dir: the index cache; default ``<directory of the first prefix>/cache`` (mock: none, built
            in memory on every rank).
        model_vocab_size: the model's padded vocab size; error if the tokenizer's is larger.
        eod_mask_loss: zero the loss mask on EOD tokens.
        reset_position_ids: restart ``position_ids`` after every EOD.
        is_built_on_rank: megatron's hook; default every rank. Must be True on global rank 0.

    Raises ``ValueError`` / ``FileNotFoundError`` (one line, naming the bad value) for a missing
    ``.bin``/``.idx``, a split asked for samples that gets no documents, a tokenizer larger than the
    model's vocab, or a blend too small for the requested samples.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be >= 1")
    if model_vocab_size is not None:
        check_vocab_size(tokenizer, model_vocab_size)
    sizes = [train_samples, valid_samples, test_samples]
    _check_sample_counts(sizes, weighted=data_weights is not None)
    is_built_on_rank = is_built_on_rank or _every_rank
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0 and not is_built_on_rank():
        raise ValueError("is_built_on_rank() is False on global rank 0, which must build the index cache")

    if mock:
        if data_paths:
            raise ValueError(f"mock=True takes no data_paths (got {list(data_paths)})")
        blend = None
    else:
        blend = _validated_blend(data_paths, data_weights, split, sizes)
        if cache_dir is None:
            cache_dir = os.path.join(os.path.dirname(os.path.abspath(data_paths[0])), "cache")

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        split=None if mock else split,
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=False,
    )
    # Splits asked for no samples are not built. Dropping their book-ends leaves the other splits'
    # documents unchanged, and keeps megatron from building (or looping on) an unused split.
    config.split_matrix = [
        None if size == 0 else bookends for size, bookends in zip(sizes, config.split_matrix, strict=True)
    ]
    dataset_class = MockGPTDataset if mock else GPTDataset
    datasets = BlendedMegatronDatasetBuilder(dataset_class, sizes, is_built_on_rank, config).build()

    for name, size, dataset in zip(SPLIT_NAMES, sizes, datasets, strict=True):
        if dataset is not None and size and len(dataset) < size:
            raise ValueError(
                f"the {name} split has {len(dataset)} samples of {seq_length} tokens, {size} asked: "
                f"blends without data_weights give one epoch of each prefix; give data_weights to repeat them"
            )
    return GPTSplits(*datasets)


def _validated_blend(
    data_paths: Sequence[str], data_weights: Sequence[float] | None, split: str, sizes: Sequence[int | None]
) -> tuple[list[str], list[float] | None]:
    if isinstance(data_paths, str):
        raise TypeError(f"data_paths must be a sequence of prefixes, not the string {data_paths!r}")
    if not data_paths:
        raise ValueError("data_paths is empty: give indexed-dataset prefixes, or mock=True")
    if data_weights is not None:
        weights = [float(weight) for weight in data_weights]
        if len(weights) != len(data_paths):
            raise ValueError(f"{len(weights)} data_weights for {len(data_paths)} data_paths")
        if any(weight < 0 for weight in weights) or sum(weights) <= 0:
            raise ValueError(f"data_weights={weights} must be >= 0 with a positive sum")
    else:
        weights = None
    for prefix in data_paths:
        num_documents = count_documents(prefix)
        counts = split_document_counts(num_documents, split)
        for name, size, count in zip(SPLIT_NAMES, sizes, counts, strict=True):
            if size != 0 and count == 0:
                asked = "one epoch" if size is None else f"{size} samples"
                raise ValueError(
                    f"the {name} split gets 0 of the {num_documents} documents of {prefix} under "
                    f"split={split!r} but {asked} are asked of it: give it a larger share, ask it for 0 "
                    f"samples, or cut the corpus into more documents (preprocess_data.py --lines-per-document)"
                )
    return list(data_paths), weights


def gpt_batch(samples: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The trainer's microbatch from GPT samples: ``tokens``, ``labels`` and ``position_ids`` (int64) and
    ``loss_mask`` (float32), each ``[micro_batch, seq_length]``. Other keys are dropped.

    ``samples``: one sample dict (``[seq_length]`` tensors, becomes a batch of 1), a collated dict
    (``[micro_batch, seq_length]``), or a sequence of sample dicts (stacked in order).
    """
    if isinstance(samples, Mapping):
        batch = {key: torch.as_tensor(_field(samples, key)) for key in BATCH_KEYS}
        if batch["tokens"].dim() == 1:
            batch = {key: value.unsqueeze(0) for key, value in batch.items()}
    else:
        if not samples:
            raise ValueError("gpt_batch got no samples")
        batch = {
            key: torch.stack([torch.as_tensor(_field(sample, key)) for sample in samples])
            for key in BATCH_KEYS
        }
    shape = batch["tokens"].shape
    for key, value in batch.items():
        if value.dim() != 2 or value.shape != shape:
            raise ValueError(
                f"{key} has shape {tuple(value.shape)}, tokens {tuple(shape)}: expected [batch, seq]"
            )
    return {key: value.to(_BATCH_DTYPES[key]) for key, value in batch.items()}


def _field(sample: Mapping[str, Any], key: str) -> Any:
    try:
        return sample[key]
    except KeyError:
        raise KeyError(f"GPT sample has no {key!r} (keys: {sorted(sample)})") from None


class PretrainingSampler:
    """Megatron's ``MegatronPretrainingSampler`` (``megatron/training/datasets/data_samplers.py``), which
    cannot be imported without megatron.training's global arguments: sample indices in dataset order,
    ``micro_batch_size * data_parallel_size`` consecutive indices per step, rank ``r`` taking the ``r``-th
    slice; the last incomplete step is dropped. (The dataset itself is already shuffled by megatron.)

    ``consumed_samples`` counts samples over all data-parallel ranks (the trainer adds the global batch
    size each iteration), so a run resumed with the checkpointed count continues with the very next
    sample on every rank, for any number of microbatches per global batch.
    """

    def __init__(
        self,
        total_samples: int,
        *,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} not in [0, data_parallel_size={data_parallel_size})"
            )
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} leaves no samples in a dataset of {total_samples}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.samples_per_step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        """Microbatches this rank yields."""
        return (self.total_samples - self.consumed_samples) // self.samples_per_step

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self.samples_per_step
            yield list(range(start, start + self.micro_batch_size))


def build_microbatch_iterator(
    dataset: Any,
    *,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Microbatches (:func:`gpt_batch` dicts) of ``dataset`` for one data-parallel rank, starting after
    ``consumed_samples`` (global count; see :class:`PretrainingSampler`). Ends (``StopIteration``) when
    fewer than ``micro_batch_size * data_parallel_size`` samples remain. ``num_workers > 0`` reads samples
    in DataLoader worker processes; the order is the same."""
    sampler = PretrainingSampler(
        len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=gpt_batch, num_workers=num_workers
    )
    return iter(loader)
