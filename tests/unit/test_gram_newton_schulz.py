"""Gram Newton–Schulz against standard Newton–Schulz: equal in exact arithmetic, so equal to a tight bound in
fp64 / fp32, and in bf16 no further from orthogonal than the standard iteration.

Three kinds of input: Gaussian; gradient-like (rank 8 plus 1 % noise); ill-conditioned (singular values spread
log-uniformly over [1e-6, 1]). The ill-conditioned and low-rank ones are where Gram Newton–Schulz in half
precision loses the small eigenvalues of X·Xᵀ (the Dao-lab blog's "spurious negative eigenvalues").

Measured (128 × 640, 5 steps, quintic / Polar Express, bf16 compute, fp32 k × k iteration, restart after step 2):
orthogonality error Gaussian 0.380 / 0.161 (standard 0.379 / 0.166), low-rank 0.940 / 0.853 (0.936 / 0.845),
ill-conditioned 0.770 / 0.699 (0.767 / 0.691). Without restarts and with a bf16 k × k iteration the low-rank
and ill-conditioned inputs diverge (errors of 60 to 1e11).
"""

from __future__ import annotations

import threading

import pytest
import torch

from megatron_muon.ops.gram_newton_schulz import (
    DEFAULT_GRAM_RESTARTS,
    gram_iteration_flops,
    resolve_gram_restarts,
)
from megatron_muon.ops.newton_schulz import (
    choose_ns_algorithm,
    newton_schulz,
    newton_schulz_flops,
    ns_algorithm_flops,
    orthogonality_error,
)
from tests.unit.test_newton_schulz import ThreadAllReduce, gaussian

CUSTOM = [
    (3.0, -3.2, 1.2),
    (3.4445, -4.775, 2.0315),
    (2.5, -2.0, 0.6),
    (2.0, -1.5, 0.5),
    (1.875, -1.25, 0.375),
]
SCHEDULES = {"quintic": "quintic", "polar_express": "polar_express", "custom": CUSTOM}


def gradient_like(*shape: int, seed: int = 0) -> torch.Tensor:
    """Rank 8 plus 1 % Gaussian noise (momentum of a layer is dominated by a few directions)."""
    generator = torch.Generator().manual_seed(seed)
    *batch, rows, cols = shape
    low_rank = torch.randn(*batch, rows, 8, generator=generator) @ torch.randn(
        *batch, 8, cols, generator=generator
    )
    return low_rank + 0.01 * torch.randn(*shape, generator=generator)


def ill_conditioned(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Singular values log-spaced over [1e-6, 1], random singular vectors."""
    generator = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    left, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator, dtype=torch.float64))
    return (left @ torch.diag(torch.logspace(0, -6, k, dtype=torch.float64)) @ right.T).float()


MATRICES = {
    "gaussian": lambda: gaussian(128, 640, seed=1),
    "gradient_like": lambda: gradient_like(128, 640, seed=2),
    "ill_conditioned": lambda: ill_conditioned(128, 640, seed=3),
    "tall_gradient_like": lambda: gradient_like(480, 96, seed=4),
    "expert_stack": lambda: gradient_like(4, 48, 200, seed=5),
}


def relative_difference(y: torch.Tensor, reference: torch.Tensor) -> float:
    return (
        (torch.linalg.matrix_norm((y - reference).double()) / torch.linalg.matrix_norm(reference.double()))
        .max()
        .item()
    )


# ---------------------------------------------------------------------------------------------------------
# Equal to standard Newton–Schulz in exact arithmetic


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(MATRICES))
@pytest.mark.parametrize("restarts", [(), (2,), (1, 3), (1, 2, 3, 4)])
def test_float64_gram_equals_standard(kind, schedule, restarts):
    x = MATRICES[kind]()
    coefficients = SCHEDULES[schedule]
    standard = newton_schulz(x, 5, coefficients, torch.float64)
    gram = newton_schulz(x, 5, coefficients, torch.float64, algorithm="gram", gram_restarts=restarts)
    # Not 1e-15: the norm is taken in fp32 (``_inverse_norm``), and the two iterations use it differently.
    assert relative_difference(gram, standard) < 1e-6


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_float32_gram_with_default_restarts_equals_standard(kind, schedule):
    x = MATRICES[kind]()
    coefficients = SCHEDULES[schedule]
    standard = newton_schulz(x, 5, coefficients, torch.float32)
    gram = newton_schulz(x, 5, coefficients, torch.float32, algorithm="gram")
    # Measured: <= 5e-5 (fp32 rounding, amplified on the tiny singular values the polynomials blow up).
    assert relative_difference(gram, standard) < 2e-4


def test_more_steps_and_a_long_schedule_still_equal_standard():
    x = gradient_like(64, 320, seed=6)
    standard = newton_schulz(x, 9, "polar_express", torch.float64)
    gram = newton_schulz(x, 9, "polar_express", torch.float64, algorithm="gram", gram_restarts=(3, 6))
    assert relative_difference(gram, standard) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# bf16: no further from orthogonal than standard Newton–Schulz


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_bf16_orthogonality_error_is_within_the_standards(kind, schedule):
    x = MATRICES[kind]()
    coefficients = SCHEDULES[schedule]
    standard = orthogonality_error(newton_schulz(x, 5, coefficients, torch.bfloat16))
    gram = orthogonality_error(newton_schulz(x, 5, coefficients, torch.bfloat16, algorithm="gram"))
    # Measured: at most 1.2 % above standard's (Polar Express, ill-conditioned), below it on half the cases.
    assert (gram <= standard * 1.03 + 1e-3).all(), (gram, standard)


@pytest.mark.parametrize("kind", ["gradient_like", "ill_conditioned"])
def test_bf16_gram_iteration_without_restarts_diverges_which_the_defaults_prevent(kind):
    """Why the defaults are what they are: the naive form (bf16 k × k iteration, no restart) blows up."""
    x = MATRICES[kind]()
    naive = newton_schulz(
        x, 5, "polar_express", torch.bfloat16, algorithm="gram", gram_restarts=(), gram_dtype=torch.bfloat16
    )
    assert orthogonality_error(naive).item() > 10
    for restarts, gram_dtype in (((), None), (DEFAULT_GRAM_RESTARTS, torch.bfloat16)):
        fixed = newton_schulz(
            x,
            5,
            "polar_express",
            torch.bfloat16,
            algorithm="gram",
            gram_restarts=restarts,
            gram_dtype=gram_dtype,
        )
        assert orthogonality_error(fixed).item() < 1.0


# ---------------------------------------------------------------------------------------------------------
# Stacks, shards, layout


def test_stack_equals_the_loop_over_its_matrices():
    x = gradient_like(3, 40, 150, seed=7)
    stacked = newton_schulz(x, 5, "quintic", torch.float32, algorithm="gram")
    for index in range(3):
        single = newton_schulz(x[index], 5, "quintic", torch.float32, algorithm="gram")
        torch.testing.assert_close(stacked[index], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 130), (130, 40), (2, 3, 24, 90)])
def test_output_has_the_input_shape_and_dtype_and_zero_stays_zero(shape, dtype):
    x = gaussian(*shape, dtype=dtype)
    y = newton_schulz(x, 5, algorithm="gram")
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    assert not newton_schulz(torch.zeros(shape, dtype=dtype), 5, algorithm="gram").any()


def run_sharded(shards: list[torch.Tensor], **kwargs) -> tuple[list[torch.Tensor], ThreadAllReduce, list]:
    collective = ThreadAllReduce(len(shards))
    results: list[torch.Tensor | None] = [None] * len(shards)
    reduced_dtypes: list = []
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        reduce = collective.for_rank(rank)

        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            reduced_dtypes.append(tensor.dtype)
            return reduce(tensor)

        try:
            results[rank] = newton_schulz(shards[rank], all_reduce_sum=all_reduce_sum, **kwargs)
        except BaseException as error:
            errors.append(error)
            collective.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results, collective, reduced_dtypes  # type: ignore[return-value]


@pytest.mark.parametrize("restarts", [(), (2,), (1, 3)])
@pytest.mark.parametrize(
    ("shape", "split_dim", "transpose"),
    [((48, 400), -1, False), ((400, 48), -2, True), ((3, 40, 240), -1, False)],
)
def test_sharded_gram_all_reduces_once_per_segment_and_equals_the_whole_matrix(
    shape, split_dim, transpose, restarts
):
    x = gradient_like(*shape, seed=8)
    shards = list(x.chunk(4, dim=split_dim))
    results, collective, dtypes = run_sharded(
        shards,
        steps=5,
        coefficients="polar_express",
        compute_dtype=torch.bfloat16,
        transpose=transpose,
        algorithm="gram",
        gram_restarts=restarts,
    )
    assert collective.calls == [1 + len(restarts)] * 4  # not one per step
    assert set(dtypes) == {torch.float32}  # the Gram travels in fp32, not bf16
    # Rounding moves the amplified noise directions of a gradient-like matrix a lot (a bf16 run differs from
    # another by ~25 % in Frobenius norm), so bf16 is held to the orthogonality of standard Newton–Schulz.
    sharded_error = orthogonality_error(torch.cat(results, dim=split_dim))
    standard_error = orthogonality_error(newton_schulz(x, 5, "polar_express", torch.bfloat16))
    if restarts:  # without a restart the drift costs ~15 % here (fp32 k x k iteration and all)
        assert (sharded_error <= standard_error * 1.03 + 1e-3).all()
    fp32_results, _, _ = run_sharded(
        shards, steps=5, coefficients="polar_express", compute_dtype=torch.float32, transpose=transpose,
        algorithm="gram", gram_restarts=restarts,
    )  # fmt: skip
    standard = newton_schulz(x, 5, "polar_express", torch.float32)
    # Measured: <= 5e-5 with a restart, 7.5e-4 without (fp32 drift over 5 steps, as unsharded).
    assert relative_difference(torch.cat(fp32_results, dim=split_dim), standard) < (
        2e-4 if restarts else 2e-3
    )


def test_auto_on_a_shard_decides_from_the_shards_own_width():
    """A 64 × 1024 matrix in 4 shards of 64 × 256: Gram (256/64 > 1.5); in 16 shards of 64 × 64: standard."""
    for shards, expected_calls in ((4, 2), (16, 5)):
        pieces = list(gaussian(64, 1024, seed=9).chunk(shards, dim=-1))
        _, collective, _ = run_sharded(
            pieces, steps=5, compute_dtype=torch.float32, transpose=False, algorithm="auto"
        )
        assert collective.calls == [expected_calls] * shards


# ---------------------------------------------------------------------------------------------------------
# FLOPs and the choice by cost


def test_flops_formula_counts_each_segment():
    k, big = 64, 640
    one_restart = 2 * 4 * k * k * big + (8 * 5 - 6 * 2) * k**3
    assert gram_iteration_flops(k, big, 5, (2,)) == one_restart
    assert ns_algorithm_flops(big, k, 5, "gram") == one_restart  # tall: the same
    # Restarting after every step does the standard iteration's FLOPs exactly.
    assert gram_iteration_flops(k, big, 5, (1, 2, 3, 4)) == newton_schulz_flops(k, big, 5)
    assert ns_algorithm_flops(k, big, 5, "standard") == newton_schulz_flops(k, big, 5)
    assert ns_algorithm_flops(k, big, 5, "auto") == min(one_restart, newton_schulz_flops(k, big, 5))
    # A shard of the distributed mode: the K-long work is divided, the k × k work is not.
    assert ns_algorithm_flops(k, big, 5, "gram", shards=4) == 2 * 4 * k * k * big / 4 + 28 * k**3


@pytest.mark.parametrize(
    ("shape", "shards", "expected"),
    [
        ((2048, 11059), 1, "gram"),  # DeepSpeed's first benchmark shape
        ((3584, 19353), 1, "gram"),
        ((7168, 2048), 1, "gram"),  # Kimi-K2 expert: tall, aspect 3.5
        ((2048, 1408), 1, "standard"),  # Moonlight expert: aspect 1.45
        ((4096, 4096), 1, "standard"),
        ((128, 4096), 1, "gram"),  # one attention head's slice
        ((1024, 4096), 4, "standard"),  # its TP shards are 1024 x 1024: nothing to gain on them
        ((1024, 8192), 4, "gram"),
    ],
)
def test_auto_picks_gram_when_it_does_fewer_flops(shape, shards, expected):
    assert choose_ns_algorithm(*shape, 5, shards=shards) == expected
    standard = ns_algorithm_flops(*shape, 5, "standard", shards=shards)
    gram = ns_algorithm_flops(*shape, 5, "gram", shards=shards)
    assert (gram < standard) == (expected == "gram")


def test_explicit_algorithms_are_kept_whatever_the_shape():
    assert choose_ns_algorithm(64, 64, 5, "gram") == "gram"
    assert choose_ns_algorithm(64, 6400, 5, "standard") == "standard"


# ---------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("restarts", [(5,), (0,), (3, 2), (2, 2), (True,), (2.0,)])
def test_bad_restart_schedules_name_the_valid_range(restarts):
    with pytest.raises(ValueError, match=r"restarts=.*steps=5.*\[1, 4\]"):
        resolve_gram_restarts(restarts, 5)
    with pytest.raises(ValueError, match="restarts="):
        newton_schulz(gaussian(8, 32), 5, algorithm="gram", gram_restarts=restarts)


def test_default_restart_is_longer_than_two_steps():
    with pytest.raises(ValueError, match=r"restarts=\[2\] with steps=2"):
        newton_schulz(gaussian(8, 32), 2, algorithm="gram")
    newton_schulz(gaussian(8, 32), 2, algorithm="gram", gram_restarts=())


def test_unknown_algorithm_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"'fast'.*\['auto', 'standard', 'gram'\]"):
        newton_schulz(gaussian(8, 32), 5, algorithm="fast")
    with pytest.raises(ValueError, match="'fast'"):
        choose_ns_algorithm(8, 32, 5, "fast")


def test_fp8_steps_need_the_standard_algorithm():
    with pytest.raises(ValueError, match="fp8_steps=1 runs with algorithm='standard' only"):
        newton_schulz(gaussian(8, 32), 5, algorithm="gram", fp8_steps=1)
