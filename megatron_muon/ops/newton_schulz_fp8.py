"""FP8 GEMMs for the early Newton–Schulz iterations (``newton_schulz(..., fp8_steps=k)``).

Newton–Schulz is three GEMMs per step (``newton_schulz.py``). Its early steps only have to move the singular
values into a band around 1; the last steps, in bf16 or fp32, settle them there. So the first ``fp8_steps``
steps may run their GEMMs in float8 e4m3 (3 mantissa bits: a relative rounding error of at most 2⁻⁴ per
entry) at up to twice the bf16 tensor-core rate on Hopper, and the remaining steps correct what the rounding
moved. ``tests/unit/test_newton_schulz_fp8.py`` and ``tools/bench_newton_schulz_gpu.py`` measure what it costs
in orthogonality and in distance from the full-precision result, ``tools/bench_ns_precision_loss.py`` in loss.

Quantization is per matrix ("per tensor", one scale for each matrix of a stack): ``q = round_e4m3(x · s)``
with ``s = 448 / max|x|`` so the largest entry lands on e4m3's largest finite value, and the GEMM
``torch._scaled_mm(q_a, q_b, 1/s_a, 1/s_b)`` accumulates in fp32 and writes ``compute_dtype``. In one FP8 step

    X̂ = Q(X)                       quantized once, used by both GEMMs that read X
    A = X̂·X̂ᵀ                       (all-reduced over shards, as in the bf16 path)
    B = b·A + c·Q(A)·Q(A)           the second Q(A) as a column-major copy (see ``polynomial_step``)
    X ← a·X + Q(B)·X̂                the a·X term stays in ``compute_dtype``: it carries most of X

Step 0 quantizes the unnormalized input (the normalization is a per-matrix scalar, so it only changes the
scale, not the e4m3 values): one quantization serves the norm's Gram and the first B·X.

``torch._scaled_mm`` (CUDA, compute capability ≥ 8.9; also a CPU kernel in recent torch) takes 2-D operands
only, the first row-major and the second column-major, and on CUDA both dimensions of the second a multiple of
16. ``newton_schulz`` therefore zero-pads the matrix to multiples of 16 once on entry (zero rows and columns
stay exactly zero through every step) and loops over a stack. ``newton_schulz_fp8_reference`` is the same
iteration with the GEMMs emulated (dequantize, fp32 matmul): the readable reference the fast path is tested
against, and a way to study the numerics on a torch without a ``_scaled_mm`` kernel for the device.

References: Micikevicius et al. 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433) for e4m3 and
per-tensor scaling. This module imports neither torch.distributed nor megatron.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "FP8_ALIGNMENT",
    "FP8_COMPUTE_DTYPES",
    "FP8_DTYPE",
    "FP8_MAX",
    "MAX_STABLE_FP8_STEPS",
    "check_fp8_steps",
    "emulated_scaled_matmul",
    "fp8_gram",
    "fp8_unavailable_reason",
    "newton_schulz_fp8_reference",
    "pad_to_alignment",
    "polynomial_step",
    "quantize_e4m3",
    "scaled_matmul",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
FP8_ALIGNMENT = 16
"""cuBLASLt FP8 GEMMs need both dims of the second operand (and the shared dim) to be multiples of 16."""
FP8_COMPUTE_DTYPES = (torch.bfloat16, torch.float32)
"""Output (and non-FP8-step) dtypes the FP8 path supports: ``_scaled_mm`` writes bf16 / fp16 / fp32."""

MAX_STABLE_FP8_STEPS = {"quintic": 2, "polar_express": 1}
"""Most leading FP8 steps (of 5) per named schedule that stayed within bf16-like accuracy in the measurements of
``tests/unit/test_newton_schulz_fp8.py``: quintic diverged on a 48×48 matrix with 3, Polar Express on most shapes
with 2 (its early polynomials are tuned for the exact interval the previous step leaves). The optimizer's option
(``MuonConfig.ns_fp8_steps``) is limited to these; ``newton_schulz`` itself accepts any 0..steps, for studies."""

# An all-zero matrix has amax 0; clamping keeps its scale finite (448 / (448·tiny) = 1 / tiny < fp32 max), and
# no entry of a matrix whose amax is below the clamp can overflow after scaling.
_MIN_AMAX = FP8_MAX * torch.finfo(torch.float32).tiny


def check_fp8_steps(fp8_steps: int, steps: int, compute_dtype: torch.dtype) -> None:
    """Raise ``ValueError`` (one line) unless ``0 <= fp8_steps <= steps`` and, with FP8 steps, ``compute_dtype``
    is one the FP8 GEMM can write."""
    if isinstance(fp8_steps, bool) or not isinstance(fp8_steps, int) or not 0 <= fp8_steps <= steps:
        raise ValueError(f"fp8_steps={fp8_steps!r} must be an integer in [0, steps={steps}]")
    if fp8_steps and compute_dtype not in FP8_COMPUTE_DTYPES:
        raise ValueError(
            f"fp8_steps={fp8_steps} needs compute_dtype torch.bfloat16 or torch.float32 (the FP8 GEMM's output "
            f"dtype); got {compute_dtype}"
        )


@functools.cache
def _cpu_scaled_mm_error() -> str | None:
    """None when this torch has a CPU ``_scaled_mm`` for e4m3 (torch ≥ 2.6 with oneDNN), else why not."""
    try:
        ones = torch.ones(16, 16).to(FP8_DTYPE)
        scale = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(ones, ones.t(), scale_a=scale, scale_b=scale, out_dtype=torch.float32)
    except (AttributeError, NotImplementedError, RuntimeError) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """None if ``torch._scaled_mm`` can run e4m3 GEMMs on ``device``, otherwise a one-line reason.

    CUDA needs compute capability ≥ 8.9 (Ada, Hopper, Blackwell) and an NVIDIA build (ROCm's FP8 is the
    ``fnuz`` variant). ``meta`` tensors are accepted: they run torch's shape and layout checks of the CUDA
    kernel without a GPU (the unit tests use that)."""
    device = torch.device(device)
    if device.type == "meta":
        return None
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "FP8 Newton–Schulz supports NVIDIA GPUs only (this is a ROCm build of torch)"
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            name = torch.cuda.get_device_name(device)
            return (
                f"FP8 Newton–Schulz needs compute capability >= 8.9 (Ada/Hopper); {name} has "
                f"{capability[0]}.{capability[1]}"
            )
        return None
    if device.type == "cpu":
        error = _cpu_scaled_mm_error()
        if error is None:
            return None
        return f"FP8 Newton–Schulz: torch {torch.__version__} has no CPU torch._scaled_mm for e4m3 ({error})"
    return f"FP8 Newton–Schulz runs on CUDA (or CPU with torch._scaled_mm); got device {device}"


def pad_to_alignment(x: torch.Tensor, alignment: int = FP8_ALIGNMENT) -> torch.Tensor:
    """``x`` (..., k, K) zero-padded at the end of its last two dims to multiples of ``alignment`` (``x``
    itself when already aligned). Zero rows / columns stay exactly zero through Newton–Schulz: the Gram gets
    zero rows and columns, so B does, so B·X does."""
    rows, cols = x.shape[-2:]
    pad_rows, pad_cols = -rows % alignment, -cols % alignment
    if not pad_rows and not pad_cols:
        return x
    return torch.nn.functional.pad(x, (0, pad_cols, 0, pad_rows))


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-matrix e4m3 quantization of ``x`` (..., m, n).

    Returns:
        ``(q, dequant_scale)``: ``q`` row-major float8_e4m3fn of ``x``'s shape with ``q ≈ x / dequant_scale``;
        ``dequant_scale`` float32 of shape (..., 1, 1), = max|x| / 448 per matrix.
    """
    amax = x.abs().amax(dim=(-2, -1), keepdim=True).to(torch.float32).clamp_(min=_MIN_AMAX)
    scale = FP8_MAX / amax
    # x·scale is computed in fp32 (type promotion); the clamp guards the rounding of amax·(448/amax) above 448,
    # which e4m3fn (no infinity) would turn into NaN.
    quantized = (x * scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.contiguous(), scale.reciprocal()


def _column_major(q: torch.Tensor) -> torch.Tensor:
    """The same values as ``q`` (..., m, n), stored column-major (``_scaled_mm``'s second operand)."""
    return q.mT.contiguous().mT


def _scaled_mm_2d(
    a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    out: torch.Tensor = torch._scaled_mm(
        a, b, scale_a=scale_a.reshape(()), scale_b=scale_b.reshape(()), out_dtype=out_dtype
    )
    return out


def scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(a·scale_a) @ (b·scale_b)`` with ``torch._scaled_mm``, per matrix of a stack.

    ``a`` (..., m, k) row-major and ``b`` (..., k, n) column-major, float8_e4m3fn; ``scale_*`` float32
    (..., 1, 1) dequantization scales; the result (..., m, n) in ``out_dtype``, accumulated in fp32.
    ``_scaled_mm`` is 2-D only, so a stack is a loop over its matrices."""
    if a.ndim == 2:
        return _scaled_mm_2d(a, b, scale_a, scale_b, out_dtype)
    batch = a.shape[:-2]
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    scale_a, scale_b = scale_a.reshape(-1), scale_b.reshape(-1)
    # reshape keeps a column-major b column-major only when the batch dims are already contiguous over it;
    # newton_schulz passes a 3-D stack, for which reshape is the identity.
    out = torch.stack(
        [_scaled_mm_2d(a[i], b[i], scale_a[i], scale_b[i], out_dtype) for i in range(a.shape[0])]
    )
    return out.reshape(*batch, *out.shape[-2:])


def emulated_scaled_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """What ``scaled_matmul`` computes, from plain fp32 ops: the e4m3 values are exact in fp32, the product is
    accumulated in fp32 and scaled once, as ``_scaled_mm``'s epilogue does. Any layout, any device."""
    product = torch.matmul(a.to(torch.float32), b.to(torch.float32))
    return (product * (scale_a * scale_b)).to(out_dtype)


MatmulFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]


def fp8_gram(
    x: torch.Tensor, out_dtype: torch.dtype, matmul: MatmulFn = scaled_matmul
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``X̂·X̂ᵀ`` (..., k, k) in ``out_dtype`` for ``x`` (..., k, K), and ``(X̂, its dequant scale)`` for reuse
    by ``polynomial_step``."""
    quantized, scale = quantize_e4m3(x)
    # quantized.mT of a row-major (k, K) is the column-major (K, k) the second operand must be.
    return matmul(quantized, quantized.mT, scale, scale, out_dtype), (quantized, scale)


def polynomial_step(
    x: torch.Tensor,
    gram: torch.Tensor,
    x_quantized: tuple[torch.Tensor, torch.Tensor],
    a: float,
    b: float,
    c: float,
    matmul: MatmulFn = scaled_matmul,
) -> torch.Tensor:
    """One step ``a·X + (b·A + c·A·A)·X`` with its two GEMMs in e4m3; ``x`` and ``gram`` in the compute dtype,
    ``x_quantized`` = ``(X̂, scale)`` from the ``fp8_gram`` that produced ``gram`` (its scale may carry a
    normalization factor). Returns the new X in ``x``'s dtype (contiguous)."""
    out_dtype = x.dtype
    gram_q, gram_scale = quantize_e4m3(gram)
    # A·A with the second operand column-major: a transposed copy (k×k bytes) keeps Q(A)'s values exactly, where
    # the view Q(A).mT would compute Q(A)·Q(A)ᵀ and rely on the computed Gram being bitwise symmetric.
    gram_squared = matmul(gram_q, _column_major(gram_q), gram_scale, gram_scale, out_dtype)
    polynomial = torch.add(gram_squared * c, gram, alpha=b)
    poly_q, poly_scale = quantize_e4m3(polynomial)
    x_q, x_scale = x_quantized
    product = matmul(poly_q, _column_major(x_q), poly_scale, x_scale, out_dtype)
    return torch.add(product, x, alpha=a)


def newton_schulz_fp8_reference(
    x: torch.Tensor,
    triples: Sequence[tuple[float, float, float]],
    fp8_steps: int,
    compute_dtype: torch.dtype = torch.float32,
    safety: float = 1.0,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Readable reference of ``newton_schulz(x, fp8_steps=...)`` for one matrix (m, n), GEMMs emulated.

    ``triples``: the resolved (a, b, c) of each step (``resolve_coefficients``); ``safety`` the normalization
    factor (``NORMALIZATION_SAFETY``). Same rounding points as the fast path; no padding (it changes nothing)."""
    check_fp8_steps(fp8_steps, len(triples), compute_dtype)
    if x.ndim != 2:
        raise ValueError(f"the reference takes one matrix (m, n); got shape {tuple(x.shape)}")
    tall = x.size(0) > x.size(1)
    work = (x.mT if tall else x).to(compute_dtype)  # iterate on the wide orientation: the Gram is k × k
    for step, (a, b, c) in enumerate(triples):
        quantized = None
        if step < fp8_steps:
            gram, quantized = fp8_gram(work, compute_dtype, emulated_scaled_matmul)
        else:
            gram = work @ work.mT
        if step == 0:  # normalize by the Frobenius norm from trace(X·Xᵀ) of the raw input
            inverse_norm = 1.0 / (gram.diagonal().sum(dtype=torch.float32).sqrt() * safety + eps)
            work = work * inverse_norm.to(compute_dtype)
            gram = gram * (inverse_norm * inverse_norm).to(compute_dtype)
            if quantized is not None:
                quantized = (quantized[0], quantized[1] * inverse_norm)
        if step < fp8_steps:
            assert quantized is not None  # set by this step's fp8_gram
            work = polynomial_step(work, gram, quantized, a, b, c, emulated_scaled_matmul)
        else:
            work = a * work + (b * gram + c * gram @ gram) @ work
    return (work.mT if tall else work).to(x.dtype)
