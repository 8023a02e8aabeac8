"""Tokenizer and dataset glue around ``megatron.core.tokenizers`` and ``megatron.core.datasets``.

- :mod:`megatron_muon.data.tokenizer`: input documents, SentencePiece training, ``load_tokenizer``.
- :mod:`megatron_muon.data.datasets`: ``build_gpt_datasets`` (validated megatron GPT datasets), ``gpt_batch``
  and the resumable per-rank microbatch iterator.

Names are imported on first use: ``megatron.core.datasets`` costs seconds to import, and the tokenizer
tools do not need it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_tokenizer": "tokenizer",
    "null_tokenizer": "tokenizer",
    "iter_documents": "tokenizer",
    "expand_input_paths": "tokenizer",
    "train_sentencepiece_tokenizer": "tokenizer",
    "tokenize_documents": "tokenizer",
    "tokenizer_model_path": "tokenizer",
    "build_gpt_datasets": "datasets",
    "build_microbatch_iterator": "datasets",
    "check_vocab_size": "datasets",
    "count_documents": "datasets",
    "gpt_batch": "datasets",
    "split_document_counts": "datasets",
    "GPTSplits": "datasets",
    "PretrainingSampler": "datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
