"""bench/step_time.py: one device's step time read from the launcher's iteration log (the launcher replaced by a
canned log in the trainer's format)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_muon.bench import step_time


def _log(ms: dict[int, float]) -> str:
    return "".join(
        f" iteration {i:>6}/120 | consumed samples {8 * i:>9} | consumed tokens {256 * i:>11,} | ms/iter {value:8.1f} "
        f"| tokens/s {256e3 / value:9.0f} | lr muon 1.000e-03 adamw 1.000e-03 | lm loss 5.0000 | grad norm 1.000 | "
        "MFU n/a | skipped 0\n"
        for i, value in ms.items()
    )


def test_the_median_leaves_out_the_warm_up_iterations():
    log = _log({1: 900.0, 10: 500.0, 11: 30.0, 12: 20.0, 13: 25.0})
    assert step_time.median_seconds_per_step(log) == (pytest.approx(0.025), 3)
    with pytest.raises(ValueError, match="no ms/iter logged at iteration >= 11"):
        step_time.median_seconds_per_step(_log({1: 900.0, 10: 500.0}))


def test_each_optimizer_is_timed_on_one_devices_batch(monkeypatch):
    launches = []

    def run_training(config, overrides, evaluates=True):
        assert not evaluates  # no evaluation in a timing run
        launches.append((config, overrides))
        muon = "optimizer.use_muon=true" in overrides
        return SimpleNamespace(stdout=_log({i: 30.0 if muon else 25.0 for i in range(1, 13)}))

    monkeypatch.setattr(step_time, "run_training", run_training)
    times = step_time.measure_step_seconds("c.yaml", ["model.hidden_size=64"], 32, 8, ["adamw", "muon"], 2)
    assert times.seconds == {"adamw": pytest.approx(0.025), "muon": pytest.approx(0.030)}
    assert times.timed_iterations == 2
    for _, overrides in launches:
        assert overrides[0] == "model.hidden_size=64"
        assert {"model.seq_length=32", "training.global_batch_size=8", "training.micro_batch_size=8",
                "training.train_iters=12", "training.eval_interval=0"} <= set(overrides)  # fmt: skip
    with pytest.raises(ValueError, match="cannot time optimizer sgd: valid: adamw, muon"):
        step_time.measure_step_seconds("c.yaml", [], 32, 8, ["sgd"], 2)
