"""Loss against compute: the compute-optimal frontier of a set of runs, a power law fitted to it, and the compute one
optimizer needs at the loss another reaches (the reading of Moonlight, "Muon is Scalable", §3.2 / Figure 3).

Pure functions of (compute, loss) points; ``bench/compute_multiplier.py`` runs the study that feeds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Point = tuple[float, float]
"""(compute in FLOPs, validation loss in nats/token)."""


def frontier(points: Sequence[Point]) -> list[Point]:
    """The compute-optimal frontier: the points no other point beats with less or equal compute, by compute.

    A point is on it when its loss is below that of every point with less compute (model sizes and budgets mixed:
    at a given compute the best size wins). Points with a non-finite loss (diverged runs) are left out."""
    kept: list[Point] = []
    for compute, loss in sorted((c, loss) for c, loss in points if math.isfinite(loss) and c > 0):
        if not kept or loss < kept[-1][1]:  # at equal compute the lower loss comes first and wins
            kept.append((compute, loss))
    return kept


@dataclass(frozen=True, slots=True)
class PowerLaw:
    """L(C) = a · C^(−alpha), fitted by least squares in log–log space."""

    a: float
    alpha: float
    points: int
    """How many points it was fitted to."""

    def loss(self, compute: float) -> float:
        """The fitted loss at ``compute``."""
        return float(self.a * compute ** (-self.alpha))

    def compute(self, loss: float) -> float:
        """The compute at which the fitted law reaches ``loss``."""
        return float((loss / self.a) ** (-1.0 / self.alpha))


def fit_power_law(points: Sequence[Point]) -> PowerLaw:
    """Least-squares line through (log C, log L). Raises ``ValueError`` below 2 points, with one compute only, or
    when the loss does not fall with compute (alpha ≤ 0: no law to invert)."""
    if len(points) < 2:
        raise ValueError(f"a power law needs >= 2 points, got {len(points)}")
    xs = [math.log(c) for c, _ in points]
    ys = [math.log(loss) for _, loss in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a power law needs points at two computes at least")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope >= 0:
        raise ValueError(f"the loss does not fall with compute (log-log slope {slope:.4f})")
    return PowerLaw(a=math.exp(mean_y - slope * mean_x), alpha=-slope, points=len(points))


def interpolated_compute(points: Sequence[Point], loss: float) -> float | None:
    """The compute at which the frontier ``points`` (by compute, loss falling) reaches ``loss``, linear in
    (log C, log L) between its neighbours; ``None`` outside the frontier's loss range (no extrapolation)."""
    for (c0, l0), (c1, l1) in zip(points, points[1:], strict=False):
        if l1 <= loss <= l0:
            if l0 == l1:
                return c0
            t = (math.log(loss) - math.log(l0)) / (math.log(l1) - math.log(l0))
            return math.exp(math.log(c0) + t * (math.log(c1) - math.log(c0)))
    if len(points) == 1 and points[0][1] == loss:
        return points[0][0]
    return None


def shared_losses(first: Sequence[Point], second: Sequence[Point], count: int = 3) -> list[float]:
    """``count`` losses spread evenly in log space over the range both frontiers cover (empty when they do not
    overlap): where a compute ratio is read without extrapolating either."""
    if not first or not second:
        return []
    low = max(min(loss for _, loss in first), min(loss for _, loss in second))
    high = min(max(loss for _, loss in first), max(loss for _, loss in second))
    if low > high:
        return []
    if count == 1 or low == high:
        return [math.sqrt(low * high)]
    step = (math.log(high) - math.log(low)) / (count - 1)
    inner = [math.exp(math.log(high) - k * step) for k in range(1, count - 1)]
    return [high, *inner, low]  # the ends exactly: both frontiers reach them


@dataclass(frozen=True, slots=True)
class ComputeRatio:
    """How much compute the candidate needs at one loss, relative to the baseline."""

    loss: float
    fitted: float
    """C_candidate(L) / C_baseline(L) from the two fitted power laws."""
    interpolated: float | None
    """The same from the frontiers themselves (log–log interpolation; None where either does not reach L)."""


def compute_ratios(
    baseline: Sequence[Point], candidate: Sequence[Point], losses: Sequence[float]
) -> tuple[PowerLaw, PowerLaw, list[ComputeRatio]]:
    """Fit both frontiers and compare them at ``losses``: C_candidate / C_baseline (< 1: the candidate is cheaper;
    1 / ratio is its compute multiplier)."""
    base_law, cand_law = fit_power_law(baseline), fit_power_law(candidate)
    ratios = []
    for loss in losses:
        base_c, cand_c = interpolated_compute(baseline, loss), interpolated_compute(candidate, loss)
        ratios.append(
            ComputeRatio(
                loss=loss,
                fitted=cand_law.compute(loss) / base_law.compute(loss),
                interpolated=None if base_c is None or cand_c is None else cand_c / base_c,
            )
        )
    return base_law, cand_law, ratios
