"""The trainer on one GPU through the device module: model built on the GPU (no CPU initialization), batches moved
there, no CPU stand-ins, memory and MFU reported."""

from __future__ import annotations

import math

import torch


def test_the_trainer_builds_and_steps_on_the_chosen_gpu(cuda_world):
    from megatron_muon.config import load_config, validate
    from megatron_muon.platform import cpu_stand_ins_active
    from megatron_muon.platform.device import choose_device, max_memory_allocated_mib, peak_flops, use_device
    from megatron_muon.training.step import LOAD_BALANCING_LOSS, train_step
    from megatron_muon.training.trainer import Trainer

    device = use_device(choose_device(local_rank=0))
    assert device.type == "cuda" and device.backend == "cpu:gloo,cuda:nccl"
    assert not cpu_stand_ins_active()
    cfg = load_config(
        None,
        [
            "data.mock=true",
            "parallel.world_size=1",
            "model.precision=bf16",
            "training.train_iters=3",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            "training.eval_interval=0",
            "training.exit_signal_handler=false",
            "checkpoint.resume=none",
            "model.moe_router_load_balancing_type=seq_aux_loss",
        ],
    )
    trainer = Trainer(cfg, validate(cfg, 1), cuda_world)
    parameters = [p for chunk in trainer.model for p in chunk.parameters()]
    assert parameters and all(p.is_cuda for p in parameters)
    losses = []
    for _ in range(3):
        result = train_step(
            trainer.model,
            trainer.optimizer,
            trainer.train_data,  # CPU batches: the step moves them to the model's GPU
            num_microbatches=trainer.num_microbatches,
            seq_length=cfg.model.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            pg_collection=cuda_world,
        )
        assert not result["skipped"] and math.isfinite(result[LOAD_BALANCING_LOSS])
        losses.append(result["loss"])
    assert all(math.isfinite(loss) for loss in losses), losses
    assert max_memory_allocated_mib() > 0
    name = torch.cuda.get_device_name()
    print(f"{name}: max allocated {max_memory_allocated_mib():.1f} MiB, peak bf16 {peak_flops()}")
