"""The router's load balancing as configured, through the trainer: the per-sequence aux loss (DeepSeek-V3), none,
and the expert bias moved by ``model.moe_router_bias_update_rate`` — at TP2 (sequence parallel, so each rank routes
half of every sequence)."""

from __future__ import annotations

import pytest

from megatron_muon.testing import run_distributed

pytestmark = pytest.mark.slow

BASE = [
    "data.mock=true",
    "parallel.world_size=2",
    "parallel.tp=2",
    "training.train_iters=2",
    "training.global_batch_size=4",
    "training.micro_batch_size=2",
    "training.eval_interval=0",
    "training.exit_signal_handler=false",
    "checkpoint.resume=none",
]
VARIANTS = {
    "aux_loss": [],
    "seq_aux_loss": ["model.moe_router_load_balancing_type=seq_aux_loss"],
    "none": ["model.moe_router_load_balancing_type=none"],
    "bias_rate_0.001": [
        "model.moe_router_load_balancing_type=none",
        "model.moe_router_score_function=sigmoid",
        "model.moe_router_enable_expert_bias=true",
        "model.moe_router_bias_update_rate=0.001",
    ],
    "bias_rate_0.01": [
        "model.moe_router_load_balancing_type=none",
        "model.moe_router_score_function=sigmoid",
        "model.moe_router_enable_expert_bias=true",
        "model.moe_router_bias_update_rate=0.01",
    ],
}


def _one_step_per_variant_on_rank():
    import torch
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_muon.config import load_config, validate
    from megatron_muon.training.step import LOAD_BALANCING_LOSS, train_step
    from megatron_muon.training.trainer import Trainer

    pg = ProcessGroupCollection.use_mpu_process_groups()
    results = {}
    for name, overrides in VARIANTS.items():
        cfg = load_config(None, [*BASE, *overrides])
        trainer = Trainer(cfg, validate(cfg, 2), pg)
        result = train_step(
            trainer.model,
            trainer.optimizer,
            trainer.train_data,
            num_microbatches=trainer.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            pg_collection=pg,
        )
        biases = [
            module.expert_bias.clone()
            for chunk in trainer.model
            for module in chunk.modules()
            if getattr(module, "expert_bias", None) is not None
        ]
        results[name] = (result["loss"], result[LOAD_BALANCING_LOSS], torch.stack(biases) if biases else None)
    return results


def test_load_balancing_types_and_the_expert_bias_rate_act_at_tp2():
    first, second = run_distributed(_one_step_per_variant_on_rank, 2, tp=2, timeout_s=600)
    assert first.keys() == second.keys()
    for name in first:  # every rank reports the same step
        assert first[name][:2] == second[name][:2], name

    aux_loss, seq_aux_loss, none = first["aux_loss"][1], first["seq_aux_loss"][1], first["none"][1]
    # Same weights and data: the same LM loss; the balancing loss is the one configured.
    assert first["aux_loss"][0] == first["seq_aux_loss"][0] == first["none"][0]
    assert none is None  # no balancing loss is computed, so none is reported (not a 0)
    # E * sum_i f_i P_i (Fedus et al. 2021): about 1 for the near-uniform routing of a fresh model; per sequence
    # the loads f_i come from each sequence's own tokens, so the value differs from the micro-batch one.
    assert 0.5 < aux_loss < 2 and 0.5 < seq_aux_loss < 2, (aux_loss, seq_aux_loss)
    assert seq_aux_loss != aux_loss

    # The expert bias moves by sign(mean load - load) x rate after one step: every entry is 0 or +-rate.
    for name, rate in (("bias_rate_0.001", 1e-3), ("bias_rate_0.01", 1e-2)):
        bias = first[name][2]
        assert bias is not None and bias.numel() > 0
        magnitudes = bias.abs().flatten().tolist()
        assert all(m == 0.0 or m == pytest.approx(rate, rel=1e-6) for m in magnitudes), (name, magnitudes)
        assert max(magnitudes) == pytest.approx(rate, rel=1e-6), name
