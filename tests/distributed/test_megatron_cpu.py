"""megatron-core trains a tiny MoE GPT on CPU with gloo through its own schedule, DDP, finalize_model_grads and
optimizer; tensor parallelism does not change the losses; the CPU stand-ins fail loudly on a megatron they do not
know."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_muon.testing import run_distributed

STEPS = 20
MICRO_BATCH_SIZE = 2
GLOBAL_MICROBATCHES = 4  # sequences per step = 2 x 4 = 8, split over the data-parallel ranks
SEED = 1234


def _train_tiny_moe(*, steps: int, num_microbatches: int, tp: int, pp: int, ep: int, etp: int | None):
    """On one rank: seed, build the tiny MoE chunks, wrap them in megatron's DDP, build megatron's Adam and run
    ``steps`` train steps on synthetic data. Returns this rank's per-step reports."""
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_muon.testing.small_model import build_small_model
    from megatron_muon.training.step import synthetic_batches, train_step

    small = build_small_model(tp=tp, pp=pp, ep=ep, etp=etp, seed=SEED)
    cfg, pg, model = small.model, small.pg, small.chunks
    optimizer = get_megatron_optimizer(
        small.adam_config(lr=3e-3, weight_decay=0.0, clip_grad=1.0),
        model,
        use_gloo_process_groups=False,  # megatron refuses extra gloo groups with an explicit pg_collection
        pg_collection=pg,
    )
    batches = synthetic_batches(
        vocab_size=cfg.vocab_size,
        seq_length=cfg.seq_length,
        micro_batch_size=MICRO_BATCH_SIZE,
        num_microbatches=num_microbatches,
        data_parallel_rank=pg.dp.rank(),
        data_parallel_size=pg.dp.size(),
        seed=SEED,
    )
    return [
        train_step(
            model,
            optimizer,
            batches,
            num_microbatches=num_microbatches,
            seq_length=cfg.seq_length,
            micro_batch_size=MICRO_BATCH_SIZE,
            pg_collection=pg,
        )
        for _ in range(steps)
    ]


def _losses(reports) -> list[float]:
    return [report["loss"] for report in reports]


def _assert_trained(reports) -> None:
    losses = _losses(reports)
    assert all(math.isfinite(loss) for loss in losses), losses
    assert not any(report["skipped"] for report in reports)
    assert all(report["grad_norm"] is not None and math.isfinite(report["grad_norm"]) for report in reports)
    # log(256) = 5.55 at init; the arithmetic sequences are learnable, so 20 Adam steps must make progress.
    assert losses[0] == pytest.approx(math.log(256), abs=0.1), losses
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.2, f"loss did not fall: first five mean {first:.4f}, last five mean {last:.4f}"
    # Switch aux loss is num_experts * sum(f_i * P_i) = 1 for a perfectly balanced router (Fedus et al. eq. 4).
    balance = [report["load_balancing_loss"] for report in reports]
    assert all(0.9 < value < 2.0 for value in balance), balance


@pytest.fixture(scope="module")
def tp2_pp2_ep2_reports():
    """4 ranks: TP2 x PP2 (DP1), EP2 with expert TP1 (expert DP1)."""
    return run_distributed(
        _train_tiny_moe,
        4,
        tp=2,
        pp=2,
        ep=2,
        etp=1,
        kwargs=dict(steps=STEPS, num_microbatches=GLOBAL_MICROBATCHES, tp=2, pp=2, ep=2, etp=1),
    )


@pytest.mark.slow
def test_tiny_moe_trains_in_one_process():
    [reports] = run_distributed(
        _train_tiny_moe,
        1,
        kwargs=dict(steps=STEPS, num_microbatches=GLOBAL_MICROBATCHES, tp=1, pp=1, ep=1, etp=None),
    )
    _assert_trained(reports)


@pytest.mark.slow
@pytest.mark.extended  # megatron training at TP2·PP2·EP2 on 4 gloo ranks: the launcher's runs, in CI
def test_tiny_moe_trains_at_tp2_pp2_ep2_on_four_gloo_ranks(tp2_pp2_ep2_reports):
    _assert_trained(tp2_pp2_ep2_reports[0])

    # The loss lives on the last pipeline stage; every rank must report the same numbers (but its own optimizer
    # time: the step reads the device once and does not all-reduce a timing).
    def shared(reports):
        return [
            {k: v for k, v in r.items() if k not in ("optimizer_seconds", "optimizer_timer")} for r in reports
        ]

    for rank_reports in tp2_pp2_ep2_reports[1:]:
        assert shared(rank_reports) == shared(tp2_pp2_ep2_reports[0])


@pytest.mark.slow
@pytest.mark.extended  # TP against world 1 over ten steps: test_muon_training's tp2_ep2, in CI
def test_tensor_parallelism_does_not_change_the_losses(tp2_pp2_ep2_reports):
    """TP2·PP2 (DP1, 4 microbatches) against TP1·PP2 (DP2, 2 microbatches per DP rank): same seed, same global
    batch, same experts per EP rank. CPU initialization draws each full matrix and slices it, so both start from
    the same model; from there only the order of floating-point sums differs."""
    tp1_reports = run_distributed(
        _train_tiny_moe,
        4,
        tp=1,
        pp=2,
        ep=2,
        etp=1,
        kwargs=dict(steps=STEPS, num_microbatches=GLOBAL_MICROBATCHES // 2, tp=1, pp=2, ep=2, etp=1),
    )
    tp1, tp2 = _losses(tp1_reports[0]), _losses(tp2_pp2_ep2_reports[0])
    worst = max(abs(a - b) for a, b in zip(tp1, tp2, strict=True))
    assert worst < 1e-4, f"max |loss(TP1) - loss(TP2)| = {worst:.2e}\nTP1 {tp1}\nTP2 {tp2}"


# ---------------------------------------------------------------------------------------------------------------
# The stand-ins refuse to run on a megatron-core they were not written for (one process, no spawning).
# ---------------------------------------------------------------------------------------------------------------


def test_stand_ins_refuse_another_megatron_version(monkeypatch):
    import megatron.core
    from megatron.core.tensor_parallel import layers

    from megatron_muon.platform import apply_cpu_stand_ins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(megatron.core, "__version__", "0.20.0")
    torch_seen_by_layers = layers.torch
    with pytest.raises(RuntimeError, match=r"megatron.core.__version__='0.20.0'"):
        apply_cpu_stand_ins()
    assert layers.torch is torch_seen_by_layers


def test_stand_ins_name_a_moved_megatron_function_and_patch_nothing(monkeypatch):
    from megatron.core.tensor_parallel import layers
    from megatron.core.transformer.moe import token_dispatcher

    from megatron_muon.platform import apply_cpu_stand_ins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(token_dispatcher, "maybe_move_tensor_to_cpu")
    torch_seen_by_layers = layers.torch
    with pytest.raises(
        RuntimeError, match=r"megatron.core.transformer.moe.token_dispatcher.maybe_move_tensor_to_cpu"
    ):
        apply_cpu_stand_ins()
    assert layers.torch is torch_seen_by_layers  # checked everything before patching anything


def test_stand_ins_do_nothing_where_cuda_exists(monkeypatch):
    from megatron.core.tensor_parallel import layers

    from megatron_muon.platform import apply_cpu_stand_ins

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    torch_seen_by_layers = layers.torch
    assert apply_cpu_stand_ins() is False
    assert layers.torch is torch_seen_by_layers
