"""OGM-GE, AGM and MLB coefficient rules, scores and Shapley responses: vectors from methods.md,
naive Python references written here, and hypothesis properties."""

from __future__ import annotations

import itertools
import math

import hypothesis.strategies as st
import pytest
import torch
from _refs import mlb_gated_k, shapley
from hypothesis import assume, given
from settings import DEVICE
from torch import nn
from torch.autograd import gradcheck

import gradmod.functional as GF

F64 = torch.float64

# methods.md's shared test logits
Y = [0, 1, 2, 1]
ZA = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 1.2, 0.0]]
ZV = [[0.3, 0.2, 0.1], [0.0, 0.4, 0.5], [0.6, 0.1, 0.2], [0.2, 0.3, 0.1]]


def t(xs: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64, device=DEVICE)


def y_t() -> torch.Tensor:
    return torch.tensor(Y, device=DEVICE)


def naive_p(z: list[list[float]], y: list[int]) -> list[float]:
    return [math.exp(row[c]) / sum(math.exp(v) for v in row) for row, c in zip(z, y, strict=True)]


def others(xs: list[float], m: int) -> float:
    return sum(x for j, x in enumerate(xs) if j != m) / (len(xs) - 1)


scores_st = st.lists(st.floats(0.05, 50.0, allow_nan=False), min_size=2, max_size=6)
alpha_st = st.floats(0.05, 3.0)


def permuted(xs: list[float], seed: int) -> list[int]:
    order = list(range(len(xs)))
    torch.manual_seed(seed)
    return [order[i] for i in torch.randperm(len(xs)).tolist()]


def distinct(xs: list[float], rel: float = 1e-6) -> bool:
    return all(abs(a - b) > rel * max(abs(a), abs(b)) for a, b in itertools.combinations(xs, 2))


# ------------------------------------------------------------------------------- scores
def test_scores_match_methods_md_and_naive_softmax() -> None:
    p_a, p_v = naive_p(ZA, Y), naive_p(ZV, Y)
    torch.testing.assert_close(GF.true_class_probability(t(ZA), y_t()), t(p_a))
    assert sum(p_a) == pytest.approx(2.417291, abs=1e-6)
    assert sum(p_v) == pytest.approx(1.389034, abs=1e-6)
    nll = GF.clipped_nll(t(ZA), y_t())
    torch.testing.assert_close(nll, t([-math.log(p) for p in p_a]))
    assert float(nll.mean()) == pytest.approx(0.523813, abs=1e-6)
    assert float(GF.clipped_nll(t(ZV), y_t()).mean()) == pytest.approx(1.061877, abs=1e-6)


def test_clipped_nll_floor() -> None:
    z = t([[0.0, 200.0], [50.0, 0.0]])  # p(class 0) = e^-200 ~ 0 in row 0
    out = GF.clipped_nll(z, torch.tensor([0, 0], device=DEVICE))
    assert float(out[0]) == pytest.approx(-math.log(1e-8))
    assert float(out[1]) == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(out).all()


@given(scores_st)
def test_one_vs_others_ratio_matches_loop(s: list[float]) -> None:
    out = GF.one_vs_others_ratio(t(s))
    ref = [x / others(s, m) for m, x in enumerate(s)]
    torch.testing.assert_close(out, t(ref), rtol=1e-12, atol=0)


def test_one_vs_others_ratio_zero_denominator_is_finite() -> None:
    out = GF.one_vs_others_ratio(t([1.0, 0.0]))
    assert torch.isfinite(out).all() and float(out[0]) > 1e300 and float(out[1]) == 0.0


# ---------------------------------------------------------------------------------- OGM
def naive_ogm_two(s_a: float, s_v: float, alpha: float) -> list[float]:
    """The official two-modality branch, transcribed."""
    ratio_v = s_v / s_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return [1.0, 1 - math.tanh(alpha * ratio_v)]
    return [1 - math.tanh(alpha * ratio_a), 1.0]


def naive_ogm(s: list[float], alpha: float, form: str) -> list[float]:
    if len(s) == 2 and form == "official":
        return naive_ogm_two(s[0], s[1], alpha)
    out = []
    for m, x in enumerate(s):
        rho = x / others(s, m)
        if form == "official":
            out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
        else:
            out.append(1 - math.tanh(alpha * max(rho - 1, 0.0)))
    return out


def test_ogm_methods_md_vector() -> None:
    s = torch.stack([GF.true_class_probability(t(z), y_t()).sum() for z in (ZA, ZV)])
    torch.testing.assert_close(
        GF.ogm_ge_coefficients(s, alpha=0.1), t([0.827709, 1.0]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        GF.ogm_ge_coefficients(s, alpha=0.1, form="continuous"),
        t([0.926108, 1.0]),
        atol=1e-6,
        rtol=0,
    )


@given(scores_st, alpha_st, st.sampled_from(["official", "continuous"]))
def test_ogm_matches_naive(s: list[float], alpha: float, form: str) -> None:
    # the official form jumps at ratio 1: two roundings of the same ratio may land either side
    assume(form == "continuous" or all(abs(x / others(s, m) - 1) > 1e-9 for m, x in enumerate(s)))
    out = GF.ogm_ge_coefficients(t(s), alpha=alpha, form=form)  # type: ignore[arg-type]
    torch.testing.assert_close(out, t(naive_ogm(s, alpha, form)), rtol=1e-12, atol=1e-12)


@given(scores_st, alpha_st, st.sampled_from(["official", "continuous"]))
def test_ogm_only_dominant_slowed_and_bounded(s: list[float], alpha: float, form: str) -> None:
    assume(distinct(s))
    # 1 - tanh(a) = 2 sigmoid(-2a) is representable (> 0) in float64 up to a ~ 350
    assume(alpha * max(GF.one_vs_others_ratio(t(s)).tolist()) < 300)
    k = GF.ogm_ge_coefficients(t(s), alpha=alpha, form=form).tolist()  # type: ignore[arg-type]
    for m, x in enumerate(s):
        assert 0 < k[m] <= 1
        if x > others(s, m):
            assert k[m] < 1
        else:
            assert k[m] == 1.0
    if len(s) == 2:  # exactly one of two modalities is slowed
        assert sum(v < 1 for v in k) == 1


def test_ogm_two_modality_tie_slows_the_first_as_the_official_code() -> None:
    k = GF.ogm_ge_coefficients(t([2.0, 2.0]), alpha=0.5).tolist()
    assert k == pytest.approx([1 - math.tanh(0.5), 1.0])
    assert GF.ogm_ge_coefficients(t([2.0, 2.0]), alpha=0.5, form="continuous").tolist() == [1, 1]


@given(scores_st, alpha_st, st.integers(0, 1000), st.sampled_from(["official", "continuous"]))
def test_ogm_permutation_equivariant(s: list[float], alpha: float, seed: int, form: str) -> None:
    assume(distinct(s))
    perm = permuted(s, seed)
    k = GF.ogm_ge_coefficients(t(s), alpha=alpha, form=form)  # type: ignore[arg-type]
    kp = GF.ogm_ge_coefficients(t([s[i] for i in perm]), alpha=alpha, form=form)  # type: ignore[arg-type]
    torch.testing.assert_close(kp, k[perm], rtol=1e-9, atol=1e-12)  # summation order


@given(scores_st, alpha_st, st.floats(0.01, 100.0))
def test_ogm_invariant_to_scaling_all_scores(s: list[float], alpha: float, c: float) -> None:
    assume(distinct(s, 1e-3))
    k = GF.ogm_ge_coefficients(t(s), alpha=alpha)
    torch.testing.assert_close(
        GF.ogm_ge_coefficients(t(s) * c, alpha=alpha), k, rtol=1e-9, atol=1e-9
    )


# ---------------------------------------------------------------------------------- AGM
def naive_agm(s: list[float], s_bar: list[float], alpha: float, cap: float) -> list[float]:
    out = []
    for m in range(len(s)):
        r = math.exp(others(s, m) - s[m])
        r_bar = math.exp(others(s_bar, m) - s_bar[m])
        out.append(math.exp(alpha * min(r_bar - r, cap)))
    return out


def test_agm_methods_md_vector() -> None:
    s = torch.stack([GF.clipped_nll(t(z), y_t()).mean() for z in (ZA, ZV)])
    k = GF.agm_coefficients(s, torch.zeros_like(s), alpha=1.5, cap=10)
    torch.testing.assert_close(k, t([0.343341, 1.866721]), atol=1e-6, rtol=0)


nll_st = st.lists(st.floats(0.0, 18.0, allow_nan=False), min_size=2, max_size=5)


@given(st.data(), alpha_st, st.floats(0.5, 10.0))
def test_agm_matches_naive_and_is_positive(data: st.DataObject, alpha: float, cap: float) -> None:
    s = data.draw(nll_st)
    s_bar = data.draw(st.lists(st.floats(0.0, 18.0), min_size=len(s), max_size=len(s)))
    k = GF.agm_coefficients(t(s), t(s_bar), alpha=alpha, cap=cap)
    ref = naive_agm(s, s_bar, alpha, cap)
    torch.testing.assert_close(k, t(ref), rtol=1e-10, atol=1e-300)
    assert (k >= 0).all() and (k <= math.exp(alpha * cap) * (1 + 1e-12)).all()


@given(nll_st, alpha_st, st.floats(-5, 5))
def test_agm_is_one_when_current_and_running_ratios_agree(
    s: list[float], alpha: float, shift: float
) -> None:
    # ratios depend on differences only: s_bar = s + c gives r_bar = r
    k = GF.agm_coefficients(t(s), t(s) + shift, alpha=alpha, cap=10.0)
    # r and r_bar reach e^18 ~ 7e7: their difference carries ~1e-8 of rounding
    torch.testing.assert_close(k, torch.ones_like(k), rtol=0, atol=1e-6)


@given(nll_st, alpha_st, st.integers(0, 1000))
def test_agm_permutation_equivariant(s: list[float], alpha: float, seed: int) -> None:
    s_bar = [x * 0.7 + 0.1 for x in reversed(s)]
    perm = permuted(s, seed)
    k = GF.agm_coefficients(t(s), t(s_bar), alpha=alpha, cap=7.0)
    kp = GF.agm_coefficients(
        t([s[i] for i in perm]), t([s_bar[i] for i in perm]), alpha=alpha, cap=7.0
    )
    torch.testing.assert_close(kp, k[perm], rtol=1e-9, atol=1e-300)  # summation order


def test_agm_slows_the_modality_that_got_ahead() -> None:
    # running: balanced; now modality 0 has the lower loss -> slowed, 1 boosted
    k = GF.agm_coefficients(t([0.5, 1.5]), t([1.0, 1.0]), alpha=1.0, cap=10.0)
    assert float(k[0]) < 1 < float(k[1])


# ---------------------------------------------------------------------------------- MLB
def naive_mlb(s: list[float], alpha: float, beta: float | None, higher: bool) -> list[float]:
    out = []
    for m, x in enumerate(s):
        r = others(s, m) / x if higher else x / others(s, m)
        th = math.tanh(alpha * (r - 1))
        out.append(1 + (beta - 1) * th if (beta is not None and th > 0) else 1 + th)
    return out


def test_mlb_methods_md_vector() -> None:
    s = torch.stack([GF.true_class_probability(t(z), y_t()).mean() for z in (ZA, ZV)])
    torch.testing.assert_close(s, t([0.604323, 0.347259]), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        GF.mlb_coefficients(s, alpha=0.8), t([0.672254, 1.531486]), atol=1e-6, rtol=0
    )


@given(scores_st, alpha_st, st.one_of(st.none(), st.floats(1.0, 3.0)), st.booleans())
def test_mlb_matches_naive(s: list[float], alpha: float, beta: float | None, higher: bool) -> None:
    out = GF.mlb_coefficients(t(s), alpha=alpha, beta=beta, higher_is_better=higher)
    torch.testing.assert_close(out, t(naive_mlb(s, alpha, beta, higher)), rtol=1e-12, atol=1e-12)


@given(scores_st, alpha_st, st.one_of(st.none(), st.floats(1.01, 3.0)))
def test_mlb_range_order_and_cap(s: list[float], alpha: float, beta: float | None) -> None:
    k = GF.mlb_coefficients(t(s), alpha=alpha, beta=beta).tolist()
    r = [others(s, m) / x for m, x in enumerate(s)]
    for km, rm in zip(k, r, strict=True):
        # (0, 2), or (0, beta) with a cap, in exact arithmetic; 1 + tanh(x) rounds to 2 for
        # x > ~19 in float64
        top = 2.0 if beta is None else beta
        assert 0 < km <= top
        if alpha * (rm - 1) < 15 and top > 1:
            assert km < top
    for i, j in itertools.combinations(range(len(s)), 2):  # the stronger modality, the smaller k
        if s[i] > s[j] * (1 + 1e-9):
            assert k[i] <= k[j]
        elif s[j] > s[i] * (1 + 1e-9):
            assert k[j] <= k[i]


@given(st.integers(2, 6), st.floats(0.05, 50.0), alpha_st)
def test_mlb_is_one_at_balance(m: int, s: float, alpha: float) -> None:
    k = GF.mlb_coefficients(t([s] * m), alpha=alpha)
    torch.testing.assert_close(k, torch.ones_like(k), rtol=0, atol=1e-12)


@given(scores_st, alpha_st, st.integers(0, 1000), st.booleans())
def test_mlb_permutation_equivariant(s: list[float], alpha: float, seed: int, higher: bool) -> None:
    perm = permuted(s, seed)
    k = GF.mlb_coefficients(t(s), alpha=alpha, higher_is_better=higher)
    kp = GF.mlb_coefficients(t([s[i] for i in perm]), alpha=alpha, higher_is_better=higher)
    torch.testing.assert_close(kp, k[perm], rtol=1e-9, atol=1e-12)  # summation order


def test_mlb_regression_boosts_the_modality_with_the_larger_error() -> None:
    k = GF.mlb_coefficients(t([0.2, 0.8]), alpha=1.0, higher_is_better=False)
    assert float(k[0]) < 1 < float(k[1])


def test_coefficient_rules_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="M >= 2"):
        GF.ogm_ge_coefficients(t([1.0]))
    with pytest.raises(ValueError, match="alpha"):
        GF.mlb_coefficients(t([1.0, 2.0]), alpha=0)
    with pytest.raises(ValueError, match="beta"):
        GF.mlb_coefficients(t([1.0, 2.0]), beta=0.5)
    with pytest.raises(ValueError, match=r"both have shape"):
        GF.agm_coefficients(t([1.0, 2.0]), t([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="form"):
        GF.ogm_ge_coefficients(t([1.0, 2.0]), form="bogus")  # type: ignore[arg-type]


def test_gradcheck_coefficient_rules() -> None:
    s = torch.tensor([0.7, 1.3, 0.9], dtype=F64, requires_grad=True)
    s_bar = torch.tensor([1.0, 0.8, 1.1], dtype=F64, requires_grad=True)
    assert gradcheck(lambda x: GF.mlb_coefficients(x, alpha=0.8), (s,))
    assert gradcheck(lambda x: GF.ogm_ge_coefficients(x, alpha=0.3, form="continuous"), (s,))
    assert gradcheck(lambda a, b: GF.agm_coefficients(a, b, alpha=1.5, cap=7.0), (s, s_bar))


# ------------------------------------------------------------------------ Shapley values
class Fuse(nn.Module):
    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.dims = dims
        self.body = nn.Sequential(nn.Linear(sum(dims.values()), 6), nn.Tanh(), nn.Linear(6, 3))
        self.drop = nn.Dropout(0.5)

    def forward(self, xs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.drop(self.body(torch.cat([xs[n] for n in self.dims], dim=1)))


@pytest.mark.parametrize("m", [2, 3, 4])
def test_shapley_matches_naive_enumeration_and_sums_to_the_output(m: int) -> None:
    dims = {f"m{i}": i + 2 for i in range(m)}
    fuse = Fuse(dims).to(F64).eval()
    xs = {n: torch.randn(5, d, dtype=F64) for n, d in dims.items()}
    phi = GF.shapley_responses(fuse, xs)
    ref = shapley(fuse, xs)
    assert list(phi) == list(dims)
    for n in dims:
        torch.testing.assert_close(phi[n], ref[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(phi.values()), fuse(xs), rtol=1e-12, atol=1e-12)


def test_shapley_two_modalities_is_the_methods_md_formula() -> None:
    fuse = Fuse({"a": 3, "v": 4}).to(F64).eval()
    a, v = torch.randn(5, 3, dtype=F64), torch.randn(5, 4, dtype=F64)
    phi = GF.shapley_responses(fuse, {"a": a, "v": v})
    full = fuse({"a": a, "v": v})
    f_a = fuse({"a": a, "v": torch.zeros_like(v)})
    f_v = fuse({"a": torch.zeros_like(a), "v": v})
    torch.testing.assert_close(phi["a"], 0.5 * (full - f_v + f_a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phi["v"], 0.5 * (full - f_a + f_v), rtol=1e-12, atol=1e-12)


def test_shapley_masked_passes_in_eval_mode_and_flags_restored() -> None:
    fuse = Fuse({"a": 3, "v": 4}).to(F64)
    fuse.body.train()
    fuse.drop.train()
    modes: list[bool] = []
    calls = {"n": 0}

    def fn(xs: dict[str, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        modes.append(fuse.drop.training)
        return fuse(xs)

    GF.shapley_responses(
        fn, {"a": torch.randn(2, 3, dtype=F64), "v": torch.randn(2, 4, dtype=F64)}, module=fuse
    )
    assert calls["n"] == 3 and modes == [True, False, False]  # full pass in train mode
    assert fuse.training and fuse.drop.training and fuse.body.training
    fuse.body.eval()  # a mixed state is restored as it was
    with pytest.raises(RuntimeError, match="boom"):
        GF.shapley_responses(
            lambda xs: (_ for _ in ()).throw(RuntimeError("boom")),
            {"a": torch.ones(1), "v": torch.ones(1)},
            module=fuse,
        )
    assert fuse.training and not fuse.body.training and fuse.drop.training


def test_shapley_refuses_too_many_modalities() -> None:
    xs = {f"m{i}": torch.ones(1, 1) for i in range(5)}
    with pytest.raises(ValueError, match="31 forward passes"):
        GF.shapley_responses(lambda d: sum(d.values()), xs)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="at least 2"):
        GF.shapley_responses(lambda d: d["a"], {"a": torch.ones(1)})
    out = GF.shapley_responses(lambda d: sum(d.values()), xs, max_modalities=5)  # type: ignore[arg-type,return-value]
    assert len(out) == 5


def test_shapley_gradcheck() -> None:
    fuse = Fuse({"a": 2, "v": 3}).to(F64).eval()
    a = torch.randn(2, 2, dtype=F64, requires_grad=True)
    v = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert gradcheck(lambda a, v: GF.shapley_responses(fuse, {"a": a, "v": v})["a"], (a, v))


# ------------------------------------------------------------------ MLB's chance gate
@given(
    st.lists(st.floats(0.01, 1.0), min_size=2, max_size=5),
    st.floats(0.0, 0.5),
    st.sampled_from(["boost", "both"]),
)
def test_gated_mlb_matches_its_spec(scores: list[float], chance: float, gate: str) -> None:
    assume(max(scores) - chance > 1e-3)
    k = GF.mlb_coefficients(
        torch.tensor(scores, dtype=torch.float64),
        alpha=0.8,
        gate=gate,
        chance=chance,  # type: ignore[arg-type]
    )
    ref = mlb_gated_k(scores, 0.8, chance, gate)
    torch.testing.assert_close(k, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@given(st.floats(0.3, 1.0), st.integers(2, 5), st.sampled_from(["boost", "both"]))
def test_a_head_at_chance_is_not_boosted_and_with_both_nobody_is_slowed_for_it(
    strong: float, m: int, gate: str
) -> None:
    """Modalities 1.. at chance (their heads learned nothing): none of them is boosted, and
    with "both" the informative modality 0 keeps k = 1 (joint training's rate)."""
    chance = 0.1
    scores = torch.tensor([strong] + [chance] * (m - 1), dtype=torch.float64)
    k = GF.mlb_coefficients(scores, alpha=0.8, gate=gate, chance=chance)  # type: ignore[arg-type]
    assert (k[1:] <= 1.0).all()
    if gate == "both":
        assert k[0] == 1.0
    else:
        assert k[0] < 1.0  # "boost" still slows the strong modality
