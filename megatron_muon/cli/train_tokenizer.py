"""Train a SentencePiece BPE tokenizer (byte fallback, lossless) and write a megatron tokenizer directory.

    .venv/bin/python tools/train_tokenizer.py --input 'corpus/*.txt' more.jsonl --output data/tok --vocab-size 4000

Writes ``<output>/tokenizer.model``, ``tokenizer.vocab`` and megatron's ``tokenizer_metadata.json``; load it
with ``megatron_muon.data.load_tokenizer(<output>)``. Inputs: text files (every non-blank line is a training
sentence) and ``.jsonl`` files of ``{"text": ...}`` records; quote globs so the tool expands them (``**``
works). Refuses to write into a non-empty output directory unless ``--force``.
"""

from __future__ import annotations

import argparse
import sys
import time

SAMPLE_CHARS = 1_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Inputs, output directory and vocabulary settings from ``argv`` (None: ``sys.argv``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="text / .jsonl files or glob patterns")
    parser.add_argument("--output", required=True, help="tokenizer directory to write")
    parser.add_argument(
        "--vocab-size", type=int, default=4000, help="pieces, specials and 256 bytes included"
    )
    parser.add_argument("--json-key", default="text", help="field of a .jsonl record that holds the text")
    parser.add_argument(
        "--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training (0: all)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite the tokenizer in a non-empty --output"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train the SentencePiece tokenizer ``argv`` describes and print its statistics; the exit status."""
    args = parse_args(argv)
    # Imported after argument parsing so that --help is instant.
    from megatron_muon.data.tokenizer import (
        chars_per_token,
        expand_input_paths,
        iter_documents,
        load_tokenizer,
        train_sentencepiece_tokenizer,
    )

    try:
        paths = expand_input_paths(args.input)
        start = time.perf_counter()
        model_path = train_sentencepiece_tokenizer(
            paths,
            args.output,
            vocab_size=args.vocab_size,
            json_key=args.json_key,
            input_sentence_size=args.input_sentence_size,
            overwrite=args.force,
        )
        seconds = time.perf_counter() - start
        tokenizer = load_tokenizer(args.output)
        ratio, sample = chars_per_token(
            tokenizer, iter_documents(paths, json_key=args.json_key), SAMPLE_CHARS
        )
    except (OSError, ValueError) as error:
        print(f"train_tokenizer: error: {error}", file=sys.stderr)
        return 2
    print(
        f"train_tokenizer: wrote {model_path} from {len(paths)} file(s) in {seconds:.1f} s: "
        f"vocab size {tokenizer.vocab_size}, EOD id {tokenizer.eod}, "
        f"{ratio:.2f} chars/token on a {sample:,}-character sample of the input"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
