"""Hostile inputs: each is handled correctly or refused clearly, before any gradient or state
changes. References are plain autograd on float64 copies, or the official sources' arithmetic
written out here (never gradmod's reading of it).
"""

from __future__ import annotations

import copy
import io
import math
import threading
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import (
    F64,
    NAMES,
    FixedMethod,
    batch,
    hook_count,
    loss_of,
    make_classifiers,
    make_model,
)
from _refs import agm_k
from settings import DEVICE, DTYPE
from test_methods import all_tensors, ctx_for, data, dev, linear_heads, make
from torch import Tensor, nn

import gradmod

ENC = {n: f"enc.{n}" for n in NAMES}


def state_of(ctx: gradmod.ModulationContext) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in ctx.state_dict().items()}


def same_state(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k].cpu(), b[k].cpu()) for k in a
    )


def no_grads(*modules: nn.Module) -> bool:
    return all(p.grad is None for m in modules for p in m.parameters())


# ================================================================ A. CGGM official parity
def _dcos_du(u: Tensor, v: Tensor) -> Tensor:
    """d cos(u, v) / d u in closed form: v / (|u||v|) - cos(u, v) u / |u|^2."""
    nu, nv = u.norm(), v.norm()
    cos = (u * v).sum() / (nu * nv)
    return v / (nu * nv) - cos * u / nu**2


def test_official_direction_loss_is_taken_at_the_previous_steps_weights() -> None:
    """zrguo/CGGM msatrain.py builds l_gm from clones of step t's out_layer weights with step
    t's coeff and back-propagates it at step t+1. Between the two steps the weights move a lot,
    so the gradient at the previous weights differs clearly from one at the current weights."""
    lam = 0.7
    model, clfs = make_model(F64), make_classifiers(F64)
    ctx = gradmod.ModulationContext(
        model,
        clfs,
        encoders=ENC,
        method=gradmod.CGGM(rho=1.0, lam=lam, official=True),
        fusion="head",
    )
    xs, y = batch(16, dtype=F64)
    loss, feats = loss_of(model, xs, y)
    with ctx(features=feats, targets=y):
        loss.backward()
    plain = torch.autograd.grad(loss_of(model, xs, y)[0], model.head[-1].weight)[0]
    torch.testing.assert_close(model.head[-1].weight.grad, plain, rtol=0, atol=0)  # none at t=1
    # official B of the first step, from the classifiers' accuracies (acc1 starts at 0)
    acc = [float((clfs[n](feats[n].detach()).argmax(-1) == y).double().mean()) for n in NAMES]
    s1 = sum(acc) + 1e-8
    b1 = torch.tensor([(s1 - a) / s1 for a in acc], dtype=F64)
    torch.testing.assert_close(ctx.method.last_b.cpu(), b1, rtol=1e-12, atol=0)  # type: ignore[union-attr]
    u1 = model.head[-1].weight.detach().clone()
    v1 = [clfs[n][-1].weight.detach().clone() for n in NAMES]
    assert float(b1.abs().min()) > 0.1
    with torch.no_grad():  # a large move of every weight the direction loss reads
        model.head[-1].weight.mul_(-1.5).add_(0.3)
        for n in NAMES:
            clfs[n][-1].weight.mul_(2.0).sub_(0.2)
    model.zero_grad()
    for c in clfs.values():
        c.zero_grad()
    xs, y = batch(16, seed=2, dtype=F64)
    loss, feats = loss_of(model, xs, y)
    plain = torch.autograd.grad(loss, model.head[-1].weight, retain_graph=True)[0]
    with ctx(features=feats, targets=y):
        loss.backward()

    def direction(b: Tensor, u: Tensor, vs: list[Tensor]) -> Tensor:
        return -lam / len(vs) * sum(float(bm) * _dcos_du(u, v) for bm, v in zip(b, vs, strict=True))

    at_previous = plain + direction(b1, u1, v1)
    at_current = plain + direction(
        b1, model.head[-1].weight.detach(), [clfs[n][-1].weight.detach() for n in NAMES]
    )
    assert float((at_previous - at_current).abs().max()) > 1e-3  # the test tells them apart
    torch.testing.assert_close(model.head[-1].weight.grad, at_previous, rtol=1e-10, atol=1e-12)


def test_official_cggm_nan_metric_is_a_neutral_step() -> None:
    """A user metric that returns NaN: no NaN reaches the fusion weight's gradient (at this step
    or through the next step's late direction loss), the coefficients are 1, and the state is
    that of the last finite step."""
    poison = {"on": False}

    def metric(out: Tensor, y: Tensor) -> Tensor:
        acc = (out.argmax(-1) == y).to(out.dtype)
        return acc * math.nan if poison["on"] else acc

    model, clfs = make_model(F64), make_classifiers(F64)
    method = gradmod.CGGM(rho=1.3, lam=0.5, official=True, metric=metric)
    ctx = gradmod.ModulationContext(model, clfs, encoders=ENC, method=method, fusion="head")
    for i, bad in enumerate([False, False, True, False]):
        poison["on"] = bad
        xs, y = batch(16, seed=10 + i, dtype=F64)
        loss, feats = loss_of(model, xs, y)
        before = state_of(ctx)
        with ctx(features=feats, targets=y):
            loss.backward()
        for p in [*model.parameters(), *ctx.classifier_parameters()]:
            assert p.grad is not None and torch.isfinite(p.grad).all(), (i, p.shape)
        assert all(torch.isfinite(v).all() for v in ctx.state_dict().values())
        if bad:
            assert torch.equal(ctx.coefficients, torch.ones(3, dtype=F64))
            after = state_of(ctx)
            for k in ("previous", "last_b"):
                assert torch.equal(after[k], before[k]), k
            assert int(after["skipped"]) == 1
            assert torch.equal(after["direction_b"], torch.zeros(3, dtype=F64))
        model.zero_grad()
        for c in clfs.values():
            c.zero_grad()


# ======================================================= B1/B2. parameters changed afterwards
def _cggm(model: nn.Module, **kw: object) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        model,
        make_classifiers(),
        encoders=ENC,
        method=gradmod.CGGM(),
        fusion="head",
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_one_encoder_layer_replaced_after_construction_is_refused(mode: str) -> None:
    model = make_model()
    ctx = _cggm(model, mode=mode)
    layer = model.enc["b"][2]  # the last layer of one encoder only
    layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    xs, y = batch()
    _loss, feats = loss_of(model, xs, y)
    before = state_of(ctx)
    with pytest.raises(gradmod.StepError, match="replaced after the context was built"):
        ctx(features=feats, targets=y).__enter__()
    assert same_state(state_of(ctx), before) and int(ctx.method.steps) == 0  # type: ignore[arg-type]
    assert no_grads(model) and hook_count(list(model.parameters())) == 0


def test_encoder_layer_module_replaced_after_construction_is_refused() -> None:
    model = make_model()
    ctx = gradmod.ModulationContext(model, encoders=ENC, method=FixedMethod([[1.0, 2.0, 3.0]]))
    model.enc["b"][2] = nn.Linear(7, 4).to(DEVICE, DTYPE)  # a new layer object
    xs, y = batch()
    _, feats = loss_of(model, xs, y)
    with pytest.raises(gradmod.StepError, match="replaced after the context was built"):
        ctx(features=feats, targets=y).__enter__()
    assert ctx.method.calls == 0  # type: ignore[attr-defined]


def test_tied_weight_replaced_in_one_place_is_refused() -> None:
    model = make_model()
    model.add_module("alias", model.enc["a"][0])  # the same layer under two names
    ctx = gradmod.ModulationContext(model, encoders=ENC, method=FixedMethod([[1.0, 2.0, 3.0]]))
    model.alias.weight = nn.Parameter(model.enc["a"][0].weight.detach().clone())
    xs, y = batch()
    _, feats = loss_of(model, xs, y)
    with pytest.raises(gradmod.StepError, match="replaced"):
        ctx(features=feats, targets=y).__enter__()


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_parameter_skipped_as_frozen_and_unfrozen_later_is_refused(mode: str) -> None:
    model = make_model()
    model.enc["c"][0].weight.requires_grad_(False)
    ctx = _cggm(model, mode=mode, allow_frozen=True)
    model.enc["c"][0].weight.requires_grad_(True)
    xs, y = batch()
    _, feats = loss_of(model, xs, y)
    with pytest.raises(gradmod.StepError, match="allow_frozen=True skipped"):
        ctx(features=feats, targets=y).__enter__()
    assert no_grads(model) and hook_count(list(model.parameters())) == 0


@pytest.mark.parametrize("kind", ["feature", "agm"])
def test_freezing_a_parameter_later_is_fine_where_no_parameter_hook_holds_it(kind: str) -> None:
    """Feature and response scaling stay exact for the parameters that still train."""
    names = ("a", "b")
    model = make(names)
    if kind == "feature":
        ctx = ctx_for(model, FixedMethod([[0.5, 2.0]]), mode="feature")
    else:
        ctx = ctx_for(model, gradmod.AGM())
    model.enc["a"][0].weight.requires_grad_(False)
    xs, y = dev(*data(names))
    feats = model.features(xs)
    if kind == "agm":
        feats = gradmod.functional.shapley_responses(model.fuse, feats)
        out = sum(feats.values())
    else:
        out = model.fuse(feats)
    with ctx(features=feats, targets=y):
        F.cross_entropy(out, y).backward()  # type: ignore[arg-type]
    assert model.enc["a"][0].weight.grad is None and model.enc["a"][2].weight.grad is not None


class Holder(nn.Module):
    """A module that keeps its model and the model's context (as a LightningModule would)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.ctx = gradmod.ModulationContext(
            self.net, encoders=ENC, method=FixedMethod([[0.5, 2.0, 3.0]])
        )


def test_context_held_by_a_module_survives_deepcopy_and_pickling() -> None:
    """An EMA copy or a snapshot of a module that keeps its context: the copy's context
    modulates the copy's model."""
    holder = Holder()
    buf = io.BytesIO()
    torch.save(holder, buf)
    buf.seek(0)
    for other in (copy.deepcopy(holder), torch.load(buf, weights_only=False)):
        xs, y = batch()
        loss, feats = loss_of(other.net, xs, y)
        with other.ctx(features=feats, targets=y):
            loss.backward()
        twin = copy.deepcopy(holder.net)
        loss_of(twin, xs, y)[0].backward()
        for (name, p), q in zip(other.net.named_parameters(), twin.parameters(), strict=True):
            k = {"enc.a": 0.5, "enc.b": 2.0, "enc.c": 3.0}.get(name[:5], 1.0)
            torch.testing.assert_close(p.grad, q.grad * k, msg=name)


@pytest.mark.parametrize("first", ["parameter", "feature"])
@pytest.mark.parametrize("second", ["parameter", "feature"])
def test_contexts_in_different_modes_over_one_encoder_are_refused(first: str, second: str) -> None:
    model = make_model()
    a = gradmod.ModulationContext(
        model, encoders=ENC, method=FixedMethod([[1.0, 2.0, 3.0]]), mode=first
    )
    b = gradmod.ModulationContext(
        model,
        encoders={"x": "enc.a", "y": "head"},
        method=FixedMethod([[2.0, 3.0]], uses_features=False),
        mode="parameter",
    )
    if second == "feature":
        b = gradmod.ModulationContext(
            model, encoders=ENC, method=FixedMethod([[2.0, 3.0, 4.0]]), mode="feature"
        )
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    with a(features=feats, targets=y):
        with pytest.raises(gradmod.ContextError, match="already modulated"):
            b(features=feats if second == "feature" else None, targets=y).__enter__()
        loss.backward()
    assert b.method.calls == 0  # type: ignore[attr-defined]
    assert hook_count(list(model.parameters())) == 0


def test_feature_mode_accepts_encoders_also_listed_in_a_module_list() -> None:
    class Listed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)
            self.encoders = nn.ModuleList([self.a, self.b])  # the same modules, a second name
            self.head = nn.Linear(8, 3)

    model = Listed().to(DEVICE, DTYPE)
    ctx = gradmod.ModulationContext(
        model, encoders={"a": "a", "b": "b"}, method=FixedMethod([[0.5, 2.0]]), mode="feature"
    )
    xa, xb = torch.randn(5, 3, device=DEVICE), torch.randn(5, 2, device=DEVICE)
    h = {"a": model.a(xa), "b": model.b(xb)}
    y = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with ctx(features=h, targets=y):
        F.cross_entropy(model.head(torch.cat([h["a"], h["b"]], 1)), y).backward()
    assert model.a.weight.grad is not None


# ============================================================== B3. tied weights, feature mode
class TiedHead(nn.Module):
    """Encoder a's last weight is also the fusion head's last weight (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                "a": nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)),
                "b": nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4)),
            }
        )
        self.mix = nn.Linear(8, 4)
        self.out = nn.Linear(4, 4)
        self.out.weight = self.enc["a"][2].weight  # tied

    def forward(self, xa: Tensor, xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        h = {"a": self.enc["a"](xa), "b": self.enc["b"](xb)}
        return self.out(torch.tanh(self.mix(torch.cat([h["a"], h["b"]], 1)))), h


def test_feature_mode_refuses_a_weight_tied_with_the_fusion_head() -> None:
    model = TiedHead().to(DEVICE, DTYPE)
    method = FixedMethod([[0.5, 2.0]])
    with pytest.raises(gradmod.ConfigurationError, match="tied weight") as ei:
        gradmod.ModulationContext(
            model, encoders={"a": "enc.a", "b": "enc.b"}, method=method, mode="feature"
        )
    assert "'enc.a.2.weight' and 'out.weight'" in str(ei.value)


def test_parameter_mode_scales_the_whole_gradient_of_a_tied_weight() -> None:
    torch.manual_seed(0)
    model = TiedHead().to(DEVICE, F64)
    twin = copy.deepcopy(model)
    ctx = gradmod.ModulationContext(
        model, encoders={"a": "enc.a", "b": "enc.b"}, method=FixedMethod([[0.5, 2.0]])
    )
    g = torch.Generator().manual_seed(0)
    xa, xb = (torch.randn(6, d, generator=g, dtype=F64).to(DEVICE) for d in (3, 2))
    y = torch.randint(0, 4, (6,), generator=g).to(DEVICE)
    out, h = model(xa, xb)
    with ctx(features=h, targets=y):
        F.cross_entropy(out, y).backward()
    out, _ = twin(xa, xb)
    F.cross_entropy(out, y).backward()
    factor = {"enc.a": 0.5, "enc.b": 2.0}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        k = factor.get(name[:5], 1.0)
        torch.testing.assert_close(p.grad, k * q.grad, rtol=1e-12, atol=0)  # type: ignore[operator]


# ================================================================ B4. non-finite scores
def _nan_features(model: nn.Module, names: tuple[str, ...], seed: int) -> dict[str, Tensor]:
    xs, _ = dev(*data(names, seed=seed))
    xs = {k: v * math.nan if k == names[0] else v for k, v in xs.items()}
    return model.features(xs)  # type: ignore[operator, no-any-return]


def _method_step(
    model: nn.Module, ctx: gradmod.ModulationContext, feats: dict[str, Tensor], y: Tensor
) -> None:
    if isinstance(ctx.method, gradmod.AGM):
        feats = gradmod.functional.shapley_responses(model.fuse, feats)  # type: ignore[attr-defined]
        out = sum(feats.values())
    else:
        out = model.fuse(feats)  # type: ignore[operator]
    with ctx(features=feats, targets=y):
        F.cross_entropy(out, y).backward()  # type: ignore[arg-type]
    model.zero_grad()


BUILDERS: dict[str, Callable[[tuple[str, ...]], tuple[nn.Module, gradmod.ModulationContext]]] = {
    "agm": lambda names: (m := make(names), ctx_for(m, gradmod.AGM(alpha=1.2))),  # type: ignore[dict-item]
    "agm-official": lambda names: (m := make(names), ctx_for(m, gradmod.AGM(official=True))),  # type: ignore[dict-item]
    "mlb": lambda names: (m := make(names), ctx_for(m, gradmod.MLB(), linear_heads(names))),  # type: ignore[dict-item]
    # CGGM's accuracy alone stays finite on a NaN batch: its classifiers' outputs are checked
    "cggm": lambda names: (m := make(names), ctx_for(m, gradmod.CGGM(lam=0), linear_heads(names))),  # type: ignore[dict-item]
    "ogm-ge": lambda names: (m := make(names), ctx_for(m, gradmod.OGMGE(alpha=0.5), fusion="head")),  # type: ignore[dict-item]
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_non_finite_batch_leaves_no_trace_in_the_state(kind: str) -> None:
    """Steps clean, NaN, clean against steps clean, clean: the same state and coefficients after
    the last step (the NaN step was neutral: coefficients 1, state untouched)."""
    names = ("a", "b", "c")
    runs = []
    for with_nan in (True, False):
        model, ctx = BUILDERS[kind](names)
        for seed, bad in [(1, False), (2, True), (3, False)]:
            if bad and not with_nan:
                continue
            xs, y = dev(*data(names, seed=seed))
            feats = _nan_features(model, names, seed) if bad else model.features(xs)  # type: ignore[operator]
            _method_step(model, ctx, feats, y)
            for key, v in ctx.state_dict().items():
                assert torch.isfinite(v).all(), (kind, seed, key)
            if bad:
                assert torch.equal(ctx.coefficients, torch.ones_like(ctx.coefficients))
            for p in ctx.classifier_parameters():  # the heads' gradients gradmod added
                assert p.grad is None or bool(torch.isfinite(p.grad).all()), (kind, seed)
        runs.append((ctx.coefficients, state_of(ctx)))
    (k_nan, s_nan), (k_ref, s_ref) = runs
    assert torch.equal(k_nan, k_ref)
    assert int(s_nan["skipped"]) == 1
    for key in s_ref:
        if key not in ("skipped", "steps", "noise_steps"):  # counters of the steps taken
            assert torch.equal(s_nan[key], s_ref[key]), key


class _MaskedHead(nn.Module):
    """A unimodal head that masks a class absent from the task with a -inf logit: the loss and
    the gradients stay finite."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.tensor([False, False, False, True], device=x.device)
        return self.lin(x).masked_fill(mask, -math.inf)


@pytest.mark.parametrize("kind", ["multiloss", "mlb", "cggm"])
def test_heads_with_masked_minus_inf_logits_train_normally(kind: str) -> None:
    """-inf logits are not a NaN batch: the step counts as clean, and the heads' gradients are
    those of their losses on the detached features, by plain autograd (float64)."""
    names = ("a", "b", "c")
    model = make(names).to(F64)
    heads = {n: _MaskedHead(model.enc[n][-1].out_features).to(DEVICE, F64) for n in names}
    twins = copy.deepcopy(heads)
    method = {
        "multiloss": gradmod.MultiLoss(),
        "mlb": gradmod.MLB(),
        "cggm": gradmod.CGGM(lam=0),
    }[kind]
    ctx = ctx_for(model, method, heads)
    xs, y = dev(*data(names))
    y = y % 3  # class 3 is the masked one
    feats = model.features({k: v.to(F64) for k, v in xs.items()})
    with ctx(features=feats, targets=y):
        F.cross_entropy(model.fuse(feats), y).backward()
    assert int(ctx.state_dict()["skipped"]) == 0
    for n in names:
        F.cross_entropy(twins[n](feats[n].detach()), y).backward()
        for (pn, p), q in zip(heads[n].named_parameters(), twins[n].parameters(), strict=True):
            assert p.grad is not None and q.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=f"{n}.{pn}")


def test_cggm_takes_an_empty_batch() -> None:
    """A rank with no samples in a step (DDP with uneven data): no error, finite coefficients
    (the global mean counts no sample from it)."""
    names = ("a", "b", "c")
    model = make(names)
    ctx = ctx_for(model, gradmod.CGGM(lam=0), linear_heads(names))
    xs, y = dev(*data(names))
    xs, y = {k: v[:0] for k, v in xs.items()}, y[:0]
    feats = model.features(xs)
    with ctx(features=feats, targets=y):
        (model.fuse(feats).sum() * 0 + sum(f.sum() for f in feats.values()) * 0).backward()
    assert bool(torch.isfinite(ctx.coefficients).all())


# =============================================================== B6. hyperparameters
BAD_ARGS = [
    (gradmod.CGGM, {"rho": -0.1}, "rho"),
    (gradmod.CGGM, {"rho": math.nan}, "rho"),
    (gradmod.CGGM, {"lam": math.nan}, "lam"),
    (gradmod.CGGM, {"lam": -1.0}, "lam"),
    (gradmod.CGGM, {"zero_tol": math.inf}, "zero_tol"),
    (gradmod.MLB, {"alpha": math.nan}, "alpha"),
    (gradmod.MLB, {"alpha": 0.0}, "alpha"),
    (gradmod.MLB, {"beta": 0.5}, "beta"),
    (gradmod.MLB, {"weight": math.nan}, "weight"),
    (gradmod.MultiLoss, {"weight": math.nan}, "weight"),
    (gradmod.MultiLoss, {"weight": -1.0}, "weight"),
    (gradmod.MultiLoss, {"direction": math.nan}, "direction"),
    (gradmod.OGMGE, {"alpha": math.nan}, "alpha"),
    (gradmod.OGMGE, {"alpha": -0.1}, "alpha"),
    (gradmod.AGM, {"alpha": math.nan}, "alpha"),
    (gradmod.AGM, {"cap": 0.0}, "cap"),
    (gradmod.AGM, {"cap": math.inf}, "cap"),
]


@pytest.mark.parametrize(("cls", "kwargs", "name"), BAD_ARGS, ids=lambda v: str(v))
def test_bad_hyperparameters_are_configuration_errors_naming_the_range(
    cls: type, kwargs: dict[str, float], name: str
) -> None:
    with pytest.raises(gradmod.ConfigurationError) as ei:
        cls(**kwargs)
    (problem,) = ei.value.problems
    assert f"{name}" in problem and "must be a finite number" in problem
    assert any(op in problem for op in (">", "<=")), problem  # the valid range is stated


def test_every_bad_hyperparameter_is_reported_at_once() -> None:
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.MLB(alpha=math.nan, beta=0.0, weight=-1.0, scale="all")  # type: ignore[arg-type]
    assert len(ei.value.problems) == 4, ei.value.problems


def test_step_weight_must_be_finite_and_positive() -> None:
    model = make(("a", "b"))
    ctx = ctx_for(model, gradmod.MLB(), linear_heads(("a", "b")))
    for bad in (math.nan, 0.0, -1.0, math.inf):
        with pytest.raises(gradmod.StepError, match="weight must be a finite number > 0"):
            ctx(weight=bad)
    ctx(weight=np.float32(0.5))  # any real number


# ====================================================== B7. two backward passes in one block
def test_two_backward_passes_in_one_block_follow_the_objective() -> None:
    """loss1.backward(retain_graph=True); loss2.backward() inside one MultiLoss block gives the
    gradients of loss1 + loss2 + sum_m L_m: the unimodal losses count once, for the encoders
    as for the heads (float64 plain-autograd reference)."""
    names = ("a", "b")
    model, heads = make(names), linear_heads(names)
    ref_model, ref_heads = copy.deepcopy(model).to(F64), copy.deepcopy(heads)
    ctx = ctx_for(model, gradmod.MultiLoss(), heads)
    xs, y = dev(*data(names))
    feats = model.features(xs)
    out = model.fuse(feats)
    with ctx(features=feats, targets=y):
        F.cross_entropy(out, y).backward(retain_graph=True)
        (out.square().mean() * 0.1).backward()
    rx = {k: v.to(F64) for k, v in xs.items()}
    rf = ref_model.features(rx)
    rout = ref_model.fuse(rf)
    total = F.cross_entropy(rout, y) + rout.square().mean() * 0.1
    for n in names:
        h = ref_heads[n].to(F64)
        total = total + F.cross_entropy(h(rf[n]), y)
    total.backward()
    for (name, p), q in zip(
        [*model.named_parameters(), *((f"h{n}", p) for n in names for p in heads[n].parameters())],
        [*ref_model.parameters(), *(p for n in names for p in ref_heads[n].parameters())],
        strict=True,
    ):
        torch.testing.assert_close(p.grad.to(F64), q.grad, rtol=1e-5, atol=1e-6, msg=name)  # type: ignore[union-attr]


def test_two_backward_passes_with_ogm_noise_are_refused() -> None:
    names = ("a", "b")
    model = make(names)
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5), fusion="head")
    xs, y = dev(*data(names))
    feats = model.features(xs)
    out = model.fuse(feats)
    before = state_of(ctx)
    with pytest.raises(gradmod.StepError, match="second backward"), ctx(features=feats, targets=y):
        F.cross_entropy(out, y).backward(retain_graph=True)
        out.sum().backward()
    assert same_state(state_of(ctx), before)
    assert hook_count(list(model.parameters())) == 0


# =============================================================== B8. pickling in the block
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_model_saved_inside_the_block_carries_nothing_of_gradmod(mode: str) -> None:
    model = make_model()
    ctx = _cggm(model, mode=mode)
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    buf = io.BytesIO()
    with ctx(features=feats, targets=y):
        torch.save(model, buf)
        copied = copy.deepcopy(model)
        loss.backward()
    assert all(not vars(p) for p in model.parameters())  # nothing stored on the parameters
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copied):
        assert hook_count(list(other.parameters())) == 0
        assert all(not vars(p) for p in other.parameters())
        ctx2 = _cggm(other)
        loss2, feats2 = loss_of(other, xs, y)
        with ctx2(features=feats2, targets=y):  # a new context works on the loaded model
            loss2.backward()
        assert all(p.grad is not None for p in other.enc.parameters())


# ======================================== B9. OGM-GE: a failed micro-batch that is redone
class Boom(Exception):
    pass


def test_ogm_failed_micro_batch_redone_counts_once_in_the_noise() -> None:
    names = ("a", "b")
    runs = []
    for fail in (True, False):
        model = make(names)
        ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=4), fusion="head")
        micro = [dev(*data(names, n=8, seed=s)) for s in (5, 6)]
        attempts = [(0, True), (0, False), (1, False)] if fail else [(0, False), (1, False)]
        for i, boom in attempts:
            xs, y = micro[i]
            feats = model.features(xs)
            loss = F.cross_entropy(model.fuse(feats), y) / 2
            try:
                with ctx(features=feats, targets=y, boundary=i == 1, weight=0.5):
                    loss.backward()
                    if boom:
                        raise Boom
            except Boom:
                model.zero_grad()  # the failed micro-batch is thrown away and redone
        runs.append(({n: p.grad.clone() for n, p in model.named_parameters()}, state_of(ctx)))  # type: ignore[union-attr]
    (g_fail, s_fail), (g_ref, s_ref) = runs
    for name in g_ref:
        assert torch.equal(g_fail[name], g_ref[name]), name
    assert same_state(s_fail, s_ref)


# ============================================================ B10. float class labels
@pytest.mark.parametrize("kind", ["ogm-ge", "agm", "mlb", "cggm"])
def test_float_labels_for_classification_are_a_step_error(kind: str) -> None:
    names = ("a", "b")
    model = make(names)
    if kind == "cggm":
        ctx = ctx_for(model, gradmod.CGGM(lam=0), linear_heads(names))
    elif kind in BUILDERS:
        model, ctx = BUILDERS[kind](names)
    else:
        ctx = ctx_for(model, gradmod.AGM())
    xs, y = dev(*data(names))
    feats = model.features(xs)  # type: ignore[operator]
    if kind == "agm":
        feats = gradmod.functional.shapley_responses(model.fuse, feats)  # type: ignore[attr-defined]
    before = state_of(ctx)
    for bad in (y.to(DTYPE) + 0.9, y.to(DTYPE)):
        with pytest.raises(gradmod.StepError, match="integer class indices"):
            ctx(features=feats, targets=bad).__enter__()
    assert same_state(state_of(ctx), before)
    assert hook_count(all_tensors(model)) == 0 and no_grads(model)


# ============================================================= B11. AGM stays bounded
def _agm_two_steps(method: gradmod.AGM) -> Tensor:
    """Responses held as leaves: step 1 modality a is sure and right, b unsure; step 2 the other
    way round (50 classes): the running ratio of step 1 is ~50, the ratio of step 2 ~1/50."""
    lin = nn.Linear(2, 2).to(DEVICE, F64)
    ctx = gradmod.ModulationContext(
        lin, encoders={"a": [lin.weight], "b": [lin.bias]}, method=method
    )
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    sure = torch.zeros(4, 50, dtype=F64, device=DEVICE)
    sure[:, 0] = 20.0
    unsure = torch.zeros(4, 50, dtype=F64, device=DEVICE)
    for a, b in ((sure, unsure), (unsure, sure)):
        phi = {"a": a.clone().requires_grad_(True), "b": b.clone().requires_grad_(True)}
        with ctx(features=phi, targets=y):
            F.cross_entropy(phi["a"] + phi["b"], y).backward()
    return ctx.coefficients


def test_agm_default_coefficients_are_bounded_where_the_official_rule_explodes() -> None:
    alpha = 1.0
    s1 = [math.log(1 + 49 * math.exp(-20.0)), math.log(50.0)]
    s2 = s1[::-1]
    official = agm_k(s2, s1, alpha, 10.0)  # lihong2303/AGM_ICCV2023 CREMAD_main.py, cap 10
    assert max(official) > 1000  # the official rule boosts modality a by e^10 (its cap)
    k = _agm_two_steps(gradmod.AGM(alpha=alpha))
    assert float(k.max()) <= math.exp(alpha) * (1 + 1e-12)
    assert float(k.min()) >= math.exp(-alpha) * (1 - 1e-12)
    torch.testing.assert_close(k, torch.tensor(agm_k(s2, s1, alpha, 1.0, -1.0), dtype=F64))
    k_official = _agm_two_steps(gradmod.AGM(alpha=alpha, official=True))
    torch.testing.assert_close(k_official, torch.tensor(official, dtype=F64), rtol=1e-9, atol=0)


def test_agm_official_three_modalities_has_no_probability_floor() -> None:
    """URFunny_main.py (M = 3) scores -log(softmax) without the 1e-8 floor of the two-modality
    script: a true-class probability of ~e^-30 scores 30, not -log(1e-8) = 18.4."""
    model = nn.ModuleDict({n: nn.Linear(1, 1) for n in "abc"}).to(DEVICE, F64)
    y = torch.ones(2, dtype=torch.long, device=DEVICE)
    far = torch.tensor([30.0, 0.0, 0.0], dtype=F64, device=DEVICE).expand(2, 3)  # p(1) ~ e^-30
    mid = torch.zeros(2, 3, dtype=F64, device=DEVICE)
    ks = {}
    for official in (True, False):
        ctx = gradmod.ModulationContext(
            model, encoders={n: n for n in "abc"}, method=gradmod.AGM(official=official)
        )
        phi = {n: (far if n == "a" else mid).clone().requires_grad_(True) for n in "abc"}
        with ctx(features=phi, targets=y):
            sum(p.sum() for p in phi.values()).backward()  # type: ignore[union-attr]
        ks[official] = ctx.coefficients
    s_plain = [30.0 + math.log(1 + 2 * math.exp(-30.0)), math.log(3.0), math.log(3.0)]
    s_floor = [-math.log(1e-8), math.log(3.0), math.log(3.0)]
    torch.testing.assert_close(
        ks[True], torch.tensor(agm_k(s_plain, [0.0] * 3, 1.0, 7.0), dtype=F64), rtol=1e-9, atol=0
    )
    torch.testing.assert_close(
        ks[False], torch.tensor(agm_k(s_floor, [0.0] * 3, 1.0, 1.0, -1.0), dtype=F64)
    )


# ====================================================== B12. mistakes at the point they happen
def test_cggm_direction_loss_without_fusion_is_refused() -> None:
    model = make_model()
    with pytest.raises(gradmod.ConfigurationError, match=r"no fusion= was given.*lam=0"):
        gradmod.ModulationContext(model, make_classifiers(), encoders=ENC, method=gradmod.CGGM())
    gradmod.ModulationContext(model, make_classifiers(), encoders=ENC, method=gradmod.CGGM(lam=0))


def test_state_dict_for_another_number_of_modalities_is_refused_on_load() -> None:
    three = make(("a", "b", "c"))
    ctx3 = ctx_for(three, gradmod.AGM())
    xs, y = dev(*data(("a", "b", "c")))
    phi = gradmod.functional.shapley_responses(three.fuse, three.features(xs))
    with ctx3(features=phi, targets=y):
        F.cross_entropy(sum(phi.values()), y).backward()  # type: ignore[arg-type]
    two = make(("a", "b"))
    ctx2 = ctx_for(two, gradmod.AGM())
    before = state_of(ctx2)
    with pytest.raises(gradmod.ConfigurationError, match="saved for 3 modalities"):
        ctx2.load_state_dict(ctx3.state_dict())
    assert same_state(state_of(ctx2), before)
    corrupt = dict(ctx3.state_dict())
    corrupt["score_sum"] = corrupt["score_sum"] * math.nan
    with pytest.raises(gradmod.ConfigurationError, match="non-finite"):
        ctx3.load_state_dict(corrupt)


def test_state_dict_of_another_method_is_refused_whole_on_load() -> None:
    """An OGM-GE checkpoint loaded into an MLB context: refused before any key is copied (a
    plain strict load copies the keys both share, then raises on the rest)."""
    names = ("a", "b", "c")
    models = (make(names), make(names))
    ogm = ctx_for(models[0], gradmod.OGMGE(ge=False), fusion="head")
    mlb = ctx_for(models[1], gradmod.MLB(), linear_heads(names))
    xs, y = dev(*data(names))
    for model, ctx in zip(models, (ogm, mlb), strict=True):
        feats = model.features(xs)
        with ctx(features=feats, targets=y):
            F.cross_entropy(model.fuse(feats), y).backward()
    before = state_of(mlb)
    with pytest.raises(gradmod.ConfigurationError, match=r"does not fit MLB.*unexpected keys"):
        mlb.load_state_dict(ogm.state_dict())
    assert same_state(state_of(mlb), before)


def test_one_context_used_from_two_threads_is_refused_clearly() -> None:
    model = make_model()
    ctx = gradmod.ModulationContext(model, encoders=ENC, method=FixedMethod([[1.0, 2.0, 3.0]]))
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            with ctx(features=feats, targets=y):
                inside.set()
                release.wait(10)
                loss.backward()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    assert inside.wait(10)
    try:
        with pytest.raises(gradmod.ContextError, match="another thread"):
            ctx(features=feats, targets=y).__enter__()
    finally:
        release.set()
        t.join(10)
    assert not errors
    assert ctx.method.calls == 1  # type: ignore[attr-defined]
    assert hook_count(list(model.parameters())) == 0


# ============================================================== C. first impressions
def test_default_method_is_the_recommendation_and_the_one_shot_form_works() -> None:
    """``with ModulationContext(model, heads, features=f, targets=y): loss.backward()`` with
    nothing else runs gradmod.balanced(): the same gradients as an explicit balanced() context."""
    names = ("a", "b")
    results = []
    for explicit in (False, True):
        model, heads = make(names), linear_heads(names)
        xs, y = dev(*data(names))
        feats = model.features(xs)
        loss = F.cross_entropy(model.fuse(feats), y)
        kw = {"method": gradmod.balanced()} if explicit else {}
        enc = {n: f"enc.{n}" for n in names}
        with gradmod.ModulationContext(
            model, heads, encoders=enc, features=feats, targets=y, **kw
        ) as ctx:
            loss.backward()
        assert isinstance(ctx.method, gradmod.MLB) and ctx.method.alpha == 0.8
        assert ctx.method.scale == "encoder"
        results.append([p.grad.clone() for p in all_tensors(model, heads)])  # type: ignore[union-attr]
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
