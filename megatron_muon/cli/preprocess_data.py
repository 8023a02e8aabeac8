"""Tokenize text / jsonl documents into a megatron indexed dataset (``<prefix>_text_document.bin/.idx``).

    .venv/bin/python tools/preprocess_data.py --input 'corpus/*.txt' --tokenizer data/tok \\
        --output-prefix data/corpus/corpus --lines-per-document 100 --workers 2

Every document becomes one sequence of the dataset: its tokens followed by the tokenizer's EOD. Documents:
one ``{"text": ...}`` record of a ``.jsonl`` file; for text files, ``--lines-per-document 0`` (default)
makes each file one document, ``N >= 1`` ends a document at the first blank line after at least N non-blank
lines (1: one document per paragraph). Megatron splits train/valid/test by document, so a few big files
need ``N`` for every split to get documents.

Train on the printed prefix (``<output-prefix>_text_document``). Outputs are written to temporary files
and renamed at the end: a failed run leaves existing outputs untouched. Refuses to overwrite existing
outputs unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Inputs, tokenizer and output prefix from ``argv`` (None: ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text / .jsonl files or glob patterns")
    parser.add_argument("--tokenizer", required=True, help="directory written by tools/train_tokenizer.py")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>_text_document.bin/.idx")
    parser.add_argument("--json-key", default="text", help="field of a .jsonl record that holds the text")
    parser.add_argument(
        "--lines-per-document",
        type=int,
        default=0,
        help="text files: end a document at the first blank line after this many non-blank lines "
        "(0: one document per file, 1: one per paragraph)",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers={args.workers} must be >= 1")
    if args.lines_per_document < 0:
        parser.error(f"--lines-per-document={args.lines_per_document} must be >= 0")
    return args


def output_prefix(prefix: str, json_key: str) -> str:
    """Megatron's naming: ``<prefix>_<key>_document``."""
    return f"{prefix}_{json_key}_document"


def preprocess(args: argparse.Namespace) -> tuple[str, int, int]:
    """Write the dataset; returns (dataset prefix, documents, tokens including EODs)."""
    from megatron_muon.data.tokenizer import (
        describe_paths,
        expand_input_paths,
        iter_documents,
        load_tokenizer,
        tokenize_documents,
        tokenizer_model_path,
    )

    # Checks that need no megatron import first, so that mistakes are reported at once.
    paths = expand_input_paths(args.input)
    tokenizer_model_path(args.tokenizer)
    prefix = output_prefix(args.output_prefix, args.json_key)
    bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
    for path in (bin_path, idx_path):
        if os.path.exists(path) and not args.force:
            raise FileExistsError(f"output {path} exists (use --force to overwrite)")

    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    tokenizer = load_tokenizer(args.tokenizer)
    eod = tokenizer.eod
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    staging_bin, staging_idx = f"{bin_path}.partial", f"{idx_path}.partial"

    documents = iter_documents(paths, lines_per_document=args.lines_per_document, json_key=args.json_key)
    total_bytes = sum(os.path.getsize(path) for path in paths)
    num_documents = num_tokens = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(staging_bin, dtype=DType.optimal_dtype(tokenizer.vocab_size))
        encoded = tokenize_documents(documents, args.tokenizer, workers=args.workers)
        # No tqdm monitor thread, so the tokenizer pool forks a single-threaded process.
        tqdm.monitor_interval = 0
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr) as bar:
            for ids, source_bytes in encoded:
                sequence = np.append(ids, np.int32(eod))
                builder.add_document(sequence, [sequence.size])
                num_documents += 1
                num_tokens += sequence.size
                bar.update(source_bytes)
                bar.set_postfix_str(f"{num_documents:,} docs, {num_tokens:,} tokens", refresh=False)
        if num_documents == 0:
            raise ValueError(f"no documents in the input: {describe_paths(paths)} hold no text")
        builder.finalize(staging_idx)
        os.replace(staging_bin, bin_path)
        os.replace(staging_idx, idx_path)
    finally:
        if builder is not None:
            builder.data_file.close()  # already closed by finalize on success
        for path in (staging_bin, staging_idx):
            if os.path.exists(path):
                os.remove(path)
    return prefix, num_documents, num_tokens


def main(argv: list[str] | None = None) -> int:
    """Tokenize the inputs into megatron's indexed dataset and print what was written; the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        prefix, num_documents, num_tokens = preprocess(args)
    except (OSError, ValueError) as error:
        print(f"preprocess_data: error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(
        f"preprocess_data: wrote {prefix}.bin/.idx: {num_documents:,} documents, {num_tokens:,} tokens "
        f"({num_documents:,} of them EOD) in {seconds:.1f} s; data prefix for training: {prefix}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
