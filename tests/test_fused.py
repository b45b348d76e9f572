"""The fused hot paths: parameter-mode scaling when the block is left, and OGM-GE's noise drawn
ahead on a thread. Each must give what the plain path gives, bit for bit, and fall back to it
wherever it would not be exact."""

from __future__ import annotations

import copy
import math
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _models import (
    F64,
    NAMES,
    FixedMethod,
    batch,
    grads,
    loss_of,
    make_model,
    modality_of,
    plain_grads,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from settings import ATOL, DEVICE, DTYPE, RTOL
from torch import Tensor, nn

import gradmod
from gradmod._hooks import HookSet  # the path taken is internal: the tests check both run

K = [0.5, 2.0, -1.5]
ENCODERS = {n: f"enc.{n}" for n in NAMES}


def _block(
    model: nn.Module, ctx: gradmod.ModulationContext, *, set_to_none: bool, **backward: bool
) -> bool:
    """One block on the suite's batch; returns whether the scaling was deferred to the exit."""
    xs, y = batch(dtype=next(model.parameters()).dtype)
    loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
    if not set_to_none:  # gradients present before the block: the hook path
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    with ctx(features=feats, targets=y):
        deferred = ctx._wiring.hooks._deferred is not None
        loss.backward(**backward)
    return deferred


def _assert_scaled(
    got: dict[str, Tensor | None],
    ref: dict[str, Tensor],
    k: list[float] = K,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
) -> None:
    """Every gradient in ``got`` is its modality's ``k`` times the float64 reference ``ref``
    (unscaled outside the encoders)."""
    for name, g in got.items():
        m = modality_of(name)
        assert g is not None, name
        want = ref[name] * (k[NAMES.index(m)] if m else 1.0)
        torch.testing.assert_close(g.double().cpu(), want, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("dtype", [DTYPE, torch.bfloat16], ids=str)
def test_scaling_on_leaving_equals_the_hooks_bit_for_bit(dtype: torch.dtype) -> None:
    """The gradient scaled in place on leaving the block is the hook's product exactly, and
    both are ``k_m`` times the float64 gradient."""
    base = make_model(dtype=dtype)
    runs = {}
    for set_to_none in (True, False):
        model = copy.deepcopy(base)
        ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
        assert _block(model, ctx, set_to_none=set_to_none) is set_to_none
        runs[set_to_none] = grads(model)
    for name, g in runs[True].items():
        assert g is not None and torch.equal(g, runs[False][name]), name
    tol = (RTOL, ATOL) if dtype == DTYPE else (2e-2, 2e-2)
    _assert_scaled(runs[True], plain_grads(base, *batch()), rtol=tol[0], atol=tol[1])


def test_a_post_accumulate_grad_hook_sees_the_modulated_gradient() -> None:
    """An optimizer stepped in backward (a post-accumulate-grad hook) must read the modulated
    gradient: such a tensor keeps the hook path."""
    model = make_model()
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    seen: dict[str, Tensor] = {}
    handles = [
        p.register_post_accumulate_grad_hook(
            lambda t, name=name: seen.__setitem__(name, t.grad.detach().clone())  # type: ignore[union-attr,misc]
        )
        for name, p in model.named_parameters()
    ]
    assert not _block(model, ctx, set_to_none=True)
    for h in handles:
        h.remove()
    ref = plain_grads(model, *batch())
    _assert_scaled(dict(seen), ref)
    assert len(seen) == len(ref)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_keeps_the_modulated_gradient_differentiable() -> None:
    """``backward(create_graph=True)`` inside a deferred block: the gradient is replaced out of
    place (``k g``, still in the graph), so a gradient penalty differentiates ``k g``."""
    model = make_model(dtype=F64)
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    assert _block(model, ctx, set_to_none=True, create_graph=True)
    w = model.enc["b"][0].weight
    assert w.grad is not None and w.grad.requires_grad
    (penalty_grad,) = torch.autograd.grad(w.grad.square().sum(), w)
    ref = copy.deepcopy(make_model(dtype=F64))
    ref.load_state_dict(model.state_dict())
    loss, _ = loss_of(ref, *batch(dtype=F64))  # type: ignore[arg-type]
    rw = ref.enc["b"][0].weight
    (g,) = torch.autograd.grad(loss, rw, create_graph=True)
    (want,) = torch.autograd.grad((K[1] * g).square().sum(), rw)
    torch.testing.assert_close(w.grad.detach(), K[1] * g.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(penalty_grad, want, rtol=1e-10, atol=1e-12)
    model.zero_grad(set_to_none=True)  # breaks the parameter <-> gradient cycle


def test_a_block_that_raises_after_backward_leaves_no_claim_and_scales_what_arrived() -> None:
    """As with the hooks (which scale each gradient as it arrives), what reached ``.grad`` is
    scaled; the claims are gone, so the next block runs."""
    model = make_model()
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
    with pytest.raises(KeyError), ctx(features=feats, targets=y):
        loss.backward()
        raise KeyError("after backward")
    assert not HookSet.held_elsewhere([p for p in model.parameters()])
    _assert_scaled(grads(model), plain_grads(model, xs, y))


def test_what_the_block_does_after_backward_sees_the_modulated_gradients() -> None:
    """The scaling runs when the backward ends, before ``backward()`` returns: clipping and an
    optimizer step inside the block act on the modulated gradients, as with hooks."""
    base = make_model(dtype=F64)
    after: dict[bool, dict[str, Tensor]] = {}
    for set_to_none in (True, False):
        model = copy.deepcopy(base)
        ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xs, y = batch(dtype=F64)
        loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
        if not set_to_none:
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        with ctx(features=feats, targets=y):
            assert (ctx._wiring.hooks._deferred is not None) is set_to_none
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            opt.step()
        assert norm > 0.05  # the clipping bound
        after[set_to_none] = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = plain_grads(base, *batch(dtype=F64))
    scaled = {n: g * (K[NAMES.index(m)] if (m := modality_of(n)) else 1.0) for n, g in ref.items()}
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g) for g in scaled.values()])
    )
    for name, p in base.named_parameters():
        want = p.detach() - 0.1 * scaled[name] * (0.05 / (total + 1e-6))
        for got in after.values():
            torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)


def test_two_backward_passes_in_a_deferred_block_scale_both() -> None:
    """The first backward's gradients are scaled when it ends; the tensors are then hooked, so
    the second backward's gradients are scaled as they arrive: ``k (g_1 + g_2)``."""
    model = make_model(dtype=F64)
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    xs, y = batch(dtype=F64)
    xs2, y2 = batch(dtype=F64, seed=2)
    loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
    loss2, _ = loss_of(model, xs2, y2)  # type: ignore[arg-type]
    with ctx(features=feats, targets=y):
        assert ctx._wiring.hooks._deferred is not None
        loss.backward()
        loss2.backward()
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    (loss_of(ref, xs, y)[0] + loss_of(ref, xs2, y2)[0]).backward()  # type: ignore[arg-type]
    got = grads(model)
    for name, p in ref.named_parameters():
        m = modality_of(name)
        want = p.grad * (K[NAMES.index(m)] if m else 1.0)  # type: ignore[operator]
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)
    assert not HookSet.held_elsewhere(list(model.parameters()))


# ------------------------------------------------------------------------- OGM-GE draw-ahead
class Wide(nn.Module):
    """Modality ``a`` above the draw-ahead threshold (2^18 elements), ``b`` below it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(600, 480), nn.ReLU(), nn.Linear(480, 8))
        self.b = nn.Linear(6, 8)
        self.head = nn.Linear(16, 3)

    def forward(self, xa: Tensor, xb: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        f = {"a": self.a(xa), "b": self.b(xb)}
        return self.head(torch.cat([f["a"], f["b"]], 1)), f


def _ogm_run(
    base: Wide, *, draw_ahead: bool, steps: int, resume_at: int | None = None
) -> tuple[list[Tensor], gradmod.ModulationContext]:
    model = copy.deepcopy(base).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(16, 600, generator=g), torch.randn(16, 6, generator=g), i % 3)
        for i in range(steps)
    ]

    def context() -> gradmod.ModulationContext:
        method = gradmod.OGMGE(alpha=0.5, seed=7, draw_ahead=draw_ahead, window=None)
        return gradmod.ModulationContext(
            model, encoders={"a": "a", "b": "b"}, method=method, fusion="head"
        )

    ctx = context()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i, (xa, xb, shift) in enumerate(data):
        if resume_at is not None and i == resume_at:  # a new context from the saved state
            state = ctx.state_dict()
            ctx.close()
            ctx = context()
            ctx.load_state_dict(state)
        y = (torch.arange(16) + shift) % 3
        out, f = model(xa.to(DEVICE), xb.to(DEVICE))
        with ctx(features=f, targets=y.to(DEVICE)):
            F.cross_entropy(out, y.to(DEVICE)).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], ctx


def test_noise_drawn_ahead_is_the_noise_drawn_in_backward() -> None:
    torch.manual_seed(0)
    base = Wide()
    ahead, ctx = _ogm_run(base, draw_ahead=True, steps=4)
    inline, _ = _ogm_run(base, draw_ahead=False, steps=4)
    for a, b in zip(ahead, inline, strict=True):
        assert torch.equal(a, b)
    if DEVICE.type == "cpu":  # the large modality's next draw is under way (CPU only)
        method = ctx.method
        assert isinstance(method, gradmod.OGMGE)
        assert len(method._ahead._running) == 1
        # and it is the one the next step uses (the small modality's hook, which fires
        # first, leaves it alone)
        taken: list[bool] = []
        take = method._ahead.take

        def spy(key: tuple[int, torch.device, torch.dtype, int]) -> Tensor | None:
            got = take(key)
            taken.append(got is not None)
            return got

        method._ahead.take = spy  # type: ignore[method-assign]
        model = ctx._model
        xa, xb = torch.randn(16, 600), torch.randn(16, 6)
        out, f = model(xa, xb)
        y = torch.arange(16) % 3
        with ctx(features=f, targets=y):
            F.cross_entropy(out, y).backward()
        assert taken == [True]
    # a resumed run (a new context, the state loaded) draws the same noise
    resumed, _ = _ogm_run(base, draw_ahead=True, steps=4, resume_at=2)
    for a, b in zip(resumed, inline, strict=True):
        assert torch.equal(a, b)


def test_a_method_with_noise_drawn_ahead_copies_and_pickles_without_it() -> None:
    torch.manual_seed(0)
    _, ctx = _ogm_run(Wide(), draw_ahead=True, steps=2)
    method = ctx.method
    assert isinstance(method, gradmod.OGMGE)
    for clone in (copy.deepcopy(method), pickle.loads(pickle.dumps(method))):
        assert isinstance(clone, gradmod.OGMGE)
        assert not clone._ahead._running
        assert torch.equal(clone.noise_steps, method.noise_steps)
    assert int(method.noise_steps) > 0
    method.reset()
    assert not method._ahead._running
    assert int(method.noise_steps) == 0 and int(method.steps) == 0
    assert method.last_coefficients.numel() == 0


_EXIT_AFTER_ONE_STEP = textwrap.dedent(
    """
    import torch, torch.nn as nn, torch.nn.functional as F
    import gradmod
    torch.set_num_threads(1)
    # modality a: 8.4M elements, whose next noise (tens of ms) is still being drawn on exit
    model = nn.ModuleDict(
        {"a": nn.Linear(4096, 2048), "b": nn.Linear(4, 2048), "head": nn.Linear(4096, 3)}
    )
    method = gradmod.OGMGE(window=None)
    ctx = gradmod.ModulationContext(
        model, encoders={"a": "a", "b": "b"}, method=method, fusion="head"
    )
    y = torch.tensor([0, 1])
    f = {"a": model["a"](torch.randn(2, 4096)), "b": model["b"](torch.randn(2, 4))}
    with ctx(features=f, targets=y):
        F.cross_entropy(model["head"](torch.cat([f["a"], f["b"]], 1)), y).backward()
    assert len(method._ahead._running) == 1, "the next draw is not under way"
    print("stepped")
    """
)


def test_a_script_that_ends_while_noise_is_drawn_ahead_exits_cleanly() -> None:
    # A draw still running when the interpreter shuts down used to be killed inside torch:
    # the process aborted (exit status 134) after a successful training script.
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _EXIT_AFTER_ONE_STEP],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "stepped"


def test_draw_ahead_must_be_a_bool() -> None:
    with pytest.raises(gradmod.ConfigurationError, match="draw_ahead must be True or False"):
        gradmod.OGMGE(draw_ahead="yes")  # type: ignore[arg-type]


def test_scaling_deferred_is_used_for_a_float64_model_too() -> None:
    """float64 gradients are multiplied by the float64 coefficients (no float32 copy)."""
    model = make_model(dtype=F64)
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    assert _block(model, ctx, set_to_none=True)
    _assert_scaled(grads(model), plain_grads(model, *batch(dtype=F64)), rtol=1e-12, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(
    mean=st.floats(-1e3, 1e3, allow_nan=False),
    scale=st.floats(1e-6, 1e3, allow_nan=False),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_one_pass_std_is_the_two_pass_std(
    mean: float, scale: float, seed: int, dtype: torch.dtype
) -> None:
    """The noise's std in one pass is within 2e-5 relative (float32; 1e-9 for float64) of the
    float64 std of the same numbers where the variance is at least a fifth of the mean square; where the mean dominates
    (below a twentieth) it is torch's two-pass std, exactly."""
    from gradmod.methods._ogm import _ONE_PASS_MIN, _std_value

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(_ONE_PASS_MIN + 7, generator=g, dtype=F64) * scale + mean).to(dtype)
    x64 = x.double()
    want = x64.std().item()
    spread = want**2 / x64.square().mean().item()
    if spread >= 0.2:
        tol = 1e-9 if dtype == F64 else 2e-5  # float32: the reductions' own rounding
        assert math.isclose(_std_value(x), want, rel_tol=tol)
    elif spread < 0.05:
        assert _std_value(x) == float(x.std())


def test_std_of_one_number_or_of_non_finite_gradients_is_zero() -> None:
    from gradmod.methods._ogm import _ONE_PASS_MIN, _std_value

    assert _std_value(torch.ones(1)) == 0.0
    big = torch.randn(_ONE_PASS_MIN)
    big[3] = math.inf
    assert _std_value(big) == 0.0
    big[3] = math.nan
    assert _std_value(big) == 0.0


def test_a_copied_context_scales_with_its_own_coefficients() -> None:
    """The cached hooks are bound to a context's own coefficient views: a deep copy of the
    model and its context (after steps on both paths) multiplies by the copy's coefficients."""
    model = make_model(dtype=F64)
    ctx = gradmod.ModulationContext(
        model, encoders=ENCODERS, method=FixedMethod([K]), monitor=gradmod.Monitor()
    )
    for _ in range(2):
        _block(model, ctx, set_to_none=False)  # the hook path, hooks cached
        _block(model, ctx, set_to_none=True)
    model_copy, ctx_copy = copy.deepcopy((model, ctx))
    ctx._wiring.coefficients.zero_()  # the original's: must not reach the copy's gradients
    for set_to_none in (True, False):
        _block(model_copy, ctx_copy, set_to_none=set_to_none)
        ref = plain_grads(model_copy, *batch(dtype=F64))
        _assert_scaled(grads(model_copy), ref, rtol=1e-12, atol=1e-14)


def test_a_model_cast_after_steps_gets_factors_of_its_new_dtype() -> None:
    """float32 steps, then ``model.double()``: the deferred scaling multiplies the float64
    gradients by the float64 coefficients (a cached float32 factor would be off by ~1e-9)."""
    model = make_model(dtype=torch.float32)
    k = [0.3, 1.7, 0.55]  # not exact in float32
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([k]))
    _block(model, ctx, set_to_none=True)
    model.double()
    model.zero_grad(set_to_none=True)
    assert _block(model, ctx, set_to_none=True)
    _assert_scaled(grads(model), plain_grads(model, *batch(dtype=F64)), k, rtol=1e-13, atol=1e-15)


def test_a_refused_block_leaves_the_coefficients_and_scores_as_they_were() -> None:
    model = make_model()
    from _models import make_classifiers

    ctx = gradmod.ModulationContext(
        model, make_classifiers(), encoders=ENCODERS, method=gradmod.MLB()
    )
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
    before, scores = ctx.coefficients, dict(ctx.scores)
    with pytest.raises(gradmod.StepError, match="weight="), ctx(feats, y, boundary=False):
        loss.backward()
    assert torch.equal(ctx.coefficients, before)
    assert ctx.scores.keys() == scores.keys()


def test_autograd_grad_inside_a_deferred_block_is_unmodulated_and_reported() -> None:
    """What is modulated is what reaches ``.grad``: ``torch.autograd.grad`` inside a block
    that defers the scaling returns the plain gradient, and the block, through which no
    modulated gradient passed, is refused on leaving (nothing silently ignored)."""
    model = make_model(dtype=F64)
    ctx = gradmod.ModulationContext(model, encoders=ENCODERS, method=FixedMethod([K]))
    xs, y = batch(dtype=F64)
    w = model.enc["b"][0].weight
    (plain,) = torch.autograd.grad(loss_of(model, xs, y)[0], w)  # type: ignore[arg-type]
    loss, feats = loss_of(model, xs, y)  # type: ignore[arg-type]
    refused = pytest.raises(gradmod.StepError, match="no modulated gradient passed")
    with refused, ctx(features=feats, targets=y):
        assert ctx._wiring.hooks._deferred is not None
        (got,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert not HookSet.held_elsewhere(list(model.parameters()))
