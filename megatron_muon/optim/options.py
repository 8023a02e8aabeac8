"""Muon's options (a light module: loading a config does not import megatron).

Two kinds of object. :class:`MuonConfig` is the ``optimizer.muon`` section of the run config, plain and mutable
(OmegaConf fills it). The frozen settings — :class:`MuonHyperparameters`, :class:`NewtonSchulzSettings`,
:class:`MuonPlanSettings`, :class:`NorMuonSettings`, bundled in :class:`MuonSettings` — are what the optimizer and its
plan are built from: each checks its own values once, on construction, with a one-line ``ValueError``, and the
code that receives one trusts it (nothing is checked again per step). ``MuonConfig.settings()`` builds them from
the config (checked before launch by ``config/checks.py``); programmatic users of ``Muon`` get the same checks
from the same constructors.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from megatron_muon.ops.gram_newton_schulz import DEFAULT_GRAM_RESTARTS, resolve_gram_restarts
from megatron_muon.ops.newton_schulz import NS_ALGORITHMS, resolve_coefficients
from megatron_muon.ops.scaling import SCALE_MODES

TpMode = Literal["auto", "owner", "duplicated", "distributed"]
"""Who orthogonalizes a tensor-parallel-sharded matrix (``optim/plan.py``)."""
MODES: tuple[TpMode, ...] = get_args(TpMode)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
NS_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""What Newton–Schulz can compute in (the run config offers ``DTYPES``)."""


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True, slots=True)
class MuonHyperparameters:
    """The values of one Muon param group (``Muon``'s defaults, and each group's once at construction); validated
    on construction. megatron's scheduler then moves ``lr`` and ``weight_decay`` per step between values checked
    here and in the run config."""

    lr: float
    """Learning rate (the update of one logical matrix has spectral norm ≈ lr·scale)."""
    momentum: float = 0.95
    """β of the momentum EMA, in [0, 1)."""
    nesterov: bool = True
    """Nesterov look-ahead."""
    weight_decay: float = 0.0
    """Decoupled weight decay, ``W ← W·(1 − lr·wd)``."""
    scale_mode: str = "spectral"
    """Update scale rule (``ops.scaling``)."""
    scale_multiplier: float = 1.0
    """Factor on the scale rule (muP's per-group multiplier)."""

    def __post_init__(self) -> None:
        if not (_finite_number(self.lr) and self.lr >= 0):
            raise ValueError(f"lr={self.lr!r} must be a finite number >= 0")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum={self.momentum!r} must be in [0, 1)")
        if not (_finite_number(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a finite number >= 0")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode={self.scale_mode!r} is not one of {list(SCALE_MODES)}")
        if not isinstance(self.nesterov, bool):
            raise ValueError(f"nesterov={self.nesterov!r} must be a bool")
        if not (_finite_number(self.scale_multiplier) and self.scale_multiplier > 0):
            raise ValueError(f"scale_multiplier={self.scale_multiplier!r} must be a finite number > 0")

    def as_group(self) -> dict[str, object]:
        """The param-group keys and values (torch's ``defaults``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True, slots=True)
class NewtonSchulzSettings:
    """How Muon orthogonalizes (``ops.newton_schulz``); validated on construction."""

    steps: int = 5
    """Newton–Schulz iterations."""
    coefficients: str | Sequence[Sequence[float]] = "quintic"
    """A named schedule (``quintic``, ``polar_express``) or one (a, b, c) triple per step."""
    compute_dtype: torch.dtype = torch.bfloat16
    """dtype of the iteration's GEMMs."""
    fp8_steps: int = 0
    """How many of the first steps run their GEMMs in FP8 (experimental; ``ops/newton_schulz_fp8.py``)."""
    gram_restarts: tuple[int, ...] = DEFAULT_GRAM_RESTARTS
    """Gram Newton–Schulz's restarts (for the matrices the plan runs with ``gram``)."""

    def __post_init__(self) -> None:
        from megatron_muon.ops.newton_schulz_fp8 import check_fp8_steps

        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"ns_steps={self.steps!r} must be an integer >= 1")
        if self.compute_dtype not in NS_COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype={self.compute_dtype} must be one of float64, float32, bfloat16, float16"
            )
        resolve_coefficients(self.coefficients, self.steps)  # raises ValueError on a bad schedule
        if not isinstance(self.coefficients, str):  # a list of lists from a config: frozen as tuples
            object.__setattr__(self, "coefficients", tuple(tuple(abc) for abc in self.coefficients))
        check_fp8_steps(self.fp8_steps, self.steps, self.compute_dtype)
        try:
            restarts = resolve_gram_restarts(self.gram_restarts, self.steps)
        except ValueError as error:
            raise ValueError(f"ns_gram_restarts: {error}") from None
        object.__setattr__(self, "gram_restarts", restarts)


@dataclass(frozen=True, kw_only=True, slots=True)
class MuonPlanSettings:
    """What the optimizer's plan (``optim/plan.py: build_muon_plan``) is built from; validated on construction."""

    tp_mode: str = "auto"
    """Who orthogonalizes a sharded matrix: auto | owner | duplicated | distributed (``plan.py``)."""
    ns_steps: int = 5
    """Newton–Schulz iterations, in the cost model's FLOP counts."""
    ns_algorithm: str = "auto"
    """auto | standard | gram, chosen per matrix once its mode is known (``ops.newton_schulz.choose_ns_algorithm``)."""
    gram_restarts: tuple[int, ...] = DEFAULT_GRAM_RESTARTS
    """Gram Newton–Schulz's restarts, in the Gram FLOP count."""
    num_buckets: int = 4
    """Exchange buckets per step, of about equal Newton–Schulz cost: communication of one overlaps computation of
    the next (one on a grid of one rank, where nothing travels)."""
    replicate_state: bool = True
    """False (the distributed optimizer, FSDP): no sharded matrix runs ``duplicated``, whose every holder would keep
    the whole momentum."""
    momentum_with_shards: bool = False
    """``owner`` matrices keep their momentum with the shards' holders (``MatrixPlan.momentum_with_shards``)."""

    def __post_init__(self) -> None:
        if self.num_buckets < 1:
            raise ValueError(f"num_buckets={self.num_buckets} must be >= 1")
        if self.tp_mode not in MODES:
            raise ValueError(f"tp_mode={self.tp_mode!r}; valid: {list(MODES)}")
        if self.ns_algorithm not in NS_ALGORITHMS:
            raise ValueError(f"ns_algorithm={self.ns_algorithm!r}; valid: {list(NS_ALGORITHMS)}")
        if self.tp_mode == "duplicated" and not self.replicate_state:
            raise ValueError(
                "tp_mode='duplicated' keeps every holder's momentum; valid without replicated state: "
                "auto, owner, distributed"
            )
        object.__setattr__(self, "gram_restarts", tuple(self.gram_restarts))


@dataclass(frozen=True, slots=True)
class NorMuonSettings:
    """NorMuon's (Li et al. 2025) EMA factor and ε of the per-row second moment; validated on construction."""

    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"normuon_beta2={self.beta2!r} must be in [0, 1)")
        if not self.eps > 0.0:
            raise ValueError(f"normuon_eps={self.eps!r} must be > 0")


@dataclass(frozen=True, kw_only=True, slots=True)
class MuonSettings:
    """Muon's validated settings, as ``optim/build.py`` builds the optimizer from them (``MuonConfig.settings()``)."""

    hyperparameters: MuonHyperparameters
    newton_schulz: NewtonSchulzSettings
    plan: MuonPlanSettings
    """Before the layout's say (``replicate_state``, ``momentum_with_shards``: ``build.py``)."""
    normuon: NorMuonSettings | None
    """None: plain Muon."""


@dataclass(kw_only=True, slots=True)
class MuonConfig:
    """Muon's own settings; everything AdamW and the schedule need stays in megatron's ``OptimizerConfig``.

    The mode fields are typed ``str``, not their ``Literal`` (``TpMode``, ``ScaleMode``, ``Router``): this is the
    ``optimizer.muon`` section of the run config, whose values are checked with one-line errors when it is turned
    into the frozen settings (:meth:`settings`, run before launch by ``megatron_muon/config/checks.py``), not by
    OmegaConf while loading.
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
        """Raise a one-line ``ValueError`` naming ``muon.<field>`` for a value Muon cannot run."""
        self.settings()

    def settings(self) -> MuonSettings:
        """The frozen settings the optimizer and its plan are built from, validated: what a run config may say
        (named choices, the measured FP8 limits) here, the rest by the settings' own constructors."""
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"muon.compute_dtype={self.compute_dtype!r}; valid: {sorted(DTYPES)}")
        if self.ns_algorithm == "gram" and self.ns_fp8_steps:
            raise ValueError(
                f"muon.ns_algorithm='gram' cannot run muon.ns_fp8_steps={self.ns_fp8_steps} (FP8 steps run with "
                "the standard algorithm); valid: ns_algorithm auto or standard (auto then runs standard), or "
                "ns_fp8_steps 0"
            )
        self._validate_ns_fp8_steps()
        try:
            normuon = NorMuonSettings(self.normuon_beta2, self.normuon_eps)
            return MuonSettings(
                plan=MuonPlanSettings(
                    tp_mode=self.tp_mode,
                    ns_steps=self.ns_steps,
                    ns_algorithm=self.planned_ns_algorithm,
                    gram_restarts=self.planned_gram_restarts,
                ),
                # The restarts are a Gram setting: checked where Gram can run (not with FP8 steps or
                # ns_algorithm standard).
                newton_schulz=NewtonSchulzSettings(
                    self.ns_steps,
                    self.coefficients,
                    DTYPES[self.compute_dtype],
                    self.ns_fp8_steps,
                    self.planned_gram_restarts,
                ),
                hyperparameters=MuonHyperparameters(
                    lr=self.lr,
                    momentum=self.momentum,
                    nesterov=self.nesterov,
                    weight_decay=self.weight_decay,
                    scale_mode=self.scale_mode,
                ),
                normuon=normuon if self.normuon else None,
            )
        except ValueError as error:
            raise ValueError(f"muon.{error}") from None

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
        """The measured stable range, narrower than what the math accepts (``ops.newton_schulz_fp8``)."""
        from megatron_muon.ops.newton_schulz_fp8 import MAX_STABLE_FP8_STEPS

        steps = self.ns_fp8_steps
        ns_steps = self.ns_steps if isinstance(self.ns_steps, int) else 0
        limit = max(0, min(MAX_STABLE_FP8_STEPS.get(self.coefficients, 0), ns_steps))
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
