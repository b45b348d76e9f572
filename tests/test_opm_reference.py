"""OPM and the revised OGM (TPAMI 2024) in gradmod.functional against float64 references written
here from the official source, GeWu-Lab/BML_TPAMI2024 at 4b3aa4f (not from gradmod):

* ``code/models/Classifier.py:58-72`` (``calcu_q``): the ratio of one modality's summed
  true-class probability to the other's, ``r = tanh(relu(ratio - 1))``; a modality with
  ``r > 0`` gets ``q_base * (1 + lam * r)``, the other 0; both clipped to [0, 1].
* ``code/models/Classifier.py:9-55`` (``custom_autograd``, ``Modality_drop.execute_drop``): one
  draw decides whether the step drops at all (``u >= 1 - p_exe``); per sample and modality a
  Bernoulli(1 - q) keep draw from torch's generator, ``[B, 1, M]``-shaped; kept features are
  divided by ``1 - theta`` with ``theta`` the width-weighted mean of q.
* ``code/main.py:118-152``: OGM's coefficients; ``s_0 / s_1 > 1`` slows modality 0 by
  ``1 - tanh(alpha * ratio)``, otherwise modality 1 by ``1 - tanh(alpha / ratio)``; with
  ``use_OGM_plus`` the other modality gets 4 instead.

The numbers of ``docs/methods/opm.md`` (computed by the official lines, ``opm_formula.py
--vector``) are checked too.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given
from settings import DEVICE

import gradmod.functional as GF

F64 = torch.float64

# docs/methods/opm.md: the methods.md OGM-GE logits, y = [0, 1, 2, 1]
Y = [0, 1, 2, 1]
Z_A = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 1.2, 0.0]]
Z_V = [[0.3, 0.2, 0.1], [0.0, 0.4, 0.5], [0.6, 0.1, 0.2], [0.2, 0.3, 0.1]]


def t(xs: list[float], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------- references
def ref_scores(z: list[list[float]], y: list[int]) -> float:
    """Summed softmax probability of the true class (Classifier.py:142-143), a Python loop."""
    total = 0.0
    for row, c in zip(z, y, strict=True):
        den = sum(math.exp(v) for v in row)
        total += math.exp(row[c]) / den
    return total


def _div(a: float, b: float) -> float:
    """IEEE division as torch does it (x / 0 = inf, 0 / 0 = nan)."""
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)


def ref_q(s0: float, s1: float, q_base: float, lam: float) -> list[float]:
    """Classifier.py:58-72, for two modalities."""
    out = []
    for mine, other in ((s0, s1), (s1, s0)):
        excess = _div(mine, other) - 1
        r = math.nan if math.isnan(excess) else math.tanh(max(excess, 0.0))
        q = q_base * (1 + lam * r) if r > 0 else 0.0  # a NaN r is not > 0
        out.append(min(max(q, 0.0), 1.0))
    return out


def ref_drop(
    feats: list[torch.Tensor], q: list[float], keep: list[list[bool]], dims: list[int]
) -> list[torch.Tensor]:
    """Classifier.py:39-49: keep-mask times features, divided by 1 - theta (the official code
    then removes the samples that no modality kept, Classifier.py:50-52; gradmod reports them in
    ``keep`` instead: the official rule for q never produces one)."""
    theta = sum(d * p for d, p in zip(dims, q, strict=True)) / sum(dims)
    out = []
    for f, k in zip(feats, keep, strict=True):
        mask = torch.tensor(k, dtype=F64).reshape(-1, *([1] * (f.dim() - 1)))
        out.append(f.double().cpu() * mask / (1 - theta))
    return out


def ref_keep(q: list[float], batch: int, seed: int) -> list[list[bool]]:
    """Classifier.py:45: Bernoulli(1 - q) over float32 probabilities, sampled with shape
    [B, 1] (so [B, 1, M], sample-major) from torch's global generator after manual_seed."""
    torch.manual_seed(seed)
    probs = 1 - torch.tensor(q, dtype=torch.float32)
    draws = torch.distributions.Bernoulli(probs=probs).sample((batch, 1))  # [B, 1, M]
    return [[bool(draws[i, 0, m]) for i in range(batch)] for m in range(len(q))]


def ref_ogm(s0: float, s1: float, alpha: float, plus: bool) -> list[float]:
    """main.py:118-152."""
    r1, r2 = _div(s0, s1), _div(s1, s0)
    if r1 > 1:
        return [1.0, 4.0] if plus else [1 - math.tanh(alpha * r1), 1.0]
    return [4.0, 1.0] if plus else [1.0, 1 - math.tanh(alpha * r2)]


score = st.floats(0.0, 64.0, allow_nan=False, allow_subnormal=False)  # zero-floor: tiny
pos_score = st.floats(1e-3, 64.0, allow_nan=False)
q_base_st = st.floats(0.0, 1.0)
lam_st = st.floats(0.0, 3.0)


# ------------------------------------------------------------------------------- test vector
def test_spec_vector() -> None:
    y = torch.tensor(Y, device=DEVICE)
    s = torch.stack([GF.true_class_probability(t(z), y).sum() for z in (Z_A, Z_V)])
    torch.testing.assert_close(s, t([2.417291086, 1.389034093]), atol=1e-9, rtol=0)
    assert [ref_scores(z, Y) for z in (Z_A, Z_V)] == pytest.approx(s.tolist(), abs=1e-12)
    q = GF.opm_drop_probability(s, q_base=0.5, lam=0.5)
    # the official q is float32: 0.657326698
    torch.testing.assert_close(q, t([0.657326709, 0.0]), atol=1e-9, rtol=0)
    assert abs(float(q[0].float()) - 0.657326698) < 1e-9
    scale = GF.opm_feature_scale(q, dims=[512, 512])
    torch.testing.assert_close(scale, t([1.489565640] * 2), atol=1e-9, rtol=0)
    f1 = torch.arange(1.0, 13.0, dtype=F64, device=DEVICE).reshape(4, 3) / 10
    f2 = torch.ones(4, 3, dtype=F64, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    out = GF.opm_drop([f1, f2], q, generator=gen, dims=[512, 512])
    assert bool(out.executed)
    if DEVICE.type == "cpu":  # the official draws: CPU generator, seed 0
        assert out.keep.tolist() == [[False, True, True, False], [True] * 4]
        expected = f1 * 1.4895656404663964
        expected[0] = expected[3] = 0
        torch.testing.assert_close(out.features[0], expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.features[1], f2 * 1.4895656404663964, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        GF.ogm_tpami_coefficients(s, alpha=0.8), t([0.116342937, 1.0]), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        GF.ogm_tpami_coefficients(s, alpha=1.0), t([0.059742328, 1.0]), atol=1e-9, rtol=0
    )
    k = GF.ogm_tpami_coefficients(s, variant="boost")
    torch.testing.assert_close(k, t([1.0, 4.0]))


# ------------------------------------------------------------------------ dropping probability
@given(score, score, q_base_st, lam_st)
def test_q_matches_official_reference(s0: float, s1: float, q_base: float, lam: float) -> None:
    q = GF.opm_drop_probability(t([s0, s1]), q_base=q_base, lam=lam)
    torch.testing.assert_close(q, t(ref_q(s0, s1, q_base, lam)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ([3.0, 3.0], [0.0, 0.0]),  # balance: nothing dropped
        ([0.0, 0.0], [0.0, 0.0]),  # 0/0: the official NaN ratio is "not dominant"
        ([2.0, 0.0], [0.75, 0.0]),  # a zero partner: dominant by far, q_base * (1 + lam)
        ([0.0, 2.0], [0.0, 0.75]),
        ([math.inf, 1.0], [0.75, 0.0]),
        ([math.nan, 1.0], [0.0, 0.0]),
    ],
)
def test_q_edge_cases(s: list[float], expected: list[float]) -> None:
    q = GF.opm_drop_probability(t(s), q_base=0.5, lam=0.5)
    torch.testing.assert_close(q, t(expected))
    assert q.tolist() == pytest.approx(ref_q(s[0], s[1], 0.5, 0.5))


def test_q_is_clipped_and_jumps_at_balance() -> None:
    q = GF.opm_drop_probability(t([1.0 + 1e-12, 1.0]), q_base=0.5, lam=0.5)
    assert q.tolist() == pytest.approx([0.5, 0.0])  # just above balance: q_base at once
    q = GF.opm_drop_probability(t([100.0, 1.0]), q_base=0.8, lam=1.0)
    assert q.tolist() == [1.0, 0.0]  # 0.8 * (1 + tanh(99)) clipped


@given(st.lists(score, min_size=2, max_size=6), q_base_st, lam_st)
def test_q_invariants(s: list[float], q_base: float, lam: float) -> None:
    scores = t(s)
    q = GF.opm_drop_probability(scores, q_base=q_base, lam=lam)
    assert q.shape == scores.shape and q.dtype == F64 and q.device == scores.device
    assert bool(((q >= 0) & (q <= 1)).all())
    rho = [
        _div(x, sum(v for j, v in enumerate(s) if j != m) / (len(s) - 1)) for m, x in enumerate(s)
    ]
    for m, r in enumerate(rho):
        if not r > 1:  # never drop a modality that does not dominate
            assert float(q[m]) == 0.0
        elif r > 1 + 1e-9:
            assert q_base - 1e-12 <= float(q[m]) <= min(1.0, q_base * (1 + lam)) + 1e-12
    # the weakest modality is never dropped: no sample loses every modality
    assert float(q[int(torch.argmin(scores))]) == 0.0


@given(st.integers(2, 6), pos_score, q_base_st, lam_st)
def test_q_neutral_at_balance(m: int, s: float, q_base: float, lam: float) -> None:
    q = GF.opm_drop_probability(t([s] * m), q_base=q_base, lam=lam)
    assert q.tolist() == [0.0] * m


@given(st.lists(pos_score, min_size=2, max_size=6), st.floats(1e-3, 1e3), st.randoms())
def test_q_scale_invariant_and_permutation_equivariant(
    s: list[float], c: float, rnd: object
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    q = GF.opm_drop_probability(t(s))
    mean_others = [(sum(s) - x) / (len(s) - 1) for x in s]
    assume(all(abs(x / o - 1) > 1e-9 for x, o in zip(s, mean_others, strict=True)))
    torch.testing.assert_close(GF.opm_drop_probability(t(s) * c), q, atol=1e-9, rtol=1e-9)
    perm = list(range(len(s)))
    rnd.shuffle(perm)
    qp = GF.opm_drop_probability(t([s[i] for i in perm]))
    torch.testing.assert_close(qp, q[perm], atol=1e-12, rtol=1e-12)


@given(st.lists(pos_score, min_size=2, max_size=5), st.integers(0, 4), st.floats(1.0, 10.0))
def test_q_monotone_in_the_discrepancy(s: list[float], m: int, factor: float) -> None:
    """Raising one modality's score never lowers its own q nor raises anyone else's."""
    m %= len(s)
    up = list(s)
    up[m] *= factor
    q, qu = GF.opm_drop_probability(t(s)), GF.opm_drop_probability(t(up))
    assert float(qu[m]) >= float(q[m]) - 1e-12
    for j in range(len(s)):
        if j != m:
            assert float(qu[j]) <= float(q[j]) + 1e-12


def test_q_dtype_device_and_bad_arguments() -> None:
    q = GF.opm_drop_probability(t([2.0, 1.0], torch.float32))
    assert q.dtype == torch.float32 and q.device.type == DEVICE.type
    with pytest.raises(ValueError, match="M >= 2"):
        GF.opm_drop_probability(t([1.0]))
    with pytest.raises(ValueError, match="q_base"):
        GF.opm_drop_probability(t([1.0, 2.0]), q_base=1.5)
    with pytest.raises(ValueError, match="lam"):
        GF.opm_drop_probability(t([1.0, 2.0]), lam=-0.1)
    with pytest.raises(ValueError, match="floating"):
        GF.opm_drop_probability(torch.tensor([1, 2], device=DEVICE))


def test_scores_are_not_differentiated_through() -> None:
    s = t([2.0, 1.0]).requires_grad_()
    assert not GF.opm_drop_probability(s).requires_grad
    assert not GF.ogm_tpami_coefficients(s).requires_grad


# ---------------------------------------------------------------------------------- rescaling
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=4), st.data())
def test_feature_scale(q: list[float], data: st.DataObject) -> None:
    dims = data.draw(st.lists(st.integers(1, 600), min_size=len(q), max_size=len(q)))
    theta = sum(d * p for d, p in zip(dims, q, strict=True)) / sum(dims)
    shared = GF.opm_feature_scale(t(q), dims=dims)
    expected = 1 / (1 - theta) if theta < 1 else 1.0
    torch.testing.assert_close(shared, t([expected] * len(q)), rtol=1e-12, atol=0)
    per = GF.opm_feature_scale(t(q), dims=dims, rescale="per_modality")
    torch.testing.assert_close(
        per, t([1 / (1 - p) if p < 1 else 1.0 for p in q]), rtol=1e-12, atol=0
    )
    assert GF.opm_feature_scale(t(q), dims=dims, rescale="none").tolist() == [1.0] * len(q)
    assert bool(torch.isfinite(shared).all() and torch.isfinite(per).all())


def test_feature_scale_bad_arguments() -> None:
    with pytest.raises(ValueError, match="dims"):
        GF.opm_feature_scale(t([0.5, 0.0]), dims=[3])
    with pytest.raises(ValueError, match="dims"):
        GF.opm_feature_scale(t([0.5, 0.0]), dims=[3, 0])
    with pytest.raises(ValueError, match="rescale"):
        GF.opm_feature_scale(t([0.5, 0.0]), dims=[3, 3], rescale="mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- dropping
def _feats(batch: int, widths: tuple[int, ...] = (5, 3), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, w, generator=g, dtype=F64).to(DEVICE) for w in widths]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the official draws are CPU draws")
@given(
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=3), st.integers(1, 40), st.integers(0, 2**31)
)
def test_drop_matches_official_reference(q: list[float], batch: int, seed: int) -> None:
    # every q = 1 (theta = 1): the official 0 / 0 is NaN, gradmod's features are 0 (tested below)
    assume(min(q) < 1)
    feats = _feats(batch, (4, 2, 3)[: len(q)], seed=seed % 1000)
    feats = [f.requires_grad_() for f in feats]
    out = GF.opm_drop(feats, t(q), generator=_gen(seed))
    keep = ref_keep(q, batch, seed)
    assert out.keep.tolist() == keep
    dims = [f.shape[1] for f in feats]
    for got, want in zip(out.features, ref_drop(feats, q, keep, dims), strict=True):
        torch.testing.assert_close(got.detach(), want, atol=1e-12, rtol=1e-12)
    # the gradient reaching the features: the incoming one times keep / (1 - theta)
    ups = [torch.randn_like(f) for f in feats]
    sum((o * u).sum() for o, u in zip(out.features, ups, strict=True)).backward()
    for f, want in zip(feats, ref_drop(ups, q, keep, dims), strict=True):
        torch.testing.assert_close(f.grad, want.to(f.grad), atol=1e-12, rtol=1e-12)  # type: ignore[arg-type]


def test_drop_is_deterministic_and_rank_independent() -> None:
    q = t([0.6, 0.0])
    a = GF.opm_drop(_feats(64), q, generator=_gen(5), p_exe=0.7)
    b = GF.opm_drop(_feats(64), q, generator=_gen(5), p_exe=0.7)  # another "rank", same seed
    assert torch.equal(a.keep, b.keep) and torch.equal(a.executed, b.executed)
    for x, y in zip(a.features, b.features, strict=True):
        assert torch.equal(x, y)
    c = GF.opm_drop(_feats(64), q, generator=_gen(6), p_exe=1.0)
    assert not torch.equal(a.keep, c.keep) or not bool(a.executed)
    # per-rank masks, one shared decision
    d = GF.opm_drop(_feats(64), q, generator=_gen(7), execute_generator=_gen(1), p_exe=0.5)
    e = GF.opm_drop(_feats(64), q, generator=_gen(8), execute_generator=_gen(1), p_exe=0.5)
    assert torch.equal(d.executed, e.executed)


def test_drop_consumes_the_same_draws_whatever_happens() -> None:
    """B*M masks and one u per call, executed or not: the next call sees the same stream."""
    q = t([0.6, 0.0])
    g1, g2 = _gen(3), _gen(3)
    GF.opm_drop(_feats(16), q, generator=g1, p_exe=0.0)
    GF.opm_drop(_feats(16), q, generator=g2, p_exe=1.0)
    assert torch.equal(
        torch.rand(4, generator=g1, device=DEVICE), torch.rand(4, generator=g2, device=DEVICE)
    )


def test_not_executed_is_the_identity() -> None:
    feats = _feats(9)
    out = GF.opm_drop(feats, t([0.9, 0.0]), generator=_gen(0), p_exe=0.0)
    assert not bool(out.executed) and bool(out.keep.all())
    assert out.scale.tolist() == [1.0, 1.0]
    for x, y in zip(out.features, feats, strict=True):
        assert torch.equal(x, y)


def test_execution_and_keep_frequencies() -> None:
    q = t([0.3, 0.0, 0.8])
    executed = 0
    n = 400
    for seed in range(n):
        out = GF.opm_drop(_feats(4, (2, 2, 2)), q, generator=_gen(seed), p_exe=0.7)
        executed += int(out.executed)
    assert abs(executed / n - 0.7) < 4 * math.sqrt(0.21 / n)
    out = GF.opm_drop(_feats(20000, (2, 2, 2)), q, generator=_gen(0), p_exe=1.0)
    rate = out.keep.double().mean(dim=1)
    torch.testing.assert_close(rate, t([0.7, 1.0, 0.2]), atol=0.015, rtol=0)
    assert bool(out.keep[1].all())  # q = 0 is never dropped


def test_per_modality_rescale_is_unbiased() -> None:
    q = t([0.6, 0.0])
    feats = [torch.ones(40000, 1, dtype=F64, device=DEVICE)] * 2
    out = GF.opm_drop(feats, q, generator=_gen(0), rescale="per_modality")
    means = [float(f.mean()) for f in out.features]
    assert means == pytest.approx([1.0, 1.0], abs=0.03)
    shared = GF.opm_drop(feats, q, generator=_gen(0))  # official: (1 - q_m) / (1 - theta)
    means = [float(f.mean()) for f in shared.features]
    assert means == pytest.approx([0.4 / 0.7, 1 / 0.7], abs=0.03)


def test_certain_drop_gives_zeros_not_nan() -> None:
    for rescale in ("shared", "per_modality"):
        out = GF.opm_drop(_feats(6), t([1.0, 1.0]), generator=_gen(0), rescale=rescale)  # type: ignore[arg-type]
        for f in out.features:
            assert bool((f == 0).all())


def test_drop_shapes_dtypes_and_no_gradient_to_the_probabilities() -> None:
    feats = [
        torch.randn(7, 3, 4, 4, device=DEVICE, requires_grad=True),
        torch.randn(7, 6, device=DEVICE, dtype=torch.bfloat16, requires_grad=True),
    ]
    q = t([0.7, 0.2]).requires_grad_()
    out = GF.opm_drop(feats, q, generator=_gen(1))
    assert [f.shape for f in out.features] == [f.shape for f in feats]
    assert [f.dtype for f in out.features] == [f.dtype for f in feats]
    assert out.keep.shape == (2, 7) and out.keep.dtype == torch.bool
    sum(f.float().sum() for f in out.features).backward()
    assert q.grad is None
    assert all(f.grad is not None for f in feats)
    nan = GF.opm_drop(_feats(5), t([math.nan, 0.0]), generator=_gen(0))
    assert bool(nan.keep.all())  # NaN counts as 0


def test_empty_batch() -> None:
    out = GF.opm_drop(_feats(0), t([0.5, 0.0]), generator=_gen(0))
    assert out.keep.shape == (2, 0) and [f.shape[0] for f in out.features] == [0, 0]


def test_drop_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one dropping probability"):
        GF.opm_drop(_feats(3), t([0.5]))
    with pytest.raises(ValueError, match="batch size"):
        GF.opm_drop([*_feats(3)[:1], *_feats(4)[1:]], t([0.5, 0.0]))
    with pytest.raises(ValueError, match="p_exe"):
        GF.opm_drop(_feats(3), t([0.5, 0.0]), p_exe=1.5)
    other = "cpu" if DEVICE.type != "cpu" else "meta"
    try:
        gen = torch.Generator(device=other)
    except RuntimeError:
        return
    with pytest.raises(ValueError, match="generator"):
        GF.opm_drop(_feats(3), t([0.5, 0.0]), generator=gen)


# -------------------------------------------------------------------------------------- OGM
@given(score, score, st.floats(0.05, 3.0), st.booleans())
def test_ogm_matches_official_reference(s0: float, s1: float, alpha: float, plus: bool) -> None:
    assume(s0 > 0 or s1 > 0)  # both 0: the official coefficient is NaN (gradmod's is 1)
    k = GF.ogm_tpami_coefficients(t([s0, s1]), alpha=alpha, variant="boost" if plus else "slow")
    torch.testing.assert_close(k, t(ref_ogm(s0, s1, alpha, plus)), atol=1e-12, rtol=1e-12)


@given(pos_score, st.floats(0.05, 3.0))
def test_ogm_tie_break_differs_from_cvpr(s: float, alpha: float) -> None:
    k = GF.ogm_tpami_coefficients(t([s, s]), alpha=alpha)
    assert k.tolist() == pytest.approx([1.0, 1 - math.tanh(alpha)])  # TPAMI: modality 1 slowed
    cvpr = GF.ogm_ge_coefficients(t([s, s]), alpha=alpha)
    assert cvpr.tolist() == pytest.approx([1 - math.tanh(alpha), 1.0])  # CVPR: modality 0
    assert GF.ogm_tpami_coefficients(t([s, s]), variant="boost").tolist() == [4.0, 1.0]


@given(pos_score, pos_score, st.floats(0.05, 3.0))
def test_ogm_equals_cvpr_rule_off_ties(s0: float, s1: float, alpha: float) -> None:
    assume(s0 != s1)
    k = GF.ogm_tpami_coefficients(t([s0, s1]), alpha=alpha)
    torch.testing.assert_close(k, GF.ogm_ge_coefficients(t([s0, s1]), alpha=alpha))


@given(st.lists(score, min_size=2, max_size=6), st.floats(0.05, 3.0))
def test_ogm_invariants(s: list[float], alpha: float) -> None:
    assume(sum(s) > 0)
    k = GF.ogm_tpami_coefficients(t(s), alpha=alpha)
    # 0 only in the limit of a partner scoring 0 (rho = s / tiny): 2 sigmoid(-2 alpha rho) = 0
    assert bool(((k >= 0) & (k <= 1)).all())
    if min(s) > 0 and alpha * max(s) / min(s) < 300:
        assert bool((k > 0).all())  # 2 sigmoid(-2x) stays positive up to x ~ 350 (float64)
    b = GF.ogm_tpami_coefficients(t(s), variant="boost", boost=2.5)
    assert set(b.tolist()) <= {1.0, 2.5}
    if len(s) > 2 and len(set(s)) == 1:
        assert k.tolist() == [1.0] * len(s) and b.tolist() == [1.0] * len(s)  # tie: neutral


def test_ogm_never_rounds_to_a_frozen_encoder() -> None:
    k = GF.ogm_tpami_coefficients(t([30.0, 1.0]), alpha=1.0)
    assert 0 < float(k[0]) < 1e-20  # the official float32 1 - tanh(30) is exactly 0
    assert float(k[1]) == 1.0


def test_ogm_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        GF.ogm_tpami_coefficients(t([1.0, 2.0]), alpha=0.0)
    with pytest.raises(ValueError, match="boost"):
        GF.ogm_tpami_coefficients(t([1.0, 2.0]), variant="boost", boost=-1.0)
    with pytest.raises(ValueError, match="variant"):
        GF.ogm_tpami_coefficients(t([1.0, 2.0]), variant="plus")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- no host sync
def test_rules_compile_without_graph_breaks() -> None:
    """fullgraph=True refuses .item(), Python branches on tensors and other host syncs."""
    q_fn = torch.compile(GF.opm_drop_probability, backend="eager", fullgraph=True)
    k_fn = torch.compile(GF.ogm_tpami_coefficients, backend="eager", fullgraph=True)
    s_fn = torch.compile(GF.opm_feature_scale, backend="eager", fullgraph=True)
    for s in ([2.0, 1.0], [1.0, 1.0, 3.0]):
        torch.testing.assert_close(q_fn(t(s)), GF.opm_drop_probability(t(s)))
        torch.testing.assert_close(
            k_fn(t(s), alpha=0.8), GF.ogm_tpami_coefficients(t(s), alpha=0.8)
        )
    q = t([0.6, 0.0])
    torch.testing.assert_close(s_fn(q, dims=[4, 4]), GF.opm_feature_scale(q, dims=[4, 4]))
