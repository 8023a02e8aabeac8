"""Muon's options (a light module: loading a config does not import megatron)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from megatron_muon.ops.gram_newton_schulz import DEFAULT_GRAM_RESTARTS, resolve_gram_restarts
from megatron_muon.ops.newton_schulz import NS_ALGORITHMS

TpMode = Literal["auto", "owner", "duplicated", "distributed"]
"""Who orthogonalizes a tensor-parallel-sharded matrix (``optim/plan.py``)."""
MODES: tuple[TpMode, ...] = get_args(TpMode)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(kw_only=True, slots=True)
class MuonConfig:
    """Muon's own settings; everything AdamW and the schedule need stays in megatron's ``OptimizerConfig``.

    The mode fields are typed ``str``, not their ``Literal`` (``TpMode``, ``ScaleMode``, ``Router``): this is the
    ``optimizer.muon`` section of the run config, whose values are checked in one place with one-line errors
    (``validate`` here and ``megatron_muon/config/checks.py``), not by OmegaConf while loading.
    """

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
    ns_algorithm: str = "auto"
    """Newton–Schulz algorithm per logical matrix: standard (iterate on X) | gram (iterate on the k x k Gram X·Xᵀ,
    ``ops/gram_newton_schulz.py``) | auto (whichever does fewer FLOPs on the rank that runs it: Gram for aspect
    ratios above 1.5, ``optim/plan.py``). Equal in exact arithmetic; standard only with ``ns_fp8_steps``."""
    ns_gram_restarts: list[int] = field(default_factory=lambda: list(DEFAULT_GRAM_RESTARTS))
    """Gram Newton–Schulz: the iterations after which X and its Gram are recomputed, for stability in half
    precision (strictly increasing, each in [1, ns_steps - 1]; default [2], the Dao-lab choice for 5 steps)."""
    compute_dtype: str = "bfloat16"
    """Newton–Schulz compute dtype: bfloat16 | float32 | float64."""
    ns_fp8_steps: int = 0
    """Experimental: the GEMMs of the first k Newton–Schulz steps in FP8 e4m3, per-matrix scaling
    (``ops/newton_schulz_fp8.py``); at most 2 with quintic, 1 with polar_express (more diverged when measured).
    Needs compute_dtype bfloat16 | float32 and an FP8 GPU (compute capability >= 8.9)."""
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
        if self.ns_algorithm not in NS_ALGORITHMS:
            raise ValueError(f"muon.ns_algorithm={self.ns_algorithm!r}; valid: {list(NS_ALGORITHMS)}")
        if self.ns_algorithm == "gram" and self.ns_fp8_steps:
            raise ValueError(
                f"muon.ns_algorithm='gram' cannot run muon.ns_fp8_steps={self.ns_fp8_steps} (FP8 steps run with "
                "the standard algorithm); valid: ns_algorithm auto or standard (auto then runs standard), or "
                "ns_fp8_steps 0"
            )
        self._validate_ns_fp8_steps()
        # The restarts are a Gram setting: checked where Gram can run (not with FP8 steps or ns_algorithm standard).
        steps_valid = (
            isinstance(self.ns_steps, int) and self.ns_steps >= 1
        )  # else the ns_steps check names it
        if steps_valid and self.planned_ns_algorithm != "standard":
            try:
                resolve_gram_restarts(self.ns_gram_restarts, self.ns_steps)
            except ValueError as error:
                raise ValueError(f"muon.ns_gram_restarts: {error}") from None
        if not 0.0 <= self.normuon_beta2 < 1.0:
            raise ValueError(f"muon.normuon_beta2={self.normuon_beta2!r} must be in [0, 1)")
        if not self.normuon_eps > 0.0:
            raise ValueError(f"muon.normuon_eps={self.normuon_eps!r} must be > 0")

    @property
    def planned_ns_algorithm(self) -> str:
        """What the plan chooses from: ``ns_algorithm``, but ``standard`` when FP8 steps are on (they have no Gram
        form)."""
        return "standard" if self.ns_fp8_steps else self.ns_algorithm

    @property
    def planned_gram_restarts(self) -> tuple[int, ...]:
        """``ns_gram_restarts`` where Gram can run; () where the plan runs standard only (they are a Gram setting,
        and a short ``ns_steps`` with the default restarts is then valid)."""
        return () if self.planned_ns_algorithm == "standard" else tuple(self.ns_gram_restarts)

    def _validate_ns_fp8_steps(self) -> None:
        from megatron_muon.ops.newton_schulz_fp8 import MAX_STABLE_FP8_STEPS

        steps = self.ns_fp8_steps
        limit = min(MAX_STABLE_FP8_STEPS.get(self.coefficients, 0), self.ns_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= limit:
            raise ValueError(
                f"muon.ns_fp8_steps={steps!r} must be an integer in [0, {limit}] with "
                f"muon.coefficients={self.coefficients!r} and muon.ns_steps={self.ns_steps} "
                f"(measured stable maxima: {MAX_STABLE_FP8_STEPS})"
            )
        if steps and self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(
                f"muon.ns_fp8_steps={steps} needs muon.compute_dtype 'bfloat16' or 'float32'; "
                f"got {self.compute_dtype!r}"
            )


@dataclass(kw_only=True, slots=True)
class QKClipConfig:
    """MuonClip's QK-clip (Kimi K2): after each step, shrink the query and key weights of every attention head
    whose largest pre-softmax logit exceeded ``threshold`` (``optim/qk_clip.py``, rule in ``ops/qk_clip.py``)."""

    enabled: bool = False
    """Clip after every optimizer step."""
    threshold: float = 100.0
    """τ: the largest pre-softmax logit a head may keep (K2: 100)."""
    alpha: float = 0.5
    """The query's share of the rescaling: W_q·γ^α, W_k·γ^(1−α)."""
    log_max_logits: bool = False
    """Record and log each layer's largest logit (``attention/max_logit/layer_NN``) even without clipping."""

    def validate(self) -> None:
        if not self.threshold > 0:
            raise ValueError(f"qk_clip.threshold={self.threshold!r} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"qk_clip.alpha={self.alpha!r} must be in [0, 1]")

    @property
    def records(self) -> bool:
        """Whether the per-head maxima are recorded at all."""
        return self.enabled or self.log_max_logits


MuonOptions = MuonConfig
"""The name before 2026-12-05 (one suffix for config classes since): kept so user code importing it still works."""
