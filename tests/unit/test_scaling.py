"""Update scale rules: each mode's formula and its errors."""

from __future__ import annotations

import math

import pytest

from megatron_muon.ops.scaling import SCALE_MODES, update_scale


@pytest.mark.parametrize(
    ("fan_out", "fan_in", "expected"),
    [(1024, 1024, 1.0), (4096, 1024, 2.0), (1024, 4096, 0.5), (3, 12, 0.5)],
)
def test_spectral_is_sqrt_fan_out_over_fan_in(fan_out, fan_in, expected):
    assert update_scale("spectral", fan_out, fan_in) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("fan_out", "fan_in", "expected"),
    [(1024, 1024, 0.2 * 32), (4096, 1024, 0.2 * 64), (1024, 4096, 0.2 * 64), (25, 4, 1.0)],
)
def test_moonlight_is_0_2_sqrt_of_the_larger_fan(fan_out, fan_in, expected):
    assert update_scale("moonlight", fan_out, fan_in) == pytest.approx(expected)


def test_moonlight_gives_an_update_rms_of_0_2():
    # U·Vᵀ of a (fan_out, fan_in) matrix has min(fan_out, fan_in) unit singular values, so RMS 1/√max.
    fan_out, fan_in = 768, 3072
    rms_of_polar_factor = math.sqrt(min(fan_out, fan_in) / (fan_out * fan_in))
    assert update_scale("moonlight", fan_out, fan_in) * rms_of_polar_factor == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("fan_out", "fan_in", "expected"),
    [(1024, 1024, 1.0), (4096, 1024, 2.0), (1024, 4096, 1.0), (18, 2, 3.0)],
)
def test_shape_enlarges_only_tall_matrices(fan_out, fan_in, expected):
    assert update_scale("shape", fan_out, fan_in) == pytest.approx(expected)


@pytest.mark.parametrize(("fan_out", "fan_in"), [(1, 1), (4096, 1024), (7, 5000)])
def test_none_is_one(fan_out, fan_in):
    assert update_scale("none", fan_out, fan_in) == 1.0


def test_every_listed_mode_is_accepted_and_returns_a_float():
    for mode in SCALE_MODES:
        assert isinstance(update_scale(mode, 64, 32), float)


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'unit_rms_norm'.*spectral.*moonlight.*shape.*none"):
        update_scale("unit_rms_norm", 64, 64)


@pytest.mark.parametrize(
    ("fan_out", "fan_in", "bad"), [(0, 4, "fan_out=0"), (4, -2, "fan_in=-2"), (4, 2.0, "fan_in=2.0")]
)
def test_non_positive_or_non_integer_fans_are_rejected(fan_out, fan_in, bad):
    with pytest.raises(ValueError, match=bad):
        update_scale("spectral", fan_out, fan_in)
