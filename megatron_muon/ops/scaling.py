"""Update scale rules: the factor Muon multiplies an orthogonalized update by, per logical matrix.

An orthogonalized update O = U·Vᵀ of a (fan_out, fan_in) weight has every singular value 1, hence spectral
norm 1 and RMS entry 1/√max(fan_out, fan_in). The rules below pick the size the update should have instead:

======================  ==============================  ===============================================
mode                    factor                          what it keeps fixed
======================  ==============================  ===============================================
``"spectral"``          √(fan_out / fan_in)             the update's RMS→RMS operator norm (muP)
``"moonlight"``         0.2 · √max(fan_out, fan_in)     the update's RMS entry, 0.2 (AdamW-like)
``"shape"``             √max(1, fan_out / fan_in)       Keller Jordan's Muon
``"none"``              1                               nothing (the raw polar factor)
======================  ==============================  ===============================================

Beware the names in NVIDIA's Emerging-Optimizers (the backend of megatron-core's Muon,
``get_muon_scale_factor``): there ``"unit_rms_norm"`` is our ``"spectral"``, ``"spectral"`` is
√max(fan_out, fan_in) (our ``"moonlight"`` without the 0.2), and ``"shape_scaling"`` is our ``"shape"``.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

__all__ = ["SCALE_MODES", "ScaleMode", "update_scale"]

ScaleMode = Literal["spectral", "moonlight", "shape", "none"]
"""The update-scale rules of :func:`update_scale`."""
SCALE_MODES: tuple[ScaleMode, ...] = get_args(ScaleMode)

# Moonlight's target update RMS. Liu et al. (2025), "Muon is Scalable for LLM Training" (Moonshot AI,
# arXiv:2502.16982), "consistent update RMS": AdamW's update RMS is empirically 0.2–0.4, and scaling Muon's update to
# RMS 0.2 lets it reuse AdamW's learning rate and weight decay.
MOONLIGHT_UPDATE_RMS = 0.2


def update_scale(mode: ScaleMode, fan_out: int, fan_in: int) -> float:
    """Scale factor for the orthogonalized update of one logical (fan_out, fan_in) weight matrix.

    Args:
        mode: one of ``SCALE_MODES``.
        fan_out: output features, the weight's first dim (rows of ``y = W·x``).
        fan_in: input features, the weight's second dim.

    Returns:
        The dimensionless factor the update U·Vᵀ is multiplied by (before the learning rate).

    Raises:
        ValueError: unknown ``mode`` or a fan that is not a positive integer.
    """
    for name, fan in (("fan_out", fan_out), ("fan_in", fan_in)):
        if isinstance(fan, bool) or not isinstance(fan, int) or fan < 1:
            raise ValueError(
                f"{name}={fan!r} must be a positive integer (the weight has shape (fan_out, fan_in))"
            )
    if mode == "spectral":
        # √(fan_out/fan_in) sets the update's RMS→RMS operator norm ‖ΔW‖₂·√(fan_in/fan_out) to 1, the
        # muP-consistent size for a hidden layer: Bernstein & Newhouse, "Old Optimizer, New Norm: An
        # Anthology" (arXiv:2409.20325) and "Modular Duality in Deep Learning" (arXiv:2410.21265); Large et
        # al., "Scalable Optimization in the Modular Norm" (arXiv:2405.14813); Jianlin Su's Muon posts on
        # kexue.fm. Megatron-core / Emerging-Optimizers call this mode "unit_rms_norm".
        return math.sqrt(fan_out / fan_in)
    if mode == "moonlight":
        # Liu et al. 2025, "Muon is Scalable for LLM Training" (arXiv:2502.16982): U·Vᵀ has RMS
        # 1/√max(A, B), so 0.2·√max(A, B) gives the update RMS 0.2 of a typical AdamW step.
        return MOONLIGHT_UPDATE_RMS * math.sqrt(max(fan_out, fan_in))
    if mode == "shape":
        # Keller Jordan's Muon (https://github.com/KellerJordan/Muon, muon.py ``muon_update``):
        # ``max(1, grad.size(-2) / grad.size(-1)) ** 0.5``, which enlarges the update of tall matrices only.
        return math.sqrt(max(1.0, fan_out / fan_in))
    if mode == "none":
        # The raw polar factor, e.g. for ablations or when the learning rate is set per matrix elsewhere.
        return 1.0
    raise ValueError(f"mode={mode!r} is not an update scale rule; valid modes: {list(SCALE_MODES)}")
