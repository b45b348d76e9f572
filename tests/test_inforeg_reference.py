"""InfoReg's functions (gradmod.functional) against a naive float64 reference written here.

The reference follows the authors' training loop (GeWu-Lab/InfoReg_CVPR2025 ``main.py`` at
939b2ed), read from the source, not from gradmod:

* ``main.py:694`` the per-epoch trace list starts as ten zeros; ``main.py:237-243`` at epoch 0
  ``k = 1``, else ``tr1 = sum(list[-10:]) / 10``, ``tr2 = sum(list[-11:-1]) / 10``,
  ``k = (tr1 - tr2) / tr1`` (from the *audio* list only);
* ``main.py:259`` the model is deep-copied at the start of every epoch (the anchor);
* ``main.py:460-461`` ``score_m = sum_i softmax(out_m)[i][label[i]]`` (a batch *sum*);
* ``main.py:465-485`` audio ahead (``score_a > score_v``) and ``k > 0.05``:
  ``beta = 0.95 * exp(tanh(score_a - score_v))``, ``beta2 = 0``; visual ahead:
  ``beta2 = 0.1 * exp(tanh(score_v - score_a))``, ``beta = 0``; otherwise both 0;
* ``main.py:489-495`` after backward, every ``audio_net`` parameter's ``grad += beta * (w - w_t)``
  and every ``visual_net`` parameter's ``grad += beta2 * (w - w_t)`` (``w_t`` the anchor);
* ``main.py:501-523`` then, per step, ``fim[name] += weight.grad * weight.grad`` for every
  ``Conv2d`` / ``Linear`` of the encoder; ``main.py:569-577`` at the epoch's end the trace is
  ``sum over those modules of fim[name].mean()``, appended to the list (``main.py:594-595``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from _refs import softmax_true
from hypothesis import assume, given
from settings import DEVICE, DTYPE, RTOL
from torch import nn

import gradmod.functional as GF

F64 = torch.float64


def t(xs: Sequence[float] | Sequence[Sequence[float]], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(xs, dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------- naive reference
def naive_rate(traces: Sequence[float]) -> float:
    """main.py:694 + 237-243, as plain Python (raises ZeroDivisionError like the original)."""
    history = [0.0] * 10 + list(traces)
    if len(traces) == 0:  # epoch == 0
        return 1.0
    tr1 = sum(history[-10:]) / 10
    tr2 = sum(history[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def naive_beta(
    s_a: float, s_v: float, k: float, lam: tuple[float, float] = (0.95, 0.1), thr: float = 0.05
) -> tuple[float, float]:
    """main.py:465-485."""
    if s_a > s_v and k > thr:
        return lam[0] * math.exp(math.tanh(s_a - s_v)), 0.0
    if s_a < s_v and k > thr:
        return 0.0, lam[1] * math.exp(math.tanh(s_v - s_a))
    return 0.0, 0.0


def naive_fisher(steps: Sequence[Sequence[torch.Tensor]]) -> float:
    """main.py:501-505 + 569-572 for one encoder: elementwise sum over steps, then mean per
    tensor, then the sum over tensors. ``steps[i]`` holds step i's weight gradients."""
    acc = [[0.0] * g.numel() for g in steps[0]]
    for grads in steps:
        for a, g in zip(acc, grads, strict=True):
            for i, x in enumerate(g.reshape(-1).tolist()):
                a[i] += x * x
    return sum(sum(a) / len(a) for a in acc)


def naive_proximal(w: torch.Tensor, w_t: torch.Tensor, beta: float) -> list[float]:
    """main.py:492: beta * (w - w_t), elementwise."""
    return [
        beta * (x - y)
        for x, y in zip(w.reshape(-1).tolist(), w_t.reshape(-1).tolist(), strict=True)
    ]


# ------------------------------------------------------------------------- the test vector
Y = [0, 1, 2, 1]
ZA = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 1.2, 0.0]]
ZV = [[0.3, 0.2, 0.1], [0.0, 0.4, 0.5], [0.6, 0.1, 0.2], [0.2, 0.3, 0.1]]
LAM = (0.95, 0.1)


def test_spec_vector() -> None:
    """docs/methods/inforeg.md's test vector (computed there by exec'ing the official lines)."""
    for traces, k in (
        ([], 1.0),
        ([4.0], 1.0),
        ([4.0, 6.0], 0.6),
        ([4.0, 6.0, 6.5], 0.393939),
        ([4.0, 6.0, 6.5] + [6.5] * 9, 0.007692),
    ):
        for policy in ("safe", "official"):
            got = GF.acquisition_rate(t(traces), policy=policy)  # type: ignore[arg-type]
            assert float(got) == pytest.approx(k, abs=1e-6)
        assert naive_rate(traces) == pytest.approx(k, abs=1e-6)
    y = torch.tensor(Y, device=DEVICE)
    s = torch.stack([GF.true_class_probability(t(z), y).sum() for z in (ZA, ZV)])
    torch.testing.assert_close(s, t([2.417291, 1.389034]), atol=1e-6, rtol=0)
    lam = t(LAM)
    torch.testing.assert_close(
        GF.inforeg_beta(s, 0.393939, strength=lam), t([2.058371, 0.0]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        GF.inforeg_beta(s.flip(0), 0.393939, strength=lam), t([0.0, 0.216671]), atol=1e-6, rtol=0
    )
    assert GF.inforeg_beta(s, 0.04, strength=lam).tolist() == [0.0, 0.0]
    w, w_t = t([[0.5, -1.0], [2.0, 0.0]]), t([[0.4, -1.2], [2.0, 0.5]])
    (g,) = GF.proximal_gradient([w], [w_t], t(2.0))
    torch.testing.assert_close(g, t([[0.2, 0.4], [0.0, -1.0]]), atol=1e-12, rtol=0)
    ga, gv = t([[0.1, -0.2], [0.3, 0.0]]), t([[0.5, 0.5, -1.0]])
    tr = GF.fisher_trace([[ga], [gv]]) + GF.fisher_trace([[2 * ga], [0 * gv]])
    torch.testing.assert_close(tr, t([0.175, 0.5]), atol=1e-12, rtol=0)


# ------------------------------------------------------------------------- rate
traces_st = st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=0, max_size=30)


@given(traces_st)
def test_rate_matches_naive(traces: list[float]) -> None:
    try:
        ref: float | None = naive_rate(traces)
    except ZeroDivisionError:
        ref = None
    off = float(GF.acquisition_rate(t(traces), policy="official"))
    safe = float(GF.acquisition_rate(t(traces), policy="safe"))
    if ref is None:  # no information in the last 10 epochs
        assert not math.isfinite(off) and safe == 0.0
    else:
        assert off == pytest.approx(ref, rel=1e-9, abs=1e-12)
        assert safe == pytest.approx(ref, rel=1e-9, abs=1e-12)


@given(
    st.lists(
        st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf])),
        max_size=30,
    )
)
def test_safe_rate_is_finite_and_at_most_one(traces: list[float]) -> None:
    k = float(GF.acquisition_rate(t(traces)))
    assert math.isfinite(k) and k <= 1.0 + 1e-12
    assert float(GF.acquisition_rate(t([1e308] * 12))) == 0.0  # the sums overflow


@given(traces_st, st.floats(1e-3, 1e3))
def test_rate_is_scale_invariant(traces: list[float], c: float) -> None:
    assume(sum(traces[-10:]) > 1e-6)
    k = GF.acquisition_rate(t(traces))
    kc = GF.acquisition_rate(t([c * x for x in traces]))
    torch.testing.assert_close(kc, k, rtol=1e-9, atol=1e-9)


@given(traces_st, traces_st, st.integers(1, 12))
def test_rate_reads_only_the_last_window_plus_one_epochs(
    old: list[float], recent: list[float], window: int
) -> None:
    assume(len(recent) >= window + 1)
    k = GF.acquisition_rate(t(recent), window=window)
    k2 = GF.acquisition_rate(t(old + recent), window=window)
    torch.testing.assert_close(k2, k, rtol=0, atol=0, equal_nan=True)


@given(st.floats(1e-3, 1e3), st.integers(1, 40), st.integers(1, 12))
def test_rate_of_a_constant_trace(c: float, epochs: int, window: int) -> None:
    """T constant: k = 1/e while the zero start is inside the window, then exactly 0."""
    k = float(GF.acquisition_rate(t([c] * epochs), window=window))
    expected = 1.0 / epochs if epochs <= window else 0.0
    assert k == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_rate_per_modality_columns() -> None:
    a, v = [4.0, 6.0, 6.5], [1.0, 0.5, 0.25]
    k = GF.acquisition_rate(t([[x, y] for x, y in zip(a, v, strict=True)]))
    assert k.shape == (2,)
    assert float(k[0]) == pytest.approx(naive_rate(a))
    assert float(k[1]) == pytest.approx(naive_rate(v))
    empty = GF.acquisition_rate(torch.zeros(0, 3, dtype=F64, device=DEVICE))
    assert empty.tolist() == [1.0, 1.0, 1.0]


def test_rate_zero_history_policies() -> None:
    """Nothing learned for 10 epochs: the official Python raises; here nan (official) / 0."""
    traces = [1.0] + [0.0] * 10
    with pytest.raises(ZeroDivisionError):
        naive_rate(traces)
    assert not math.isfinite(float(GF.acquisition_rate(t(traces), policy="official")))
    assert math.isnan(float(GF.acquisition_rate(t([0.0] * 3), policy="official")))
    assert float(GF.acquisition_rate(t(traces))) == 0.0


def test_rate_argument_errors() -> None:
    with pytest.raises(ValueError, match="window"):
        GF.acquisition_rate(t([1.0]), window=0)
    with pytest.raises(ValueError, match="window"):
        GF.acquisition_rate(t([1.0]), window=True)
    with pytest.raises(ValueError, match="policy"):
        GF.acquisition_rate(t([1.0]), policy="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[E\]"):
        GF.acquisition_rate(torch.zeros(2, 2, 2, dtype=F64))


# ------------------------------------------------------------------------- beta
logit_rows = st.lists(st.floats(-8, 8), min_size=3, max_size=3)


@given(
    st.lists(st.tuples(logit_rows, logit_rows, st.integers(0, 2)), min_size=1, max_size=12),
    st.sampled_from([1.0, 0.6, 0.05, 0.0500001, 0.04, -1.0]),
    st.sampled_from(["runner_up", "mean"]),
)
def test_beta_matches_naive_for_two_modalities(
    rows: list[tuple[list[float], list[float], int]], k: float, versus: str
) -> None:
    za = t([r[0] for r in rows])
    zv = t([r[1] for r in rows])
    y = torch.tensor([r[2] for r in rows], device=DEVICE)
    s_a, s_v = sum(softmax_true(za, y)), sum(softmax_true(zv, y))
    s = torch.stack([GF.true_class_probability(z, y).sum() for z in (za, zv)])
    assume(abs(s_a - s_v) > 1e-9 or s_a == s_v)  # the float summation order decides a near-tie
    got = GF.inforeg_beta(s, k, strength=t(LAM), versus=versus)  # type: ignore[arg-type]
    torch.testing.assert_close(got, t(naive_beta(s_a, s_v, k)), rtol=1e-9, atol=1e-12)


def test_beta_exact_tie_regulates_none() -> None:
    y = torch.tensor(Y, device=DEVICE)
    s = GF.true_class_probability(t(ZA), y).sum().repeat(2)
    assert GF.inforeg_beta(s, 1.0, strength=1.0).tolist() == [0.0, 0.0]
    assert naive_beta(float(s[0]), float(s[1]), 1.0) == (0.0, 0.0)


scores_st = st.lists(st.floats(0.0, 64.0), min_size=2, max_size=6)


@given(scores_st, st.floats(0.0, 3.0), st.floats(-1.0, 1.0))
def test_beta_runner_up_regulates_only_the_strict_leader(
    scores: list[float], lam: float, k: float
) -> None:
    b = GF.inforeg_beta(t(scores), k, strength=lam)
    top = max(scores)
    leaders = [i for i, s in enumerate(scores) if s == top]
    for i, bi in enumerate(b.tolist()):
        if i == leaders[0] and len(leaders) == 1 and k > 0.05 and lam > 0:
            second = max(s for j, s in enumerate(scores) if j != i)
            assert bi == pytest.approx(lam * math.exp(math.tanh(top - second)), rel=1e-12)
            assert lam <= bi <= math.e * lam
        else:
            assert bi == 0.0


@given(scores_st, st.floats(0.1, 3.0))
def test_beta_mean_regulates_every_modality_above_the_mean_of_the_others(
    scores: list[float], lam: float
) -> None:
    b = GF.inforeg_beta(t(scores), 1.0, strength=lam, versus="mean")
    m = len(scores)
    for i, bi in enumerate(b.tolist()):
        gap = scores[i] - (sum(scores) - scores[i]) / (m - 1)
        if 0 < abs(gap) < 1e-9:
            continue  # at the mean up to rounding: either side is right
        expected = lam * math.exp(math.tanh(gap)) if gap > 0 else 0.0
        assert bi == pytest.approx(expected, rel=1e-9, abs=1e-12)


@given(scores_st, st.randoms(use_true_random=False), st.sampled_from(["runner_up", "mean"]))
def test_beta_permutation_equivariance(scores: list[float], rnd: object, versus: str) -> None:
    perm = list(range(len(scores)))
    rnd.shuffle(perm)  # type: ignore[attr-defined]
    lam = t([0.5 + i for i in range(len(scores))])
    b = GF.inforeg_beta(t(scores), 1.0, strength=lam, versus=versus)  # type: ignore[arg-type]
    bp = GF.inforeg_beta(
        t([scores[i] for i in perm]),
        1.0,
        strength=lam[perm],
        versus=versus,  # type: ignore[arg-type]
    )
    exact = versus == "runner_up"  # a mean is summed in another order
    torch.testing.assert_close(bp, b[perm], rtol=0 if exact else 1e-12, atol=0)


@given(scores_st, st.floats(-10, 10))
def test_beta_depends_on_score_differences_only(scores: list[float], c: float) -> None:
    s = t(scores)
    gaps = [abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1 :]]
    assume(min(gaps) > 1e-6)  # the shift may round a near-tie into a tie or out of one
    for versus in ("runner_up", "mean"):
        b = GF.inforeg_beta(s, 1.0, strength=1.0, versus=versus)  # type: ignore[arg-type]
        bc = GF.inforeg_beta(s + c, 1.0, strength=1.0, versus=versus)  # type: ignore[arg-type]
        torch.testing.assert_close(bc, b, rtol=1e-9, atol=1e-9)


@given(st.floats(0.0, 64.0), st.floats(0.0, 64.0))
def test_beta_two_modalities_runner_up_equals_mean(a: float, b: float) -> None:
    s = t([a, b])
    torch.testing.assert_close(
        GF.inforeg_beta(s, 1.0, strength=t(LAM)),
        GF.inforeg_beta(s, 1.0, strength=t(LAM), versus="mean"),
        rtol=0,
        atol=0,
    )


def test_beta_per_modality_rate_gates_each_modality() -> None:
    s = t([3.0, 1.0, 2.0])
    open_a = GF.inforeg_beta(s, t([0.5, 0.0, 0.0]), strength=1.0)
    closed_a = GF.inforeg_beta(s, t([0.0, 0.5, 0.5]), strength=1.0)
    assert open_a[0] > 0 and closed_a.tolist() == [0.0, 0.0, 0.0]


def test_beta_non_finite_inputs_regulate_nothing() -> None:
    for s in ([math.nan, 1.0], [1.0, math.nan], [math.inf, math.inf], [math.nan, math.nan, 2.0]):
        for versus in ("runner_up", "mean"):
            b = GF.inforeg_beta(t(s), 1.0, strength=1.0, versus=versus)  # type: ignore[arg-type]
            assert b.tolist() == [0.0] * len(s)
    assert GF.inforeg_beta(t([2.0, 1.0]), math.nan, strength=1.0).tolist() == [0.0, 0.0]
    # an infinite leader saturates tanh, as in the official code
    b = GF.inforeg_beta(t([math.inf, 1.0]), 1.0, strength=1.0)
    assert b.tolist() == [pytest.approx(math.e), 0.0]


def test_beta_is_differentiable_where_regulated() -> None:
    s = t([3.0, 2.5, 1.0]).requires_grad_()
    b = GF.inforeg_beta(s, 1.0, strength=2.0)
    (g,) = torch.autograd.grad(b.sum(), s)
    d = 2.0 * math.exp(math.tanh(0.5)) * (1 - math.tanh(0.5) ** 2)
    torch.testing.assert_close(g, t([d, -d, 0.0]), rtol=1e-12, atol=1e-12)


def test_beta_argument_errors() -> None:
    with pytest.raises(ValueError, match="M >= 2"):
        GF.inforeg_beta(t([1.0]), 1.0, strength=1.0)
    with pytest.raises(ValueError, match="versus"):
        GF.inforeg_beta(t([1.0, 2.0]), 1.0, strength=1.0, versus="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="strength"):
        GF.inforeg_beta(t([1.0, 2.0]), 1.0, strength=-1.0)
    with pytest.raises(ValueError, match="rate and strength"):
        GF.inforeg_beta(t([1.0, 2.0]), t([1.0, 1.0, 1.0]), strength=1.0)


# ------------------------------------------------------------------------- Fisher trace
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_fisher_trace_matches_naive(steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    shapes = [[(3, 2, 2, 2), (4, 5)], [(2, 3)], []]
    per_step = [
        [[torch.randn(sh, generator=g, dtype=F64) for sh in group] for group in shapes]
        for _ in range(steps)
    ]
    got = sum(
        GF.fisher_trace([[x.to(DEVICE, DTYPE) for x in grp] for grp in groups])
        for groups in per_step
    )
    assert isinstance(got, torch.Tensor) and got.dtype == F64 and got.shape == (3,)
    for m in range(2):
        ref = naive_fisher([groups[m] for groups in per_step])
        assert float(got[m]) == pytest.approx(ref, rel=max(RTOL, 1e-12))
    assert float(got[2]) == 0.0


@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_fisher_trace_scales_quadratically_and_ignores_shape(seed: int, c: float) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, generator=g, dtype=F64)
    base = GF.fisher_trace([[x]])
    torch.testing.assert_close(GF.fisher_trace([[c * x]]), c * c * base, rtol=1e-12, atol=0)
    torch.testing.assert_close(GF.fisher_trace([[x.reshape(2, 3, 4)]]), base, rtol=1e-12, atol=0)


def test_fisher_trace_half_precision_and_edge_cases() -> None:
    x = torch.full((8,), 1e-3)  # 1e-6 squared underflows in float16; float32 keeps it
    out = GF.fisher_trace([[x.half()], [x.bfloat16()]])
    torch.testing.assert_close(out, torch.full((2,), 1e-6, dtype=F64), rtol=2e-2, atol=0)
    assert GF.fisher_trace([]).shape == (0,)
    assert GF.fisher_trace([[torch.zeros(0)]]).tolist() == [0.0]
    assert GF.fisher_trace([[x]], dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------------- proximal
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 3.0))
def test_proximal_gradient_matches_naive_and_penalty(seed: int, beta: float) -> None:
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(sh, generator=g, dtype=F64).to(DEVICE, DTYPE) for sh in ((3, 4), (5,))]
    anchors = [w + 0.1 * torch.randn(w.shape, generator=g, dtype=F64).to(DEVICE, DTYPE) for w in ws]
    out = GF.proximal_gradient(ws, anchors, t(beta))
    for o, w, a in zip(out, ws, anchors, strict=True):
        assert o.dtype == DTYPE and o.shape == w.shape
        ref = naive_proximal(w.double(), a.double(), beta)
        torch.testing.assert_close(o.double().reshape(-1), t(ref), rtol=RTOL, atol=1e-6)
    leaves = [w.detach().clone().requires_grad_() for w in ws]
    grads = torch.autograd.grad(GF.proximal_penalty(leaves, anchors, t(beta)), leaves)
    for gr, o in zip(grads, out, strict=True):
        torch.testing.assert_close(gr, o, rtol=RTOL, atol=1e-6)
    # the float form agrees, and the inputs are left alone
    for o, o2 in zip(out, GF.proximal_gradient(ws, anchors, beta), strict=True):
        torch.testing.assert_close(o2, o, rtol=RTOL, atol=1e-6)


def test_proximal_is_zero_at_the_anchor_and_for_zero_beta() -> None:
    w = t([[1.0, -2.0]])
    assert GF.proximal_gradient([w], [w.clone()], 3.0)[0].tolist() == [[0.0, 0.0]]
    assert GF.proximal_gradient([w], [w + 1], t(0.0))[0].tolist() == [[0.0, 0.0]]
    assert float(GF.proximal_penalty([w], [w + 1], 2.0)) == pytest.approx(2.0)
    assert GF.proximal_gradient([], [], 1.0) == []
    assert float(GF.proximal_penalty([], [], t(1.0))) == 0.0


def test_proximal_argument_errors() -> None:
    w = t([1.0, 2.0])
    with pytest.raises(ValueError, match="anchors"):
        GF.proximal_gradient([w, w], [w], 1.0)
    with pytest.raises(ValueError, match="shape"):
        GF.proximal_penalty([w], [t([1.0])], 1.0)
    with pytest.raises(ValueError, match="0-d"):
        GF.proximal_gradient([w], [w], t([1.0, 2.0]))


# ------------------------------------------------------------------------- the training loop
class Net(nn.Module):
    """Named like the official model: audio_net, visual_net, a linear head on [a; v]."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.visual_net = nn.Sequential(nn.Linear(7, 4))
        self.head = nn.Linear(8, 3)

    def forward(self, xa: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, v = self.audio_net(xa), self.visual_net(xv)
        return a, v, self.head(torch.cat([a, v], 1))


def make_data(steps: int, batch: int = 6, seed: int = 3) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 5, generator=g, dtype=F64) * 2,  # audio: larger inputs, leads
            torch.randn(batch, 7, generator=g, dtype=F64),
            torch.randint(0, 3, (batch,), generator=g),
        )
        for _ in range(steps)
    ]


def run_loop(net: Net, official: bool, epochs: int = 13, steps: int = 2) -> dict[str, object]:
    """Both loops share model, data and SGD; ``official`` follows main.py with plain Python
    (naive_rate / naive_beta / naive_proximal / naive_fisher), the other composes gradmod's
    functions."""
    data = make_data(steps)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    encs = [net.audio_net, net.visual_net]
    traces: list[list[float]] = [[], []]
    rates, betas = [], []
    for _ in range(epochs):
        if official:
            k = naive_rate(traces[0])  # the audio list gates both modalities
        else:
            k = float(GF.acquisition_rate(t(traces[0]), policy="official"))
        rates.append(k)
        anchor = copy.deepcopy(net)  # main.py:259
        anchors = [list(anchor.audio_net.parameters()), list(anchor.visual_net.parameters())]
        step_grads: list[list[list[torch.Tensor]]] = [[], []]
        epoch_trace = torch.zeros(2, dtype=F64)
        for xa, xv, y in data:
            opt.zero_grad()
            a, v, out = net(xa.to(DEVICE), xv.to(DEVICE))
            y = y.to(DEVICE)
            w, b = net.head.weight, net.head.bias
            za, zv = a @ w[:, :4].T + b / 2, v @ w[:, 4:].T + b / 2  # main.py:361-363
            (F.cross_entropy(out, y) + F.cross_entropy(za, y) + F.cross_entropy(zv, y)).backward()
            if official:
                s_a, s_v = sum(softmax_true(za, y)), sum(softmax_true(zv, y))
                beta = list(naive_beta(s_a, s_v, k))
                for enc, anc, bm in zip(encs, anchors, beta, strict=True):
                    for p, p_t in zip(enc.parameters(), anc, strict=True):
                        add = t(naive_proximal(p.detach(), p_t.detach(), bm)).reshape(p.shape)
                        p.grad += add
                for m, enc in enumerate(encs):
                    step_grads[m].append(
                        [mod.weight.grad.clone() for mod in enc if isinstance(mod, nn.Linear)]
                    )
            else:
                s = torch.stack([GF.true_class_probability(z, y).sum() for z in (za, zv)])
                bt = GF.inforeg_beta(s.detach(), k, strength=t(LAM))
                beta = bt.tolist()
                for enc, anc, bm in zip(encs, anchors, bt, strict=True):
                    ps = list(enc.parameters())
                    for p, gp in zip(ps, GF.proximal_gradient(ps, anc, bm), strict=True):
                        p.grad += gp
                epoch_trace += GF.fisher_trace(
                    [[mod.weight.grad for mod in enc if isinstance(mod, nn.Linear)] for enc in encs]
                )
            betas.append(beta)
            opt.step()
        for m in range(2):
            traces[m].append(naive_fisher(step_grads[m]) if official else float(epoch_trace[m]))
    return {"rates": rates, "betas": betas, "traces": traces, "state": net.state_dict()}


def test_training_loop_matches_the_official_order() -> None:
    """13 epochs x 2 steps: the window opens, regulates, and closes identically."""
    torch.manual_seed(0)
    net = Net().to(DEVICE, F64)
    ref = run_loop(copy.deepcopy(net), official=True)
    got = run_loop(net, official=False)
    rates = ref["rates"]
    assert isinstance(rates, list)
    assert rates[0] == 1.0 and min(rates) <= 0.05 < max(rates)  # the window closes in the run
    betas = ref["betas"]
    assert isinstance(betas, list) and any(max(b) > 0 for b in betas)
    for key in ("rates", "betas", "traces"):
        torch.testing.assert_close(t(got[key]), t(ref[key]), rtol=1e-9, atol=1e-12)  # type: ignore[arg-type]
    for name, p in ref["state"].items():  # type: ignore[attr-defined]
        torch.testing.assert_close(got["state"][name], p, rtol=1e-9, atol=1e-12)  # type: ignore[index]
