"""Summary statistics: mean/sd over seeds, paired t tests (``scipy.stats``), gap closed."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as scipy_stats
from torch import Tensor

__all__ = [
    "CONFIDENCE",
    "GAP_MIN",
    "Paired",
    "coefficient_stats",
    "gap_closed",
    "mean_sd",
    "paired",
]

#: The joint -> ensemble gap (accuracy, fraction) below which "gap closed" is reported as n/a.
GAP_MIN = 0.01
#: Confidence level of the interval reported for a paired mean difference.
CONFIDENCE = 0.95
_RELATIVE_TOL = 1e-9


def mean_sd(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (``n - 1``; NaN for one value)."""
    mean = statistics.fmean(xs)
    return mean, statistics.stdev(xs) if len(xs) > 1 else math.nan


@dataclass(frozen=True)
class Paired:
    """Paired difference ``b - a`` over seeds and its paired t test (df = n - 1).

    ``mean`` and ``sd`` (``n - 1``) describe the differences; ``t = mean / (sd / sqrt(n))``,
    ``p`` is its two-sided p-value and ``ci`` the :data:`CONFIDENCE` confidence interval
    ``(low, high)`` of the mean difference, ``mean -+ t_crit * sd / sqrt(n)``.
    """

    mean: float
    sd: float
    n: int
    t: float
    p: float
    ci: tuple[float, float]


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired t test of ``b - a`` with ``scipy.stats.ttest_rel`` (two-sided).

    Edge cases, decided here and not left to scipy (which warns or returns NaN there):

    * one pair: ``sd``, ``t``, ``p`` and both CI bounds are NaN (no variance estimate);
    * every difference the same value up to float rounding (``sd <= 1e-9 * max(1, |mean|)``):
      ``sd = 0`` and the CI is the point ``(mean, mean)``; ``t = +-inf`` with ``p = 0`` when
      that value is non-zero, ``t = 0`` with ``p = 1`` when it is zero (``|mean| <= 1e-9``).
    """
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Paired(mean, math.nan, len(d), math.nan, math.nan, (math.nan, math.nan))
    sd = statistics.stdev(d)
    if sd <= _RELATIVE_TOL * max(1.0, abs(mean)):
        return _constant(mean, len(d))
    return _t_test(a, b, mean, sd)


def _constant(mean: float, n: int) -> Paired:
    """The test of ``n >= 2`` identical differences: zero spread, a certain sign or none."""
    if abs(mean) <= _RELATIVE_TOL:
        return Paired(mean, 0.0, n, 0.0, 1.0, (mean, mean))
    return Paired(mean, 0.0, n, math.copysign(math.inf, mean), 0.0, (mean, mean))


def _t_test(a: Sequence[float], b: Sequence[float], mean: float, sd: float) -> Paired:
    """scipy's paired t test, for differences with a positive spread (no scipy warning then)."""
    res = scipy_stats.ttest_rel(b, a)
    ci = res.confidence_interval(CONFIDENCE)
    return Paired(
        mean, sd, len(a), float(res.statistic), float(res.pvalue), (float(ci.low), float(ci.high))
    )


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
