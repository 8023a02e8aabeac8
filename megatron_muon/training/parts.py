"""What a training run is made of, built the same way by the trainer and by the GPU rehearsal
(``megatron_muon/rehearsal``): the model chunks in megatron's DDP, the optimizer, the QK-clip and expert-load
recorders and the LR scheduler. No data, no checkpoint: those are the trainer's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_muon.config import ParallelDims, PretrainConfig
from megatron_muon.models.gpt_moe import build_gpt_moe_model_chunks
from megatron_muon.optim.build import adamw_config_overrides, build_optimizer
from megatron_muon.optim.layer_wise import tag_muon_params
from megatron_muon.optim.qk_clip import QKClip
from megatron_muon.platform.device import Device
from megatron_muon.training.expert_load import ExpertLoadTracker
from megatron_muon.training.fsdp import wrap_in_fsdp
from megatron_muon.training.initialization import initialize_layout_independent_
from megatron_muon.training.megatron_configs import (
    adamw_optimizer_config,
    ddp_config,
    scheduler_arguments,
    transformer_config,
)
from megatron_muon.training.step import wrap_in_ddp

__all__ = ["TrainingParts", "build_training_parts"]


@dataclass(slots=True)
class TrainingParts:
    """The model and everything that updates or watches it, for one rank."""

    transformer_config: Any
    """megatron's ``TransformerConfig`` (shared by the chunks)."""
    model: list[Any]
    """megatron ``DistributedDataParallel`` chunks, or ``FullyShardedChunk`` with ``parallel.fsdp`` (one per
    virtual pipeline stage)."""
    optimizer: Any
    """megatron ``ChainedOptimizer`` (Muon + AdamW) or megatron's own AdamW."""
    scheduler: OptimizerParamScheduler
    qk_clip: QKClip | None
    expert_load: ExpertLoadTracker | None


def _move_to_device_(module: torch.nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers of ``module`` not yet on ``device`` there, before DDP holds references to
    them. A moved parameter is a new ``Parameter`` carrying the old one's attributes (megatron's
    ``sequence_parallel``, ``allreduce``, ... tags), as ``Module.to`` would make it."""
    for submodule in module.modules():
        for name, parameter in submodule._parameters.items():
            if parameter is not None and parameter.device != device:
                moved = torch.nn.Parameter(
                    parameter.detach().to(device), requires_grad=parameter.requires_grad
                )
                for attribute, value in parameter.__dict__.items():
                    if attribute not in moved.__dict__:  # megatron's tags, not the tensor's own state
                        setattr(moved, attribute, value)
                submodule._parameters[name] = moved
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.device != device:
                submodule._buffers[name] = buffer.to(device)


def build_training_parts(
    cfg: PretrainConfig,
    dims: ParallelDims,
    pg_collection: Any,
    device: Device,
    *,
    transformer_config_hook: Any = None,
) -> TrainingParts:
    """Build this rank's model (seeded, layout-independent initial weights, on ``device``), wrap it in megatron's
    DDP and build the optimizer, the recorders and the scheduler, as every run does.

    ``transformer_config_hook(config)``, when given, may change megatron's ``TransformerConfig`` before the build
    (the GPU rehearsal uses it for its one documented narrowing)."""
    train = cfg.training
    torch.manual_seed(train.seed)
    model_parallel_cuda_manual_seed(train.seed)
    config = transformer_config(cfg, dims, device)
    compute_dtype = None
    if cfg.parallel.fsdp and config.params_dtype != torch.float32:
        # FSDP keeps fp32 shards and gathers them in the compute dtype (MixedPrecisionPolicy).
        compute_dtype, config.params_dtype = config.params_dtype, torch.float32
    if transformer_config_hook is not None:
        transformer_config_hook(config)
    chunks = build_gpt_moe_model_chunks(cfg.model, config, pg_collection)
    if device.type == "cuda":
        # megatron-core 0.19.2: modules built without a device (the torch norms of the local spec) start on the
        # CPU even without use_cpu_initialization; megatron's own training loop moves every chunk to the current
        # GPU after the build (training.py: get_model), so we do the same.
        for chunk in chunks:
            _move_to_device_(chunk, device.torch_device)
    # The same seed gives the same initial model at every TP/PP/EP/DP layout (megatron's own draw does not).
    initialize_layout_independent_(chunks, config, train.seed)
    opt = cfg.optimizer
    if opt.distributed_optimizer and opt.use_muon:
        tag_muon_params(chunks, router=opt.muon.router)  # Muon's params: whole per DP shard
    model: list[Any]
    if cfg.parallel.fsdp:
        # fp32 shards (the master weights), gathered in the model's precision for compute.
        model = wrap_in_fsdp(chunks, config, pg_collection=pg_collection, param_dtype=compute_dtype)
    else:
        model = wrap_in_ddp(chunks, config, pg_collection=pg_collection, ddp_config=ddp_config(cfg))

    adam_config = adamw_optimizer_config(cfg)
    if opt.use_muon:
        optimizer = build_optimizer(
            model, adam_config, opt.muon, pg_collection, router_lr_multiplier=opt.router_lr_multiplier
        )
    else:  # the AdamW baseline: megatron's own optimizer for every parameter
        optimizer = get_megatron_optimizer(
            adam_config,
            model,
            config_overrides=adamw_config_overrides(adam_config, model),  # + muP's, when on
            use_gloo_process_groups=False,
            pg_collection=pg_collection,
        )
    qk_clip = None
    if opt.qk_clip.records:
        qk_clip = QKClip(
            model,
            threshold=opt.qk_clip.threshold,
            alpha=opt.qk_clip.alpha,
            dp_cp_group=pg_collection.dp_cp,
            mp_group=pg_collection.mp,
            num_layers=cfg.model.num_layers,
            clip=opt.qk_clip.enabled,
        )
    expert_load = None
    if cfg.model.num_moe_experts > 0:
        expert_load = ExpertLoadTracker(
            model,
            num_layers=cfg.model.num_layers,
            num_experts=cfg.model.num_moe_experts,
            dp_cp_group=pg_collection.dp_cp,
            mp_group=pg_collection.mp,
        )
    scheduler = OptimizerParamScheduler(optimizer, **scheduler_arguments(cfg))
    return TrainingParts(
        transformer_config=config,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        qk_clip=qk_clip,
        expert_load=expert_load,
    )
