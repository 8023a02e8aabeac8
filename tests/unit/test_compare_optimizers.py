"""The token-ratio arithmetic of tools/compare_optimizers.py (megatron_muon/bench/compare_optimizers.py) (the runs themselves are an experiment, not a test)."""

from __future__ import annotations

import pytest

from megatron_muon.bench import compare_optimizers


@pytest.fixture(scope="module")
def tool():
    return compare_optimizers


def test_tokens_to_reach_interpolates_between_evaluations(tool):
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert tool.tokens_to_reach(curve, 3.5) == pytest.approx(250.0)
    assert tool.tokens_to_reach(curve, 6.0) == 100.0  # the first evaluation already reaches it
    assert tool.tokens_to_reach(curve, 2.0) is None


def _rows(optimizer, batch, lr, losses, step_tokens=1000):
    return [
        dict(
            optimizer=optimizer,
            batch_size=str(batch),
            lr=str(lr),
            tokens=str((i + 1) * step_tokens),
            val_loss=str(v),
        )
        for i, v in enumerate(losses)
    ]


def test_summary_takes_the_best_adamw_end_point_and_the_earliest_muon_run(tool):
    rows = (
        _rows("adamw", 8, 1e-3, [6.0, 5.0, 4.5, 4.2])
        + _rows("adamw", 8, 3e-3, [5.8, 4.8, 4.3, 4.0])  # best AdamW: 4.0 after 4000 tokens
        + _rows("muon", 8, 0.01, [5.0, 4.4, 4.1, 3.9])  # reaches 4.0 at 3500 tokens
        + _rows("muon", 8, 0.02, [4.8, 4.0, 3.8, 3.7])  # reaches 4.0 at 2000 tokens: the one that counts
        + _rows("adamw", 16, 1e-3, [5.0, 4.0])
        + _rows("muon", 16, 0.02, [5.5, 4.5])  # never reaches 4.0
    )
    (small, large) = tool.summarize(rows, [8, 16], budget=4000)
    assert (small["adamw_lr"], small["adamw_final_loss"], small["adamw_tokens"]) == (3e-3, 4.0, 4000)
    assert (small["muon_lr"], small["muon_tokens_to_adamw_loss"]) == (0.02, 2000.0)
    assert small["token_ratio"] == pytest.approx(0.5)
    assert large["token_ratio"] is None and large["muon_tokens_to_adamw_loss"] is None
