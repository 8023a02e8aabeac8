"""The step's one host read (``training/step.py``): its gradient norm is megatron's, computed on the device from the
same gradients and process groups (``training/grad_norm.py``), at several layouts, with and without megatron's
distributed optimizer and with megatron's own AdamW; and the trainer's recorders and deferred metrics report what
the old per-matrix host reads did."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

TINY = str(Path(__file__).resolve().parents[2] / "launch" / "configs" / "tiny_cpu.yaml")
SMALL = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "training.global_batch_size=8",
    "training.micro_batch_size=2",
]


def _batches(cfg, dims, chunks: int):
    from megatron.core import parallel_state

    from megatron_muon.training.step import synthetic_batches

    data = synthetic_batches(
        vocab_size=cfg.model.vocab_size,
        seq_length=cfg.model.seq_length,
        micro_batch_size=cfg.training.micro_batch_size,
        num_microbatches=cfg.training.num_microbatches(dims.dp),
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=dims.dp,
    )
    return [data] * chunks if chunks > 1 else data


def _norms_on_rank(layout: list[str], variants: list[list[str]]) -> list[tuple[float, float, float]]:
    """Per variant: (megatron's get_grad_norm, ours from the device, train_step's) after one forward/backward."""
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config, validate
    from megatron_muon.platform.device import chosen_device
    from megatron_muon.training.grad_norm import grad_norm_squared
    from megatron_muon.training.parts import build_training_parts
    from megatron_muon.training.recorders import StepRecorders
    from megatron_muon.training.step import _forward_backward, train_step

    pg = ProcessGroupCollection.use_mpu_process_groups()
    results = []
    for overrides in variants:
        cfg = load_config(TINY, [*SMALL, *layout, *overrides])
        dims = validate(cfg)
        parts = build_training_parts(cfg, dims, pg, chosen_device())
        micro, nmb = cfg.training.micro_batch_size, cfg.training.num_microbatches(dims.dp)
        kwargs = dict(
            num_microbatches=nmb, seq_length=cfg.model.seq_length, micro_batch_size=micro, pg_collection=pg
        )

        for chunk in parts.model:
            chunk.zero_grad_buffer()
        parts.optimizer.zero_grad()
        parts.model[0].config.grad_scale_func = parts.optimizer.scale_loss
        _forward_backward(parts.model, _batches(cfg, dims, len(parts.model)), forward_only=False, **kwargs)
        parts.optimizer.prepare_grads()
        theirs = parts.optimizer.get_grad_norm()
        ours = math.sqrt(float(grad_norm_squared(parts.optimizer, torch.device("cpu"))))
        recorders = StepRecorders(parts.optimizer, parts.qk_clip, parts.expert_load)
        step = train_step(
            parts.model,
            parts.optimizer,
            _batches(cfg, dims, len(parts.model)),
            read_with_step=recorders.read_with_step,
            **kwargs,
        )
        metrics, _ = recorders.after_step(step, 1)
        assert not step["skipped"] and step["optimizer_seconds"] > 0
        assert any(k.startswith("moe/load_imbalance/") for k in metrics), metrics
        if cfg.optimizer.qk_clip.records:
            assert any(k.startswith("attention/max_logit/") for k in metrics), metrics
        _, deferred = recorders.flush()
        if cfg.optimizer.use_muon:
            assert any(k.startswith("muon/update_rms/") for k in deferred) and all(
                isinstance(v, float) and math.isfinite(v) for v in deferred.values()
            ), deferred
        results.append((float(theirs), ours, step["grad_norm"]))
    return results


@pytest.mark.parametrize(
    ("layout", "sizes", "variants"),
    [
        (
            ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"],
            dict(tp=2, pp=2, ep=2, etp=1),
            [["optimizer.distributed_optimizer=false"], ["optimizer.distributed_optimizer=true"]],
        ),
        pytest.param(
            ["parallel.tp=1", "parallel.pp=1", "parallel.ep=2"],
            dict(tp=1, pp=1, ep=2, etp=1),
            [
                ["optimizer.distributed_optimizer=true"],
                ["optimizer.use_muon=false", "optimizer.distributed_optimizer=true"],
            ],
        ),
    ],
    ids=["tp2-pp2-ep2", "dp4-ep2"],
)
def test_the_device_grad_norm_is_megatrons(layout, sizes, variants):
    ranks = run_distributed(_norms_on_rank, 4, **sizes, timeout_s=600, args=(layout, variants))
    for rank, results in enumerate(ranks):
        for (theirs, ours, stepped), variant in zip(results, variants, strict=True):
            assert theirs > 0 and math.isclose(ours, theirs, rel_tol=1e-5), (rank, variant, theirs, ours)
            # train_step's norm is of the next batch's gradients: the same computation, another batch
            assert math.isfinite(stepped) and stepped > 0, (rank, variant, stepped)


def _prepare_grads_calls_on_rank(variants: list[list[str]]) -> list[dict[str, int]]:
    """Per variant: how often each of the optimizer's leaf members prepared its gradients during one train_step."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config, validate
    from megatron_muon.optim.build import chain_members
    from megatron_muon.platform.device import chosen_device
    from megatron_muon.training.parts import build_training_parts
    from megatron_muon.training.step import train_step

    pg = ProcessGroupCollection.use_mpu_process_groups()
    results = []
    for overrides in variants:
        cfg = load_config(TINY, [*SMALL, *ONE_RANK, *overrides])
        dims = validate(cfg)
        parts = build_training_parts(cfg, dims, pg, chosen_device())
        calls: dict[str, int] = {}
        for index, member in enumerate(chain_members(parts.optimizer)):
            name = f"{index}:{type(member).__name__}"
            calls[name] = 0

            def counted(prepare=member.prepare_grads, name=name, calls=calls):
                calls[name] += 1
                return prepare()

            member.prepare_grads = counted
        step = train_step(
            parts.model,
            parts.optimizer,
            _batches(cfg, dims, len(parts.model)),
            num_microbatches=cfg.training.num_microbatches(dims.dp),
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            pg_collection=pg,
        )
        assert not step["skipped"] and math.isfinite(step["grad_norm"]), step
        results.append(calls)
    return results


ONE_RANK = ["parallel.world_size=1", "parallel.tp=1", "parallel.pp=1", "parallel.ep=1"]


def test_one_train_step_prepares_the_gradients_once():
    """megatron's ``ChainedOptimizer.step`` prepares the gradients itself; the step has prepared them already (before
    its norm), so each member prepares once per iteration (fp16's loss scaler would otherwise update twice)."""
    variants = [["optimizer.distributed_optimizer=false"], ["optimizer.distributed_optimizer=true"]]
    (results,) = run_distributed(_prepare_grads_calls_on_rank, 1, timeout_s=300, args=(variants,))
    for calls, variant in zip(results, variants, strict=True):
        assert calls and set(calls.values()) == {1}, (variant, calls)
