"""QK-clip as the trainer runs it (``training/parts.py`` builds the run from a config, ``StepRecorders`` reduces the
maxima after the backward and clips after the update) with bf16 model weights and fp32 main weights, and with
megatron's distributed optimizer (main weights sharded over data-parallel ranks), at TP2·DP2·EP2 on 4 gloo ranks.

A head with a planted large logit (its query and key rows scaled up, in the model and in the optimizer's main
weights) is brought to τ by the step's clip, and stays there: the learning rate is 0, so only the clip changes
weights, and every step sees the same batch. If the clip reached the model weights but not the main weights, the
next update (which copies main weights into the model) would restore the planted head: the third step's logits
show it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

TINY = str(Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny_cpu.yaml")
THRESHOLD = 1.0  # the initial weights' logits are ~0.1-0.3; the planted head's ~36 times that
PLANT = 6.0  # the planted head's query and key rows are multiplied by this: its logits by 36
PLANTED_LAYER = 2  # global, 1-based (the MoE layer)
STEPS = 3
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.moe_ffn_hidden_size=64",
    "model.num_moe_experts=4",
    "model.seq_length=32",
    "model.num_query_groups=4",  # one key per head: the clip of head 0 touches no other head
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "parallel.tp=2",
    "parallel.pp=1",
    "parallel.ep=2",
    "optimizer.qk_clip.enabled=true",
    f"optimizer.qk_clip.threshold={THRESHOLD}",
]
VARIANTS = {
    "bf16": ["model.precision=bf16", "optimizer.distributed_optimizer=false"],
    "fp32_distributed_optimizer": ["model.precision=fp32", "optimizer.distributed_optimizer=true"],
    "bf16_distributed_optimizer": ["model.precision=bf16", "optimizer.distributed_optimizer=true"],
}


def _plant_(attention) -> None:
    """Head 0's query rows and its group's key rows (megatron's qkv rows per group: the group's queries, its key,
    its value), on the TP rank that holds global head 0."""
    heads = attention.num_attention_heads_per_partition
    groups = attention.num_query_groups_per_partition
    d = attention.hidden_size_per_attention_head
    per_group = heads // groups
    weight = attention.linear_qkv.weight
    weight[:d] *= PLANT
    weight[per_group * d : (per_group + 1) * d] *= PLANT


def _steps_of_variant(overrides: list[str], pg: Any) -> dict[str, Any]:
    """One variant on this rank: each step's per-head maxima of every layer (MAX over data-parallel ranks, this
    rank's heads) and the per-layer maxima the trainer reads with the step; the weights' dtypes."""
    import torch
    import torch.distributed as dist

    from megatron_muon.config import load_config, validate
    from megatron_muon.platform.device import chosen_device
    from megatron_muon.training.parts import build_training_parts
    from megatron_muon.training.recorders import StepRecorders
    from megatron_muon.training.step import synthetic_batches, train_step

    cfg = load_config(TINY, [*SMALL, *overrides])
    dims = validate(cfg)
    parts = build_training_parts(cfg, dims, pg, chosen_device())
    assert parts.qk_clip is not None
    attentions = {int(a.layer_number): a.module for a in parts.qk_clip.attentions}
    if pg.tp.rank() == 0:
        with torch.no_grad():
            _plant_(attentions[PLANTED_LAYER])
    parts.optimizer.reload_model_params()  # the plant into the main weights too (bf16: fp32 copies)
    # No scheduler step: the learning rate stays at its warm-up start, 0, so only QK-clip changes weights.
    recorders = StepRecorders(parts.optimizer, parts.qk_clip, parts.expert_load)
    micro, microbatches = cfg.training.micro_batch_size, cfg.training.num_microbatches(dims.dp)
    per_head: list[dict[int, torch.Tensor]] = []
    per_layer: list[list[float]] = []

    def read_with_step() -> dict[str, Any]:
        heads = {
            n: a.core_attention.current_max_attn_logits.detach().float().clone()
            for n, a in attentions.items()
        }
        for logits in heads.values():
            dist.all_reduce(logits, op=dist.ReduceOp.MAX, group=pg.dp_cp)
        per_head.append(heads)
        return recorders.read_with_step()

    for iteration in range(1, STEPS + 1):
        batches = synthetic_batches(  # the same batch every step
            vocab_size=cfg.model.vocab_size,
            seq_length=cfg.model.seq_length,
            micro_batch_size=micro,
            num_microbatches=microbatches,
            data_parallel_rank=pg.dp.rank(),
            data_parallel_size=dims.dp,
            seed=11,
        )
        step = train_step(
            parts.model,
            parts.optimizer,
            batches,
            num_microbatches=microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=micro,
            pg_collection=pg,
            read_with_step=read_with_step,
        )
        assert not step["skipped"], iteration
        metrics, _ = recorders.after_step(step, iteration)
        per_layer.append([metrics[f"attention/max_logit/layer_{n:02d}"] for n in sorted(attentions)])
    qkv = attentions[PLANTED_LAYER].linear_qkv.weight
    main = getattr(qkv, "main_param", None)
    return dict(
        tp_rank=pg.tp.rank(),
        per_head=per_head,
        per_layer=per_layer,
        model_dtype=str(qkv.dtype),
        # The ranks that update the weight (all of them, or its owner under the distributed optimizer)
        main_dtype=None if main is None else str(main.dtype),
        lr=[group["lr"] for group in parts.optimizer.param_groups],
    )


def _steps_on_rank(variants: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return {name: _steps_of_variant(overrides, pg) for name, overrides in variants.items()}


@pytest.fixture(scope="module")
def runs() -> list[dict[str, dict]]:
    return run_distributed(_steps_on_rank, 4, tp=2, pp=1, ep=2, etp=1, args=(VARIANTS,), timeout_s=600)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_planted_head_lands_at_tau_and_stays_there(name, runs):
    by_rank = [r[name] for r in runs]
    assert all(lr == 0.0 for r in by_rank for lr in r["lr"]), by_rank[0]["lr"]
    if name.startswith("bf16"):
        assert {r["model_dtype"] for r in by_rank} == {"torch.bfloat16"}
        # fp32 main copies, on every rank or (distributed optimizer) on the owners only
        assert {r["main_dtype"] for r in by_rank} - {None} == {"torch.float32"}, [
            r["main_dtype"] for r in by_rank
        ]
    # Every rank reads the same per-layer maxima.
    assert all(r["per_layer"] == by_rank[0]["per_layer"] for r in by_rank), [r["per_layer"] for r in by_rank]
    planted = next(r for r in by_rank if r["tp_rank"] == 0)
    other = next(r for r in by_rank if r["tp_rank"] == 1)
    first, second, third = planted["per_head"]
    assert first[PLANTED_LAYER][0] > 2 * THRESHOLD, f"the plant did not work: {first[PLANTED_LAYER].tolist()}"
    unplanted = [*first[PLANTED_LAYER][1:].tolist(), *(v for s in other["per_head"] for v in s[1].tolist())]
    assert max(unplanted) < THRESHOLD, f"a head other than the planted one is above τ: {unplanted}"
    layer = PLANTED_LAYER - 1
    assert planted["per_layer"][0][layer] == pytest.approx(float(first[PLANTED_LAYER][0]), rel=1e-6)

    # bf16 weights: the clipped rows are rounded to 8 bits of mantissa (q and k: ~2 x 0.4% on the logit).
    tolerance = 0.02 if name.startswith("bf16") else 1e-4
    for step, logits in ((2, second), (3, third)):
        assert float(logits[PLANTED_LAYER][0]) == pytest.approx(THRESHOLD, rel=tolerance), (
            step,
            logits[PLANTED_LAYER].tolist(),
        )
        assert planted["per_layer"][step - 1][layer] == pytest.approx(THRESHOLD, rel=tolerance)
        # Heads at or under τ are not touched: the other TP rank's heads and the unplanted layer keep their logits
        # bit for bit (learning rate 0, same batch).
        assert torch_equal(other["per_head"][step - 1][PLANTED_LAYER], other["per_head"][0][PLANTED_LAYER])
        assert torch_equal(logits[1], first[1])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
