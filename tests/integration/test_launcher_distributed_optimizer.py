"""``optimizer.distributed_optimizer: true`` through the launcher on Shakespeare (real tokens, uneven routing):
the same losses as without it at the same layout, and its checkpoint continues without it at another layout as
the run itself continued."""

from __future__ import annotations

import pytest

from tests.integration.test_launcher import TINY_CONFIG, iteration_losses, launch

pytestmark = pytest.mark.slow

# fp32 weights and Newton–Schulz: the runs differ only in the order of floating-point sums (reduce-scatter vs
# all-reduce, other layouts); a lost optimizer state or a stale parameter all-gather moves the loss by far more.
SAME_LAYOUT_TOLERANCE = 1e-4
OTHER_LAYOUT_TOLERANCE = 1e-3


def test_distributed_optimizer_trains_like_the_plain_one_and_its_checkpoint_resumes_without_it(
    tmp_path, shakespeare_data, launcher_env
):
    common = [
        TINY_CONFIG,
        "training.train_iters=6",
        "optimizer.warmup_iters=1",
        "training.eval_interval=0",
        "logging.log_interval=1",
        "checkpoint.save_interval=3",
    ]
    dp4_ep2 = ["parallel.tp=1", "parallel.pp=1", "parallel.ep=2"]  # data-parallel 4, expert-data-parallel 2
    distributed = launch(
        launcher_env,
        *common,
        *dp4_ep2,
        "optimizer.distributed_optimizer=true",
        "optimizer.overlap_grad_reduce=true",
        "optimizer.overlap_param_gather=true",
        f"checkpoint.save_dir={tmp_path / 'distributed'}",
        f"logging.tensorboard_dir={tmp_path / 'tb1'}",
    )
    assert distributed.returncode == 0, distributed.stderr[-3000:] + distributed.stdout[-3000:]
    on = iteration_losses(distributed.stdout)
    assert sorted(on) == list(range(1, 7)) and on[6] < on[1] - 0.5, on

    plain = launch(
        launcher_env,
        *common,
        *dp4_ep2,
        "training.train_iters=3",
        f"checkpoint.save_dir={tmp_path / 'plain'}",
        f"logging.tensorboard_dir={tmp_path / 'tb2'}",
    )
    assert plain.returncode == 0, plain.stderr[-3000:] + plain.stdout[-3000:]
    off = iteration_losses(plain.stdout)
    worst = max(abs(off[i] - on[i]) for i in (1, 2, 3))
    assert worst <= SAME_LAYOUT_TOLERANCE, f"distributed optimizer {on} vs plain {off}"

    # Saved with the distributed optimizer at DP4·EP2, resumed without it at the default TP2·PP2·EP2.
    checkpoint = tmp_path / "distributed" / "iter_0000003"
    resumed = launch(
        launcher_env,
        *common,
        f"checkpoint.resume={checkpoint}",
        f"checkpoint.save_dir={tmp_path / 'resumed'}",
        f"logging.tensorboard_dir={tmp_path / 'tb3'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    assert f"loaded checkpoint {checkpoint} at iteration 3" in resumed.stdout, resumed.stdout[-3000:]
    continued = iteration_losses(resumed.stdout)
    assert sorted(continued) == [4, 5, 6], continued
    worst = max(abs(continued[i] - on[i]) for i in (4, 5, 6))
    assert worst <= OTHER_LAYOUT_TOLERANCE, f"resumed {continued} vs the saving run's own {on}"
