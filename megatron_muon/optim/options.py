"""Muon's options (a light module: loading a config does not import megatron)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("auto", "owner", "duplicated", "distributed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(kw_only=True, slots=True)
class MuonOptions:
    """Muon's own settings; everything AdamW and the schedule need stays in megatron's ``OptimizerConfig``."""

    lr: float = 0.02
    """Peak learning rate of the Muon groups (the scheduler decays it like the AdamW one)."""
    min_lr: float = 0.0
    """Final learning rate of the Muon groups."""
    weight_decay: float = 0.1
    """Decoupled weight decay of the Muon groups."""
    momentum: float = 0.95
    """Momentum β."""
    nesterov: bool = True
    """Nesterov look-ahead."""
    scale_mode: str = "spectral"
    """Update scale rule (``ops.scaling``): spectral | moonlight | shape | none."""
    ns_steps: int = 5
    """Newton–Schulz iterations."""
    coefficients: str = "quintic"
    """Newton–Schulz schedule: quintic | polar_express."""
    compute_dtype: str = "bfloat16"
    """Newton–Schulz compute dtype: bfloat16 | float32 | float64."""
    tp_mode: str = "auto"
    """Who orthogonalizes sharded matrices: auto | owner | duplicated | distributed (``optim/plan.py``)."""
    split_qkv: bool = True
    """Orthogonalize Q, K, V of the fused QKV weight separately."""
    qkv_per_head: bool = False
    """Orthogonalize each attention head separately."""
    split_gate_up: bool = True
    """Orthogonalize SwiGLU gate and up separately."""
    router: str = "adamw"
    """Optimizer of the MoE router weight: adamw | muon."""
    normuon: bool = False
    """NorMuon (Li et al. 2025): normalize each row of the orthogonalized update by a running second moment."""
    normuon_beta2: float = 0.95
    """NorMuon: EMA factor of the per-row second moment."""
    normuon_eps: float = 1e-8
    """NorMuon: ε added to the root of the second moment."""

    def validate(self) -> None:
        if self.tp_mode not in MODES:
            raise ValueError(f"muon.tp_mode={self.tp_mode!r}; valid: {list(MODES)}")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"muon.compute_dtype={self.compute_dtype!r}; valid: {sorted(DTYPES)}")
        if not 0.0 <= self.normuon_beta2 < 1.0:
            raise ValueError(f"muon.normuon_beta2={self.normuon_beta2!r} must be in [0, 1)")
        if not self.normuon_eps > 0.0:
            raise ValueError(f"muon.normuon_eps={self.normuon_eps!r} must be > 0")
