"""``parallel.fsdp: true`` through the launcher on Shakespeare (real tokens, uneven routing): the same losses as
without it at the same layout (TP2·DP2, and DP4·EP2 with experts sharded over expert-DP), and checkpoints that
cross between FSDP and non-FSDP runs at other layouts, both ways, continuing as the saving run did."""

from __future__ import annotations

import pytest

from tests.integration.test_launcher import TINY_CONFIG, iteration_losses, launch

pytestmark = pytest.mark.slow

# fp32 weights and Newton–Schulz: the runs differ only in the order of floating-point sums (reduce-scatter vs
# all-reduce, other layouts); a lost row of a parameter, a momentum or a moment moves the loss by far more.
SAME_LAYOUT_TOLERANCE = 1e-4
OTHER_LAYOUT_TOLERANCE = 1e-3
COMMON = [
    TINY_CONFIG,
    "training.train_iters=6",
    "optimizer.warmup_iters=1",
    "training.eval_interval=0",
    "logging.log_interval=1",
    "checkpoint.save_interval=3",
]
TP2_DP2 = ["parallel.tp=2", "parallel.pp=1", "parallel.ep=1"]
DP4_EP2 = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=2"]


def _run(env, tmp_path, name: str, *overrides: str) -> dict[int, float]:
    result = launch(
        env,
        *COMMON,
        *overrides,
        f"checkpoint.save_dir={tmp_path / name}",
        f"logging.tensorboard_dir={tmp_path / ('tb_' + name)}",
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return iteration_losses(result.stdout)


def _close(a: dict[int, float], b: dict[int, float], iterations, tolerance: float, what: str) -> None:
    worst = max(abs(a[i] - b[i]) for i in iterations)
    assert worst <= tolerance, f"{what}: {a} vs {b}"


# The full suite only: FSDP's exactness is tests/distributed/test_parallel_muon.py's (TP·DP·EP and DP4), its
# checkpoints' crossing to and from other layouts the layout cycle's (dp4_ep2_fsdp), its GPU program CI's
# rehearsal (tests/unit/test_rehearsal.py), all in CI.
@pytest.mark.extended
def test_fsdp_trains_and_its_checkpoint_resumes_without_fsdp_at_another_layout(
    tmp_path, shakespeare_data, launcher_env
):
    fsdp = _run(launcher_env, tmp_path, "fsdp", *TP2_DP2, "parallel.fsdp=true")
    assert sorted(fsdp) == list(range(1, 7)) and fsdp[6] < fsdp[1] - 0.5, fsdp
    # The FSDP run's checkpoint without FSDP at the default TP2·PP2·EP2.
    out_of_fsdp = _run(
        launcher_env, tmp_path, "out_of_fsdp", f"checkpoint.resume={tmp_path / 'fsdp' / 'iter_0000003'}"
    )
    assert sorted(out_of_fsdp) == [4, 5, 6], out_of_fsdp
    _close(out_of_fsdp, fsdp, (4, 5, 6), OTHER_LAYOUT_TOLERANCE, "FSDP checkpoint resumed without FSDP")


@pytest.mark.extended  # FSDP's exactness with TP·DP·EP and at DP4 is tests/distributed/test_parallel_muon.py's, in CI
def test_fsdp_at_tp2_dp2_trains_like_ddp(tmp_path, shakespeare_data, launcher_env):
    plain = _run(launcher_env, tmp_path, "plain", *TP2_DP2)
    fsdp = _run(launcher_env, tmp_path, "fsdp", *TP2_DP2, "parallel.fsdp=true")
    _close(fsdp, plain, range(1, 7), SAME_LAYOUT_TOLERANCE, "FSDP at TP2·DP2 vs DDP")


@pytest.mark.extended  # the other direction of the same format; the layout cycle loads into FSDP in CI
def test_a_ddp_checkpoint_continues_under_fsdp_with_experts_over_expert_dp(
    tmp_path, shakespeare_data, launcher_env
):
    plain = _run(launcher_env, tmp_path, "plain", *TP2_DP2)
    # The plain run's checkpoint continued under FSDP at DP4·EP2 (experts sharded over expert-DP 2).
    into_fsdp = _run(
        launcher_env,
        tmp_path,
        "into_fsdp",
        *DP4_EP2,
        "parallel.fsdp=true",
        f"checkpoint.resume={tmp_path / 'plain' / 'iter_0000003'}",
    )
    assert sorted(into_fsdp) == [4, 5, 6], into_fsdp
    _close(into_fsdp, plain, (4, 5, 6), OTHER_LAYOUT_TOLERANCE, "DDP checkpoint resumed with FSDP")


@pytest.mark.extended  # FSDP's exactness at DP4 is tests/distributed/test_parallel_muon.py's, in CI
def test_fsdp_at_pure_data_parallel_4_trains_like_ddp(tmp_path, shakespeare_data, launcher_env):
    dp4 = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=1", "checkpoint.save_interval=0"]
    plain = _run(launcher_env, tmp_path, "plain", *dp4, "training.train_iters=3")
    fsdp = _run(launcher_env, tmp_path, "fsdp", *dp4, "training.train_iters=3", "parallel.fsdp=true")
    _close(fsdp, plain, (1, 2, 3), SAME_LAYOUT_TOLERANCE, "FSDP at DP4 vs DDP")
