"""NorMuon's neuron-wise normalization of an orthogonalized update (Li et al. 2025, "NorMuon: Making Muon more
efficient and scalable", arXiv:2510.05491, Algorithm 1).

Newton–Schulz makes the update's singular values equal but leaves its rows (one per output neuron) with very
different norms. NorMuon keeps a second-moment EMA per row, ``v ← β₂·v + (1−β₂)·mean_cols(O ⊙ O)``, divides each
row by ``√v + ε``, and rescales the result to the Frobenius norm of an exactly orthogonal matrix, √min(m, n).
The paper then applies Moonlight's learning-rate match ``η̂ = 0.2·η·√(mn)/‖Ô‖_F`` (update RMS 0.2·η); our
``moonlight`` scale rule 0.2·√max(m, n) after this normalization is exactly that, and the other scale rules
(``spectral`` …) keep the meaning they have for plain Muon.

Math apart from communication: when the matrix is sharded (the ``distributed`` mode), the caller passes the
one reduction each sharding needs — columns split: the per-row sums of squares are summed across shards;
rows split: the Frobenius total is — so the sharded and the whole-matrix paths are the same code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["row_normalize_"]

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def row_normalize_(
    directions: torch.Tensor,
    second_moment: torch.Tensor,
    *,
    beta2: float,
    eps: float,
    num_rows: int,
    num_cols: int,
    row_sum_all_reduce: AllReduceSum | None = None,
    total_all_reduce: AllReduceSum | None = None,
) -> torch.Tensor:
    """NorMuon's normalization of a stack of orthogonalized matrices; updates ``second_moment`` in place.

    Args:
        directions: ``[B, m, n]`` orthogonalized updates (or this rank's shards of them), any float dtype.
        second_moment: ``[B, m]`` fp32 EMA of each row's mean square (the rows this rank holds).
        beta2, eps: the EMA factor and the ε added to ``√v`` (paper: 0.95, 1e-8).
        num_rows, num_cols: shape of the whole matrix (the mean is over all columns, also when they are sharded).
        row_sum_all_reduce: sums per-row squares over the shards of a column-split matrix.
        total_all_reduce: sums the Frobenius totals over the shards of a row-split matrix.

    Returns ``[B, m, n]`` fp32: each row divided by ``√v + ε``, the whole scaled to Frobenius norm √min(m, n).
    """
    if directions.dim() != 3 or second_moment.shape != directions.shape[:2]:
        raise ValueError(
            f"directions {tuple(directions.shape)} must be [B, m, n] and second_moment "
            f"{tuple(second_moment.shape)} [B, m]"
        )
    directions = directions.float()
    row_squares = directions.square().sum(-1)
    if row_sum_all_reduce is not None:
        row_squares = row_sum_all_reduce(row_squares)
    second_moment.lerp_(row_squares / num_cols, 1.0 - beta2)
    inverse = 1.0 / (second_moment.sqrt() + eps)
    normalized_total = (row_squares * inverse.square()).sum(-1)  # ‖Ô‖_F² per matrix, [B]
    if total_all_reduce is not None:
        normalized_total = total_all_reduce(normalized_total)
    # An all-zero update stays zero (x/tiny · 0) rather than becoming NaN.
    ratio = (min(num_rows, num_cols) / normalized_total.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    return directions * (inverse * ratio[:, None]).unsqueeze(-1)
