"""MMPareto through the engine, against a float64 reference of one official training step.

The reference is written from the authors' code (GeWu-Lab/MMPareto_ICML2024 at a339db3,
``code/MMPareto.py``), not from gradmod, in the official order:

* 97-103: one forward; the fused loss ``L_mm`` and the unimodal losses ``L_a``, ``L_v``
  (cross-entropy of the fusion head on the concatenated features and of each unimodal head);
* 117-147: the encoders' gradients of each loss separately (``retain_graph``): ``g`` of
  ``L_mm``, ``u`` of the encoder's own unimodal loss;
* 149-174: per encoder, ``F.cosine_similarity`` of the flattened ``g`` and ``u``; ``> 0``:
  weights ``(0.5, 0.5)``, otherwise ``MinNormSolver`` on the two vectors (``min_norm_solvers.py
  :17-30``, every inner product counted twice through the ``"concat"`` entry);
* 180-181: ``(L_mm + L_a + L_v).backward()``: ``.grad`` of every parameter;
* 184-207: every encoder tensor's gradient becomes ``gamma * max(1, r) * (2 k0 g + 2 k1 u)``,
  ``r = |.grad| / |2 k0 g + 2 k1 u|``, gamma = 1.5; the heads keep ``.grad``.

gradmod's default (``rescale="encoder"``) measures ``r`` once over the whole encoder; the
reference has that variant as an option.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_mmpareto_reference import min_norm_from2
from torch import Tensor, nn

import gradmod
from gradmod import ConfigurationError, StepError
from gradmod.methods import MMPareto

F64 = torch.float64
NAMES = ("audio", "visual")
DIMS = {"audio": 5, "visual": 4}
FEAT, CLASSES = 3, 4


class AV(nn.Module):
    """Two MLP encoders and a linear fusion head on their concatenation (the official layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, FEAT))
        self.visual = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, FEAT))
        self.head = nn.Linear(2 * FEAT, CLASSES)

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"audio": self.audio(xs["audio"]), "visual": self.visual(xs["visual"])}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        out: Tensor = self.head(torch.cat([feats["audio"], feats["visual"]], dim=1))
        return out


def setup(seed: int = 0, flip: bool = True) -> tuple[AV, dict[str, nn.Module]]:
    """Float64 model and heads; ``flip``: the fusion head's audio block is the negative of the
    audio head's weight, so that the audio encoder's two gradients conflict."""
    torch.manual_seed(seed)
    model = AV().double()
    linear = {n: nn.Linear(FEAT, CLASSES).double() for n in NAMES}
    if flip:
        with torch.no_grad():
            model.head.weight[:, :FEAT] = -2.0 * linear["audio"].weight
    return model, dict(linear)


def batch(seed: int, n: int = 16) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = {k: torch.randn(n, d, generator=g, dtype=F64) for k, d in DIMS.items()}
    return xs, torch.randint(0, CLASSES, (n,), generator=g)


# ------------------------------------------------------------------------------ reference
def official_step(
    model: AV,
    heads: dict[str, nn.Module],
    xs: dict[str, Tensor],
    y: Tensor,
    *,
    rescale: str = "tensor",
    gamma: float = 1.5,
) -> dict[str, dict[str, float]]:
    """One official training step on ``.grad`` (float64): returns the per-encoder scores."""
    # 97-103
    feats = model.features(xs)
    loss_mm = F.cross_entropy(model.fuse(feats), y)
    loss_uni = {n: F.cross_entropy(heads[n](feats[n]), y) for n in NAMES}
    enc = {n: list(getattr(model, n).parameters()) for n in NAMES}
    # 117-147: each loss's encoder gradients, separately
    g = {n: list(torch.autograd.grad(loss_mm, enc[n], retain_graph=True)) for n in NAMES}
    u = {n: list(torch.autograd.grad(loss_uni[n], enc[n], retain_graph=True)) for n in NAMES}
    # 180-181
    (loss_mm + loss_uni["audio"] + loss_uni["visual"]).backward()
    scores: dict[str, dict[str, float]] = {}
    for n in NAMES:
        # 149-174
        fg = torch.cat([x.reshape(-1) for x in g[n]])
        fu = torch.cat([x.reshape(-1) for x in u[n]])
        cos = float(F.cosine_similarity(fg, fu, dim=0))
        if cos > 0:
            k = (0.5, 0.5)
        else:
            c = min_norm_from2(2 * float(fg @ fg), 2 * float(fg @ fu), 2 * float(fu @ fu))
            k = (c, 1 - c)
        # 184-207
        new = [2 * k[0] * gi + 2 * k[1] * ui for gi, ui in zip(g[n], u[n], strict=True)]
        if rescale == "encoder":
            whole = torch.cat([p.grad.reshape(-1) for p in enc[n] if p.grad is not None])
            r_all = float(whole.norm() / torch.cat([x.reshape(-1) for x in new]).norm())
        for p, d in zip(enc[n], new, strict=True):
            assert p.grad is not None
            r = float(p.grad.norm() / d.norm()) if rescale == "tensor" else r_all
            p.grad = (r * d * gamma) if r > 1 else d * gamma
        scores[n] = {"cosine": cos, "multimodal_weight": k[0], "conflict": float(cos <= 0)}
    return scores


# ------------------------------------------------------------------------------- helpers
def context(model: AV, heads: dict[str, nn.Module], **kw: Any) -> gradmod.ModulationContext:
    kw.setdefault("method", MMPareto())
    return gradmod.ModulationContext(model, heads, **kw)


def engine_block(
    ctx: gradmod.ModulationContext,
    model: AV,
    xs: dict[str, Tensor],
    y: Tensor,
    *,
    divide: float = 1.0,
    scaler: torch.amp.GradScaler | None = None,
    **kw: Any,
) -> None:
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y) / divide
    with ctx(feats, y, **kw):
        (scaler.scale(loss) if scaler is not None else loss).backward()


def params(model: AV, heads: dict[str, nn.Module]) -> list[nn.Parameter]:
    return [*model.parameters(), *(p for h in heads.values() for p in h.parameters())]


def grads(model: AV, heads: dict[str, nn.Module]) -> list[Tensor]:
    out = []
    for p in params(model, heads):
        assert p.grad is not None
        out.append(p.grad.clone())
    return out


PRESETS = {
    "official": (lambda: MMPareto(rescale="tensor", policy="official"), "tensor"),
    "default": (MMPareto, "encoder"),
}


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("flip", [True, False], ids=["conflict", "agree"])
def test_one_step_matches_the_official_order(preset: str, flip: bool) -> None:
    make, rescale = PRESETS[preset]
    model, heads = setup(flip=flip)
    ref_model, ref_heads = copy.deepcopy((model, heads))
    xs, y = batch(1)
    ctx = context(model, heads, method=make())
    engine_block(ctx, model, xs, y)
    want = official_step(ref_model, ref_heads, xs, y, rescale=rescale)
    assert want["audio"]["conflict"] == float(flip)  # the setup does what it says
    for got, ref in zip(grads(model, heads), grads(ref_model, ref_heads), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    scores = ctx.scores
    for m, n in enumerate(NAMES):
        for key, value in want[n].items():
            assert float(scores[key][m]) == pytest.approx(value, rel=1e-10, abs=1e-13), (n, key)


def test_the_default_keeps_the_common_descent_direction() -> None:
    """With a conflict, gradmod's default (one magnitude per encoder) never turns an encoder's
    gradient against either loss; the official per-tensor rule is allowed to."""
    model, heads = setup()
    xs, y = batch(1)
    feats = model.features(xs)
    enc = list(model.audio.parameters())
    g = torch.autograd.grad(F.cross_entropy(model.fuse(feats), y), enc, retain_graph=True)
    u = torch.autograd.grad(F.cross_entropy(heads["audio"](feats["audio"]), y), enc)
    ctx = context(model, heads)
    engine_block(ctx, model, xs, y)
    out = [p.grad for p in enc if p.grad is not None]
    assert bool(ctx.scores["conflict"][0]) and len(out) == len(enc)
    assert sum(float((a * b).sum()) for a, b in zip(out, g, strict=True)) >= 0
    assert sum(float((a * b).sum()) for a, b in zip(out, u, strict=True)) >= 0


def test_an_accumulation_window_is_combined_once_at_its_boundary() -> None:
    """Two half batches (loss / 2, weight=0.5): the encoders get nothing until the boundary,
    then the combination of the whole window's g and u, the full batch's step."""
    model, heads = setup()
    ref_model, ref_heads = copy.deepcopy((model, heads))
    xs, y = batch(2, n=16)
    ctx = context(model, heads)
    halves = [
        ({k: v[i * 8 : i * 8 + 8] for k, v in xs.items()}, y[i * 8 : i * 8 + 8]) for i in (0, 1)
    ]
    engine_block(ctx, model, *halves[0], divide=2.0, boundary=False, weight=0.5)
    assert all(not p.grad.any() for p in model.audio.parameters())  # type: ignore[union-attr]
    assert all(p.grad is not None and p.grad.any() for p in heads["audio"].parameters())
    assert bool(torch.isnan(ctx.scores["cosine"]).all())  # nothing combined yet
    engine_block(ctx, model, *halves[1], divide=2.0, boundary=True, weight=0.5)
    official_step(ref_model, ref_heads, xs, y, rescale="encoder")
    for got, ref in zip(grads(model, heads), grads(ref_model, ref_heads), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    assert ctx.method._windowed() is None  # type: ignore[operator]


def test_a_block_that_raises_drops_its_stash() -> None:
    """A window's second block raises after its backward: its fused and unimodal gradients are
    dropped; redone cleanly, the window ends as if the failed block had never run."""
    model, heads = setup()
    other_model, other_heads = copy.deepcopy((model, heads))
    ctx, other = context(model, heads), context(other_model, other_heads)
    first, second = batch(4, n=8), batch(5, n=8)
    engine_block(ctx, model, *first, boundary=False, weight=1.0)
    feats = model.features(second[0])
    loss = F.cross_entropy(model.fuse(feats), second[1])
    with pytest.raises(KeyError), ctx(feats, second[1], boundary=True, weight=1.0):
        loss.backward()
        raise KeyError("after backward")
    engine_block(ctx, model, *second, boundary=True, weight=1.0)
    engine_block(other, other_model, *first, boundary=False, weight=1.0)
    engine_block(other, other_model, *second, boundary=True, weight=1.0)
    # the fusion head's gradient is the user's backward's (the failed one's included): gradmod
    # owns the encoders' (stashed) and the unimodal heads' (accumulated) gradients
    mine = [*model.audio.parameters(), *model.visual.parameters()]
    mine += [p for h in heads.values() for p in h.parameters()]
    theirs = [*other_model.audio.parameters(), *other_model.visual.parameters()]
    theirs += [p for h in other_heads.values() for p in h.parameters()]
    for a, b in zip(mine, theirs, strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    assert all(not (p._backward_hooks or {}) for p in params(model, heads))


def test_a_grad_scaler_changes_nothing() -> None:
    """float32, power-of-two scale with scaler.scale(loss).backward() inside the block: the
    trained parameters are bit-identical to the run without a scaler (u is scaled in the
    combine, after backward)."""
    runs = []
    for use_scaler in (False, True):
        model, heads = setup()
        model.float()
        for h in heads.values():
            h.float()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
        ctx = context(model, heads, grad_scaler=scaler if use_scaler else None)
        opt = torch.optim.SGD(params(model, heads), lr=0.1, momentum=0.9)
        for s in range(3):
            xs, y = batch(10 + s)
            engine_block(
                ctx,
                model,
                {k: v.float() for k, v in xs.items()},
                y,
                scaler=scaler if use_scaler else None,
            )
            if use_scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad()
        assert not use_scaler or scaler.get_scale() == 2.0**12
        runs.append([p.detach().clone() for p in params(model, heads)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_the_monitor_records_what_the_boundary_added() -> None:
    model, heads = setup()
    monitor = gradmod.Monitor()
    ctx = context(model, heads, monitor=monitor)
    engine_block(ctx, model, *batch(4, n=8), boundary=False, weight=0.5)
    engine_block(ctx, model, *batch(5, n=8), boundary=True, weight=0.5)
    rows = monitor.latest()
    norm = torch.cat([p.grad.reshape(-1) for p in model.audio.parameters()]).norm()  # type: ignore[union-attr]
    assert float(rows["grad_norm_after/audio"]) == pytest.approx(float(norm), rel=1e-6)
    assert float(rows["score/conflict/audio"]) == 1.0


def test_refusals() -> None:
    model, heads = setup()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"mode": "feature"}, "parameter hooks"),
        ({"optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}, "no update-level form"),
    ]
    for kw, what in cases:
        with pytest.raises(ConfigurationError, match=what):
            context(model, heads, **kw)
    with pytest.raises(ConfigurationError, match="classifiers"):
        gradmod.ModulationContext(model, None, encoders={n: n for n in NAMES}, method=MMPareto())
    with pytest.raises(ConfigurationError, match="gamma"):
        MMPareto(gamma=0.0)
    with pytest.raises(ConfigurationError, match="rescale"):
        MMPareto(rescale="layer")  # type: ignore[arg-type]
    ctx = context(model, heads)
    xs, y = batch(6)
    feats = model.features(xs)
    with pytest.raises(StepError, match="class indices"), ctx(feats, y.double()):
        pass
    with pytest.raises(StepError, match="weight="), ctx(feats, y, boundary=False):
        pass
    half = {k: v.half() for k, v in feats.items()}
    with pytest.raises(StepError, match="grad_scaler"), ctx(half, y):
        pass
    assert all(not (p._backward_hooks or {}) for p in params(model, heads))


class _Undeclared(MMPareto):
    """Returns a combine without declaring it (a programming error the engine reports)."""

    def needs(self) -> gradmod.Needs:
        return gradmod.Needs(classifiers="required", trains_classifiers=True, features=True)


def test_a_combine_must_be_declared() -> None:
    model, heads = setup()
    ctx = context(model, heads, method=_Undeclared())
    feats = model.features(batch(7)[0])
    with pytest.raises(RuntimeError, match="combines_gradients"), ctx(feats, batch(7)[1]):
        pass
    assert all(not (p._backward_hooks or {}) for p in params(model, heads))
