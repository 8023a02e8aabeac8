"""Newton–Schulz orthogonalization against the exact polar factor, and its sharded path against its unsharded one.

Bands below were measured on Gaussian matrices (float64 reference): quintic 5 steps puts the singular values
of a matrix with aspect ratio >= 2 in [0.682, 1.134] (bf16: [0.679, 1.139]); Polar Express 5 steps in
[0.870, 1.124]. Each test band adds a margin of about 0.02.
"""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_muon.ops.newton_schulz import (
    COEFFICIENT_SCHEDULES,
    newton_schulz,
    newton_schulz_flops,
    orthogonality_error,
    resolve_coefficients,
)

QUINTIC_BAND = (0.66, 1.16)
POLAR_EXPRESS_BAND = (0.85, 1.14)


def exact_polar_factor(x: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ of the reduced SVD, in float64, per matrix of a stack."""
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


def gaussian(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def relative_polar_error(y: torch.Tensor, x: torch.Tensor) -> float:
    """‖Y − U·Vᵀ‖_F / ‖U·Vᵀ‖_F."""
    reference = exact_polar_factor(x)
    return (
        (torch.linalg.matrix_norm(y.double() - reference) / torch.linalg.matrix_norm(reference)).max().item()
    )


# ---------------------------------------------------------------------------------------------------------
# Accuracy against the SVD


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 128), (128, 256), (256, 64), (96, 384), (4, 64, 160)])
@pytest.mark.parametrize(
    ("coefficients", "band"), [("quintic", QUINTIC_BAND), ("polar_express", POLAR_EXPRESS_BAND)]
)
def test_singular_values_land_in_the_schedule_band_for_well_conditioned_inputs(
    shape, compute_dtype, coefficients, band
):
    x = gaussian(*shape)
    values = singular_values(newton_schulz(x, 5, coefficients, compute_dtype))
    assert values.min().item() >= band[0], values.min()
    assert values.max().item() <= band[1], values.max()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [128, 256])
def test_square_gaussian_keeps_tiny_singular_values_small_but_puts_the_top_ones_in_band(size, compute_dtype):
    # A square Gaussian has σ_min ≈ 0 (relative to ‖X‖_F ≈ size, σ_min is ~1/size): 5 quintic steps
    # cannot lift those, which is all the schedule promises. The top 90% must be in band.
    x = gaussian(size, size, seed=1)
    values = singular_values(newton_schulz(x, 5, "quintic", compute_dtype))
    assert values.min().item() < 0.5
    top = values[: int(0.9 * size)]
    assert top.min().item() >= QUINTIC_BAND[0]
    assert top.max().item() <= 1.22  # the 5-step image of [0.01, 1] is [0.68, 1.21]


@pytest.mark.parametrize("shape", [(64, 128), (200, 80), (3, 48, 96)])
def test_polar_express_is_closer_to_the_polar_factor_than_quintic(shape):
    x = gaussian(*shape, seed=2)
    quintic = relative_polar_error(newton_schulz(x, 5, "quintic", torch.float32), x)
    polar_express = relative_polar_error(newton_schulz(x, 5, "polar_express", torch.float32), x)
    # measured: quintic ≈ 0.21, Polar Express ≈ 0.085
    assert polar_express < 0.6 * quintic, (polar_express, quintic)
    assert polar_express < 0.1


def test_polar_express_converges_to_the_polar_factor_with_more_steps():
    x = gaussian(96, 192, seed=3, dtype=torch.float64)
    y = newton_schulz(x, 10, "polar_express", torch.float64)
    assert relative_polar_error(y, x) < 1e-6
    assert orthogonality_error(y).item() < 1e-6


def test_quintic_does_not_converge_to_the_polar_factor():
    # The quintic overshoots by design; more steps keep its singular values cycling in [0.68, 1.14].
    x = gaussian(96, 192, seed=3, dtype=torch.float64)
    assert relative_polar_error(newton_schulz(x, 20, "quintic", torch.float64), x) > 0.1


def test_fp32_and_bf16_compute_agree_to_bf16_precision():
    x = gaussian(128, 320, seed=4)
    fp32 = newton_schulz(x, 5, "quintic", torch.float32)
    bf16 = newton_schulz(x, 5, "quintic", torch.bfloat16)
    assert relative_polar_error(fp32, x) == pytest.approx(relative_polar_error(bf16, x), abs=5e-3)
    assert (torch.linalg.matrix_norm(fp32 - bf16) / torch.linalg.matrix_norm(fp32)).item() < 0.05


def test_explicit_coefficients_are_used_step_by_step():
    # The convergent Newton–Schulz quintic (15x − 10x³ + 3x⁵)/8, written out as an explicit list.
    x = gaussian(32, 64, seed=5, dtype=torch.float64)
    explicit = [(15 / 8, -10 / 8, 3 / 8)] * 30
    y = newton_schulz(x, 30, explicit, torch.float64)
    assert relative_polar_error(y, x) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# Shapes, dtypes, stacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(48, 48), (32, 80), (80, 32), (2, 3, 40, 24)])
def test_output_has_the_input_shape_and_dtype(shape, dtype):
    x = gaussian(*shape).to(dtype)
    y = newton_schulz(x, 3, "quintic", torch.float32)
    assert y.shape == x.shape
    assert y.dtype == dtype
    assert y.is_contiguous()


def test_input_is_not_modified():
    x = gaussian(40, 24, seed=6)
    before = x.clone()
    newton_schulz(x, 5, "quintic", torch.float32)
    assert torch.equal(x, before)


@pytest.mark.parametrize("shape", [(8, 40, 72), (8, 72, 40), (2, 4, 32, 32)])
def test_stack_equals_the_loop_over_its_matrices(shape):
    x = gaussian(*shape, seed=7)
    batched = newton_schulz(x, 5, "polar_express", torch.float32)
    flat = x.reshape(-1, *shape[-2:])
    looped = torch.stack([newton_schulz(matrix, 5, "polar_express", torch.float32) for matrix in flat])
    torch.testing.assert_close(batched, looped.reshape(shape), rtol=1e-5, atol=1e-5)


def test_stack_normalizes_each_matrix_by_its_own_norm():
    x = gaussian(3, 32, 64, seed=8) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]
    y = newton_schulz(x, 5, "quintic", torch.float32)
    for index in range(3):
        values = singular_values(y[index])
        assert QUINTIC_BAND[0] <= values.min().item() and values.max().item() <= QUINTIC_BAND[1]


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_transposed_input_gives_the_transposed_output(coefficients):
    x = gaussian(48, 112, seed=9)
    torch.testing.assert_close(
        newton_schulz(x.T, 5, coefficients, torch.float32),
        newton_schulz(x, 5, coefficients, torch.float32).T,
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("shape", [(16, 16), (16, 40), (3, 40, 16)])
def test_zero_matrix_returns_zeros(shape):
    y = newton_schulz(torch.zeros(shape), 5, "polar_express", torch.bfloat16)
    assert torch.equal(y, torch.zeros(shape))


def test_zero_matrix_in_a_stack_leaves_the_others_untouched():
    x = gaussian(3, 24, 48, seed=10)
    x[1] = 0
    y = newton_schulz(x, 5, "quintic", torch.float32)
    assert torch.equal(y[1], torch.zeros(24, 48))
    torch.testing.assert_close(y[0], newton_schulz(x[0], 5, "quintic", torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-4, 1e12])
def test_result_does_not_depend_on_the_input_scale(scale):
    # eps=1e-7 is absolute (as in Keller Jordan's Muon): it must stay small next to ‖X‖_F ≈ 55·scale.
    x = gaussian(32, 96, seed=11)
    torch.testing.assert_close(
        newton_schulz(x * scale, 5, "quintic", torch.float32),
        newton_schulz(x, 5, "quintic", torch.float32),
        rtol=1e-4,
        atol=1e-4,
    )


# ---------------------------------------------------------------------------------------------------------
# Sharded path: threads stand in for ranks, a barrier for the collective


class ThreadAllReduce:
    """Sum tensors across ``world_size`` threads in place, like torch.distributed.all_reduce(SUM)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.calls = [0] * world_size

    def for_rank(self, rank: int):
        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            # Every rank adds the shards in rank order, so all ranks get bitwise the same sum.
            total = self.slots[0].clone()
            for other in self.slots[1:]:
                total += other
            self.barrier.wait()  # nobody overwrites a slot before everybody has read them all
            return tensor.copy_(total)

        return all_reduce_sum


def run_sharded(shards: list[torch.Tensor], **kwargs) -> tuple[list[torch.Tensor], list[int]]:
    collective = ThreadAllReduce(len(shards))
    results: list[torch.Tensor | None] = [None] * len(shards)
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = newton_schulz(shards[rank], all_reduce_sum=collective.for_rank(rank), **kwargs)
        except BaseException as error:  # surfaced below; a dead rank would otherwise hang the barrier
            errors.append(error)
            collective.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results, collective.calls


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize(
    ("shape", "split_dim", "transpose"),
    [
        ((48, 160), -1, False),  # wide: columns (the long side) are split
        ((160, 48), -2, True),  # tall: rows are split, each shard is transposed
        ((4, 40, 120), -1, False),  # a stack of wide expert matrices
        ((4, 120, 40), -2, True),  # a stack of tall expert matrices
    ],
)
@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_path_equals_the_unsharded_result(shape, split_dim, transpose, coefficients, world_size):
    steps = 5
    x = gaussian(*shape, seed=12)
    shards = list(x.chunk(world_size, dim=split_dim))
    results, calls = run_sharded(
        shards, steps=steps, coefficients=coefficients, compute_dtype=torch.float32, transpose=transpose
    )
    expected = newton_schulz(x, steps, coefficients, torch.float32)
    torch.testing.assert_close(torch.cat(results, dim=split_dim), expected, rtol=1e-4, atol=1e-5)
    # One collective per step: the first Gram also yields the norm.
    assert calls == [steps] * world_size


def test_sharded_path_with_uneven_shards_and_bf16():
    x = gaussian(40, 150, seed=13)
    shards = [x[:, :30], x[:, 30:100], x[:, 100:]]
    results, _ = run_sharded(
        shards, steps=5, coefficients="quintic", compute_dtype=torch.bfloat16, transpose=False
    )
    expected = newton_schulz(x, 5, "quintic", torch.bfloat16)
    # bf16 Grams are rounded before and after the sum, so agreement is to bf16 precision only.
    difference = torch.linalg.matrix_norm(torch.cat(results, dim=-1) - expected) / torch.linalg.matrix_norm(
        expected
    )
    assert difference.item() < 0.03


def test_single_rank_all_reduce_is_the_unsharded_path():
    x = gaussian(64, 24, seed=14)
    calls = []

    def identity_sum(tensor):
        calls.append(tuple(tensor.shape))
        return tensor

    y = newton_schulz(x, 4, "polar_express", torch.float32, all_reduce_sum=identity_sum, transpose=True)
    assert torch.equal(y, newton_schulz(x, 4, "polar_express", torch.float32))
    assert calls == [(24, 24)] * 4  # the Gram is on the small side


# ---------------------------------------------------------------------------------------------------------
# Coefficients, FLOPs, orthogonality error, bad inputs


def test_polar_express_schedule_applies_the_papers_safety_factor():
    published_first = (8.28721201814563, -23.595886519098837, 17.300387312530933)
    first = COEFFICIENT_SCHEDULES["polar_express"][0]
    assert first == pytest.approx(
        (published_first[0] / 1.01, published_first[1] / 1.01**3, published_first[2] / 1.01**5)
    )
    assert COEFFICIENT_SCHEDULES["polar_express"][-1] == (1.875, -1.25, 0.375)


def test_schedules_longer_than_published_repeat_the_last_triple():
    triples = resolve_coefficients("polar_express", 12)
    assert len(triples) == 12
    assert triples[7:] == ((1.875, -1.25, 0.375),) * 5
    assert resolve_coefficients("quintic", 3) == ((3.4445, -4.7750, 2.0315),) * 3


def test_orthogonality_error_measures_the_gram_deviation():
    q, _ = torch.linalg.qr(gaussian(64, 32, seed=15, dtype=torch.float64))
    assert orthogonality_error(q).item() < 1e-12
    assert orthogonality_error(q.T).item() < 1e-12
    # Singular values all 2: ‖4I − I‖_F/√k = 3.
    assert orthogonality_error(2 * q).item() == pytest.approx(3.0)
    stack = torch.stack([q, 2 * q, 0 * q])
    errors = orthogonality_error(stack)
    assert errors.shape == (3,)
    assert errors.tolist() == pytest.approx([0.0, 3.0, 1.0], abs=1e-12)


def test_flops_formula():
    # k = 64, K = 256, 5 steps: 5·(4·64²·256 + 2·64³)
    assert newton_schulz_flops(64, 256, 5) == 5 * (4 * 64 * 64 * 256 + 2 * 64**3)
    assert newton_schulz_flops(256, 64, 5) == newton_schulz_flops(64, 256, 5)
    assert newton_schulz_flops(100, 100, 1) == 6 * 100**3
    with pytest.raises(ValueError, match="steps=0"):
        newton_schulz_flops(4, 4, 0)


def test_unknown_schedule_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'cubic'.*polar_express.*quintic"):
        newton_schulz(gaussian(8, 8), coefficients="cubic")


def test_explicit_list_of_the_wrong_length_names_both_lengths():
    with pytest.raises(ValueError, match="got 2 triples for steps=5"):
        newton_schulz(gaussian(8, 8), 5, [(3.0, -3.0, 1.0), (2.0, -1.0, 0.5)])


def test_malformed_triple_is_rejected():
    with pytest.raises(ValueError, match=r"coefficients\[1\]"):
        resolve_coefficients([(3.0, -3.0, 1.0), (2.0, -1.0)], 2)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_bad_steps_are_rejected(steps):
    with pytest.raises(ValueError, match="steps="):
        newton_schulz(gaussian(8, 8), steps)


def test_vector_input_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        newton_schulz(gaussian(8))


def test_integer_input_is_rejected():
    with pytest.raises(ValueError, match="floating point"):
        newton_schulz(torch.ones(4, 4, dtype=torch.int64))


def test_sharded_call_requires_an_explicit_transpose():
    with pytest.raises(ValueError, match="transpose must be given"):
        newton_schulz(gaussian(8, 16), all_reduce_sum=lambda tensor: tensor)
