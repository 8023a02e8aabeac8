"""A plain single-process Muon on whole logical matrices, written to be read, not to be fast.

The parallel-aware optimizer must produce, for every logical matrix and any TP/PP/EP/DP layout, what this
produces on the full matrix (tests/distributed/test_parallel_muon.py). It shares only ``newton_schulz`` and
``update_scale`` with the fast path; both are tested on their own against an SVD and the papers' formulas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megatron_muon.ops.newton_schulz import newton_schulz
from megatron_muon.ops.scaling import ScaleMode, update_scale


class ReferenceMuon:
    """Muon on a dict of named full matrices ``{key: W (fan_out, fan_in)}``.

    step(grads): for each matrix, ``m ← β·m + (1−β)·g``; ``u = (1−β)·g + β·m`` with Nesterov, else ``m``;
    ``O = NS(u)``; with ``normuon_beta2`` (NorMuon, Li et al. 2025): ``v ← β₂·v + (1−β₂)·mean_cols(O²)``,
    ``O ← O / (√v + ε)`` rescaled to Frobenius norm √min(m, n); ``W ← W·(1 − lr·wd) − lr · scale(fan_out,
    fan_in) · O``.
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        *,
        lr: float,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale_mode: ScaleMode = "spectral",
        ns_steps: int = 5,
        coefficients: str | Sequence[Sequence[float]] = "quintic",
        compute_dtype: torch.dtype = torch.float32,
        normuon_beta2: float | None = None,
        normuon_eps: float = 1e-8,
    ) -> None:
        self.weights = {k: w.clone().float() for k, w in weights.items()}
        self.momenta = {k: torch.zeros_like(w) for k, w in self.weights.items()}
        self.lr, self.beta, self.nesterov, self.wd = lr, momentum, nesterov, weight_decay
        self.scale_mode, self.ns_steps, self.coefficients = scale_mode, ns_steps, coefficients
        self.compute_dtype = compute_dtype
        self.normuon_beta2, self.normuon_eps = normuon_beta2, normuon_eps
        self.row_second_moments = {k: torch.zeros(w.shape[0]) for k, w in self.weights.items()}

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for key, weight in self.weights.items():
            grad = grads[key].float()
            momentum = self.beta * self.momenta[key] + (1 - self.beta) * grad
            self.momenta[key] = momentum
            direction_input = (1 - self.beta) * grad + self.beta * momentum if self.nesterov else momentum
            orthogonal = newton_schulz(
                direction_input, self.ns_steps, self.coefficients, compute_dtype=self.compute_dtype
            ).float()
            if self.normuon_beta2 is not None:
                beta2 = self.normuon_beta2
                moment = beta2 * self.row_second_moments[key] + (1 - beta2) * orthogonal.square().mean(dim=1)
                self.row_second_moments[key] = moment
                normalized = orthogonal / (moment.sqrt() + self.normuon_eps)[:, None]
                orthogonal = normalized * (min(weight.shape) ** 0.5 / normalized.norm())
            fan_out, fan_in = weight.shape
            scale = update_scale(self.scale_mode, fan_out, fan_in)
            self.weights[key] = weight * (1 - self.lr * self.wd) - self.lr * scale * orthogonal
