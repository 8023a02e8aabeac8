"""Newton–Schulz orthogonalization: the polar factor U·Vᵀ of a matrix, approximately, from matmuls only.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) replaces a weight's momentum M = U·S·Vᵀ by
its polar factor U·Vᵀ. An odd polynomial p(x) = a·x + b·x³ + c·x⁵ applied to a matrix acts on each singular
value separately, p(X) = U·p(S)·Vᵀ, and is evaluated with matmuls as

    A = X·Xᵀ            (k × k Gram on the small side k)
    B = b·A + c·A·A
    X ← a·X + B·X

— the loop of Keller Jordan's ``zeropower_via_newtonschulz5``. Composing a few such polynomials after scaling
X so that every singular value is ≤ 1 pushes all nonzero singular values towards 1.

Math apart from communication: when ``all_reduce_sum`` is given, the input is one shard of a larger matrix
split along its long dimension. The only quantity that needs the other shards is the k × k Gram, so the
sharded iteration all-reduces A once per step and is otherwise the same code as the unsharded one
(``all_reduce_sum=None``). The Frobenius norm comes from trace(A) of the first, unnormalized Gram, so
normalization costs no extra collective.

``algorithm="gram"`` runs the same polynomials on the k × k Gram matrix instead (``gram_newton_schulz.py``:
fewer FLOPs for wide matrices, one collective per restart segment instead of one per step when sharded);
``"auto"`` takes whichever does fewer FLOPs for the shape (``choose_ns_algorithm``).

This module imports neither torch.distributed nor megatron.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from megatron_muon.ops import newton_schulz_fp8 as fp8
from megatron_muon.ops.gram_newton_schulz import (
    DEFAULT_GRAM_RESTARTS,
    gram_iteration,
    gram_iteration_flops,
    gram_matrix,
    resolve_gram_restarts,
)

__all__ = [
    "COEFFICIENT_SCHEDULES",
    "DEFAULT_GRAM_RESTARTS",
    "NORMALIZATION_SAFETY",
    "NS_ALGORITHMS",
    "NsAlgorithm",
    "choose_ns_algorithm",
    "newton_schulz",
    "newton_schulz_flops",
    "ns_algorithm_flops",
    "orthogonality_error",
    "resolve_coefficients",
]

CoefficientTriple = tuple[float, float, float]

NsAlgorithm = Literal["auto", "standard", "gram"]
"""How a matrix is orthogonalized: ``standard`` (iterate on X), ``gram`` (iterate on X·Xᵀ,
``gram_newton_schulz.py``) or ``auto`` (the one with fewer FLOPs for its shape, ``choose_ns_algorithm``)."""
NS_ALGORITHMS: tuple[NsAlgorithm, ...] = get_args(NsAlgorithm)

# Keller Jordan's Muon quintic (https://kellerjordan.github.io/posts/muon/, ``zeropower_via_newtonschulz5``).
# The coefficients are tuned to maximize the slope p'(0) = a, so that tiny singular values grow fast, while
# the iterates stay within a band around 1 instead of converging to 1: the scalar map sends any x in
# [0.01, 1] into [0.68, 1.21] within 5 steps and then cycles within [0.68, 1.14] (measured; the post asks
# for [1 - 0.3, 1 + 0.3]). Overshooting the convergent Newton–Schulz
# polynomial (a = 15/8) buys far fewer steps; the spread of the singular values around 1 does not hurt
# training (Keller Jordan's docstring: "S'_ii ~ Uniform(0.5, 1.5) ... not to hurt model performance").
_QUINTIC: CoefficientTriple = (3.4445, -4.7750, 2.0315)

# Amsel, Persson, Musco, Gower (2025), "The Polar Express: Optimal Matrix Sign Methods and Their Application
# to the Muon Algorithm", arXiv:2505.16932, Algorithm 1: one polynomial per step, each optimal in the
# minimax sense for the interval the previous steps left. After the 7th the polynomials equal the
# convergent (15x - 10x³ + 3x⁵)/8 numerically, which is repeated for any further step.
_POLAR_EXPRESS_PUBLISHED: tuple[CoefficientTriple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)

# Polar Express safety factor (Algorithm 1 and Section 4.4 of arXiv:2505.16932): in half precision a
# singular value may land slightly above the interval a polynomial was designed for, where p grows fast.
# The paper divides the normalized matrix by 1.01 and replaces p(x) by p(x / 1.01), i.e. divides (a, b, c)
# by (1.01, 1.01³, 1.01⁵), for every polynomial but the last (convergent) one.
_POLAR_EXPRESS_SAFETY = 1.01
_POLAR_EXPRESS: tuple[CoefficientTriple, ...] = tuple(
    (a / _POLAR_EXPRESS_SAFETY, b / _POLAR_EXPRESS_SAFETY**3, c / _POLAR_EXPRESS_SAFETY**5)
    for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]
) + (_POLAR_EXPRESS_PUBLISHED[-1],)

COEFFICIENT_SCHEDULES: dict[str, tuple[CoefficientTriple, ...]] = {
    "quintic": (_QUINTIC,),
    "polar_express": _POLAR_EXPRESS,
}
"""Named schedules. A schedule shorter than ``steps`` repeats its last triple."""

NORMALIZATION_SAFETY: dict[str, float] = {"quintic": 1.0, "polar_express": _POLAR_EXPRESS_SAFETY}
"""Factor the Frobenius norm is multiplied by before dividing, per named schedule (1.0 for explicit lists)."""


def resolve_coefficients(
    coefficients: str | Sequence[Sequence[float]], steps: int
) -> tuple[CoefficientTriple, ...]:
    """The (a, b, c) triple of each of ``steps`` iterations.

    Args:
        coefficients: a name in ``COEFFICIENT_SCHEDULES`` (its last triple repeats past its end), or an
            explicit sequence of (a, b, c) triples whose length must equal ``steps``.
        steps: number of Newton–Schulz iterations, ≥ 1.

    Returns:
        ``steps`` triples of floats.

    Raises:
        ValueError: unknown name, non-positive ``steps``, a list of the wrong length, or a malformed triple.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if isinstance(coefficients, str):
        if coefficients not in COEFFICIENT_SCHEDULES:
            raise ValueError(
                f"coefficients={coefficients!r} is not a known schedule; valid names: "
                f"{sorted(COEFFICIENT_SCHEDULES)} (or pass an explicit list of (a, b, c) triples)"
            )
        schedule = COEFFICIENT_SCHEDULES[coefficients]
        return schedule[:steps] + (schedule[-1],) * max(0, steps - len(schedule))
    triples = list(coefficients)
    if len(triples) != steps:
        raise ValueError(
            f"an explicit coefficient list needs one (a, b, c) triple per step: got {len(triples)} "
            f"triples for steps={steps}"
        )
    resolved = []
    for index, triple in enumerate(triples):
        if len(triple) != 3:
            raise ValueError(f"coefficients[{index}]={tuple(triple)!r} is not an (a, b, c) triple")
        resolved.append((float(triple[0]), float(triple[1]), float(triple[2])))
    return tuple(resolved)


def newton_schulz_flops(m: int, n: int, steps: int) -> int:
    """Floating-point operations of one ``newton_schulz`` call on one m × n matrix.

    With k = min(m, n) and K = max(m, n), each step does three GEMMs, counted as 2 FLOPs per multiply-add:

        A = X·Xᵀ     (k×K)·(K×k)   2·k·k·K
        A·A          (k×k)·(k×k)   2·k·k·k
        B·X          (k×k)·(k×K)   2·k·k·K

    so ``steps · (4·k²·K + 2·k³)``. The elementwise work (scaling, the b·A and a·X terms fused into the GEMMs)
    is O(k·K) per step and not counted. For a stack of matrices multiply by the number of matrices.
    """
    if m < 1 or n < 1 or steps < 1:
        raise ValueError(f"m={m}, n={n}, steps={steps} must all be >= 1")
    k, big = min(m, n), max(m, n)
    return steps * (4 * k * k * big + 2 * k * k * k)


def _iterate_flops(k: int, long: float, steps: int, algorithm: str, restarts: Sequence[int]) -> float:
    """FLOPs of ``algorithm`` on an iterate with Gram side k and long side ``long`` (formulas of
    ``newton_schulz_flops`` and ``gram_iteration_flops``, with ``long`` possibly a shard's width)."""
    if algorithm == "standard":
        return steps * (4 * k * k * long + 2 * k**3)
    if algorithm == "gram":
        return gram_iteration_flops(k, long, steps, restarts)
    raise ValueError(f"ns_algorithm={algorithm!r}; valid: {list(NS_ALGORITHMS)}")


def _choose_on_iterate(k: int, long: float, steps: int, algorithm: str, restarts: Sequence[int]) -> str:
    if algorithm == "auto":
        gram = _iterate_flops(k, long, steps, "gram", restarts)
        return "gram" if gram < _iterate_flops(k, long, steps, "standard", restarts) else "standard"
    if algorithm not in NS_ALGORITHMS:
        raise ValueError(f"ns_algorithm={algorithm!r}; valid: {list(NS_ALGORITHMS)}")
    return algorithm


def choose_ns_algorithm(
    m: int,
    n: int,
    steps: int,
    algorithm: str = "auto",
    restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS,
    *,
    shards: int = 1,
) -> Literal["standard", "gram"]:
    """``standard`` or ``gram`` for an m × n matrix whose long side is split into ``shards`` slices, one per
    rank (the ``distributed`` mode: the k × k work is repeated on every slice, the K-long work divided).

    ``auto`` picks Gram only when it does strictly fewer FLOPs per rank. With s steps and S < s restart
    segments that is exactly (K / shards) / k > 1.5, whatever the restarts: square matrices stay standard.
    """
    chosen = _choose_on_iterate(min(m, n), max(m, n) / shards, steps, algorithm, restarts)
    return "gram" if chosen == "gram" else "standard"


def ns_algorithm_flops(
    m: int,
    n: int,
    steps: int,
    algorithm: str,
    restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS,
    *,
    shards: int = 1,
) -> float:
    """FLOPs per rank of orthogonalizing one m × n matrix (its long side split into ``shards`` slices) with
    ``algorithm`` (``standard``, ``gram``, or ``auto``: the one ``choose_ns_algorithm`` picks)."""
    if m < 1 or n < 1 or steps < 1 or shards < 1:
        raise ValueError(f"m={m}, n={n}, steps={steps}, shards={shards} must all be >= 1")
    chosen = choose_ns_algorithm(m, n, steps, algorithm, restarts, shards=shards)
    return _iterate_flops(min(m, n), max(m, n) / shards, steps, chosen, restarts)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """X·Xᵀ for x of shape (..., k, K) -> (..., k, k)."""
    return torch.matmul(x, x.mT)


def _polynomial_step(x: torch.Tensor, gram: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """a·X + (b·A + c·A·A)·X with the scalars fused into the GEMMs (addmm / baddbmm: one pass each)."""
    if x.ndim == 2:
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        return torch.addmm(x, polynomial, x, beta=a)
    polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
    return torch.baddbmm(x, polynomial, x, beta=a)


def newton_schulz(
    x: torch.Tensor,
    steps: int = 5,
    coefficients: str | Sequence[Sequence[float]] = "quintic",
    compute_dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
    *,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    transpose: bool | None = None,
    fp8_steps: int = 0,
    algorithm: str = "standard",
    gram_restarts: Sequence[int] = DEFAULT_GRAM_RESTARTS,
    gram_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Approximate polar factor U·Vᵀ of ``x`` (per matrix for a stack) by a Newton–Schulz iteration.

    Each matrix is divided by (‖X‖_F · safety + eps) so that its spectral norm is ≤ 1, then ``steps``
    polynomial steps X ← a·X + (b·A + c·A²)·X with A = X·Xᵀ run in ``compute_dtype``. The Gram is formed on
    the small side: a tall matrix is transposed once on entry and back on exit.

    With the default ``"quintic"`` schedule the singular values of the result are not 1 but spread in a band
    around it (within [0.68, 1.21] after 5 steps for singular values ≥ 0.01·‖X‖_F, see ``_QUINTIC``);
    ``"polar_express"`` lands in [0.84, 1.13] after 5 steps for singular values ≥ 0.001·‖X‖_F (in exact
    arithmetic) and converges to 1.

    Args:
        x: a matrix (m, n) or a stack (..., m, n) of matrices (e.g. the experts of an MoE layer), any floating
            dtype. With ``all_reduce_sum`` it is this rank's shard of a larger matrix (or stack) split along
            the matrix's long dimension.
        steps: number of iterations, ≥ 1. Keller Jordan's Muon uses 5.
        coefficients: ``"quintic"`` (Keller Jordan's (3.4445, -4.7750, 2.0315) every step),
            ``"polar_express"`` (Amsel et al. 2025, arXiv:2505.16932, with the paper's 1.01 safety factor on
            both the matrix and the coefficients), or an explicit list of ``steps`` (a, b, c) triples (no
            safety factor applied).
        compute_dtype: dtype of every GEMM and of the Gram that is all-reduced. bfloat16 is Muon's default
            and fast on GPUs; float32 is available and more accurate — bf16 keeps 8 mantissa bits, so each
            rank's partial Gram is rounded before the sum and the sum is rounded again, and the sharded result
            matches the unsharded one only to bf16 precision. On a CPU, bf16 GEMMs are fast only with
            AVX512-BF16 or AMX (then about twice fp32, see docs/benchmarks.md) and far slower without.
        eps: added to the scaled Frobenius norm before dividing, so an all-zero matrix returns zeros. It is
            absolute (1e-7 as in Keller Jordan's Muon and Polar Express): a matrix with ‖X‖_F not much
            larger than eps is under-normalized and comes out far from orthogonal.
        all_reduce_sum: ``None`` for a whole matrix. Otherwise a callable that sums a tensor in place across
            the ranks holding the shards and returns it; it is called exactly ``steps`` times, each time on
            the (..., k, k) Gram in ``compute_dtype``, and must be called by every rank in the same order.
        transpose: whether to iterate on Xᵀ, i.e. whether the FULL matrix is tall (m > n). Required with
            ``all_reduce_sum`` (a shard's own shape cannot tell); defaults to ``m > n`` otherwise.
        fp8_steps: run the GEMMs of the first ``fp8_steps`` steps in float8 e4m3 with one scale per matrix,
            writing ``compute_dtype`` (bfloat16 or float32); the other steps as above. 0 (default): no FP8.
            Experimental; see ``newton_schulz_fp8.py`` for the scheme and what it costs in accuracy. Needs
            ``torch._scaled_mm`` on ``x``'s device (CUDA compute capability >= 8.9, or a CPU build that has
            it); ``RuntimeError`` otherwise — there is no silent fallback to bf16.
        algorithm: ``"standard"`` (default), ``"gram"`` (the same polynomials iterated on the k × k Gram:
            ``gram_newton_schulz.py``) or ``"auto"`` (``choose_ns_algorithm`` on this call's shape, after the
            transpose: for a shard, its own long side). Equal in exact arithmetic. With ``all_reduce_sum`` Gram
            calls it 1 + len(gram_restarts) times, in ``gram_dtype``, instead of ``steps`` times.
        gram_restarts: Gram only: the iterations after which X and its Gram are recomputed (strictly
            increasing, in [1, steps − 1]); default ``(2,)``, the Dao-lab choice.
        gram_dtype: Gram only: dtype of the k × k iteration and of the Gram all-reduce; default float32 when
            ``compute_dtype`` is a half type (bf16 would round away the small eigenvalues of X·Xᵀ), else
            ``compute_dtype``.

    Returns:
        A tensor of ``x``'s shape and dtype (contiguous). In the sharded case, this rank's shard of the
        orthogonalized full matrix.

    Raises:
        ValueError: ``x`` has fewer than 2 dims or is not floating point, a dtype is not floating point,
            ``transpose`` is missing with ``all_reduce_sum``, or ``coefficients`` / ``steps`` are invalid
            (see ``resolve_coefficients``), or ``fp8_steps`` is out of [0, steps] or used with a
            ``compute_dtype`` other than bfloat16 / float32, or ``algorithm`` / ``gram_restarts`` are
            invalid (FP8 steps run with the standard algorithm only).
        RuntimeError: ``fp8_steps > 0`` on a device without an FP8 ``torch._scaled_mm``.

    Precision limits of deriving the norm from trace(X·Xᵀ): the squared Frobenius norm of each input matrix
    must be representable in ``compute_dtype`` (fp32/bf16: about 1e-38 < ‖X‖_F² < 3e38), otherwise the
    Gram underflows to zero (the output is zeros) or overflows.
    """
    if x.ndim < 2:
        raise ValueError(f"x must be a matrix (m, n) or a stack (..., m, n); got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point; got dtype {x.dtype}")
    if not compute_dtype.is_floating_point:
        raise ValueError(
            f"compute_dtype={compute_dtype} must be a floating dtype (torch.bfloat16, torch.float32)"
        )
    triples = resolve_coefficients(coefficients, steps)
    fp8.check_fp8_steps(fp8_steps, steps, compute_dtype)
    if fp8_steps and (reason := fp8.fp8_unavailable_reason(x.device)) is not None:
        raise RuntimeError(reason)
    safety = NORMALIZATION_SAFETY.get(coefficients, 1.0) if isinstance(coefficients, str) else 1.0
    if all_reduce_sum is not None and transpose is None:
        raise ValueError(
            "transpose must be given explicitly with all_reduce_sum: pass transpose=True when the full "
            "(unsharded) matrix is tall (m > n), so the shard is transposed to put the small side first"
        )
    if transpose is None:
        transpose = x.size(-2) > x.size(-1)
    # The iterate is (rows, cols) after the transpose; a shard's cols are its own slice of the long side.
    rows, cols = (x.size(-1), x.size(-2)) if transpose else (x.size(-2), x.size(-1))
    algorithm = _choose_on_iterate(rows, cols, steps, algorithm, gram_restarts)
    if algorithm == "gram":
        restarts = resolve_gram_restarts(gram_restarts, steps)
        if fp8_steps:
            raise ValueError(f"fp8_steps={fp8_steps} runs with algorithm='standard' only; got 'gram'")

    batch_shape = x.shape[:-2]
    # (..., m, n) -> (batch, m, n) so stacks run as one baddbmm; a plain matrix stays 2-D for addmm.
    work = x.to(compute_dtype) if x.ndim == 2 else x.reshape(-1, *x.shape[-2:]).to(compute_dtype)
    if transpose:
        work = work.mT  # a view; the first polynomial step writes a fresh contiguous (k, K) tensor
    small, large = work.shape[-2:]

    if algorithm == "gram":
        if gram_dtype is None:
            half = compute_dtype in (torch.bfloat16, torch.float16)
            gram_dtype = torch.float32 if half else compute_dtype
        gram = gram_matrix(work, gram_dtype)
        if all_reduce_sum is not None:
            gram = all_reduce_sum(gram)
        inverse_norm = _inverse_norm(gram, safety, eps)
        work = gram_iteration(
            work * inverse_norm.to(compute_dtype),
            gram * (inverse_norm * inverse_norm).to(gram_dtype),
            triples,
            restarts,
            all_reduce_sum=all_reduce_sum,
        )
        return _restore_layout(work, x, transpose, batch_shape)
    if fp8_steps:
        work = fp8.pad_to_alignment(work)  # zero rows / columns stay zero; cropped below

    # The first Gram is of the unnormalized X: its trace is ‖X‖_F² (summed over shards), so normalizing
    # needs no collective of its own, and A scales by the square of X's factor.
    quantized = None  # (X̂, dequant scale) of an FP8 step: the Gram's e4m3 copy of X, reused for B·X
    if fp8_steps:
        gram, quantized = fp8.fp8_gram(work, compute_dtype)
    else:
        gram = _gram(work)
    if all_reduce_sum is not None:
        gram = all_reduce_sum(gram)
    inverse_norm = _inverse_norm(gram, safety, eps)
    work = work * inverse_norm.to(compute_dtype)
    gram = gram * (inverse_norm * inverse_norm).to(compute_dtype)
    if quantized is not None:  # the normalization is a per-matrix scalar: it only rescales X̂
        quantized = (quantized[0], quantized[1] * inverse_norm)

    for step, (a, b, c) in enumerate(triples):
        if step > 0:
            if step < fp8_steps:
                gram, quantized = fp8.fp8_gram(work, compute_dtype)
            else:
                gram = _gram(work)
            if all_reduce_sum is not None:
                gram = all_reduce_sum(gram)
        if step < fp8_steps:
            assert quantized is not None  # set by this step's (or the normalizing) fp8_gram
            work = fp8.polynomial_step(work, gram, quantized, a, b, c)
        else:
            work = _polynomial_step(work, gram, a, b, c)

    if fp8_steps:
        work = work[..., :small, :large]
    return _restore_layout(work, x, transpose, batch_shape)


def _inverse_norm(gram: torch.Tensor, safety: float, eps: float) -> torch.Tensor:
    """1 / (‖X‖_F·safety + eps) per matrix, (…, 1, 1) in fp32, from the trace of the unnormalized Gram."""
    squared_norm = gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1, dtype=torch.float32)
    inverse_norm = 1.0 / (squared_norm.sqrt() * safety + eps)
    return inverse_norm[..., None, None]


def _restore_layout(
    work: torch.Tensor, x: torch.Tensor, transpose: bool, batch_shape: torch.Size
) -> torch.Tensor:
    """Undo the transpose and the batch flattening; ``x``'s dtype, contiguous."""
    if transpose:
        work = work.mT
    # One pass: cast and lay out (m, n) row-major together (``.contiguous()`` is a no-op after a cast).
    work = work.to(x.dtype, memory_format=torch.contiguous_format).contiguous()
    return work.reshape(*batch_shape, *work.shape[-2:])


def orthogonality_error(x: torch.Tensor, accumulate_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """How far each matrix is from semi-orthogonal: ‖X·Xᵀ − I‖_F / √k on the small side k = min(m, n).

    The value is the RMS deviation of the k×k Gram from the identity; it is 0 for an exact polar factor and
    about RMS(σᵢ² − 1) otherwise (σᵢ the singular values).

    Args:
        x: (m, n) or a stack (..., m, n).
        accumulate_dtype: dtype the Gram is computed in (float64 by default; float32 is faster on GPUs).

    Returns:
        A tensor of ``x``'s batch shape (a 0-dim tensor for one matrix) in ``accumulate_dtype``.
    """
    if x.ndim < 2:
        raise ValueError(f"x must be a matrix (m, n) or a stack (..., m, n); got shape {tuple(x.shape)}")
    work = x.to(accumulate_dtype)
    if work.size(-2) > work.size(-1):
        work = work.mT
    k = work.size(-2)
    deviation = _gram(work) - torch.eye(k, dtype=accumulate_dtype, device=x.device)
    error: torch.Tensor = torch.linalg.matrix_norm(deviation, ord="fro") / math.sqrt(k)
    return error
