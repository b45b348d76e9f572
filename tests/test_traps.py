"""The plain-loop traps: ``scaler.scale(loss)`` inside the block, a scaled loss without the
scaler, accumulation without ``weight=``, and the scores the method decided from.

References are written by hand from the definitions (plain autograd on copies, float64), never
from gradmod's own code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import hook_count
from test_methods import LinNet, ctx_for, data, deep_heads, dev, linear_heads, make
from torch import Tensor

import gradmod

NAMES = ("a", "b")


def _step_inputs(model: LinNet, seed: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    xs, y = dev(*data(NAMES, n=12, seed=seed))
    feats = model.features(xs)
    return F.cross_entropy(model.fuse(feats), y), feats, y


# ------------------------------------------------------------------------ accumulation weight
@pytest.mark.parametrize("method", ["mlb", "cggm"])
def test_accumulation_without_weight_is_refused_before_anything_changes(method: str) -> None:
    model = make(NAMES)
    if method == "mlb":
        ctx = ctx_for(model, gradmod.MLB(), linear_heads(NAMES))
    else:
        ctx = ctx_for(model, gradmod.CGGM(), deep_heads(NAMES), fusion="head")
    loss, feats, y = _step_inputs(model, 1)
    with pytest.raises(gradmod.StepError, match=r"weight=1/n"), ctx(feats, y, boundary=False):
        loss.backward()  # pragma: no cover - refused on entering
    assert all(p.grad is None for p in [*model.parameters(), *ctx.classifier_parameters()])
    assert int(ctx.method.steps) == 0 and int(ctx.method.skipped) == 0
    assert hook_count(list(model.parameters())) == 0


def test_the_block_that_closes_a_window_needs_weight_too() -> None:
    model, heads = make(NAMES), linear_heads(NAMES)
    ctx = ctx_for(model, gradmod.MLB(), heads)
    loss, feats, y = _step_inputs(model, 1)
    with ctx(feats, y, boundary=False, weight=0.5):
        (loss / 2).backward()
    loss, feats, y = _step_inputs(model, 2)
    with pytest.raises(gradmod.StepError, match="before this one"), ctx(feats, y):
        (loss / 2).backward()  # pragma: no cover


def test_accumulation_with_weight_equals_the_full_batch() -> None:
    """Two half batches, loss / 2 and weight=1/2, give the gradients of one full batch: the
    reference is plain autograd of CE(fused) + Σ_m CE(head_m) on the full batch (plain
    multi-loss: coefficients 1)."""
    model, heads = make(NAMES), linear_heads(NAMES)
    ref_model, ref_heads = copy.deepcopy(model), copy.deepcopy(heads)
    xs, y = dev(*data(NAMES, n=12, seed=4))
    ctx = ctx_for(model, gradmod.MultiLoss(), heads)
    for half, boundary in ((slice(0, 6), False), (slice(6, 12), True)):
        feats = model.features({k: v[half] for k, v in xs.items()})
        loss = F.cross_entropy(model.fuse(feats), y[half]) / 2
        with ctx(feats, y[half], boundary=boundary, weight=0.5):
            loss.backward()
    feats = ref_model.features(xs)
    total = F.cross_entropy(ref_model.fuse(feats), y)
    total = total + sum(F.cross_entropy(ref_heads[n](feats[n]), y) for n in NAMES)
    total.backward()
    got = [*model.parameters(), *(p for n in NAMES for p in heads[n].parameters())]
    want = [*ref_model.parameters(), *(p for n in NAMES for p in ref_heads[n].parameters())]
    for g, w in zip(got, want, strict=True):
        assert g.grad is not None and w.grad is not None
        torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ogm", "fixed"])
def test_methods_adding_no_gradient_need_no_weight(method: str) -> None:
    model = make(NAMES)
    if method == "ogm":
        ctx = ctx_for(model, gradmod.OGMGE(ge=False), fusion="head")
    else:
        ctx = ctx_for(model, gradmod.Fixed([0.5, 2.0]))
    ref = copy.deepcopy(model)
    for seed, boundary in ((1, False), (2, True)):
        loss, feats, y = _step_inputs(model, seed)
        with ctx(feats, y, boundary=boundary):
            loss.backward()
        _step_inputs(ref, seed)[0].backward()
    if method == "fixed":  # each micro-batch's encoder gradient times k_m, the rest plain
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            k = {"enc." + n: c for n, c in zip(NAMES, (0.5, 2.0), strict=True)}
            factor = next((c for prefix, c in k.items() if name.startswith(prefix)), 1.0)
            assert p.grad is not None and q.grad is not None
            torch.testing.assert_close(p.grad, factor * q.grad, rtol=1e-6, atol=1e-7)
    else:
        assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------------------------- scaler
def _update_run(scaler_to_ctx: bool, use_scaler: bool = True) -> list[Tensor]:
    """One MLB step at the update level; returns the model's parameters after it."""
    torch.manual_seed(0)
    model, heads = make(NAMES), linear_heads(NAMES)
    opt = torch.optim.Adam(
        [*model.parameters(), *(p for h in heads.values() for p in h.parameters())]
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if use_scaler else None
    ctx = ctx_for(
        model, gradmod.MLB(), heads, optimizer=opt, grad_scaler=scaler if scaler_to_ctx else None
    )
    before = [p.detach().clone() for p in model.parameters()]
    loss, feats, y = _step_inputs(model, 1)
    with ctx(feats, y):
        (scaler.scale(loss) if scaler is not None else loss).backward()
    try:
        scaler.step(opt) if scaler is not None else opt.step()
    finally:
        after = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    return after


def test_a_scaler_the_context_was_not_given_is_refused_before_the_step() -> None:
    with pytest.raises(gradmod.StepError, match="grad_scaler=scaler"):
        _update_run(scaler_to_ctx=False)


def test_the_scaler_given_to_the_context_steps_as_without_a_scaler() -> None:
    """A power-of-two scale unscales exactly: the same parameters, bit for bit."""
    with_scaler = _update_run(scaler_to_ctx=True)
    without = _update_run(scaler_to_ctx=False, use_scaler=False)
    for a, b in zip(with_scaler, without, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- scores
def test_mlb_scores_are_the_mean_true_class_probability_of_each_head() -> None:
    model, heads = make(NAMES), linear_heads(NAMES)
    ctx = ctx_for(model, gradmod.MLB(), heads)
    loss, feats, y = _step_inputs(model, 3)
    with ctx(feats, y):
        loss.backward()
    scores = ctx.scores["true_class_probability"]
    for i, n in enumerate(NAMES):
        probs = torch.softmax(heads[n](feats[n].detach()).double(), dim=1)
        want = probs[torch.arange(len(y)), y].mean()
        torch.testing.assert_close(scores[i], want.to(scores), rtol=1e-6, atol=1e-7)
    # the coefficients are MLB's rule on those scores (two modalities: r_m = s_other / s_m,
    # k_m = 1 + tanh(alpha (r_m - 1)), alpha = 0.8)
    s = scores.double()
    r = s.flip(0) / s
    torch.testing.assert_close(ctx.coefficients.double(), 1 + torch.tanh(0.8 * (r - 1)))


def _half_step(ctx: gradmod.ModulationContext, model: LinNet) -> None:
    xs, y = dev(*data(NAMES, n=12, seed=5))
    with torch.autocast("cpu", dtype=torch.float16):
        feats = model.features(xs)
        loss = F.cross_entropy(model.fuse(feats), y)
    assert feats["a"].dtype == torch.float16
    with ctx(feats, y):
        loss.backward()


def test_float16_features_without_a_scaler_are_refused_at_the_gradient_level() -> None:
    """Without an optimizer gradmod cannot see a GradScaler step: float16 features (autocast)
    without grad_scaler= are refused, before anything changes."""
    model, heads = make(NAMES), linear_heads(NAMES)
    ctx = ctx_for(model, gradmod.MLB(), heads)
    with pytest.raises(gradmod.StepError, match="grad_scaler=scaler"):
        _half_step(ctx, model)
    assert all(p.grad is None for p in model.parameters())
    assert int(ctx.method.steps) == 0


def test_float16_without_a_scaler_on_purpose_runs() -> None:
    model, heads = make(NAMES), linear_heads(NAMES)
    ctx = ctx_for(model, gradmod.MLB(), heads, grad_scaler=False)
    _half_step(ctx, model)
    assert int(ctx.method.steps) == 1
    assert all(p.grad is not None for p in model.parameters())
