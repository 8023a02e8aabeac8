"""Gram Newton–Schulz: the same polynomial iteration as ``newton_schulz.py``, run on the k × k Gram matrix.

Standard Newton–Schulz updates the whole k × K matrix every step, X ← p(A)·X with A = X·Xᵀ and
p(t) = a + b·t + c·t². Every iterate is X₀ times a polynomial of the first Gram R₀ = X₀·X₀ᵀ, so the iteration
can run on k × k matrices alone (Zhang, Amsel, Chen, Dao 2026, "Gram Newton–Schulz",
https://dao-lab.ai/blog/2026/gram-newton-schulz and https://github.com/Dao-AILab/gram-newton-schulz):

    R ← X·Xᵀ, Q ← I                                   (once per segment: 2·k²·K FLOPs)
    per step:  P = a·I + b·R + c·R²                   (R²: 2·k³)
               Q ← P·Q                                (2·k³; the first step of a segment just takes Q = P)
               R ← P·R·P                              (4·k³; skipped on the last step of a segment)
    X ← Q·X                                           (once per segment: 2·k²·K)

P, Q and R are polynomials of one symmetric matrix, so they commute and R stays X·Xᵀ of the current iterate.
With K ≫ k the K-long GEMMs run once per segment instead of twice per step; the k × k work grows from 2·k³ to
8·k³ per step (``gram_iteration_flops``). For 5 steps and one restart it does fewer FLOPs than standard
Newton–Schulz when K / k > 1.5.

Stability (the blog's "spurious negative eigenvalues" and "eigenvector drift"): R holds the squares of the
singular values, so a rounding error relative to its largest entries (2⁻⁹ in bf16) wipes out singular values
below ~√2⁻⁹ ≈ 0.06 — standard Newton–Schulz in bf16 keeps them down to ~2⁻⁹ — and the errors of P, Q, R
compound over the steps instead of being reset by a fresh X·Xᵀ. Two remedies, both here:

* ``restarts``: after the listed iterations, X is materialized (X ← Q·X) and its Gram recomputed, discarding
  the drift accumulated in Q and R. The blog restarts once, after the 2nd of 5 iterations
  (``DEFAULT_GRAM_RESTARTS``); each restart costs 4·k²·K FLOPs.
* ``gram_dtype``: the k × k iteration (R, P, Q) runs in float32 by default whatever the compute dtype of X,
  and the Gram X·Xᵀ of a bf16 X is written in float32 (on CUDA from bf16 operands with fp32 output, on other
  devices from X upcast), so no small eigenvalue is lost to rounding R. Only the K-long GEMM Q·X runs in the
  compute dtype, as every GEMM of standard Newton–Schulz does. ``tests/unit/test_gram_newton_schulz.py``
  measures the orthogonality error in bf16 against standard Newton–Schulz's.

Sharded matrices (the ``distributed`` mode): each rank holds a slice of X along K. R is the sum of the slices'
Grams, so it is all-reduced once per segment (1 + len(restarts) collectives instead of one per step); every
k × k step is then local, and X ← Q·X applies to each slice on its own.

This module imports neither torch.distributed nor megatron.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "DEFAULT_GRAM_RESTARTS",
    "gram_iteration",
    "gram_matrix",
    "gram_iteration_flops",
    "resolve_gram_restarts",
]

DEFAULT_GRAM_RESTARTS: tuple[int, ...] = (2,)
"""Restart after the 2nd iteration: the Dao-lab default for 5 steps (``gram_newton_schulz_reset_iterations=[2]``;
their ``autotune_restarts`` recommends one restart for 5 steps). Tested against standard Newton–Schulz in bf16
for the quintic and Polar Express schedules."""

CoefficientTriple = tuple[float, float, float]


def resolve_gram_restarts(restarts: Sequence[int], steps: int) -> tuple[int, ...]:
    """Validate the iterations after which Gram Newton–Schulz restarts: strictly increasing integers in
    [1, steps − 1] (a restart after the last iteration would cost a Gram and change nothing).

    Raises:
        ValueError: naming the bad list and the valid range.
    """
    values = tuple(restarts)
    valid = all(isinstance(r, int) and not isinstance(r, bool) for r in values)
    if not valid or any(not 1 <= r < steps for r in values) or list(values) != sorted(set(values)):
        raise ValueError(
            f"gram restarts={list(values)!r} with steps={steps}: valid are strictly increasing integers in "
            f"[1, {steps - 1}] (the iterations after which X and its Gram are recomputed), or []"
        )
    return values


def gram_iteration_flops(
    k: int, long: float, steps: int, restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS
) -> float:
    """Floating-point operations of Gram Newton–Schulz on a k × ``long`` iterate (2 per multiply-add; ``long``
    may be a shard's slice of the long side).

    With the steps cut into S = 1 + len(restarts) segments of L₁ … L_S steps, each segment forms one Gram
    (2·k²·long) and applies Q once (2·k²·long), and runs L·2·k³ (R²), (L − 1)·2·k³ (Q) and (L − 1)·4·k³ (R):
    ``4·S·k²·long + (8·steps − 6·S)·k³`` in all. The symmetric products are counted as full GEMMs (torch has
    no symmetric GEMM); the elementwise work is O(k²) per step and not counted.
    """
    segments = 1 + len(resolve_gram_restarts(restarts, steps))
    return 4 * segments * k * k * long + (8 * steps - 6 * segments) * k**3


def gram_matrix(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """X·Xᵀ of x (..., k, K) written in ``dtype``.

    A half-precision x with a wider ``dtype`` on CUDA uses the GEMM's fp32 accumulator directly (``out_dtype``:
    tensor-core speed, no rounding of the result to half precision); elsewhere x is upcast first (CPU kernels
    have no mixed-dtype GEMM)."""
    if x.dtype == dtype:
        return torch.matmul(x, x.mT)
    if x.is_cuda and dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16):
        multiply = torch.mm if x.ndim == 2 else torch.bmm
        return multiply(x, x.mT, out_dtype=dtype)
    wide = x.to(dtype)
    return torch.matmul(wide, wide.mT)


def _polynomial(gram: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """P = a·I + b·R + c·R² (one fused GEMM, then a diagonal add)."""
    if gram.ndim == 2:
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
    else:
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
    polynomial.diagonal(dim1=-2, dim2=-1).add_(a)
    return polynomial


def gram_iteration(
    x: torch.Tensor,
    gram: torch.Tensor,
    triples: Sequence[CoefficientTriple],
    restarts: Sequence[int],
    *,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``triples`` (one (a, b, c) per step) of Gram Newton–Schulz on a normalized X.

    Args:
        x: (k, K) or (batch, k, K), the small side first, already divided by its norm; any floating dtype (the
            dtype of the K-long GEMMs).
        gram: X·Xᵀ of ``x`` (all-reduced over shards when sharded), (…, k, k) in the dtype of the k × k
            iteration.
        triples: the steps' coefficients.
        restarts: iterations after which X ← Q·X and its Gram is recomputed (``resolve_gram_restarts``).
        all_reduce_sum: sums a restart's Gram over the shards of X (in place), or ``None`` for whole matrices.

    Returns:
        p_s(…p_1(X)) in ``x``'s dtype and shape.
    """
    gram_dtype = gram.dtype
    bounds = [0, *restarts, len(triples)]
    for segment, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if segment > 0:
            gram = gram_matrix(x, gram_dtype)
            if all_reduce_sum is not None:
                gram = all_reduce_sum(gram)
        accumulated: torch.Tensor | None = None
        for step in range(start, stop):
            polynomial = _polynomial(gram, *triples[step])
            accumulated = polynomial if accumulated is None else torch.matmul(polynomial, accumulated)
            if step + 1 < stop:
                gram = torch.matmul(polynomial, torch.matmul(gram, polynomial))
        assert accumulated is not None  # every segment has at least one step (resolve_gram_restarts)
        x = torch.matmul(accumulated.to(x.dtype), x)
    return x
