"""FP8 Newton–Schulz on the GPU (``torch._scaled_mm`` through cuBLASLt): against the emulated reference, and what
it costs in orthogonality and distance from fp32 NS next to bf16 NS, at the sizes Muon sees. The CPU twins of
these tests (torch's CPU ``_scaled_mm``) are in tests/unit/test_newton_schulz_fp8.py; the bounds here are theirs
at 512×512 and up (FP8 rounding averages out over the long side)."""

from __future__ import annotations

import pytest
import torch

from megatron_muon.ops import newton_schulz_fp8 as fp8
from megatron_muon.ops.newton_schulz import (
    NORMALIZATION_SAFETY,
    newton_schulz,
    orthogonality_error,
    resolve_coefficients,
)


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    # fp32 references must be fp32: TF32 would round them to 10 mantissa bits.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=generator, device="cuda")


def relative_distance(y: torch.Tensor, reference: torch.Tensor) -> float:
    difference = torch.linalg.matrix_norm(y.double() - reference.double())
    return (difference / torch.linalg.matrix_norm(reference.double())).max().item()


@pytest.mark.parametrize("shape", [(256, 512, 1024), (3, 128, 256, 512)])
def test_cublas_fp8_gemm_equals_the_fp32_emulation(fp8_gpu, shape):
    *batch, m, k, n = shape
    a, scale_a = fp8.quantize_e4m3(gaussian(*batch, m, k, seed=1))
    b_rows, scale_b = fp8.quantize_e4m3(gaussian(*batch, n, k, seed=2))
    b = b_rows.mT  # column-major, as _scaled_mm wants
    for out_dtype in (torch.float32, torch.bfloat16):
        fast = fp8.scaled_matmul(a, b, scale_a, scale_b, out_dtype)
        emulated = fp8.emulated_scaled_matmul(a, b, scale_a, scale_b, out_dtype)
        tolerance = 1e-5 if out_dtype == torch.float32 else 2e-2  # bf16 output: one bf16 rounding
        torch.testing.assert_close(
            fast.float(), emulated.float(), rtol=tolerance, atol=tolerance * emulated.abs().max().item()
        )


@pytest.mark.parametrize(
    "shape", [(1024, 4096), (4096, 1024), (1000, 3000)]
)  # 1000×3000: padded to 1008×3008
@pytest.mark.parametrize(
    ("coefficients", "fp8_steps"), [("quintic", 1), ("quintic", 2), ("polar_express", 1)]
)
def test_cuda_fp8_newton_schulz_matches_the_emulated_reference(fp8_gpu, shape, coefficients, fp8_steps):
    x = gaussian(*shape, seed=3)
    fast = newton_schulz(x, 5, coefficients, torch.float32, fp8_steps=fp8_steps)
    reference = fp8.newton_schulz_fp8_reference(
        x, resolve_coefficients(coefficients, 5), fp8_steps, torch.float32, NORMALIZATION_SAFETY[coefficients]
    )
    # Same e4m3 values and scales; cuBLAS sums in another order, which can flip a rare e4m3 rounding.
    assert relative_distance(fast, reference) < 1e-3


@pytest.mark.parametrize("shape", [(1024, 1024), (1024, 4096), (4096, 1024), (16, 512, 1024)])
@pytest.mark.parametrize("fp8_steps", [1, 2])
def test_fp8_newton_schulz_costs_about_what_bf16_does(fp8_gpu, shape, fp8_steps):
    x = gaussian(*shape, seed=4)
    fp32 = newton_schulz(x, 5, "quintic", torch.float32)
    bf16 = newton_schulz(x, 5, "quintic", torch.bfloat16)
    with_fp8 = newton_schulz(x, 5, "quintic", torch.bfloat16, fp8_steps=fp8_steps)
    bf16_distance, fp8_distance = relative_distance(bf16, fp32), relative_distance(with_fp8, fp32)
    bf16_error = orthogonality_error(bf16, torch.float32).max().item()
    fp8_error = orthogonality_error(with_fp8, torch.float32).max().item()
    print(
        f"{shape} fp8_steps={fp8_steps}: distance to fp32 NS bf16 {bf16_distance:.4f} fp8 {fp8_distance:.4f}; "
        f"orthogonality error bf16 {bf16_error:.4f} fp8 {fp8_error:.4f}"
    )
    # CPU, 512×512: bf16 0.0110, two FP8 steps 0.0114 (tests/unit/test_newton_schulz_fp8.py).
    assert fp8_distance < 2 * bf16_distance + 0.005
    assert fp8_error < bf16_error + 0.02


def test_a_gpu_without_fp8_is_refused_in_one_line():
    device = torch.device("cuda", torch.cuda.current_device())
    if fp8.fp8_unavailable_reason(device) is None:
        pytest.skip(f"{torch.cuda.get_device_name(device)} has FP8; the refusal is for older GPUs")
    with pytest.raises(RuntimeError, match="needs compute capability >= 8.9") as error:
        newton_schulz(gaussian(64, 128), 5, fp8_steps=1)
    assert "\n" not in str(error.value)
