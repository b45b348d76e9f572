"""The benchmark's paired t test (``benchmarks/_balance/stats.py``) and how the report shows it.

References are independent of scipy: t from :mod:`statistics`, two-sided p-values by Simpson
integration of the Student-t density written out below (closed form for df = 2), critical values
from a published t table. Differences in the invariants are drawn on a 0.25-point grid, like
accuracy differences on the benchmark's 400-sample test sets (exact in binary floating point).
"""

from __future__ import annotations

import math
import statistics
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from _balance import report, stats

#: Two-sided 5 % critical values of Student's t (published tables), by degrees of freedom.
T_CRIT_95 = {2: 4.302653, 3: 3.182446, 9: 2.262157}


def student_t_pdf(x: float, df: int) -> float:
    """Density of Student's t with ``df`` degrees of freedom."""
    norm = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    return float(norm * (1 + x * x / df) ** (-(df + 1) / 2))


def simpson(f: Callable[[float], float], lo: float, hi: float, steps: int = 4000) -> float:
    """Composite Simpson rule of ``f`` on ``[lo, hi]`` (``steps`` even)."""
    h = (hi - lo) / steps
    inner = sum((4 if i % 2 else 2) * f(lo + i * h) for i in range(1, steps))
    return (f(lo) + inner + f(hi)) * h / 3


def two_sided_p(t: float, df: int) -> float:
    """``P(|T| >= |t|) = 1 - 2 * integral_0^|t| pdf`` (the density is symmetric)."""
    return 1 - 2 * simpson(lambda x: student_t_pdf(x, df), 0.0, abs(t))


def hand_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, float]:
    """Reference ``(mean, sd, t, p)`` of the differences ``b - a``."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    t = mean / (sd / math.sqrt(len(d)))
    return mean, sd, t, two_sided_p(t, len(d) - 1)


def test_reference_density_reproduces_the_table() -> None:
    """The reference itself: 95 % of the t mass lies within the tabled critical values."""
    for df, crit in T_CRIT_95.items():
        assert two_sided_p(crit, df) == pytest.approx(0.05, abs=1e-6), df
    assert two_sided_p(0.0, 9) == 1.0


# (a, b), with the hand values of d = b - a in the comments
SAMPLES = {
    # d = [0.03, 0.04, 0.01, 0.05]: mean 0.0325, sd 0.0170783, t = 3.80600 (df 3), p ~ 0.0319
    "n4": ([0.80, 0.82, 0.78, 0.85], [0.83, 0.86, 0.79, 0.90]),
    # d = [1.5, -0.5, 2, 0.75, 1.25, -1, 2.5, 0.25, 1, 0.5]: mean 0.825, sd 1.07400,
    # t = 2.42913 (df 9), p ~ 0.038, CI 0.825 -+ 2.262157 * 1.07400 / sqrt(10) = 0.057..1.593
    "n10": (
        [84.0, 83.5, 85.25, 84.75, 82.5, 86.0, 84.25, 83.0, 85.5, 84.0],
        [85.5, 83.0, 87.25, 85.5, 83.75, 85.0, 86.75, 83.25, 86.5, 84.5],
    ),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_paired_matches_hand_computed_t_p_and_ci(name: str) -> None:
    a, b = SAMPLES[name]
    mean, sd, t, p = hand_test(a, b)
    n = len(a)
    half = T_CRIT_95[n - 1] * sd / math.sqrt(n)

    got = stats.paired(a, b)
    assert got.n == n
    assert got.mean == pytest.approx(mean, rel=1e-12)
    assert got.sd == pytest.approx(sd, rel=1e-12)
    assert got.t == pytest.approx(t, rel=1e-9)
    assert got.p == pytest.approx(p, abs=1e-8)
    assert 0.03 < got.p < 0.04  # both samples: significant at 5 %, not at 1 %
    assert got.ci == pytest.approx((mean - half, mean + half), abs=1e-6 * sd)


def test_paired_hand_values_written_out() -> None:
    """The comments' numbers, so that a wrong reference cannot hide a wrong result."""
    n4 = stats.paired(*SAMPLES["n4"])
    assert (n4.mean, n4.sd, n4.t) == pytest.approx((0.0325, 0.0170783, 3.80600), rel=1e-5)
    n10 = stats.paired(*SAMPLES["n10"])
    assert (n10.mean, n10.sd, n10.t) == pytest.approx((0.825, 1.0740, 2.42913), rel=1e-4)
    assert n10.ci == pytest.approx((0.0567, 1.5933), abs=1e-4)


def test_paired_is_antisymmetric() -> None:
    a, b = SAMPLES["n10"]
    ab, ba = stats.paired(a, b), stats.paired(b, a)
    assert (ba.mean, ba.t) == pytest.approx((-ab.mean, -ab.t))
    assert ba.sd == pytest.approx(ab.sd) and ba.p == pytest.approx(ab.p)
    assert ba.ci == pytest.approx((-ab.ci[1], -ab.ci[0]))


# --------------------------------------------------------------------------- edge cases
def _quiet(f: Callable[[], stats.Paired]) -> stats.Paired:
    """Run ``f`` with every warning an error, whatever the pytest configuration."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return f()


def test_one_pair_has_no_test() -> None:
    p = _quiet(lambda: stats.paired([0.5], [0.75]))
    assert p.n == 1 and p.mean == 0.25
    assert all(math.isnan(x) for x in (p.sd, p.t, p.p, *p.ci))


@pytest.mark.parametrize(
    ("a", "b", "t", "p"),
    [
        ([0.5, 0.6, 0.7], [0.6, 0.7, 0.8], math.inf, 0.0),  # +0.1 each, up to float rounding
        ([0.6, 0.7], [0.5, 0.6], -math.inf, 0.0),
        ([84.25, 90.5, 71.0], [86.25, 92.5, 73.0], math.inf, 0.0),  # +2 points each, exact
        ([0.5, 0.6], [0.5, 0.6], 0.0, 1.0),  # no difference at all
        ([0.1, 0.7], [0.1 + 1e-17, 0.7 - 1e-16], 0.0, 1.0),  # zero up to rounding
    ],
)
def test_identical_differences_give_a_degenerate_test(
    a: list[float], b: list[float], t: float, p: float
) -> None:
    """sd 0, t = +-inf (p = 0) or 0 (p = 1), the CI the single point ``mean``; scipy is not
    asked (it would warn about the zero variance or return NaN)."""
    got = _quiet(lambda: stats.paired(a, b))
    assert got.sd == 0.0 and got.t == t and got.p == p
    assert got.ci == (got.mean, got.mean)
    assert got.mean == pytest.approx(
        statistics.fmean(y - x for x, y in zip(a, b, strict=True)), abs=1e-15
    )


def test_spread_just_above_rounding_goes_to_scipy_without_warnings() -> None:
    """``sd`` a few 1e-9 of the mean: a real (tiny) spread, a huge but finite t."""
    d = [1.0, 1.0 + 4e-9, 1.0 - 4e-9, 1.0]
    got = _quiet(lambda: stats.paired([0.0] * 4, d))
    assert 0 < got.sd < 1e-8
    assert math.isfinite(got.t) and got.t > 1e8
    assert got.p < 1e-12
    assert got.ci[0] < 1.0 < got.ci[1] and got.ci[1] - got.ci[0] < 1e-7


# --------------------------------------------------------------------------- invariants
points = st.integers(-40, 40).map(lambda k: k / 4)  # -10 .. +10 points, step 0.25


@st.composite
def pairs(draw: st.DrawFn, n: int | None = None) -> tuple[list[float], list[float]]:
    """``(a, b)``: accuracies in points (a on the grid too) and their paired values."""
    size = n if n is not None else draw(st.integers(2, 12))
    a = [60 + x for x in draw(st.lists(points, min_size=size, max_size=size))]
    d = draw(st.lists(points, min_size=size, max_size=size))
    return a, [x + y for x, y in zip(a, d, strict=True)]


@given(pairs())
def test_ci_is_symmetric_about_the_mean_and_agrees_with_p(ab: tuple[list[float], ...]) -> None:
    a, b = ab
    p = stats.paired(a, b)
    low, high = p.ci
    assert low <= p.mean <= high
    assert (low + high) / 2 == pytest.approx(p.mean, abs=1e-9)
    assert 0.0 <= p.p <= 1.0
    if abs(p.p - 0.05) > 1e-9:  # test / interval duality: 0 outside the 95 % CI iff p < 0.05
        assert (not low <= 0.0 <= high) == (p.p < 0.05), p


@given(st.integers(2, 10).flatmap(lambda n: st.tuples(pairs(n), pairs(n))))
def test_p_decreases_as_abs_t_grows(samples: tuple[tuple[list[float], ...], ...]) -> None:
    first, second = (stats.paired(a, b) for a, b in samples)
    lo, hi = sorted([first, second], key=lambda p: abs(p.t))
    assert lo.p >= hi.p
    if abs(hi.t) > abs(lo.t) + 1e-6 and math.isfinite(hi.t):
        assert lo.p > hi.p or hi.p == 0.0  # strictly, unless it underflowed to 0


# --------------------------------------------------------------------------- the report
def _record(method: str, seed: int, acc: float) -> dict[str, Any]:
    """The fields of a run record that the compact tables read."""
    return {"setting": "s", "optimizer": "adam", "method": method, "seed": seed, "fused_acc": acc}


def _cells(table: str) -> dict[str, str]:
    """``method -> cell`` of a one-setting Markdown table."""
    rows = [ln.split("|") for ln in table.splitlines() if ln.startswith("| ")]
    return {r[1].strip(): r[2].strip() for r in rows[1:]}


def test_format_test_cells() -> None:
    p = stats.Paired(4.05, 1.56, 10, 8.2, 2e-5, (2.93, 5.17))
    assert report.format_test(p, 2) == "t=+8.2, p<0.001, CI +2.93..+5.17"
    assert report.format_test(p, 1) == "t=+8.2, p<0.001, CI +2.9..+5.2"
    q = stats.Paired(-0.4, 0.9, 10, -1.4, 0.1946, (-1.04, 0.24))
    assert report.format_test(q, 2) == "t=-1.4, p=0.195, CI -1.04..+0.24"
    assert report.format_test(stats.paired([0.5, 0.6], [0.6, 0.7]), 1) == (
        "t=+inf, p<0.001, CI +0.1..+0.1"
    )
    assert report.format_test(stats.paired([1.0, 2.0], [1.0, 2.0]), 1) == (
        "t=+0.0, p=1.000, CI +0.0..+0.0"
    )
    assert report.format_test(stats.paired([1.0], [2.0]), 1) == ""


def test_compact_table_cell_against_a_closed_form_reference() -> None:
    """df = 2 has a closed-form t distribution: P(|T| >= t) = 1 - t / sqrt(2 + t^2)."""
    joint, method = [0.80, 0.82, 0.78], [0.83, 0.86, 0.79]
    records = [_record("joint", s, x) for s, x in enumerate(joint)]
    records += [_record("m", s, x) for s, x in enumerate(method)]
    # d = [3, 4, 1] points: mean 8/3, sd sqrt(7/3), t = (8/3) / sqrt(7/9) = 3.0237
    mean, sd = 8 / 3, math.sqrt(7 / 3)
    t = mean / (sd / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)
    assert p == pytest.approx(two_sided_p(t, 2), abs=1e-9)  # the two references agree
    half = T_CRIT_95[2] * sd / math.sqrt(3)
    cell = f"82.7 (+2.7, t=+{t:.1f}, p={p:.3f}, CI {mean - half:+.1f}..{mean + half:+.1f})"
    assert cell == "82.7 (+2.7, t=+3.0, p=0.094, CI -1.1..+6.5)"
    out = report.compact_tables(records)
    assert "(paired difference to joint, t, p, 95 % CI)" in out
    assert _cells(out) == {"joint": "80.0", "m": cell}


def test_report_cells_with_one_seed_show_no_test() -> None:
    records = [_record("joint", 0, 0.80), _record("m", 0, 0.83)]
    assert _cells(report.compact_tables(records)) == {"joint": "80.0", "m": "83.0 (+3.0)"}
