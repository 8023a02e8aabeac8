"""Muon: momentum orthogonalized by Newton–Schulz (Keller Jordan, 2024; Liu et al. 2025 "Muon is Scalable").

One step loop (the shape of NVIDIA Emerging-Optimizers' ``OrthogonalizedOptimizer``): for every parameter,
decoupled weight decay ``W ← W·(1 − lr·wd)`` then ``W ← W − lr·D`` where ``D`` is the orthogonalized, scaled
momentum of every logical matrix the parameter holds. *Where* the momentum lives and *who* runs Newton–Schulz is
the orthogonalizer's business (``executor.py``): on one process every matrix is local; under TP/EP/DP the plan
gathers shards to an owner, or runs a distributed Gram iteration, so ``D`` does not depend on the layout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_muon.ops.newton_schulz import resolve_coefficients
from megatron_muon.ops.newton_schulz_fp8 import check_fp8_steps
from megatron_muon.ops.normuon import row_normalize_
from megatron_muon.ops.scaling import SCALE_MODES
from megatron_muon.optim.layout import MatrixPiece, whole_tensor_pieces

logger = logging.getLogger(__name__)

# Keys megatron-core's param-group builder and LR/WD scheduler put in a group (optimizer/__init__.py
# `_get_param_groups`, optimizer_param_scheduler.py). Accepted and ignored by the Muon math.
MEGATRON_GROUP_KEYS = frozenset(
    {
        "wd_mult",
        "lr_mult",
        "is_expert_parallel",
        "is_decoupled_lr",
        "default_config",
        "max_lr",
        "min_lr",
        "start_wd",
        "end_wd",
        "optimizer",
        "decoupled_weight_decay",
    }
)
MUON_GROUP_KEYS = frozenset(
    {"params", "lr", "momentum", "nesterov", "weight_decay", "scale_mode", "scale_multiplier"}
)


def momentum_input_(buffer: torch.Tensor, grad: torch.Tensor, beta: float, nesterov: bool) -> torch.Tensor:
    """Update the momentum ``buffer`` in place with ``grad`` and return what Newton–Schulz orthogonalizes.

    EMA form ``m ← β·m + (1−β)·g`` (Emerging-Optimizers / Keller Jordan's ``lerp``); Nesterov returns
    ``(1−β)·g + β·m``, otherwise ``m``. The (1−β) factor is irrelevant to the update: Newton–Schulz normalizes.
    """
    buffer.lerp_(grad, 1.0 - beta)
    if nesterov:
        return grad.lerp(buffer, beta)
    return buffer


ROW_SECOND_MOMENT = "row_second_moment"
"""Key of NorMuon's per-row second moment in a matrix's state (beside ``"momentum"``)."""


@dataclass(frozen=True, slots=True)
class NorMuonNormalization:
    """NorMuon (Li et al. 2025) as a plug-in of Muon's one step loop: called by the orthogonalizer on every
    batch of freshly orthogonalized matrices, before the scale rule; keeps a per-row second moment (fp32,
    ``[rows]``) in each matrix's state. See ``ops/normuon.py`` for the math."""

    beta2: float = 0.95
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"normuon beta2={self.beta2!r} must be in [0, 1)")
        if not self.eps > 0.0:
            raise ValueError(f"normuon eps={self.eps!r} must be > 0")

    def __call__(
        self, directions: torch.Tensor, states: list[dict], *, full_shape: tuple[int, int], **all_reduces
    ) -> torch.Tensor:
        """``directions``: ``[B, m, n]`` (shards of) orthogonalized matrices of shape ``full_shape``; ``states``:
        their B state dicts."""
        rows = directions.shape[1]
        moments = torch.stack(
            [
                state.get(ROW_SECOND_MOMENT)
                if state.get(ROW_SECOND_MOMENT) is not None
                else torch.zeros(rows, dtype=torch.float32, device=directions.device)
                for state in states
            ]
        )
        normalized = row_normalize_(
            directions,
            moments,
            beta2=self.beta2,
            eps=self.eps,
            num_rows=full_shape[0],
            num_cols=full_shape[1],
            **all_reduces,
        )
        for state, moment in zip(states, moments.unbind(0), strict=True):
            state[ROW_SECOND_MOMENT] = moment.clone()
        return normalized


def _check_hyperparameters(group: dict, where: str) -> None:
    unknown = set(group) - MUON_GROUP_KEYS - MEGATRON_GROUP_KEYS
    if unknown:
        raise ValueError(
            f"{where}: unknown param-group keys {sorted(unknown)}; valid: "
            f"{sorted(MUON_GROUP_KEYS | MEGATRON_GROUP_KEYS)}"
        )
    lr = group["lr"]
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where}: lr={lr!r} must be a finite number >= 0")
    beta = group["momentum"]
    if not (isinstance(beta, (int, float)) and 0.0 <= beta < 1.0):
        raise ValueError(f"{where}: momentum={beta!r} must be in [0, 1)")
    wd = group["weight_decay"]
    if not (isinstance(wd, (int, float)) and math.isfinite(wd) and wd >= 0):
        raise ValueError(f"{where}: weight_decay={wd!r} must be a finite number >= 0")
    if group["scale_mode"] not in SCALE_MODES:
        raise ValueError(f"{where}: scale_mode={group['scale_mode']!r}; valid: {sorted(SCALE_MODES)}")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"{where}: nesterov={group['nesterov']!r} must be a bool")
    multiplier = group["scale_multiplier"]
    if not (isinstance(multiplier, (int, float)) and math.isfinite(multiplier) and multiplier > 0):
        raise ValueError(f"{where}: scale_multiplier={multiplier!r} must be a finite number > 0")


class Muon(torch.optim.Optimizer):
    """Muon for the hidden weight matrices of a network.

    Args:
        params: tensors or param groups (group keys: ``lr``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``scale_mode``, ``scale_multiplier``, plus megatron's scheduler keys; anything else is an error).
        lr: learning rate (the update of one logical matrix has spectral norm ≈ lr·scale).
        momentum: β of the momentum EMA, in [0, 1).
        nesterov: use the Nesterov look-ahead.
        weight_decay: decoupled weight decay, ``W ← W·(1 − lr·wd)`` (Moonlight's recipe).
        scale_mode: update scale rule of ``ops.scaling`` (``spectral`` default: √(fan_out/fan_in)).
        ns_steps, coefficients, compute_dtype: Newton–Schulz settings (``ops.newton_schulz``).
        ns_fp8_steps: how many of the first Newton–Schulz steps run their GEMMs in FP8 (experimental;
            ``ops/newton_schulz_fp8.py``; needs a device with FP8 ``torch._scaled_mm``).
        pieces: for each param group, for each parameter, its logical matrices (``layout.MatrixPiece``); by
            default each 2-D parameter is one matrix and each N-D one a stack.
        orthogonalizer: computes the directions; default ``executor.MatrixOrthogonalizer`` on one process.
        post_orthogonalize: a plug-in applied to each batch of orthogonalized matrices before the scale rule
            (``NorMuonNormalization``); ``None``: plain Muon.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale_mode: str = "spectral",
        ns_steps: int = 5,
        coefficients: str | Sequence[Sequence[float]] = "quintic",
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        pieces: list[list[list[MatrixPiece]]] | None = None,
        orthogonalizer=None,
        post_orthogonalize: NorMuonNormalization | None = None,
        ns_fp8_steps: int = 0,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scale_mode=scale_mode,
            scale_multiplier=1.0,
        )
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"ns_steps={ns_steps!r} must be an integer >= 1")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(
                f"compute_dtype={compute_dtype} must be one of float64, float32, bfloat16, float16"
            )
        resolve_coefficients(coefficients, ns_steps)  # raises ValueError on a bad schedule
        check_fp8_steps(ns_fp8_steps, ns_steps, compute_dtype)
        super().__init__(params, defaults)
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"param group {index}")
        self.ns_steps = ns_steps
        self.coefficients = coefficients
        self.compute_dtype = compute_dtype
        self.post_orthogonalize = post_orthogonalize
        self.ns_fp8_steps = ns_fp8_steps
        if pieces is None:
            pieces = [
                [whole_tensor_pieces(f"group{g}.param{i}", p) for i, p in enumerate(group["params"])]
                for g, group in enumerate(self.param_groups)
            ]
        if [len(g) for g in pieces] != [len(group["params"]) for group in self.param_groups]:
            raise ValueError("pieces must list one entry per parameter of every param group")
        self.pieces = pieces
        if orthogonalizer is None:
            from megatron_muon.optim.executor import MatrixOrthogonalizer

            orthogonalizer = MatrixOrthogonalizer([p for group in pieces for ps in group for p in ps])
        self.orthogonalizer = orthogonalizer

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "pieces", None) is not None:
            raise RuntimeError("Muon cannot take new param groups after construction (its plan is fixed)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One Muon step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            _check_hyperparameters(group, f"param group {index}")
        work = [
            (param, group, self.pieces[g][i])
            for g, group in enumerate(self.param_groups)
            for i, param in enumerate(group["params"])
        ]
        directions = self.orthogonalizer.directions(self, work)
        for (param, group, _), direction in zip(work, directions, strict=True):
            if direction is None:
                continue
            if group["weight_decay"] != 0.0:
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
            param.add_(direction.to(param.dtype), alpha=-group["lr"])
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as torch does, but keep momentum (and NorMuon's second moment) in fp32:
        ``Optimizer.load_state_dict`` casts floating state to each parameter's dtype, which would turn the fp32
        momentum of a bf16 parameter into bf16."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        fp32_keys = ("momentum", ROW_SECOND_MOMENT)
        momenta = {
            pid: {
                (k, name): v[name]
                for k, v in state.items()
                if isinstance(v, dict)
                for name in fp32_keys
                if name in v
            }
            for pid, state in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params, strict=True):
            for (key, name), momentum in momenta.get(pid, {}).items():
                self.state[param][key][name] = momentum.to(
                    device=param.device, dtype=torch.float32, copy=True
                )

    def matrix_state(self, param: torch.Tensor, key: str) -> dict:
        """State of the logical matrix ``key`` held in ``param``'s optimizer state (created on first use)."""
        return self.state[param].setdefault(key, {})
