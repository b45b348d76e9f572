"""Properties and reference values of gradmod.functional (hypothesis + float64 references)."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given
from settings import ATOL, DEVICE, DTYPE, RTOL
from torch.autograd import gradcheck

import gradmod.functional as GF

F64 = torch.float64


def t(xs: list[float], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype, device=DEVICE)


metric = st.floats(0.0, 1.0, allow_nan=False, width=32)
deltas = st.lists(st.floats(-1.0, 1.0, allow_nan=False), min_size=2, max_size=8)


def naive_b(delta: list[float], official: bool) -> list[float]:
    """The CGGM rule written out as a plain Python loop (the test's own reference)."""
    m = len(delta)
    if official:  # zrguo/CGGM src/msatrain.py: diff_sum = sum(diff) + 1e-8
        diff_sum = sum(delta) + 1e-8
        return [(diff_sum - d) / diff_sum for d in delta]
    pos = [max(d, 0.0) for d in delta]
    total = sum(pos)
    if total <= 1e-6:
        return [(m - 1) / m] * m
    return [(total - d) / total for d in pos]


# ------------------------------------------------------------------ improvement_rate_scale
def test_methods_md_vector() -> None:
    prev, cur = t([0.5, 0.6, 0.4]), t([0.6, 0.62, 0.5])
    for policy in ("safe", "official"):
        out = GF.improvement_rate_scale(prev, cur, rho=1.3, policy=policy)  # type: ignore[arg-type]
        torch.testing.assert_close(out, t([0.709091, 1.181818, 0.709091]), atol=1e-6, rtol=0)
        b = out / 1.3
        torch.testing.assert_close(b, t([0.545455, 0.909091, 0.545455]), atol=1e-6, rtol=0)


@given(deltas, st.sampled_from(["safe", "official"]))
def test_matches_naive_loop(delta: list[float], policy: str) -> None:
    total = sum(delta)
    assume(policy == "safe" or abs(total) > 1e-3)
    out = GF.improvement_rate_scale(
        torch.zeros(len(delta), dtype=F64, device=DEVICE),
        t(delta),
        policy=policy,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(out, t(naive_b(delta, policy == "official")), rtol=1e-9, atol=1e-9)


@given(deltas)
def test_safe_scale_normalization_always(delta: list[float]) -> None:
    """Safe policy: sum B = M - 1 at every step, B in [0, 1], finite."""
    b = GF.improvement_rate_scale(torch.zeros(len(delta), dtype=F64, device=DEVICE), t(delta))
    assert torch.isfinite(b).all()
    assert (b >= 0).all() and (b <= 1).all()
    assert math.isclose(float(b.sum()), len(delta) - 1, rel_tol=1e-12, abs_tol=1e-12)


@given(deltas)
def test_official_scale_normalization_when_sum_not_zero(delta: list[float]) -> None:
    total = sum(delta)
    assume(abs(total) > 1e-3)
    b = GF.improvement_rate_scale(
        torch.zeros(len(delta), dtype=F64, device=DEVICE), t(delta), policy="official"
    )
    m = len(delta)
    # with S = sum(delta) + 1e-8: sum B = (M S - sum(delta)) / S = M - 1 + 1e-8 / S
    s = total + 1e-8
    assert math.isclose(float(b.sum()), m - 1 + 1e-8 / s, rel_tol=1e-9)
    assert math.isclose(float(b.sum()), m - 1, rel_tol=1e-4)


@given(st.lists(st.floats(-1, 1), min_size=2, max_size=6))
def test_official_b_is_one_when_no_metric_changed(metric: list[float]) -> None:
    """Official: every delta 0 gives S = 1e-8 and B = (1e-8 - 0) / 1e-8 = 1 for every modality."""
    x = t(metric)
    b = GF.improvement_rate_scale(x, x.clone(), rho=1.3, policy="official")
    assert torch.equal(b, torch.full_like(b, 1.3))


@given(deltas, st.randoms(use_true_random=False), st.sampled_from(["safe", "official"]))
def test_permutation_equivariance(delta: list[float], rnd: object, policy: str) -> None:
    perm = list(range(len(delta)))
    rnd.shuffle(perm)  # type: ignore[attr-defined]
    zeros = torch.zeros(len(delta), dtype=F64, device=DEVICE)
    b = GF.improvement_rate_scale(zeros, t(delta), policy=policy)  # type: ignore[arg-type]
    bp = GF.improvement_rate_scale(zeros, t([delta[i] for i in perm]), policy=policy)  # type: ignore[arg-type]
    torch.testing.assert_close(bp, b[perm], rtol=1e-12, atol=1e-12)


@given(deltas, st.floats(0.01, 100.0))
def test_positive_scaling_invariance_safe(delta: list[float], c: float) -> None:
    assume(sum(max(d, 0) for d in delta) > 1e-3)
    zeros = torch.zeros(len(delta), dtype=F64, device=DEVICE)
    b = GF.improvement_rate_scale(zeros, t(delta))
    bc = GF.improvement_rate_scale(zeros, t([c * d for d in delta]))
    torch.testing.assert_close(bc, b, rtol=1e-9, atol=1e-9)


@given(deltas, st.floats(0.1, 10.0), st.booleans())
def test_scaling_invariance_official(delta: list[float], c: float, negate: bool) -> None:
    """Any c != 0 (negative too) leaves the official B unchanged (up to the 1e-8 guard: its
    relative effect is ~1e-8 / |sum| times |B|, so both sums stay above 1e-2)."""
    c = -c if negate else c
    assume(abs(sum(delta)) > 1e-2 and abs(c * sum(delta)) > 1e-2)
    zeros = torch.zeros(len(delta), dtype=F64, device=DEVICE)
    b = GF.improvement_rate_scale(zeros, t(delta), policy="official")
    bc = GF.improvement_rate_scale(zeros, t([c * d for d in delta]), policy="official")
    torch.testing.assert_close(bc, b, rtol=1e-5, atol=1e-5)


@given(st.integers(2, 8), st.floats(-1, 1), st.sampled_from(["safe", "official"]))
def test_equal_improvements_give_equal_factors(m: int, d: float, policy: str) -> None:
    # official: B = (M-1)/M + 1e-8 / (M (M d + 1e-8)), within 1e-6 of (M-1)/M once |d| > 5e-3
    assume(policy == "safe" or abs(d) > 5e-3)
    out = GF.improvement_rate_scale(
        torch.zeros(m, dtype=F64, device=DEVICE),
        t([d] * m),
        policy=policy,  # type: ignore[arg-type]
    )
    torch.testing.assert_close(out, t([(m - 1) / m] * m), rtol=1e-6, atol=1e-6)


@given(deltas)
def test_largest_improvement_gets_smallest_factor(delta: list[float]) -> None:
    assume(sum(max(d, 0) for d in delta) > 1e-3)
    b = GF.improvement_rate_scale(torch.zeros(len(delta), dtype=F64, device=DEVICE), t(delta))
    best = max(range(len(delta)), key=lambda i: delta[i])
    assert float(b[best]) == pytest.approx(float(b.min()), abs=1e-12)
    # and the ordering is reversed everywhere
    for i in range(len(delta)):
        for j in range(len(delta)):
            if delta[i] > delta[j] and delta[i] > 0:
                assert b[i] <= b[j] + 1e-12


@given(st.integers(2, 6), st.sampled_from([0.0, 1e-9, -0.3]))
def test_safe_policy_no_improvement_is_neutral_and_finite(m: int, d: float) -> None:
    """sum(Delta) ~ 0 or all-negative: official explodes or divides by ~0, safe does not."""
    prev = torch.full((m,), 0.5, dtype=torch.float32, device=DEVICE)
    out = GF.improvement_rate_scale(prev, prev + d, rho=1.3)
    torch.testing.assert_close(out, torch.full_like(out, 1.3 * (m - 1) / m))


def test_official_policy_explodes_where_safe_does_not() -> None:
    prev = t([0.5, 0.5])
    cur = t([0.6, 0.4])  # sum(Delta) = 0 exactly (in float64, 0.1 - 0.1)
    off = GF.improvement_rate_scale(prev, cur, policy="official")
    assert off.abs().max() > 1e6 and (off < 0).any()
    safe = GF.improvement_rate_scale(prev, cur)
    torch.testing.assert_close(safe, t([0.0, 1.0]))


def test_safe_policy_nonfinite_inputs() -> None:
    prev = t([0.5, 0.5, 0.5])
    out = GF.improvement_rate_scale(prev, t([float("nan"), float("inf"), 0.7]))
    torch.testing.assert_close(out, t([1.0, 1.0, 0.0]))


def test_dtype_device_and_errors() -> None:
    prev = torch.zeros(3, dtype=DTYPE, device=DEVICE)
    out = GF.improvement_rate_scale(
        prev, prev + torch.tensor([0.1, 0.2, 0.3], dtype=DTYPE, device=DEVICE)
    )
    assert out.dtype == DTYPE and out.device.type == DEVICE.type
    with pytest.raises(ValueError, match="at least 2"):
        GF.improvement_rate_scale(torch.zeros(1), torch.ones(1))
    with pytest.raises(ValueError, match="shape"):
        GF.improvement_rate_scale(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="policy"):
        GF.improvement_rate_scale(torch.zeros(2), torch.ones(2), policy="nope")  # type: ignore[arg-type]


def test_gradcheck_improvement_rate_scale() -> None:
    prev = torch.tensor([0.5, 0.6, 0.4], dtype=F64, requires_grad=True)
    cur = torch.tensor([0.6, 0.62, 0.5], dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, b: GF.improvement_rate_scale(a, b, rho=1.3), (prev, cur))
    assert gradcheck(lambda a, b: GF.improvement_rate_scale(a, b, policy="official"), (prev, cur))


# --------------------------------------------------------------------------- cosines
shapes = st.lists(
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)


@given(shapes, st.integers(0, 2**31 - 1))
def test_list_cosine_equals_concatenated_cosine_float64(
    shp: list[tuple[int, ...]], seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=g, dtype=F64) for s in shp]
    b = [torch.randn(s, generator=g, dtype=F64) for s in shp]
    fa = torch.cat([x.reshape(-1) for x in a])
    fb = torch.cat([x.reshape(-1) for x in b])
    ref = float(fa @ fb) / math.sqrt(float(fa @ fa) * float(fb @ fb))
    out = GF.flat_cosine([x.to(DEVICE) for x in a], [x.to(DEVICE) for x in b])
    assert float(out) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_cosine_in_working_dtype() -> None:
    a = [
        torch.randn(64, 32, dtype=DTYPE, device=DEVICE),
        torch.randn(32, dtype=DTYPE, device=DEVICE),
    ]
    b = [x + 0.3 * torch.randn_like(x) for x in a]
    fa = torch.cat([x.double().reshape(-1) for x in a]).cpu()
    fb = torch.cat([x.double().reshape(-1) for x in b]).cpu()
    ref = float(fa @ fb / (fa.norm() * fb.norm()))
    assert float(GF.flat_cosine(a, b)) == pytest.approx(ref, rel=RTOL * 10, abs=ATOL * 10)


def test_cosine_zero_vector_is_finite() -> None:
    a = torch.zeros(4, 3, dtype=F64, requires_grad=True)
    b = torch.randn(4, 3, dtype=F64)
    c = GF.flat_cosine(a, b)
    c.backward()
    assert float(c.detach()) == 0.0 and torch.isfinite(a.grad).all()  # type: ignore[arg-type]


def test_cosine_shape_errors() -> None:
    with pytest.raises(ValueError, match="same shapes"):
        GF.flat_cosine(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="equal length"):
        GF.flat_cosine([torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_gradcheck_cosines() -> None:
    a = [
        torch.randn(3, 2, dtype=F64, requires_grad=True),
        torch.randn(4, dtype=F64, requires_grad=True),
    ]
    b = [
        torch.randn(3, 2, dtype=F64, requires_grad=True),
        torch.randn(4, dtype=F64, requires_grad=True),
    ]
    assert gradcheck(lambda *x: GF.flat_cosine(list(x[:2]), list(x[2:])), (*a, *b))
    coeff = torch.tensor([0.3, -0.7, 1.2], dtype=F64, requires_grad=True)
    vs = [torch.randn(3, 2, dtype=F64, requires_grad=True) for _ in range(3)]
    u = torch.randn(3, 2, dtype=F64, requires_grad=True)
    assert gradcheck(lambda c, u, *v: GF.cosine_direction_loss(c, list(v), u), (coeff, u, *vs))


# ------------------------------------------------------------------- direction loss
def _unit(cos: float) -> torch.Tensor:
    """A unit 2-vector at the given cosine from e1."""
    return torch.tensor([cos, math.sqrt(max(0.0, 1 - cos * cos))], dtype=F64)


def test_direction_loss_methods_md_vector() -> None:
    b = t([0.545455, 0.909091, 0.545455])
    u = _unit(1.0).to(DEVICE)
    vs = [_unit(c).to(DEVICE) for c in (0.2, -0.1, 0.5)]
    assert float(GF.cosine_direction_loss(b, vs, u)) == pytest.approx(0.569697, abs=1e-6)


coefs = st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=6)


@given(coefs, st.integers(0, 2**31 - 1))
def test_direction_loss_nonnegative_and_matches_naive(b: list[float], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    u = [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
    vs = [
        [torch.randn(3, 4, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)]
        for _ in b
    ]
    out = float(GF.cosine_direction_loss(t(b).cpu(), vs, u))
    fu = torch.cat([x.reshape(-1) for x in u])
    ref = 0.0
    for bm, v in zip(b, vs, strict=True):
        fv = torch.cat([x.reshape(-1) for x in v])
        cos = float(fu @ fv) / math.sqrt(float(fu @ fu) * float(fv @ fv))
        ref += abs(bm) - bm * cos
    assert out >= 0.0
    assert out == pytest.approx(ref / len(b), rel=1e-10, abs=1e-12)


@given(coefs)
def test_direction_loss_zero_iff_cos_equals_sign(b: list[float]) -> None:
    u = _unit(1.0)
    aligned = [_unit(1.0) if bm >= 0 else -_unit(1.0) for bm in b]
    assert float(GF.cosine_direction_loss(t(b).cpu(), aligned, u)) == pytest.approx(0.0, abs=1e-12)
    # tilt one classifier that has B != 0: the loss becomes positive
    nonzero = [i for i, bm in enumerate(b) if abs(bm) > 1e-6]
    assume(nonzero)
    i = nonzero[0]
    tilted = list(aligned)
    tilted[i] = _unit(0.5) * (1 if b[i] > 0 else -1)
    assert float(GF.cosine_direction_loss(t(b).cpu(), tilted, u)) > 0


def test_direction_loss_shape_error() -> None:
    with pytest.raises(ValueError, match=r"shape \[M\]"):
        GF.cosine_direction_loss(torch.ones(3), [torch.ones(2)] * 2, torch.ones(2))


# --------------------------------------------------------------------------- metrics
@given(st.integers(1, 40), st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_accuracy_matches_loop(b: int, c: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=F64)
    y = torch.randint(0, c, (b,), generator=g)
    ref = (
        sum(int(max(range(c), key=lambda k: float(logits[i, k])) == int(y[i])) for i in range(b))
        / b
    )
    assert float(GF.accuracy(logits.to(DEVICE), y.to(DEVICE))) == pytest.approx(ref)
    assert GF.correct(logits, y).shape == (b,)


def test_sign_accuracy() -> None:
    pred = torch.tensor([0.3, -0.2, 0.0, 1.5, -4.0])
    y = torch.tensor([1.0, 0.5, -1.0, 0.0, -2.0])
    # > 0 agreement: T/T yes, F/T no, F/F yes, T/F no, F/F yes
    assert float(GF.sign_accuracy(pred, y)) == pytest.approx(3 / 5)
    assert float(GF.sign_accuracy(pred[:, None], y[:, None])) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="do not match"):
        GF.sign_correct(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="logits"):
        GF.correct(torch.ones(3), torch.ones(3, dtype=torch.long))


@given(st.integers(3, 8), st.floats(1e-6, 1e4, allow_nan=False), st.floats(0.01, 2.0))
def test_ogm_ge_exact_tie_of_many_modalities_slows_nobody(m: int, s: float, alpha: float) -> None:
    """Regression: with M > 2, (sum - s_m) / (M - 1) of a tie can round above s_m, making every
    modality "dominant" (all slowed by 1 - tanh(alpha)); an exact tie must leave all at 1."""
    for dtype in (torch.float64, torch.float32):
        scores = torch.full((m,), s, dtype=dtype, device=DEVICE)
        assert GF.ogm_ge_coefficients(scores, alpha=alpha).tolist() == [1.0] * m
    # still slows a modality that dominates by more than rounding
    scores = torch.full((m,), s, dtype=torch.float64, device=DEVICE)
    scores[0] *= 1 + 1e-9
    k = GF.ogm_ge_coefficients(scores, alpha=alpha)
    assert float(k[0]) < 1 and k[1:].tolist() == [1.0] * (m - 1)
