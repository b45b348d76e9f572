"""CGGM end to end against a naive float64 re-implementation written here, step by step.

The ``official=True`` reference follows the authors' training step (zrguo/CGGM
``src/msatrain.py``, ``train``), read from the source, not from gradmod:

* ``diff_sum = sum(diff) + 1e-8; coeff = (diff_sum - d) / diff_sum`` — the ``1e-8`` is in the
  numerator too, so when no metric changes every B is exactly 1;
* ``l_gm`` is built at the end of step t from ``clone()``s of that step's fusion and classifier
  ``out_layer.weight`` (``cal_cos``) with step t's ``coeff``, and added to the loss of step t+1
  (``raw_loss += lamda * l_gm`` before ``raw_loss.backward()``): its gradient is taken at step
  t's weights and reaches the fusion weight at step t+1; there is none at the first step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from settings import DEVICE
from torch import nn

import gradmod

F64 = torch.float64
NAMES = ("a", "b", "c")
DIMS = {"a": 5, "b": 7, "c": 3}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 4)) for n, d in DIMS.items()}
        )
        self.head = nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3))

    def features(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.enc[n](x[n]) for n in NAMES}

    def forward_from(self, h: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(torch.cat([h[n] for n in NAMES], 1))


def make() -> tuple[Net, dict[str, nn.Module]]:
    torch.manual_seed(1)
    net = Net().to(DEVICE, F64)
    clfs = {
        n: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DEVICE, F64) for n in NAMES
    }
    return net, clfs


def batches(k: int, bsz: int = 16) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(k):
        x = {n: torch.randn(bsz, d, generator=g, dtype=F64).to(DEVICE) for n, d in DIMS.items()}
        out.append((x, torch.randint(0, 3, (bsz,), generator=g).to(DEVICE)))
    return out


def naive_b(prev: list[float], cur: list[float], official: bool) -> list[float]:
    delta = [c - p for c, p in zip(cur, prev, strict=True)]
    m = len(delta)
    if official:
        s = sum(delta) + 1e-8
        return [(s - d) / s for d in delta]
    pos = [max(d, 0.0) for d in delta]
    s = sum(pos)
    return [(s - d) / s for d in pos] if s > 1e-6 else [(m - 1) / m] * m


def cos_grad_u(u: torch.Tensor, v: torch.Tensor) -> tuple[float, torch.Tensor]:
    """cos(u, v) and d cos / d u, from the closed form v/(|u||v|) - cos u/|u|^2."""
    nu, nv = u.norm(), v.norm()
    cos = float((u * v).sum() / (nu * nv))
    return cos, v / (nu * nv) - cos * u / nu**2


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_cggm_steps_match_naive_reference(official: bool, mode: str) -> None:
    rho, lam, lr = 1.3, 0.2, 0.5
    net, clfs = make()
    ref_net, ref_clfs = copy.deepcopy(net), copy.deepcopy(clfs)
    ctx = gradmod.ModulationContext(
        net,
        clfs,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=gradmod.CGGM(rho=rho, lam=lam, official=official),
        fusion="head",
        mode=mode,  # type: ignore[arg-type]
    )
    prev = [0.0, 0.0, 0.0]
    # official: the direction loss of the previous step, (B, u, [v_m]) at that step's weights
    pending: tuple[list[float], torch.Tensor, list[torch.Tensor]] | None = None
    for x, y in batches(4):
        # ---- gradmod
        h = net.features(x)
        loss = F.cross_entropy(net.forward_from(h), y)
        with ctx(features=h, targets=y):
            loss.backward()

        # ---- naive reference
        rh = ref_net.features(x)
        rloss = F.cross_entropy(ref_net.forward_from(rh), y)
        enc_params = {n: list(ref_net.enc[n].parameters()) for n in NAMES}
        head_params = list(ref_net.head.parameters())
        grads = torch.autograd.grad(rloss, [p for n in NAMES for p in enc_params[n]] + head_params)
        acc = []
        clf_grads = []
        for n in NAMES:
            out = ref_clfs[n](rh[n].detach())
            acc.append(sum(int(out[i].argmax()) == int(y[i]) for i in range(len(y))) / len(y))
            clf_grads.append(
                torch.autograd.grad(F.cross_entropy(out, y), list(ref_clfs[n].parameters()))
            )
        b = naive_b(prev, acc, official)
        # direction loss gradient on the fusion head's last weight matrix
        u_now = ref_net.head[2].weight.detach().clone()
        v_now = [ref_clfs[n][2].weight.detach().clone() for n in NAMES]
        if official:  # the previous step's loss, at the previous step's weights
            b_dir, u, vs = pending if pending is not None else ([0.0] * 3, u_now, v_now)
        else:
            b_dir, u, vs = b, u_now, v_now
        g_dir = torch.zeros_like(u)
        for bm, v in zip(b_dir, vs, strict=True):
            _, dcos = cos_grad_u(u, v)
            g_dir -= lam * bm * dcos / len(NAMES)
        pending = (b, u_now, v_now)

        # ---- compare
        torch.testing.assert_close(
            ctx.coefficients.double(),
            torch.tensor(b, dtype=F64, device=DEVICE) * rho,
            rtol=1e-6,
            atol=1e-6,
        )
        k = 0
        for i, n in enumerate(NAMES):
            for p in net.enc[n].parameters():
                torch.testing.assert_close(p.grad, rho * b[i] * grads[k], rtol=1e-6, atol=1e-9)
                k += 1
        for j, p in enumerate(net.head.parameters()):
            expected = grads[k + j] + (g_dir if p is net.head[2].weight else 0)
            torch.testing.assert_close(p.grad, expected, rtol=1e-9, atol=1e-12)
        for i, n in enumerate(NAMES):
            for p, g in zip(clfs[n].parameters(), clf_grads[i], strict=True):
                torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-12)

        # ---- identical SGD step on both sides (reference grads built by hand)
        with torch.no_grad():
            k = 0
            for i, n in enumerate(NAMES):
                for p in ref_net.enc[n].parameters():
                    p -= lr * rho * b[i] * grads[k]
                    k += 1
            for j, p in enumerate(ref_net.head.parameters()):
                p -= lr * (grads[k + j] + (g_dir if p is ref_net.head[2].weight else 0))
            for i, n in enumerate(NAMES):
                for p, g in zip(ref_clfs[n].parameters(), clf_grads[i], strict=True):
                    p -= lr * g
            for p in [*net.parameters(), *ctx.classifier_parameters()]:
                p -= lr * p.grad  # type: ignore[operator]
                p.grad = None
        prev = acc


def test_regression_task_uses_sign_accuracy_and_l1() -> None:
    torch.manual_seed(0)
    enc = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}).to(DEVICE, F64)
    clfs = {n: nn.Linear(4, 1).to(DEVICE, F64) for n in ("a", "b")}
    ctx = gradmod.ModulationContext(
        enc, clfs, method=gradmod.CGGM(task="regression", rho=1.0, lam=0.0)
    )
    x = {
        "a": torch.randn(9, 3, dtype=F64, device=DEVICE),
        "b": torch.randn(9, 2, dtype=F64, device=DEVICE),
    }
    y = torch.randn(9, dtype=F64, device=DEVICE)
    h = {n: enc[n](x[n]) for n in ("a", "b")}
    with ctx(features=h, targets=y):
        (h["a"].sum() + h["b"].sum()).backward()
    acc = []
    for n in ("a", "b"):
        pred = clfs[n](h[n].detach()).squeeze(1)
        acc.append(
            sum(int((float(pred[i].detach()) > 0) == (float(y[i]) > 0)) for i in range(9)) / 9
        )
        ref = torch.autograd.grad((pred - y).abs().mean(), list(clfs[n].parameters()))
        for p, g in zip(clfs[n].parameters(), ref, strict=True):
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(
        ctx.state_dict()["previous"].double(),
        torch.tensor(acc, dtype=F64, device=DEVICE),
        rtol=1e-6,
        atol=1e-6,
    )
    torch.testing.assert_close(
        ctx.coefficients.double(),
        torch.tensor(naive_b([0, 0], acc, False), dtype=F64, device=DEVICE),
        rtol=1e-6,
        atol=1e-6,
    )


def test_user_metric_and_loss() -> None:
    """A 0-d user metric and a custom classifier loss are used as given."""
    enc = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(2, 4)}).to(DEVICE, F64)
    clfs = {n: nn.Linear(4, 2).to(DEVICE, F64) for n in ("a", "b")}
    calls: list[str] = []

    def metric(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append("metric")
        return out[:, 0].mean().sigmoid()  # an arbitrary 0-d score

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out**2).mean()

    ctx = gradmod.ModulationContext(
        enc, clfs, method=gradmod.CGGM(metric=metric, loss_fn=loss_fn, rho=1.0, lam=0.0)
    )
    x = {
        "a": torch.randn(6, 3, dtype=F64, device=DEVICE),
        "b": torch.randn(6, 2, dtype=F64, device=DEVICE),
    }
    y = torch.zeros(6, dtype=torch.long, device=DEVICE)
    h = {n: enc[n](x[n]) for n in ("a", "b")}
    with ctx(features=h, targets=y):
        sum(v.sum() for v in h.values()).backward()  # type: ignore[union-attr]
    scores = [float(clfs[n](h[n].detach())[:, 0].mean().sigmoid().detach()) for n in ("a", "b")]
    assert calls == ["metric", "metric"]
    expected = naive_b([0, 0], scores, False)
    assert ctx.coefficients.tolist() == pytest.approx(expected, abs=1e-6)
    for n in ("a", "b"):
        ref = torch.autograd.grad((clfs[n](h[n].detach()) ** 2).mean(), list(clfs[n].parameters()))
        for p, g in zip(clfs[n].parameters(), ref, strict=True):
            torch.testing.assert_close(p.grad, g)
    assert math.isfinite(sum(scores))
