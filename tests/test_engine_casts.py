"""Features that are a pure dtype cast of a live tensor.

Mixed-precision wrappers hand out such casts: Accelerate's prepared model returns ``h.float()``
for every bf16 output ``h``, while the loss reaches the encoders through ``h`` itself (the copy
is a dead end). gradmod hooks the gradient of ``h``, the cast's source, so the method's
injected gradient (MLB's head losses) and feature-mode scaling land where the loss goes, whether
the copy is used or not.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod

NAMES = ("a", "b")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.b = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head = nn.Linear(8, 3)

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"a": self.a(xs["a"]), "b": self.b(xs["b"])}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats["a"], feats["b"]], 1))


def data(seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (10,), generator=g)
    xs = {"a": torch.randn(10, 5, generator=g), "b": torch.randn(10, 3, generator=g)}
    xs["a"][:, :3] += 2 * F.one_hot(y, 3)
    return xs, y


def build(
    method: str, dtype: torch.dtype = torch.float32
) -> tuple[Net, dict[str, nn.Module], gradmod.ModulationContext]:
    torch.manual_seed(0)
    model = Net().to(dtype)
    heads = {n: nn.Linear(4, 3).to(dtype) for n in NAMES}
    if method == "mlb":
        ctx = gradmod.ModulationContext(model, heads, method=gradmod.MLB())
    elif method == "mlb-feature":
        ctx = gradmod.ModulationContext(model, heads, method=gradmod.MLB(), mode="feature")
    else:
        heads = {}
        ctx = gradmod.ModulationContext(
            model, encoders={n: n for n in NAMES}, method=gradmod.Fixed([0.5, 2.0]), mode="feature"
        )
    return model, heads, ctx


def grads(model: nn.Module, heads: dict[str, nn.Module]) -> dict[str, Tensor]:
    out = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    for n, h in heads.items():
        out.update({f"{n}.{k}": p.grad.clone() for k, p in h.named_parameters()})
    return out


def autocast_step(method: str, cast: bool) -> dict[str, Tensor]:
    """bf16 autocast forward; the loss on the fp32 logits; gradmod handed the bf16 features
    (``cast=False``) or dead-end fp32 copies of them (``cast=True``, what Accelerate returns)."""
    model, heads, ctx = build(method)
    xs, y = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.features(xs)
        logits = model.fuse(feats)
    assert all(f.dtype == torch.bfloat16 for f in feats.values())
    handed = {n: f.float() for n, f in feats.items()} if cast else feats
    with ctx(features=handed, targets=y):
        F.cross_entropy(logits.float(), y).backward()
    return grads(model, heads)


@pytest.mark.parametrize("method", ["mlb", "mlb-feature", "fixed-feature"])
def test_dead_end_copies_give_the_gradients_of_the_live_features(method: str) -> None:
    """Bit for bit: the hooks sit on the bf16 tensors the copies were made from."""
    got, want = autocast_step(method, cast=True), autocast_step(method, cast=False)
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_live_cast_gets_the_injection_once() -> None:
    """float64 encoders, features cast to float32 and fused in float32 (the copy is live, and the
    source receives its gradient through it): the gradients are those of
    CE(fused) + sum_m CE(head_m(copy_m)) by plain autograd (multi-loss: coefficients 1); an
    injection added at both the copy and its source would count the head losses twice."""
    torch.manual_seed(0)
    model = Net().double()
    heads = {n: nn.Linear(4, 3) for n in NAMES}
    ref_model, ref_heads = copy.deepcopy(model), copy.deepcopy(heads)
    model.head.float()
    ref_model.head.float()
    ctx = gradmod.ModulationContext(model, heads, method=gradmod.MultiLoss())
    xs, y = data(2)
    feats = {
        n: f.float() for n, f in model.features({k: v.double() for k, v in xs.items()}).items()
    }
    with ctx(features=feats, targets=y):
        F.cross_entropy(model.fuse(feats), y).backward()
    ref = {
        n: f.float() for n, f in ref_model.features({k: v.double() for k, v in xs.items()}).items()
    }
    total = F.cross_entropy(ref_model.fuse(ref), y)
    total = total + sum(F.cross_entropy(ref_heads[n](ref[n]), y) for n in NAMES)
    total.backward()
    got, want = grads(model, heads), grads(ref_model, ref_heads)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-6, msg=k)


def test_the_source_hooks_leave_with_the_block() -> None:
    """A second backward through the same graph after the block: plain gradients (no scaling,
    no injection) are added."""
    model, _heads, ctx = build("mlb-feature")
    plain_model = copy.deepcopy(model)
    xs, y = data(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = model.features(xs)
        logits = model.fuse(feats)
    loss = F.cross_entropy(logits.float(), y)
    with ctx(features={n: f.float() for n, f in feats.items()}, targets=y):
        loss.backward(retain_graph=True)
    first = grads(model, {})
    loss.backward()
    second = grads(model, {})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_logits = plain_model.fuse(plain_model.features(xs))
    F.cross_entropy(plain_logits.float(), y).backward()
    plain = grads(plain_model, {})
    assert not all(torch.equal(first[k], plain[k]) for k in plain)  # the block did modulate
    for k in plain:
        torch.testing.assert_close(second[k] - first[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
