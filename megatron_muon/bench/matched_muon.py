"""The Muon settings the benchmarks give ours and megatron-core 0.19.2's Muon so both compute the same update, and
the torch optimizers inside either's megatron optimizer tree (``bench/muon_step.py`` says why each setting matches).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["megatron_muon_config", "ours_muon_config", "torch_optimizers"]


def ours_muon_config(*, lr: float, weight_decay: float, momentum: float, ns_steps: int, tp_mode: str) -> Any:
    """Our ``MuonConfig``: Nesterov, √(fan_out/fan_in) scale, Keller Jordan's quintic, fp32 Newton–Schulz, Q/K/V and
    gate/up split (megatron fuses gate and up; our layout cannot under TP), the router in Muon (as megatron)."""
    from megatron_muon.optim.options import MuonConfig

    return MuonConfig(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        nesterov=True,
        scale_mode="spectral",
        ns_steps=ns_steps,
        coefficients="quintic",
        compute_dtype="float32",
        tp_mode=tp_mode,
        split_qkv=True,
        split_gate_up=True,
        router="muon",
    )


def megatron_muon_config(
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    ns_steps: int,
    tp_mode: str,
    layer_wise: bool,
    clip_grad: float,
    bf16: bool,
) -> Any:
    """megatron's ``OptimizerConfig(optimizer="muon")`` with the same update as :func:`ours_muon_config`."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="muon",
        lr=lr,
        weight_decay=weight_decay,
        clip_grad=clip_grad,
        bf16=bf16,
        fp16=False,
        muon_momentum=momentum,
        muon_nesterov=True,
        muon_split_qkv=True,
        muon_scale_mode="unit_rms_norm",  # = our "spectral": sqrt(fan_out / fan_in)
        muon_fp32_matmul_prec="highest",  # fp32 Newton-Schulz ("medium" casts the iterate to bf16)
        muon_coefficient_type="simple",  # = our "quintic": (3.4445, -4.7750, 2.0315) every step
        muon_num_ns_steps=ns_steps,
        muon_tp_mode=tp_mode,
        use_layer_wise_distributed_optimizer=layer_wise,
    )


def torch_optimizers(optimizer: Any) -> list[Any]:
    """The innermost optimizers of a megatron optimizer tree: the torch optimizer each leaf megatron optimizer of the
    (nested) chain wraps (the leaf itself when it wraps none)."""
    from megatron_muon.optim.build import chain_members

    leaves = []
    for member in chain_members(optimizer):
        inner = getattr(member, "optimizer", None)
        leaves.append(inner if isinstance(inner, torch.optim.Optimizer) else member)
    return leaves
