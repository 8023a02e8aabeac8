"""Multi-head latent attention through the CLI: launch/pretrain_muon.sh trains the Moonlight proxy config
(launch/configs/moonlight_proxy_cpu.yaml: MLA, fine-grained MoE with shared experts, sigmoid router with expert
bias, sequence aux loss, QK-clip), shrunk to two layers and a few iterations, at its own layout TP2·PP2·EP2.

One process start of 4 ranks (~25 s on 2 cores). MLA at TP1 is built, stepped and clipped in-process by
tests/distributed/test_mla_model.py and test_qk_clip_mla.py, and a world-1 launch by test_launcher.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = "launch/configs/moonlight_proxy_cpu.yaml"
TRAIN_ITERS = 4
ITERATION_LINE = re.compile(r"^ iteration\s+(\d+)/(\d+) \|.*\| lm loss ([0-9.]+) \|", re.MULTILINE)
VALIDATION_LINE = re.compile(r"validation at iteration (\d+) \| lm loss ([0-9.]+)")

LAYOUTS = {
    "tp2_pp2_ep2": [],  # the config's own layout
}


def _train(tmp_path: Path, launcher_env, layout: list[str]) -> tuple[subprocess.CompletedProcess, Path]:
    tensorboard_dir = tmp_path / "tensorboard"
    arguments = [
        CONFIG,
        *layout,
        "model.num_layers=2",  # layer 0 dense, layer 1 MoE: one layer per pipeline stage at PP2
        f"training.train_iters={TRAIN_ITERS}",
        "training.global_batch_size=4",
        "training.eval_interval=4",
        "training.eval_iters=1",
        "optimizer.warmup_iters=1",
        "checkpoint.save_interval=0",
        f"checkpoint.save_dir={tmp_path / 'checkpoints'}",
        f"logging.tensorboard_dir={tensorboard_dir}",
        "logging.log_interval=1",
    ]
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "pretrain_muon.sh"), *arguments],
        cwd=REPO,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, tensorboard_dir


# The full suite only: MLA is exact at TP2·EP2 in tests/distributed/test_parallel_muon.py (tp2_ep2_mla, per-head
# matrices), its QK-clip in test_qk_clip_mla.py, and this config's GPU program is rehearsed by CI stage 3.
@pytest.mark.extended
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mla_moonlight_proxy_trains_through_the_cli(name, tmp_path, shakespeare_data, launcher_env):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    result, tensorboard_dir = _train(tmp_path, launcher_env, LAYOUTS[name])
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    losses = {int(m[1]): float(m[3]) for m in ITERATION_LINE.finditer(result.stdout)}
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1)), log[-4000:]
    assert losses[TRAIN_ITERS] < losses[1] - 0.2, losses  # ln(4000) = 8.29 at the start
    assert [int(step) for step, _ in VALIDATION_LINE.findall(result.stdout)] == [TRAIN_ITERS]

    events = EventAccumulator(str(tensorboard_dir), size_guidance={SCALARS: 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    # MLA's matrices went to Muon (kv_up split into its K and V parts), and QK-clip recorded every layer's MLA
    # attention on every pipeline stage.
    mla_kinds = {"attention.q_proj", "attention.kv_down_proj", "attention.k", "attention.v", "attention.proj"}
    assert {f"muon/update_rms/{kind}" for kind in mla_kinds} <= tags, sorted(tags)
    assert "muon/update_rms/attention.qkv" not in tags and "muon/update_rms/attention.q" not in tags
    assert {"attention/max_logit/layer_01", "attention/max_logit/layer_02"} <= tags, sorted(tags)
    assert all(0 < e.value < 100 for e in events.Scalars("attention/max_logit/layer_02"))
