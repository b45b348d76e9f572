"""Summary statistics: mean/sd over seeds, paired differences with their t, gap closed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = [
    "GAP_MIN",
    "Paired",
    "coefficient_stats",
    "gap_closed",
    "mean_sd",
    "paired",
]

#: The joint -> ensemble gap (accuracy, fraction) below which "gap closed" is reported as n/a.
GAP_MIN = 0.01
_RELATIVE_TOL = 1e-9


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (``n - 1``; NaN for one value)."""
    mean = statistics.fmean(xs)
    return mean, statistics.stdev(xs) if len(xs) > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    """Paired difference ``b - a`` over seeds: mean, sd, n and ``t = mean / (sd / sqrt(n))``."""

    mean: float
    sd: float
    n: int
    t: float


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t statistic of ``b - a`` (df = n - 1).

    ``t`` is NaN for a single pair, ``+-inf`` when every difference is the same non-zero value
    and 0 when every difference is 0 (equal up to float rounding counts as equal).
    """
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(mean, math.nan, len(d), math.nan)
    sd = statistics.stdev(d)
    if sd > _RELATIVE_TOL * max(1.0, abs(mean)):  # below: identical differences up to rounding
        t = mean / (sd / math.sqrt(len(d)))
    else:
        sd = 0.0
        t = 0.0 if abs(mean) <= _RELATIVE_TOL else math.copysign(math.inf, mean)
    return Paired(mean, sd, len(d), t)


def gap_closed(acc: float, joint: float, ensemble: float, minimum: float = GAP_MIN) -> float:
    """``(acc - joint) / (ensemble - joint)``, NaN ("n/a") unless the gap is at least ``minimum``.

    1 means the method reaches the ensemble, 0 means no better than joint training, negative
    means worse than joint training.
    """
    gap = ensemble - joint
    if not gap >= minimum:
        return math.nan
    return (acc - joint) / gap


def coefficient_stats(coeffs: Tensor, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean, sd (over steps, ``n - 1``), min and max of each modality's ``[steps, M]`` factors."""
    out: dict[str, dict[str, float]] = {}
    for i, m in enumerate(names):
        c = coeffs[:, i].double()
        sd = float(c.std()) if c.numel() > 1 else math.nan
        out[m] = {"mean": float(c.mean()), "sd": sd, "min": float(c.min()), "max": float(c.max())}
    return out
