"""MMPareto's gradient integration against a naive float64 re-implementation written here.

The reference follows the authors' code (GeWu-Lab/MMPareto_ICML2024 at a339db3), read from the
source, not from gradmod:

* ``code/MMPareto.py:117-145``: per encoder, the gradient of the multimodal loss (``'both'``) and
  of the encoder's own unimodal loss are kept per parameter name, plus a ``"concat"`` entry of
  their flattened concatenation;
* ``code/MMPareto.py:149-174``: ``F.cosine_similarity`` of the two concatenations; ``> 0``: weights
  ``[0.5, 0.5]``; otherwise ``MinNormSolver.find_min_norm_element`` on the two lists of dict
  values, which, for two vectors, is ``_min_norm_element_from2`` on inner products summed over
  every entry, the ``"concat"`` one included (``code/min_norm_solvers.py:32-57``: each inner
  product counted twice), returning ``[c, 1 - c]`` (``:121-129``);
* ``code/min_norm_solvers.py:17-30``: ``c = 0.999`` if ``v1v2 >= v1v1``, else ``0.001`` if
  ``v1v2 >= v2v2``, else ``-(v1v2 - v2v2) / (v1v1 + v2v2 - 2 v1v2)``;
* ``code/MMPareto.py:178-207``: ``gamma = 1.5``; per encoder parameter tensor,
  ``three_norm = |grad of the summed loss|``, ``new_grad = 2 k0 g + 2 k1 u``,
  ``diff = three_norm / |new_grad|``, and the gradient becomes ``diff * new_grad * gamma`` if
  ``diff > 1`` else ``new_grad * gamma``.

The test vectors are the official code's own outputs (``benchmarks/parity/mmpareto_formula.py``
runs those lines on them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given
from settings import ATOL, DEVICE, DTYPE, RTOL

import gradmod.functional as GF

F64 = torch.float64
Flat = list[list[float]]


# ------------------------------------------------------------------ the reference
def ieee_div(x: float, y: float) -> float:
    """x / y as a tensor division does it (no ZeroDivisionError)."""
    if y != 0:
        return x / y
    if x == 0 or math.isnan(x):
        return math.nan
    return math.copysign(math.inf, x)


def min_norm_from2(v1v1: float, v1v2: float, v2v2: float) -> float:
    """code/min_norm_solvers.py:17-30, the weight of the first vector."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def ref_step(g: Flat, u: Flat, gamma: float = 1.5) -> tuple[list[float], Flat]:
    """One encoder: (weights, new gradients), plain Python floats, following MMPareto.py:149-207."""
    fg = [x for t in g for x in t]
    fu = [x for t in u for x in t]
    dot = sum(a * b for a, b in zip(fg, fu, strict=True))
    ng = math.sqrt(sum(a * a for a in fg))
    nu = math.sqrt(sum(b * b for b in fu))
    cos = dot / (max(ng, 1e-8) * max(nu, 1e-8))  # F.cosine_similarity, eps 1e-8
    if cos > 0:
        k = [0.5, 0.5]
    else:
        # values() of the per-name dicts include "concat": every inner product is counted twice
        v1v1 = 2 * sum(a * a for a in fg)
        v1v2 = 2 * dot
        v2v2 = 2 * sum(b * b for b in fu)
        c = min_norm_from2(v1v1, v1v2, v2v2)
        k = [c, 1 - c]
    out = []
    for gi, ui in zip(g, u, strict=True):
        three = math.sqrt(sum((a + b) ** 2 for a, b in zip(gi, ui, strict=True)))
        new = [2 * k[0] * a + 2 * k[1] * b for a, b in zip(gi, ui, strict=True)]
        diff = ieee_div(three, math.sqrt(sum(x * x for x in new)))
        if diff > 1:
            out.append([diff * x * gamma for x in new])  # inf * 0 = nan, as in torch
        else:
            out.append([x * gamma for x in new])
    return k, out


# ------------------------------------------------------------------ helpers
SHAPES = [(2,), (3, 2), (), (1, 4)]


def tensors(flat: Flat, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = F64) -> list:
    return [
        torch.tensor(v, dtype=dtype, device=DEVICE).reshape(s)
        for v, s in zip(flat, shapes, strict=True)
    ]


def flat(ts: Sequence[torch.Tensor]) -> Flat:
    return [t.double().reshape(-1).tolist() for t in ts]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def norm(a: Sequence[torch.Tensor]) -> float:
    return math.sqrt(dot(a, a))


def close(a: Sequence[torch.Tensor], b: Flat, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(
            x.double().reshape(-1),
            torch.tensor(y, dtype=F64, device=x.device),
            rtol=rtol,
            atol=atol,
        )


# 0 or |x| in [1e-3, 10]: inner products are taken in the gradients' dtype, where squares of
# entries below ~1e-19 (float32) underflow; that regime is out of scope here
value = st.one_of(st.just(0.0), st.floats(1e-3, 10.0), st.floats(-10.0, -1e-3))


@st.composite
def pairs(draw: st.DrawFn) -> tuple[Flat, Flat, list[tuple[int, ...]]]:
    """Two gradient lists of 1-4 tensors (shapes from SHAPES), any relation between them."""
    n = draw(st.integers(1, 4))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=n, max_size=n))
    sizes = [math.prod(s) for s in shapes]
    g = [draw(st.lists(value, min_size=k, max_size=k)) for k in sizes]
    how = draw(st.sampled_from(["free", "against", "along"]))
    if how == "free":
        u = [draw(st.lists(value, min_size=k, max_size=k)) for k in sizes]
    else:  # u = s g + noise: mostly conflicting or mostly agreeing
        s = draw(st.floats(0.1, 5.0)) * (-1 if how == "against" else 1)
        noise = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0]))
        u = [[s * x + noise * draw(value) for x in t] for t in g]
    return g, u, shapes


def cancelled(g: Flat, u: Flat, k: Sequence[float], tol: float = 1e-6) -> bool:
    """Some tensor's combined direction 2 k0 g + 2 k1 u is (nearly) zero: there the ratio is
    ill-conditioned (official: NaN or rounding noise raised to full size)."""
    for gi, ui in zip(g, u, strict=True):
        d = math.sqrt(sum((2 * k[0] * a + 2 * k[1] * b) ** 2 for a, b in zip(gi, ui, strict=True)))
        ref = math.sqrt(sum(a * a for a in gi)) + math.sqrt(sum(b * b for b in ui))
        if d <= tol * ref and ref > 0:
            return True
    return False


# ------------------------------------------------------------------ the official test vectors
def test_vector_conflict() -> None:
    """docs/methods/mmpareto.md: one encoder, two tensors, conflicting gradients; the official
    code's output (MMPareto.py:149-207 run by benchmarks/parity/mmpareto_formula.py)."""
    g = [torch.tensor([1.0, 2.0], device=DEVICE), torch.tensor([0.5], device=DEVICE)]
    u = [torch.tensor([-2.0, -1.0], device=DEVICE), torch.tensor([3.0], device=DEVICE)]
    for policy in ("safe", "official"):
        res = GF.mmpareto_combine(g, u, policy=policy)  # type: ignore[arg-type]
        assert bool(res.conflict)
        assert res.weights.tolist() == pytest.approx([66 / 97, 31 / 97], abs=1e-12)
        assert res.weights.tolist() == pytest.approx([0.680412, 0.319588], abs=1e-6)
        assert float(res.cosine) == pytest.approx(-2.5 / math.sqrt(5.25 * 14), abs=1e-7)
        assert res.factor.tolist() == pytest.approx([1.0, 3.5 * 97 / 252], rel=1e-6)
        close(res.grads, [[0.123711, 3.123711], [5.25]], rtol=0, atol=1e-6)
        close(res.grads, [[12 / 97, 303 / 97], [5.25]], rtol=1e-6, atol=0)


def test_vector_agree() -> None:
    g = [torch.tensor([1.0, 0.0], device=DEVICE), torch.tensor([1.0], device=DEVICE)]
    u = [torch.tensor([1.0, 1.0], device=DEVICE), torch.tensor([-0.5], device=DEVICE)]
    res = GF.mmpareto_combine(g, u)
    assert not bool(res.conflict)
    assert res.weights.tolist() == [0.5, 0.5]
    close(res.grads, [[3.0, 1.5], [0.75]], rtol=0, atol=1e-6)


def test_vectors_match_the_reference() -> None:
    for g, u in [
        ([[1.0, 2.0], [0.5]], [[-2.0, -1.0], [3.0]]),
        ([[1.0, 0.0], [1.0]], [[1.0, 1.0], [-0.5]]),
    ]:
        k, out = ref_step(g, u)
        res = GF.mmpareto_combine(tensors(g, [(2,), (1,)]), tensors(u, [(2,), (1,)]))
        assert res.weights.tolist() == pytest.approx(k, abs=1e-12)
        close(res.grads, out)


# ------------------------------------------------------------------ against the reference
@given(pairs(), st.floats(0.5, 3.0))
def test_matches_reference(case: tuple[Flat, Flat, list[tuple[int, ...]]], gamma: float) -> None:
    g, u, shapes = case
    k, out = ref_step(g, u, gamma)
    assume(not cancelled(g, u, k))
    fg, fu = [x for t in g for x in t], [x for t in u for x in t]
    # the branch is decided by the sign of <g, u>: keep away from rounding-level ties
    assume(
        abs(sum(a * b for a, b in zip(fg, fu, strict=True))) > 1e-9 or not any(fg) or not any(fu)
    )
    for policy in ("safe", "official"):
        res = GF.mmpareto_combine(
            tensors(g, shapes),
            tensors(u, shapes),
            gamma=gamma,
            policy=policy,  # type: ignore[arg-type]
        )
        assert res.weights.tolist() == pytest.approx(k, rel=1e-9, abs=1e-12)
        close(res.grads, out, rtol=1e-8, atol=1e-10)


@given(pairs())
def test_suite_dtype_matches_float64(case: tuple[Flat, Flat, list[tuple[int, ...]]]) -> None:
    """In the suite's dtype (float32 by default) the result is float64's, to that dtype's
    precision, and keeps the dtype."""
    g, u, shapes = case
    k, _ = ref_step(g, u)
    assume(not cancelled(g, u, k, tol=1e-2))
    exact = GF.mmpareto_combine(tensors(g, shapes), tensors(u, shapes))
    gl, ul = tensors(g, shapes, DTYPE), tensors(u, shapes, DTYPE)
    assume(bool(exact.conflict) == (dot(gl, ul) <= 0))  # rounding did not move the branch
    res = GF.mmpareto_combine(gl, ul)
    assert all(x.dtype == DTYPE for x in res.grads)
    scale = max(norm(gl) + norm(ul), 1e-30)
    for x, y in zip(res.grads, exact.grads, strict=True):
        torch.testing.assert_close(x.double(), y, rtol=RTOL * 1e3, atol=ATOL * 1e2 * scale)


# ------------------------------------------------------------------ invariants
@given(pairs())
def test_weights_in_unit_interval_and_sum_to_one(
    case: tuple[Flat, Flat, list[tuple[int, ...]]],
) -> None:
    g, u, shapes = case
    res = GF.mmpareto_combine(tensors(g, shapes), tensors(u, shapes))
    w = res.weights.tolist()
    assert 0 <= w[0] <= 1 and 0 <= w[1] <= 1
    assert w[0] + w[1] == pytest.approx(1.0, abs=1e-15)
    if not bool(res.conflict):
        assert w == [0.5, 0.5]


@given(pairs())
def test_no_conflict_gives_gamma_times_the_sum(
    case: tuple[Flat, Flat, list[tuple[int, ...]]],
) -> None:
    g, u, shapes = case
    gt, ut = tensors(g, shapes), tensors(u, shapes)
    assume(dot(gt, ut) > 0)
    res = GF.mmpareto_combine(gt, ut, gamma=1.5)
    for x, a, b in zip(res.grads, gt, ut, strict=True):
        torch.testing.assert_close(x, 1.5 * (a + b), rtol=1e-12, atol=1e-14)
    # the combined direction conflicts with neither gradient
    assert dot(res.grads, gt) > 0 and dot(res.grads, ut) > 0


@given(pairs())
def test_conflict_direction_is_the_min_norm_common_descent(
    case: tuple[Flat, Flat, list[tuple[int, ...]]],
) -> None:
    """With a conflict, d = 2(a g + b u) is the min-norm point of the segment [g, u] (doubled):
    <d, g> >= 0 and <d, u> >= 0, equal in the interior; with rescale='encoder' the result is d
    times a positive factor, so it keeps both, and its norm is at least gamma |g + u|."""
    g, u, shapes = case
    gt, ut = tensors(g, shapes), tensors(u, shapes)
    assume(dot(gt, ut) < 0)
    res = GF.mmpareto_combine(gt, ut, rescale="encoder", gamma=1.5)
    a, b = res.weights.tolist()
    d = [2 * a * x + 2 * b * y for x, y in zip(gt, ut, strict=True)]
    scale = (norm(gt) + norm(ut)) ** 2
    tol = 1e-10 * scale
    assert dot(d, gt) >= -tol and dot(d, ut) >= -tol
    assert dot(d, gt) == pytest.approx(dot(d, ut), abs=tol)
    for c in [i / 50 for i in range(51)]:  # min-norm on the segment
        assert (
            norm(d) / 2 <= norm([c * x + (1 - c) * y for x, y in zip(gt, ut, strict=True)]) + 1e-9
        )
    assume(norm(d) > 1e-6 * math.sqrt(scale))  # not Pareto-stationary
    assert dot(res.grads, gt) >= -tol and dot(res.grads, ut) >= -tol
    s = norm([x + y for x, y in zip(gt, ut, strict=True)])
    assert norm(res.grads) >= 1.5 * max(s, norm(d)) * (1 - 1e-9)
    for x, y in zip(res.grads, d, strict=True):  # same direction as d
        torch.testing.assert_close(
            x, y * (norm(res.grads) / norm(d)), rtol=1e-9, atol=1e-9 * norm(res.grads)
        )


@given(pairs())
def test_tensor_rescale_magnitudes(case: tuple[Flat, Flat, list[tuple[int, ...]]]) -> None:
    """Per tensor (the official rescaling): |out_i| = gamma max(|g_i + u_i|, |d_i|)."""
    g, u, shapes = case
    gt, ut = tensors(g, shapes), tensors(u, shapes)
    res = GF.mmpareto_combine(gt, ut, gamma=1.5)
    assume(not cancelled(g, u, res.weights.tolist()))
    a, b = res.weights.tolist()
    for x, gi, ui in zip(res.grads, gt, ut, strict=True):
        d = float((2 * a * gi + 2 * b * ui).norm())
        assert float(x.norm()) == pytest.approx(1.5 * max(float((gi + ui).norm()), d), rel=1e-9)


@given(pairs(), st.sampled_from([2.0**-10, 0.5, 3.0, 2.0**16]))
def test_positive_homogeneity(case: tuple[Flat, Flat, list[tuple[int, ...]]], s: float) -> None:
    """A loss scale s > 0 on both gradients (GradScaler) scales the result and nothing else.
    (The official arithmetic, where some d_i cancels, raises rounding noise whose sign can change
    with the scale: checked only away from that.)"""
    g, u, shapes = case
    gt, ut = tensors(g, shapes), tensors(u, shapes)
    near_stationary = cancelled(g, u, GF.mmpareto_combine(gt, ut).weights.tolist())
    for policy in ("safe",) if near_stationary else ("safe", "official"):
        base = GF.mmpareto_combine(gt, ut, policy=policy)  # type: ignore[arg-type]
        scaled = GF.mmpareto_combine(
            [s * x for x in gt],
            [s * y for y in ut],
            policy=policy,  # type: ignore[arg-type]
        )
        torch.testing.assert_close(scaled.weights, base.weights, rtol=1e-12, atol=1e-15)
        # rounding in d_i is raised with it: an absolute error ~ eps * factor * |g_i| + |u_i|
        atol = 1e-14 * s * (1 + float(base.factor.max())) * (norm(gt) + norm(ut))
        for x, y in zip(scaled.grads, base.grads, strict=True):
            torch.testing.assert_close(x, s * y, rtol=1e-9, atol=atol, equal_nan=True)


@given(pairs())
def test_swapping_the_gradients_swaps_the_weights(
    case: tuple[Flat, Flat, list[tuple[int, ...]]],
) -> None:
    g, u, shapes = case
    gt, ut = tensors(g, shapes), tensors(u, shapes)
    assume(norm(gt) > 0 and norm(ut) > 0)
    w = GF.mmpareto_combine(gt, ut).weights
    w_swapped = GF.mmpareto_combine(ut, gt).weights
    torch.testing.assert_close(w_swapped, w.flip(0), rtol=1e-12, atol=1e-12)


@given(pairs(), st.floats(0.1, 5.0))
def test_safe_policy_is_finite_even_at_pareto_stationary_points(
    case: tuple[Flat, Flat, list[tuple[int, ...]]], c: float
) -> None:
    g, u, shapes = case
    for uu in (u, [[-c * x for x in t] for t in g]):  # any u, and u exactly opposite to g
        res = GF.mmpareto_combine(tensors(g, shapes), tensors(uu, shapes))
        assert all(bool(torch.isfinite(x).all()) for x in res.grads)
        assert bool(torch.isfinite(res.factor).all())


def test_weights_are_vectorised_over_modalities() -> None:
    gg = torch.tensor([5.25, 2.0, 0.0, 4.0, 1.0], dtype=F64, device=DEVICE)
    gu = torch.tensor([-2.5, 1.0, 0.0, 0.0, -1.0], dtype=F64, device=DEVICE)
    uu = torch.tensor([14.0, 3.0, 9.0, 0.0, 1.0], dtype=F64, device=DEVICE)
    w = GF.mmpareto_weights(gg, gu, uu)
    assert w.shape == (5, 2)
    expected = [
        min_norm_from2(a, b, c) if b <= 0 else 0.5
        for a, b, c in zip(gg.tolist(), gu.tolist(), uu.tolist(), strict=True)
    ]
    assert w[:, 0].tolist() == pytest.approx(expected, abs=1e-15)
    assert w[:, 0].tolist() == pytest.approx([66 / 97, 0.5, 0.999, 0.001, 0.5], abs=1e-15)
    assert (w.sum(-1) == 1).all()
    nan = GF.mmpareto_weights(*(torch.tensor([math.nan], dtype=F64, device=DEVICE),) * 3)
    assert bool(nan.isnan().all())


# ------------------------------------------------------------------ edge cases
def edge(g: Flat, u: Flat, policy: str = "safe") -> GF.ParetoCombination:
    return GF.mmpareto_combine(
        tensors(g, [(2,), (1,)]),
        tensors(u, [(2,), (1,)]),
        policy=policy,  # type: ignore[arg-type]
    )


G0: Flat = [[1.0, 2.0], [0.5]]


@pytest.mark.parametrize("policy", ["safe", "official"])
def test_zero_multimodal_gradient(policy: str) -> None:
    """<g, u> = 0 takes the solver branch, whose clamped end gives (0.999, 0.001); the rescaling
    restores |g + u| = |u|: the result is gamma u (the official output, parity script)."""
    u = [[-2.0, -1.0], [3.0]]
    res = edge([[0.0, 0.0], [0.0]], u, policy)
    assert bool(res.conflict) and res.weights.tolist() == pytest.approx([0.999, 0.001])
    close(res.grads, [[-3.0, -1.5], [4.5]])
    close(res.grads, ref_step([[0.0, 0.0], [0.0]], u)[1])


@pytest.mark.parametrize("policy", ["safe", "official"])
def test_zero_unimodal_gradient(policy: str) -> None:
    res = edge(G0, [[0.0, 0.0], [0.0]], policy)
    assert bool(res.conflict) and res.weights.tolist() == pytest.approx([0.001, 0.999])
    close(res.grads, [[1.5, 3.0], [0.75]])


@pytest.mark.parametrize("policy", ["safe", "official"])
def test_both_zero(policy: str) -> None:
    res = edge([[0.0, 0.0], [0.0]], [[0.0, 0.0], [0.0]], policy)
    close(res.grads, [[0.0, 0.0], [0.0]], atol=0)
    assert float(res.cosine) == 0.0


def test_identical_gradients() -> None:
    res = edge(G0, G0)
    assert not bool(res.conflict) and float(res.cosine) == pytest.approx(1.0)
    close(res.grads, [[3.0, 6.0], [1.5]])


@pytest.mark.parametrize("policy", ["safe", "official"])
def test_exactly_opposite_gradients_cancel(policy: str) -> None:
    """u = -g: weights (1/2, 1/2), d = 0 and g + u = 0: 0/0, no rescaling, a zero gradient."""
    res = edge(G0, [[-1.0, -2.0], [-0.5]], policy)
    assert res.weights.tolist() == [0.5, 0.5] and bool(res.conflict)
    close(res.grads, [[0.0, 0.0], [0.0]], atol=0)


@pytest.mark.parametrize("c", [2.0, 3.0, 0.25])
def test_opposite_gradients_of_other_size(c: float) -> None:
    """u = -c g: the min-norm point is 0 (Pareto-stationary) while |g + u| > 0. Official
    arithmetic: |d| = 0 gives inf * 0 = NaN, or rounding noise raised to |g + u| in a direction
    set by rounding (the official code's output for c = 2 is +1.5 g: it raises the unimodal
    loss). Safe: not raised, about 0."""
    u = [[-c * x for x in t] for t in G0]
    safe = edge(G0, u)
    assert all(bool(torch.isfinite(x).all()) for x in safe.grads)
    assert norm(safe.grads) <= 1e-12
    official = edge(G0, u, "official")
    assert official.weights.tolist() == pytest.approx([c / (1 + c), 1 / (1 + c)], abs=1e-12)
    raised = norm(official.grads) == pytest.approx(
        1.5 * abs(1 - c) * norm(tensors(G0, [(2,), (1,)])), rel=1e-3
    )
    assert raised or not all(bool(torch.isfinite(x).all()) for x in official.grads)


def test_tensor_rescale_can_break_the_common_direction() -> None:
    """The official per-tensor rescaling raises each tensor to its own |g_i + u_i|: here the
    first tensor's d_1 is tiny (raised 33x) and the result increases the unimodal loss
    (<out, u> = -16.5; the official code gives the same, parity script). rescale='encoder' keeps
    the min-norm direction."""
    g, u = [[-1.0, -1.0], [0.0]], [[3.0, 3.0], [-1.0]]
    gt, ut = tensors(g, [(2,), (1,)]), tensors(u, [(2,), (1,)])
    res = GF.mmpareto_combine(gt, ut)
    close(res.grads, [[-3.0, -3.0], [-1.5]])
    close(res.grads, ref_step(g, u)[1])
    assert res.factor.tolist() == pytest.approx([33.0, 2.0625])
    assert dot(res.grads, ut) == pytest.approx(-16.5) and dot(res.grads, gt) == pytest.approx(6.0)
    enc = GF.mmpareto_combine(gt, ut, rescale="encoder")
    assert dot(enc.grads, ut) > 0 and dot(enc.grads, gt) > 0
    assert norm(enc.grads) == pytest.approx(1.5 * 3.0)  # gamma |g + u|, |g + u| = 3 > |d|


# ------------------------------------------------------------------ API details
def test_single_tensors_dtypes_and_inputs_untouched() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        g = torch.tensor([[1.0, 2.0], [0.5, -1.0]], dtype=dtype, device=DEVICE)
        u = torch.tensor([[-2.0, -1.0], [3.0, 0.0]], dtype=dtype, device=DEVICE)
        g0, u0 = g.clone(), u.clone()
        res = GF.mmpareto_combine(g, u)
        assert len(res.grads) == 1 and res.grads[0].dtype == dtype and res.grads[0].shape == (2, 2)
        assert res.weights.dtype == F64 and res.cosine.dtype == F64
        assert torch.equal(g, g0) and torch.equal(u, u0)
        exact = GF.mmpareto_combine(g.double(), u.double())
        tol = {torch.float32: 1e-6, torch.float64: 1e-12}.get(dtype, 2e-2)
        torch.testing.assert_close(res.grads[0].double(), exact.grads[0], rtol=tol, atol=tol)
    zero_d = GF.mmpareto_combine(
        [torch.tensor(1.0, device=DEVICE)], [torch.tensor(-3.0, device=DEVICE)]
    )
    assert zero_d.grads[0].shape == () and zero_d.grads[0].dtype == torch.float32


def test_argument_errors() -> None:
    a = [torch.ones(2, device=DEVICE)]
    with pytest.raises(ValueError, match="shape"):
        GF.mmpareto_combine(a, [torch.ones(3, device=DEVICE)])
    with pytest.raises(ValueError, match="non-empty"):
        GF.mmpareto_combine([], [])
    for kwargs in (
        {"gamma": 0.0},
        {"gamma": math.nan},
        {"rescale": "layer"},
        {"policy": "x"},
        {"rtol": -1.0},
    ):
        with pytest.raises(ValueError):
            GF.mmpareto_combine(a, a, **kwargs)  # type: ignore[arg-type]
