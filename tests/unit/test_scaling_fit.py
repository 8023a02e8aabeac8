"""The compute-optimal frontier, its power-law fit and the compute ratio at equal loss (bench/scaling_fit.py)."""

from __future__ import annotations

import math

import pytest

from megatron_muon.bench.scaling_fit import (
    compute_ratios,
    fit_power_law,
    frontier,
    interpolated_compute,
    shared_losses,
)


def test_the_frontier_keeps_only_points_no_cheaper_point_beats():
    points = [(4.0, 5.0), (1.0, 6.0), (2.0, 6.5), (2.0, 5.5), (8.0, 5.2), (16.0, math.inf), (16.0, 4.0)]
    # (2, 6.5) loses to (2, 5.5); (8, 5.2) to (4, 5.0); the diverged run is dropped.
    assert frontier(points) == [(1.0, 6.0), (2.0, 5.5), (4.0, 5.0), (16.0, 4.0)]


def test_a_power_law_is_recovered_and_inverted():
    law = fit_power_law([(c, 10.0 * c**-0.1) for c in (1e9, 1e10, 1e11, 1e12)])
    assert law.a == pytest.approx(10.0) and law.alpha == pytest.approx(0.1) and law.points == 4
    assert law.compute(law.loss(3e10)) == pytest.approx(3e10)


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([(1.0, 5.0)], ">= 2 points"),
        ([(1.0, 5.0), (1.0, 4.0)], "two computes"),
        ([(1.0, 4.0), (2.0, 5.0)], "does not fall"),
    ],
)
def test_a_power_law_refuses_what_it_cannot_invert(points, message):
    with pytest.raises(ValueError, match=message):
        fit_power_law(points)


def test_interpolation_is_log_log_linear_and_never_extrapolates():
    edge = [(1.0, 8.0), (4.0, 2.0)]
    assert interpolated_compute(edge, 8.0) == 1.0 and interpolated_compute(edge, 2.0) == 4.0
    assert interpolated_compute(edge, 4.0) == pytest.approx(2.0)  # half-way in log L: half-way in log C
    assert interpolated_compute(edge, 9.0) is None and interpolated_compute(edge, 1.9) is None


def test_shared_losses_span_what_both_frontiers_cover_with_exact_ends():
    first, second = [(1.0, 6.0), (2.0, 5.0)], [(1.0, 5.5), (2.0, 4.0)]
    losses = shared_losses(first, second, 3)
    assert losses[0] == 5.5 and losses[-1] == 5.0 and 5.0 < losses[1] < 5.5
    assert shared_losses([(1.0, 6.0), (2.0, 5.0)], [(1.0, 4.0), (2.0, 3.0)]) == []


def test_a_candidate_that_needs_half_the_compute_reads_one_half_everywhere():
    baseline = [(c, 10.0 * c**-0.1) for c in (1e9, 1e10, 1e11, 1e12)]
    candidate = [(c / 2, loss) for c, loss in baseline]  # every loss at half the compute
    base_law, cand_law, ratios = compute_ratios(baseline, candidate, shared_losses(baseline, candidate, 3))
    assert base_law.alpha == pytest.approx(cand_law.alpha)
    assert len(ratios) == 3
    for ratio in ratios:
        assert ratio.fitted == pytest.approx(0.5) and ratio.interpolated == pytest.approx(0.5)
