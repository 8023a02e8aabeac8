"""``optimizer.distributed_optimizer: true`` gives the parameters the plain optimizer gives, value for value: runs built
from the config as the trainer builds them (``training/parts.py``), several DDP buckets (a small
``optimizer.ddp_bucket_size``), gradients from megatron's schedule and DDP's own reduce-scatter (both overlaps on),
two steps (the second uses the optimizer state of the first), fp32. Muon at TP2·DP2 and DP4·EP2; with
``optimizer.use_muon: false`` the config builds megatron's own ``DistributedOptimizer``, and it matches megatron's
plain optimizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

TINY = str(Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny_cpu.yaml")
STEPS = 2
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.moe_ffn_hidden_size=64",
    "model.num_moe_experts=4",
    "model.vocab_size=512",
    "model.seq_length=32",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
    "training.train_iters=10",
    "optimizer.warmup_iters=0",  # the peak learning rate from the first step
    "optimizer.overlap_grad_reduce=true",
    "optimizer.ddp_bucket_size=8192",  # elements: several buckets per buffer of this model
    "model.precision=fp32",
]
PLAIN = ["optimizer.distributed_optimizer=false"]
DISTRIBUTED = ["optimizer.distributed_optimizer=true", "optimizer.overlap_param_gather=true"]
ADAMW = ["optimizer.use_muon=false"]
# The runs differ only in the order of floating-point sums (reduce-scatter vs all-reduce, one bucket's sum vs
# another's); an update lost or applied twice, a stale all-gather or a lost optimizer state moves a parameter by the
# step size (~1e-3) or more. AdamW divides each gradient by its own RMS, which magnifies the summation noise of the
# smallest gradients (measured 1.04e-6 on an embedding row at DP4·EP2); Muon's update is a whole matrix's.
TOLERANCE = {"muon": 1e-6, "adamw": 1e-5}


def _run_of_variant(overrides: list[str], pg: Any) -> dict[str, Any]:
    """This rank's parameters after ``STEPS`` steps, the optimizer members' classes and the bucket count."""
    from megatron.core import parallel_state

    from megatron_muon.config import load_config, validate
    from megatron_muon.optim.build import chain_members
    from megatron_muon.platform.device import chosen_device
    from megatron_muon.training.parts import build_training_parts
    from megatron_muon.training.step import parameters_gathered, synthetic_batches, train_step

    cfg = load_config(TINY, [*SMALL, *overrides])
    dims = validate(cfg)
    parts = build_training_parts(cfg, dims, pg, chosen_device())
    names = {id(p): n for chunk in parts.model for n, p in chunk.named_parameters()}
    before = {names[id(p)]: p.detach().clone() for chunk in parts.model for p in chunk.parameters()}
    micro, microbatches = cfg.training.micro_batch_size, cfg.training.num_microbatches(dims.dp)
    batches = synthetic_batches(
        vocab_size=cfg.model.vocab_size,
        seq_length=cfg.model.seq_length,
        micro_batch_size=micro,
        num_microbatches=microbatches,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=dims.dp,
        seed=5,
    )
    for _ in range(STEPS):
        step = train_step(
            parts.model,
            parts.optimizer,
            batches,
            num_microbatches=microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=micro,
            pg_collection=pg,
        )
        assert not step["skipped"]
        parts.scheduler.step(increment=1)
    with parameters_gathered(parts.model):  # overlap_param_gather: the last all-gather waits for a forward
        after = {names[id(p)]: p.detach().clone() for chunk in parts.model for p in chunk.parameters()}
    moved = max(float((after[n] - before[n]).abs().max()) for n in after)
    buckets = sum(
        len(b.buckets) for chunk in parts.model for b in [*chunk.buffers, *chunk.expert_parallel_buffers]
    )
    buffers = sum(1 for chunk in parts.model for _ in [*chunk.buffers, *chunk.expert_parallel_buffers])
    return dict(
        params=after,
        moved=moved,
        buckets=buckets,
        buffers=buffers,
        members=sorted({type(m).__name__ for m in chain_members(parts.optimizer)}),
        dtype=str(next(iter(after.values())).dtype),
    )


def _runs_on_rank(variants: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    from megatron.core.process_groups_config import ProcessGroupCollection

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return {name: _run_of_variant(overrides, pg) for name, overrides in variants.items()}


LAYOUTS = {
    "tp2_dp2": (
        dict(tp=2, pp=1, ep=1, etp=1),
        ["parallel.tp=2", "parallel.pp=1", "parallel.ep=1"],
        {"muon_plain": PLAIN, "muon_distributed": DISTRIBUTED},
    ),
    "dp4_ep2": (
        dict(tp=1, pp=1, ep=2, etp=1),
        ["parallel.tp=1", "parallel.pp=1", "parallel.ep=2"],
        {
            "muon_plain": PLAIN,
            "muon_distributed": DISTRIBUTED,
            "adamw_plain": [*ADAMW, *PLAIN],
            "adamw_distributed": [*ADAMW, *DISTRIBUTED],
        },
    ),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.extended) if n == "dp4_ep2" else n for n in LAYOUTS]
)
def test_the_distributed_optimizer_gives_the_plain_optimizers_parameters(name):
    sizes, layout, variants = LAYOUTS[name]
    full = {variant: [*layout, *overrides] for variant, overrides in variants.items()}
    per_rank = run_distributed(_runs_on_rank, 4, **sizes, args=(full,), timeout_s=600)
    for rank, runs in enumerate(per_rank):
        for optimizer in ("muon", "adamw"):
            plain, distributed = runs.get(f"{optimizer}_plain"), runs.get(f"{optimizer}_distributed")
            if plain is None or distributed is None:
                continue
            assert plain["dtype"] == distributed["dtype"] == "torch.float32"
            assert distributed["buckets"] > distributed["buffers"], (rank, distributed["buckets"])  # several
            tolerance = TOLERANCE[optimizer]
            assert plain["moved"] > 100 * tolerance and distributed["moved"] > 100 * tolerance
            assert plain["params"].keys() == distributed["params"].keys()
            worst = max(
                (float((plain["params"][n] - distributed["params"][n]).abs().max()), n)
                for n in plain["params"]
            )
            assert worst[0] <= tolerance, (name, rank, optimizer, worst)
            if optimizer == "adamw":  # megatron's own optimizers, nothing of ours
                assert plain["members"] == ["FP32Optimizer"], plain["members"]
                assert distributed["members"] == ["DistributedOptimizer"], distributed["members"]
            else:  # Muon on megatron's layer-wise optimizer, AdamW on its DistributedOptimizer
                assert "DistributedOptimizer" in distributed["members"], distributed["members"]
