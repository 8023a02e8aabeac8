"""From our config sections to megatron's own config objects, in one place: the model's ``TransformerConfig`` (the
builder's, from ``cfg.model``, at the run's grid and device), DDP's and the AdamW side's ``OptimizerConfig`` and the
``OptimizerParamScheduler`` arguments. Pure functions of the config (no process group, no model), so the trainer
builds from them and ``tests/unit/test_config_reaches_megatron.py`` checks that every key reaches them.
"""

from __future__ import annotations

from typing import Any

from megatron_muon.config import ConfigError, ParallelDims, PretrainConfig
from megatron_muon.platform.device import Device

__all__ = [
    "adamw_optimizer_config",
    "check_buildable",
    "ddp_config",
    "scheduler_arguments",
    "transformer_config",
]


def transformer_config(cfg: PretrainConfig, dims: ParallelDims, device: Device):
    """Megatron's ``TransformerConfig`` of ``cfg.model`` at the process grid ``dims``, built on ``device`` (CPU
    initialization on the CPU only), for ``models.gpt_moe.build_gpt_moe_model_chunks(cfg.model, ...)``. Raises
    ``ConfigError`` (one line) for what the builder cannot build."""
    from megatron_muon.models.gpt_moe import build_transformer_config

    try:
        config = build_transformer_config(
            cfg.model,
            tp=dims.tp,
            pp=dims.pp,
            ep=dims.ep,
            etp=dims.etp,
            vpp=dims.vpp,
            cp=dims.cp,
            sequence_parallel=dims.sequence_parallel,
            use_cpu_initialization=device.use_cpu_initialization,
        )
    except (ValueError, AssertionError) as error:  # ours, and megatron's own checks in TransformerConfig
        raise ConfigError(str(error).splitlines()[0]) from None
    # Transformer Engine's attention returns each head's max logit from its fused kernel only when asked
    # (QK-clip reads it from there); megatron's local attention ignores the flag (optim/qk_clip.py hooks it).
    config.log_max_attention_logit = cfg.optimizer.qk_clip.records
    # megatron-core 0.19.2: batch_p2p_sync (default on) follows every batched pipeline send/receive with
    # torch.cuda.synchronize(), a guard for PyTorch releases before 1.13's batch_isend_irecv fix; with the torch
    # this package requires it only stalls the host once per microbatch and stage boundary.
    config.batch_p2p_sync = False
    return config


def adamw_optimizer_config(cfg: PretrainConfig):
    """Megatron's ``OptimizerConfig`` of the AdamW side (and of clipping and precision for both sides)."""
    from megatron.core.optimizer import OptimizerConfig

    opt = cfg.optimizer
    return OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.betas[0],
        adam_beta2=opt.betas[1],
        adam_eps=opt.eps,
        clip_grad=opt.clip_grad,
        bf16=cfg.model.precision == "bf16",
        fp16=False,
        use_distributed_optimizer=opt.distributed_optimizer,
        overlap_param_gather=opt.overlap_param_gather,
    )


def ddp_config(cfg: PretrainConfig):
    """Megatron's ``DistributedDataParallelConfig``: fp32 gradient reduction (the optimizers' main grads); with
    ``optimizer.distributed_optimizer`` a reduce-scatter into megatron's layer-wise layout and a parameter
    all-gather after the step (``optim/layer_wise.py``); the overlap switches and the bucket size of the config."""
    from megatron.core.distributed import DistributedDataParallelConfig

    opt = cfg.optimizer
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=opt.distributed_optimizer,
        overlap_grad_reduce=opt.overlap_grad_reduce,
        overlap_param_gather=opt.overlap_param_gather,
        bucket_size=opt.ddp_bucket_size,
    )


def scheduler_arguments(cfg: PretrainConfig) -> dict[str, Any]:
    """Keyword arguments of megatron's ``OptimizerParamScheduler`` (all but the optimizer). Muon's groups carry
    their own peak / final learning rate (``optim/build.py``) and follow the same shape."""
    opt, train_iters = cfg.optimizer, cfg.training.train_iters
    decay_iters = opt.resolved_lr_decay_iters(train_iters)
    wsd = opt.decay_style == "WSD"
    return {
        "init_lr": 0.0,
        "max_lr": opt.lr,
        "min_lr": opt.min_lr,
        "lr_warmup_steps": opt.warmup_iters,
        "lr_decay_steps": decay_iters,
        "lr_decay_style": opt.decay_style,
        "start_wd": opt.weight_decay,
        "end_wd": opt.weight_decay,
        "wd_incr_steps": decay_iters,
        "wd_incr_style": "constant",
        "wsd_decay_steps": opt.wsd_decay_iters(train_iters) if wsd else None,
        "lr_wsd_decay_style": opt.wsd_decay_style if wsd else None,
        # On resume the config's schedule takes effect (training/resume.py); only the step count is restored.
        "use_checkpoint_opt_param_scheduler": False,
        "override_opt_param_scheduler": True,
    }


def check_buildable(cfg: PretrainConfig, dims: ParallelDims, device: Device) -> None:
    """Everything that can refuse ``cfg`` on ``device`` without a process group, run before one starts: the
    device's requirements (GPU-only options), the model builder and megatron's own config checks. Raises
    ``ConfigError`` with one line."""
    from megatron_muon.platform.device import require_device_for

    require_device_for(cfg, device)
    transformer_config(cfg, dims, device)
    try:
        adamw_optimizer_config(cfg)
    except (ValueError, AssertionError) as error:
        raise ConfigError(f"optimizer: {str(error).splitlines()[0]}") from None
