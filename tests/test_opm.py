"""OPM (``gradmod.OPM``) and the TPAMI OGM preset (``OGMGE(form="tpami")``) through the engine,
against float64 references written here from the official source (GeWu-Lab/BML_TPAMI2024 at
4b3aa4f, ``code/``), not from gradmod:

* scores ``Classifier.py:112-143``: ``z_m = h_m W_m^T + b/2`` with the fusion weight detached,
  ``s_m`` the summed softmax probability of the true class;
* ``calcu_q`` ``Classifier.py:58-72`` (q of the dominant modality, 0 for the other);
* ``Modality_drop.execute_drop`` ``Classifier.py:31-55`` and ``custom_autograd`` ``:9-21``:
  one execute draw per step, Bernoulli(1 - q) keep masks ``[B, 1, M]``, kept features divided
  by ``1 - theta``; the official backward returns ``theta`` as theta's gradient (the leak,
  reproduced by ``OPM(theta_gradient=True)``, the ``"opm-official"`` preset);
* ``main.py:118-152``: the revised OGM's coefficients.

Where the official code uses global generators (NumPy's for the decision, torch's for the
masks), the references draw the official way from gradmod's documented seeds: the decision from
a generator seeded ``hash((seed, step, micro, -1))``, the masks from torch's global generator
seeded ``hash((seed, step, micro, rank))``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod
from gradmod.methods import REGISTRY

F64 = torch.float64
SEED_SPACE = 2**63
WIDTH, CLASSES, BATCH = 4, 3, 16


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, WIDTH))
        self.b = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, WIDTH))
        self.head = nn.Linear(2 * WIDTH, CLASSES)

    def features(self, xa: Tensor, xb: Tensor) -> dict[str, Tensor]:
        return {"a": self.a(xa), "b": self.b(xb)}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats["a"], feats["b"]], 1))


def make(method: gradmod.Method, **kw: object) -> tuple[Net, gradmod.ModulationContext]:
    torch.manual_seed(0)
    net = Net().double()
    ctx = gradmod.ModulationContext(
        net, encoders={"a": "a", "b": "b"}, method=method, fusion="head", **kw
    )
    return net, ctx


def batch(seed: int, n: int = BATCH) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    xa = torch.randn(n, 5, generator=g, dtype=F64)
    xa[:, 0] += 2.0 * y  # modality a is informative: it dominates, OPM drops it
    return xa, torch.randn(n, 3, generator=g, dtype=F64), y


def step(net: Net, ctx: gradmod.ModulationContext, seed: int, **kw: object) -> dict[str, Tensor]:
    """One engine step; returns the features the head consumed (detached)."""
    xa, xb, y = batch(seed)
    feats = net.features(xa, xb)
    fused = ctx.prepare(feats, y)
    with ctx(feats, y, **kw):  # type: ignore[arg-type]
        F.cross_entropy(net.fuse(fused), y).backward()
    return {n: f.detach() for n, f in fused.items()}


# ---------------------------------------------------------------------------------- references
class OfficialScale(torch.autograd.Function):
    """``custom_autograd`` (Classifier.py:9-21), verbatim in float64."""

    @staticmethod
    def forward(ctx: object, input: Tensor, theta: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(input, theta)  # type: ignore[attr-defined]
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx: object, grad_output: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        _, theta = ctx.saved_tensors  # type: ignore[attr-defined]
        return 1 / (1 - theta.item()) * grad_output.clone(), theta


def official_scores(net: Net, feats: dict[str, Tensor], y: Tensor) -> list[Tensor]:
    """Classifier.py:112-143 (the scores stay in the features' graph)."""
    w, b = net.head.weight.clone().detach(), net.head.bias.clone().detach()
    t1 = feats["a"] @ w[:, :WIDTH].T + b / 2
    t2 = feats["b"] @ w[:, WIDTH:].T + b / 2
    sm = nn.Softmax(dim=1)
    p1 = sum(sm(t1)[i][int(y[i])] for i in range(t1.shape[0]))
    p2 = sum(sm(t2)[i][int(y[i])] for i in range(t2.shape[0]))
    return [p1, p2]  # type: ignore[list-item]


def official_q(p1: Tensor, p2: Tensor, q_base: float, lam: float) -> Tensor:
    """calcu_q (Classifier.py:58-72), in float64."""
    q = torch.tensor([0.0, 0.0], dtype=F64)
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(p1 / p2 - 1))
    ratio_2 = torch.tanh(relu(p2 / p1 - 1))
    q[0] = q_base * (1 + lam * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lam * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def official_execute(seed: int, steps: int, micro: int, p_exe: float) -> bool:
    """Classifier.py:34-36 with gradmod's decision seed (the same on every rank)."""
    g = torch.Generator().manual_seed(hash((seed, steps, micro, -1)) % SEED_SPACE)
    return bool(torch.rand((), generator=g, dtype=F64) >= 1 - p_exe)


def official_mask(q: Tensor, n: int, seed: int, steps: int, micro: int, rank: int) -> Tensor:
    """Classifier.py:45 (``[2, B, 1]``) from torch's global generator, seeded as gradmod
    documents."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, steps, micro, rank)) % SEED_SPACE)
        draws = torch.distributions.Bernoulli(1 - q.detach().float()).sample([n, 1])
    return draws.permute(2, 1, 0).contiguous().reshape(2, n, -1).to(F64)


def official_step(
    net: Net,
    xa: Tensor,
    xb: Tensor,
    y: Tensor,
    *,
    steps: int,
    micro: int = 0,
    rank: int = 0,
    seed: int = 0,
    q_base: float = 0.5,
    lam: float = 0.5,
    p_exe: float = 1.0,
    leak: bool = True,
) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor | None]]:
    """The official forward and backward of one OPM step (Classifier.py:145-149, main.py:104,
    114) on a copy of ``net``: (features consumed, q, mask, encoder gradients). ``leak=False``
    detaches the scores (what gradmod's default computes)."""
    net = copy.deepcopy(net)
    feats = net.features(xa, xb)
    p1, p2 = official_scores(net, feats, y)
    if not leak:
        p1, p2 = p1.detach(), p2.detach()
    q = official_q(p1, p2, q_base, lam)
    n = int(y.shape[0])
    mask = torch.ones(2, n, 1, dtype=F64)
    consumed = [feats["a"], feats["b"]]
    if official_execute(seed, steps, micro, p_exe):
        theta = (torch.tensor([WIDTH, WIDTH], dtype=F64) * q).sum() / (2 * WIDTH)
        mask = official_mask(q, n, seed, steps, micro, rank)
        stacked = OfficialScale.apply(torch.stack(consumed, 0) * mask, theta)
        consumed = [c.squeeze(0) for c in torch.chunk(stacked, 2, dim=0)]
    out = net.head(torch.cat(consumed, 1))
    F.cross_entropy(out, y).backward()
    grads = [p.grad for p in [*net.a.parameters(), *net.b.parameters()]]
    return [c.detach() for c in consumed], q.detach(), mask.squeeze(-1), grads


def kept(feats: Mapping[str, Tensor]) -> Tensor:
    """``[2, B]``: which samples kept each modality's features (not zeroed)."""
    return torch.stack([feats[n].ne(0).any(1) for n in "ab"]).to(F64)


def encoder_grads(net: Net) -> list[Tensor | None]:
    return [p.grad for p in [*net.a.parameters(), *net.b.parameters()]]


# --------------------------------------------------------------------------------------- OPM
@pytest.mark.parametrize("steps", [0, 1, 2, 3])
def test_opm_official_preset_equals_the_official_step(steps: int) -> None:
    """``"opm-official"`` (theta_gradient=True) with p_exe = 1 against the official forward and
    backward, step by step: q, which modality is dropped, the masks, the rescaled features and
    every encoder gradient (the leak included)."""
    net, ctx = make(gradmod.OPM(theta_gradient=True, p_exe=1.0))
    for s in range(steps):
        step(net, ctx, s)
        net.zero_grad()
    xa, xb, y = batch(steps)
    want_feats, q, mask, want = official_step(net, xa, xb, y, steps=steps)
    got_feats = step(net, ctx, steps)
    d = int(torch.argmax(q))  # the dominant modality, the only one dropped
    assert float(q[d]) >= 0.5 and float(q[1 - d]) == 0
    torch.testing.assert_close(ctx.scores["drop_probability"], q, rtol=1e-12, atol=1e-14)
    assert bool(mask[1 - d].eq(1).all()) and bool(mask[d].eq(0).any())
    torch.testing.assert_close(ctx.scores["kept_fraction"], mask.mean(1), rtol=0, atol=0)
    for n, w in zip("ab", want_feats, strict=True):
        torch.testing.assert_close(got_feats[n], w, rtol=1e-12, atol=1e-14)
    for g, w in zip(encoder_grads(net), want, strict=True):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)


def test_gradmod_default_drops_the_leak_and_differs_by_exactly_its_gradient() -> None:
    """The default OPM treats q and theta as constants: it equals the official step with the
    scores detached, and differs from the official one by the gradient of theta^2/2."""
    net, ctx = make(gradmod.OPM(p_exe=1.0))
    xa, xb, y = batch(0)
    _, _, _, official = official_step(net, xa, xb, y, steps=0, leak=True)
    _, _, _, detached = official_step(net, xa, xb, y, steps=0, leak=False)
    step(net, ctx, 0)
    got = encoder_grads(net)
    for g, w in zip(got, detached, strict=True):
        assert g is not None and w is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    num = sum(float((o - g).norm() ** 2) for o, g in zip(official, got, strict=True))  # type: ignore[operator]
    den = sum(float(o.norm() ** 2) for o in official)  # type: ignore[union-attr]
    assert 1e-4 < math.sqrt(num / den) < 0.5  # the leak is a visible part of the gradient


def test_execute_decision_window_and_p_exe() -> None:
    """p_exe: the step drops iff the (seed, step, micro) draw says so; outside the window, the
    features pass unchanged (q = 0)."""
    net, ctx = make(gradmod.OPM(p_exe=0.5, window=(2, None)))
    seen = []
    for s in range(12):
        ctx.set_epoch(s // 4)
        xa, xb, _ = batch(s)
        plain = {n: f.detach() for n, f in net.features(xa, xb).items()}
        got = step(net, ctx, s)
        net.zero_grad()
        executed = official_execute(0, s, 0, 0.5) and s >= 8
        same = all(torch.equal(got[n], plain[n]) for n in "ab")
        assert same == (not executed), s
        if s < 8:
            assert ctx.scores["drop_probability"].tolist() == [0.0, 0.0]
        seen.append(executed)
    assert any(seen)
    assert int(ctx.method.state_dict()["executed_steps"]) == sum(seen)


def test_eval_mode_and_no_grad_are_untouched() -> None:
    net, ctx = make(gradmod.OPM(p_exe=1.0))
    xa, xb, y = batch(0)
    net.eval()
    feats = net.features(xa, xb)
    out = ctx.prepare(feats, y)
    assert all(out[n] is feats[n] for n in "ab")
    with ctx(feats, y):  # an eval-mode backward needs no prepare: nothing was dropped
        F.cross_entropy(net.fuse(feats), y).backward()
    net.train()
    with torch.no_grad():
        feats = net.features(xa, xb)
        out = ctx.prepare(feats, y)
    assert all(out[n] is feats[n] for n in "ab")
    # methods that do not act in the forward: prepare is the identity, in training too
    net2, ctx2 = make(gradmod.OGMGE())
    feats = net2.features(xa, xb)
    assert all(v is feats[n] for n, v in ctx2.prepare(feats, y).items())


def test_a_training_block_without_prepare_or_with_other_features_is_refused() -> None:
    net, ctx = make(gradmod.OPM(p_exe=1.0))
    xa, xb, y = batch(0)
    feats = net.features(xa, xb)
    with pytest.raises(gradmod.StepError, match=r"ctx\.prepare"), ctx(feats, y):
        pass
    fused = ctx.prepare(feats, y)
    with pytest.raises(gradmod.StepError, match=r"not those handed to ctx\.prepare"), ctx(fused, y):
        pass
    with ctx(feats, y):  # the refusals left the prepared forward for this block
        with pytest.raises(gradmod.ContextError, match="before the block"):
            ctx.prepare(feats, y)
        F.cross_entropy(net.fuse(fused), y).backward()
    with pytest.raises(gradmod.StepError, match=r"ctx\.prepare"), ctx(feats, y):
        pass  # consumed


def test_a_block_that_raises_is_redone_with_the_same_masks() -> None:
    net, ctx = make(gradmod.OPM(p_exe=1.0))
    xa, xb, y = batch(3)
    feats = net.features(xa, xb)
    first = {n: f.detach() for n, f in ctx.prepare(feats, y).items()}
    with pytest.raises(KeyError), ctx(feats, y):
        raise KeyError("inside")
    state = ctx.state_dict()
    assert int(state["steps"]) == 0 and int(state["micro"]) == 0
    again = step(net, ctx, 3)
    assert all(torch.equal(first[n], again[n]) for n in "ab")


def test_resume_redraws_identical_masks_and_accumulation_counts_micro_batches() -> None:
    net, ctx = make(gradmod.OPM(p_exe=1.0))
    for s in range(3):
        step(net, ctx, s, boundary=s != 1, weight=1.0)  # step 0, micro 0 and 1 of step 1
    state = copy.deepcopy(ctx.state_dict())
    assert (int(state["steps"]), int(state["micro"])) == (2, 0)
    saved = copy.deepcopy(net.state_dict())
    tail = [step(net, ctx, s) for s in (3, 4)]
    net2, ctx2 = make(gradmod.OPM(p_exe=1.0))
    net2.load_state_dict(saved)
    ctx2.load_state_dict(state)
    again = [step(net2, ctx2, s) for s in (3, 4)]
    for a, b in zip(tail, again, strict=True):
        assert all(torch.equal(a[n], b[n]) for n in "ab")
    # the micro-batch index enters the seed: micro 0 and 1 of a step draw different masks
    q = torch.tensor([0.6, 0.0], dtype=F64)
    assert not torch.equal(official_mask(q, 64, 0, 5, 0, 0), official_mask(q, 64, 0, 5, 1, 0))


def test_ddp_seeding_one_decision_per_step_masks_per_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks share q (global scores) and the execute decision, and draw their own masks, each
    the one seeded by (seed, step, micro, rank); the engine hands the method its rank."""
    net, ctx = make(gradmod.OPM(p_exe=0.5, seed=7))
    xa, xb, y = batch(1, n=64)
    feats = net.features(xa, xb)
    base = gradmod.Step(feats, y, lambda t: t)
    method: gradmod.OPM = ctx.method  # type: ignore[assignment]
    decided = []
    for steps in range(8):
        method.steps.fill_(steps)
        carries = [method.prepare(ctx._binding, dataclasses.replace(base, rank=r)) for r in (0, 1)]
        c0, c1 = (c.carry for c in carries)
        assert bool(c0.executed) == bool(c1.executed) == official_execute(7, steps, 0, 0.5)
        torch.testing.assert_close(c0.drop_probability, c1.drop_probability, rtol=0, atol=0)
        decided.append(bool(c0.executed))
        if bool(c0.executed):
            for r, c in enumerate(carries):
                mask = official_mask(c0.drop_probability, 64, 7, steps, 0, r)
                assert torch.equal(kept(c.features), mask.squeeze(-1))
            assert not torch.equal(kept(carries[0].features), kept(carries[1].features))
    assert any(decided) and not all(decided)
    drops = next(n for n in range(64) if official_execute(7, n, 0, 0.5))
    method.steps.fill_(drops)
    monkeypatch.setattr(gradmod._dist, "rank_and_world", lambda group: (1, 1))  # type: ignore[attr-defined]
    got = step(net, ctx, 1)
    q = ctx.scores["drop_probability"]
    assert float(q.max()) >= 0.5
    assert torch.equal(kept(got), official_mask(q, BATCH, 7, drops, 0, 1).squeeze(-1))
    assert not torch.equal(kept(got), official_mask(q, BATCH, 7, drops, 0, 0).squeeze(-1))


def test_arguments_are_checked_at_once() -> None:
    with pytest.raises(gradmod.ConfigurationError) as e:
        gradmod.OPM(q_base=1.5, lam=-1, p_exe=2, rescale="x", window=(3, 1))  # type: ignore[arg-type]
    assert len(e.value.problems) == 5
    with pytest.raises(gradmod.ConfigurationError, match="fusion"):
        gradmod.ModulationContext(Net(), encoders={"a": "a", "b": "b"}, method=gradmod.OPM())


def test_opm_presets_are_registered() -> None:
    assert {"opm", "opm-official", "opm-unbiased", "ogm-tpami", "ogm-tpami-plus"} <= set(REGISTRY)
    assert REGISTRY["opm-official"].make(2).needs().injects_into_features


# ------------------------------------------------------------------------------ TPAMI OGM
def official_ogm(s0: float, s1: float, alpha: float, plus: bool) -> list[float]:
    """main.py:118-152."""
    r1, r2 = s0 / s1, s1 / s0
    if r1 > 1:
        return [1.0, 4.0] if plus else [1 - math.tanh(alpha * r1), 1.0]
    return [4.0, 1.0] if plus else [1.0, 1 - math.tanh(alpha * r2)]


@pytest.mark.parametrize("plus", [False, True])
def test_ogm_tpami_form_through_the_engine(plus: bool) -> None:
    """The scores from the official lines (Classifier.py:112-143), the coefficients from the
    official rule (main.py:118-152) on them, and each encoder's gradient k_m times its plain
    autograd gradient."""
    method = gradmod.OGMGE(form="tpami", alpha=0.8, boost=4.0 if plus else None, ge=False)
    net, ctx = make(method)
    for s in range(3):
        xa, xb, y = batch(s)
        ref = copy.deepcopy(net)
        ref_feats = ref.features(xa, xb)
        scores = [
            float(p) for p in official_scores(ref, {k: v.detach() for k, v in ref_feats.items()}, y)
        ]
        F.cross_entropy(ref.fuse(ref_feats), y).backward()
        want = official_ogm(*scores, alpha=0.8, plus=plus)
        step(net, ctx, s)
        torch.testing.assert_close(
            ctx.scores["true_class_probability_sum"],
            torch.tensor(scores, dtype=F64),
            rtol=1e-12,
            atol=0,
        )
        torch.testing.assert_close(
            ctx.coefficients, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0
        )
        for m, name in enumerate(("a", "b")):
            for p, q in zip(
                getattr(net, name).parameters(), getattr(ref, name).parameters(), strict=True
            ):
                assert p.grad is not None and q.grad is not None
                torch.testing.assert_close(p.grad, want[m] * q.grad, rtol=1e-12, atol=1e-15)
        net.zero_grad()
    # an exact tie: the TPAMI code slows (or boosts) by its else-branch
    tie = torch.tensor([2.0, 2.0], dtype=F64)
    assert method.coefficients(tie).tolist() == pytest.approx(official_ogm(2.0, 2.0, 0.8, plus))


def test_ogm_tpami_arguments() -> None:
    with pytest.raises(gradmod.ConfigurationError, match="form='tpami'"):
        gradmod.OGMGE(boost=4.0)
    with pytest.raises(gradmod.ConfigurationError, match="boost"):
        gradmod.OGMGE(form="tpami", boost=0.0)
    assert "boost=4.0" in repr(gradmod.OGMGE(form="tpami", boost=4.0))


@pytest.mark.parametrize("theta_gradient", [False, True], ids=["default", "official-leak"])
def test_a_nan_batch_is_a_neutral_step_counted_in_skipped(theta_gradient: bool) -> None:
    """A batch whose scores are NaN (one NaN input sample): nothing is dropped, no leak is
    injected, ``last_scores`` keep the last finite step's values, the step is counted in
    ``skipped``, and the state still loads (it is finite)."""
    net, ctx = make(gradmod.OPM(p_exe=1.0, theta_gradient=theta_gradient))
    step(net, ctx, seed=1)  # a finite step first
    method = ctx.method
    assert isinstance(method, gradmod.OPM)
    before = method.last_scores.clone()
    assert torch.isfinite(before).all() and int(method.skipped) == 0
    xa, xb, y = batch(2)
    xa[3, 0] = math.nan
    net.zero_grad(set_to_none=True)
    feats = net.features(xa, xb)
    fused = ctx.prepare(feats, y)
    for n in ("a", "b"):  # nothing dropped: the features are the encoders' own
        torch.testing.assert_close(fused[n], feats[n], rtol=0, atol=0, equal_nan=True, msg=n)
    with ctx(feats, y):
        F.cross_entropy(net.fuse(fused), y).backward()
    assert torch.equal(method.last_scores, before)
    assert int(method.skipped) == 1
    assert torch.isfinite(method.last_drop_probability).all()
    fresh = make(gradmod.OPM(p_exe=1.0, theta_gradient=theta_gradient))[1]
    fresh.load_state_dict(ctx.state_dict())  # a finite checkpoint: loads
    assert int(fresh.method.skipped) == 1  # type: ignore[arg-type]
