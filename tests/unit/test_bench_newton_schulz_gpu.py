"""tools/bench_newton_schulz_gpu.py runs end to end with ``--device cpu`` (tiny shapes: a check of the tool that the
GPU session will run, not a benchmark) and writes its section of a benchmarks file, device named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_the_tool_writes_both_tables_with_the_device(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\n<!-- other:start -->\nkept\n<!-- other:end -->\n")
    command = [sys.executable, str(REPO / "tools" / "bench_newton_schulz_gpu.py"), "--device", "cpu"]
    command += ["--shapes", "32x48", "--stacks", "2x16x40", "--fp8-steps", "1", "2"]
    command += ["--warmup", "0", "--repeats", "1", "--out", str(out)]
    subprocess.run(command, check=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    text = out.read_text()
    assert "kept" in text  # other tools' sections are left alone
    section = text[text.index("<!-- bench_newton_schulz_gpu:start -->") :]
    assert "- Device: CPU: " in section
    assert "| 32×48 |" in section and "| 2×16×40 |" in section
    assert (
        section.count("e4m3 steps 1–1, bf16 after") == 2 and section.count("e4m3 steps 1–2, bf16 after") == 2
    )
    assert "FP8 GEMMs alone" in section


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_an_unavailable_gpu_is_a_one_line_exit():
    command = [sys.executable, str(REPO / "tools" / "bench_newton_schulz_gpu.py"), "--device", "cuda"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "--device cuda: torch.cuda.is_available() is False (use --device cpu to check the tool)"
    )
