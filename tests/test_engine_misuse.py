"""Misuse that would otherwise go unnoticed: each is refused clearly, and nothing is half-done."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _models import NAMES, FixedMethod, batch, hook_count, loss_of, make_classifiers, make_model
from settings import DEVICE, DTYPE
from test_methods import (
    ctx_for,
    data,
    dev,
    f64,
    linear_heads,
    make,
)
from torch import nn

import gradmod

F64 = torch.float64


def fixed(model: nn.Module) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        model, encoders={n: f"enc.{n}" for n in NAMES}, method=FixedMethod([[0.0, 0.0, 0.0]])
    )


def test_backward_outside_the_block_is_reported() -> None:
    model = make_model()
    ctx = fixed(model)
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    refused = pytest.raises(gradmod.StepError, match="no modulated gradient passed through")
    with refused, ctx(features=feats, targets=y):
        pass
    loss.backward()  # unmodulated, as the error said
    assert hook_count(list(model.parameters())) == 0


def test_parameters_replaced_after_construction_are_reported() -> None:
    model = make_model()
    ctx = fixed(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects: the context's are orphans
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    refused = pytest.raises(gradmod.StepError, match="build the context again")
    with refused, ctx(features=feats, targets=y):
        loss.backward()
    # a context built now modulates the new parameters
    model.zero_grad()
    ctx = fixed(model)
    loss, feats = loss_of(model, xs, y)
    with ctx(features=feats, targets=y):
        loss.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.enc.parameters())


def test_parameter_frozen_after_construction_is_refused_before_any_state_changes() -> None:
    model, clfs = make_model(), make_classifiers()
    ctx = gradmod.ModulationContext(
        model, clfs, encoders={n: f"enc.{n}" for n in NAMES}, method=gradmod.CGGM(), fusion="head"
    )
    model.enc["b"][0].weight.requires_grad_(False)
    xs, y = batch()
    _, feats = loss_of(model, xs, y)
    with pytest.raises(gradmod.StepError, match="stopped requiring grad"):
        ctx(features=feats, targets=y).__enter__()
    assert int(ctx.method.steps) == 0  # type: ignore[arg-type]
    assert all(p.grad is None for c in clfs.values() for p in c.parameters())


def test_accumulation_weight_divides_the_method_gradients_like_the_loss() -> None:
    """Two micro-batches, loss / 2 and weight = 1/2: the gradients of the full-batch multi-loss
    objective (float64 reference on the concatenated batch)."""
    names = ("a", "b", "c")
    model, heads = make(names), linear_heads(names)
    m64, h64 = f64(model), {n: f64(h) for n, h in heads.items()}
    ctx = ctx_for(model, gradmod.MultiLoss(), heads)
    xs, y = data(names, n=24)
    halves = [slice(0, 12), slice(12, 24)]
    for i, sl in enumerate(halves):
        xd, yd = dev({k: v[sl] for k, v in xs.items()}, y[sl])
        feats = model.features(xd)
        loss = F.cross_entropy(model.fuse(feats), yd) / 2
        with ctx(features=feats, targets=yd, boundary=i == 1, weight=1 / 2):
            loss.backward()
    feats = m64.features(xs)  # type: ignore[operator]
    total = F.cross_entropy(m64.fuse(feats), y)  # type: ignore[operator]
    total = total + sum(F.cross_entropy(h64[n](feats[n]), y) for n in names)
    total.backward()
    tol = {"rtol": 1e-4, "atol": 1e-6} if torch.bfloat16 != DTYPE else {"rtol": 3e-2, "atol": 3e-2}
    for (name, p), q in zip(model.named_parameters(), m64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.to("cpu", F64), q.grad, msg=name, **tol)  # type: ignore[arg-type]
    for n in names:
        for p, q in zip(heads[n].parameters(), h64[n].parameters(), strict=True):
            torch.testing.assert_close(p.grad.to("cpu", F64), q.grad, **tol)  # type: ignore[arg-type]
    with pytest.raises(gradmod.StepError, match="weight must be"):
        ctx(features=feats, targets=y, weight=0.0)


def test_ogm_width_mismatch_is_a_step_error_before_anything() -> None:
    names = ("a", "b")
    model = make(names)
    ctx = ctx_for(model, gradmod.OGMGE(), fusion="head")
    xd, yd = dev(*data(names))
    feats = model.features(xd)
    feats["b"] = feats["b"][:, :2]
    with pytest.raises(gradmod.StepError, match="add up to 6"):
        ctx(features=feats, targets=yd).__enter__()
    assert int(ctx.method.steps) == 0  # type: ignore[arg-type]
    assert hook_count(list(model.parameters())) == 0


class BagNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {"t": nn.EmbeddingBag(50, 4, mode="mean", sparse=True), "v": nn.Linear(3, 4)}
        )
        self.head = nn.Linear(8, 3)


def test_ogm_noise_on_a_sparse_gradient_is_refused_clearly() -> None:
    torch.manual_seed(0)
    model = BagNet().to(DEVICE)
    tokens = torch.randint(0, 50, (6, 5), device=DEVICE)
    v = torch.randn(6, 3, device=DEVICE)
    y = torch.randint(0, 3, (6,), device=DEVICE)
    for ge in (True, False):
        ctx = gradmod.ModulationContext(
            model,
            encoders={"t": "enc.t", "v": "enc.v"},
            method=gradmod.OGMGE(alpha=0.5, ge=ge),
            fusion="head",
        )
        feats = {"t": model.enc["t"](tokens), "v": model.enc["v"](v)}
        loss = F.cross_entropy(model.head(torch.cat([feats["t"], feats["v"]], 1)), y)
        if ge:
            refused = pytest.raises(gradmod.StepError, match="needs dense gradients")
            with refused, ctx(features=feats, targets=y):
                loss.backward()
            assert hook_count(list(model.parameters())) == 0
        else:  # plain OGM scales the sparse gradient
            with ctx(features=feats, targets=y):
                loss.backward()
            assert model.enc["t"].weight.grad is not None and model.enc["t"].weight.grad.is_sparse
        model.zero_grad(set_to_none=True)


def test_a_model_moved_after_construction_is_followed() -> None:
    """Built on the CPU, then moved to the suite's device: coefficients follow the parameters."""
    torch.manual_seed(0)
    model = make_model(device=torch.device("cpu"))
    ctx = fixed(model)
    model.to(DEVICE)
    twin = copy.deepcopy(model)
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    with ctx(features=feats, targets=y):
        loss.backward()
    assert ctx.coefficients.device.type == DEVICE.type
    loss, _ = loss_of(twin, xs, y)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name.startswith("enc."):
            assert float(p.grad.abs().max()) == 0.0, name
        else:
            assert torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("list", "features must be a mapping"),
        ("missing", "do not match the modalities"),
        ("extra", "do not match the modalities"),
        ("not a tensor", r"features\['a'\] is a float, not a tensor"),
        ("detached", r"features\['a'\] is not attached to the autograd graph"),
    ],
)
def test_unusable_features_are_refused_before_anything_changes(bad: str, message: str) -> None:
    model = make_model()
    method = FixedMethod([[2.0, 3.0, 4.0]])
    ctx = gradmod.ModulationContext(
        model, encoders={n: f"enc.{n}" for n in NAMES}, method=method, mode="feature"
    )
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    given: object = {
        "list": list(feats.values()),
        "missing": {n: feats[n] for n in NAMES[:-1]},
        "extra": {**feats, "z": feats["a"]},
        "not a tensor": {**feats, "a": 1.0},
        "detached": {**feats, "a": feats["a"].detach()},
    }[bad]
    refused = pytest.raises(gradmod.StepError, match=message)
    with refused, ctx(features=given, targets=y):  # type: ignore[arg-type]
        loss.backward()
    assert method.calls == 0
    assert hook_count(list(model.parameters())) == 0
    assert all(p.grad is None for p in model.parameters())
