"""Semantics of the hook engine, each checked against an independent reference built here.

References are plain autograd on copies of the model without gradmod (float64 on the CPU, or the
same dtype when the check is bit-for-bit), multiplied by hand. A tiny fixed-schedule method
(``FixedMethod`` in ``_models.py``) isolates the engine from CGGM's coefficient rule; CGGM itself
is used where its classifiers, direction loss or state are what is tested.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import weakref
from collections.abc import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from _models import (
    CLASSES,
    F64,
    NAMES,
    FixedMethod,
    MultiModal,
    batch,
    cast,
    copy_as,
    grads,
    hook_count,
    loss_of,
    make_classifiers,
    make_model,
    mlp,
    modality_of,
    plain_grads,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from settings import ATOL, DEVICE, DTYPE, RTOL
from torch import Tensor, nn

import gradmod

#: Non-dyadic on purpose: a coefficient rounded to float32 on the way would miss the float64
#: reference by ~1e-8 (relative), which the float64 checks below detect.
COEFFS = (0.3, 1.7, -0.55)
COEFFS_2 = (1.25, 0.0, 0.6)


def encoders_of(model: MultiModal) -> dict[str, str]:
    return {n: f"enc.{n}" for n in NAMES}


def fixed_ctx(
    model: MultiModal, *schedule: Sequence[float], mode: str = "parameter"
) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        model,
        encoders=encoders_of(model),
        method=FixedMethod(schedule or [COEFFS]),
        mode=mode,  # type: ignore[arg-type]
    )


def cggm_ctx(
    model: MultiModal, clfs: Mapping[str, nn.Module], **kw: object
) -> gradmod.ModulationContext:
    method = gradmod.CGGM(**{k: v for k, v in kw.items() if k in ("rho", "lam", "official")})  # type: ignore[arg-type]
    rest = {k: v for k, v in kw.items() if k not in ("rho", "lam", "official")}
    rest.setdefault("fusion", "head")
    return gradmod.ModulationContext(
        model,
        dict(clfs),
        encoders=encoders_of(model),
        method=method,
        **rest,  # type: ignore[arg-type]
    )


def step(
    model: MultiModal, ctx: gradmod.ModulationContext, xs: Mapping[str, Tensor], y: Tensor
) -> dict[str, Tensor]:
    loss, feats = loss_of(model, xs, y)
    with ctx(features=feats, targets=y):
        loss.backward()
    return feats


def plain_step(model: MultiModal, xs: Mapping[str, Tensor], y: Tensor) -> None:
    loss, _ = loss_of(model, xs, y)
    loss.backward()


def close64(actual: Tensor, expected: Tensor, what: str, rtol: float = RTOL, atol: float = ATOL):
    torch.testing.assert_close(
        actual.detach().to("cpu", F64), expected.to(F64), rtol=rtol, atol=atol, msg=what
    )


def c_of(coeffs: Sequence[float]) -> dict[str, float]:
    return dict(zip(NAMES, coeffs, strict=True))


def scaled(g: Tensor, c: float) -> Tensor:
    """``c * g`` as the engine computes it: a float64 0-d factor times ``g`` (keeps g's dtype)."""
    return g * torch.tensor(c, dtype=F64, device=g.device)


# ------------------------------------------------------------------------ parameter mode
def test_parameter_mode_scales_each_encoder_and_nothing_else() -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    xs, y = batch()
    ref = plain_grads(model, xs, y)
    ctx = fixed_ctx(model)
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    plain = dict(twin.named_parameters())
    c = c_of(COEFFS)
    assert torch.equal(ctx.coefficients.cpu(), torch.tensor(COEFFS, dtype=ctx.coefficients.dtype))
    n_enc = 0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == DTYPE, name
        m = modality_of(name)
        if m is None:
            assert torch.equal(p.grad, plain[name].grad), name
        else:
            n_enc += 1
            close64(p.grad, c[m] * ref[name], name)
            assert torch.equal(p.grad, scaled(plain[name].grad, c[m])), name
    assert n_enc == 12


class GradCoefficients(gradmod.Method):
    """Coefficients that are part of an autograd graph (a learned schedule, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(COEFFS, dtype=F64))

    def plan(self, binding: gradmod.Binding, step: gradmod.Step) -> gradmod.StepPlan:
        return gradmod.StepPlan(self.w.to(binding.device) * 1.0)


def test_coefficients_in_a_graph_are_taken_by_value() -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    xs, y = batch()
    method = GradCoefficients()
    ctx = gradmod.ModulationContext(model, encoders=encoders_of(model), method=method)
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    # the context keeps no graph of the method's: its coefficient tensor holds the value only
    assert not ctx._wiring.coefficients.requires_grad and method.w.grad is None
    plain = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        m = modality_of(name)
        want = scaled(plain[name].grad, c_of(COEFFS)[m]) if m else plain[name].grad
        assert torch.equal(p.grad, want), name


@pytest.mark.parametrize("mode", ["parameter", "feature"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39, -1e39])
def test_a_non_finite_coefficient_leaves_its_modality_untouched(mode: str, bad: float) -> None:
    """NaN and inf, and coefficients beyond float32's range (inf once in the float32 copy that
    float32 gradients are multiplied by), never reach a gradient."""
    model = make_model()
    twin = copy.deepcopy(model)
    xs, y = batch()
    coeffs = [bad, 2.0, 0.5]
    ctx = fixed_ctx(model, coeffs, mode=mode)
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    assert ctx.coefficients.tolist() == [1.0, 2.0, 0.5]
    plain = dict(twin.named_parameters())
    want = dict(zip(NAMES, [1.0, 2.0, 0.5], strict=True))
    for name, p in model.named_parameters():
        m = modality_of(name)
        if m is None:
            assert torch.equal(p.grad, plain[name].grad), name
        else:
            close64(p.grad, want[m] * plain[name].grad, name)


@pytest.mark.parametrize("big", [1e39, -1e39])
def test_a_float64_model_takes_coefficients_beyond_float32(big: float) -> None:
    """Float64 gradients are scaled by the float64 coefficient: 1e39 is applied exactly (only
    where an encoder tensor is float32 or half is it out of range)."""
    model = make_model(dtype=F64)
    twin = copy.deepcopy(model)
    xs, y = batch(dtype=F64)
    ctx = fixed_ctx(model, [big, 2.0, 0.5])
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    assert ctx.coefficients.tolist() == [big, 2.0, 0.5]
    plain = dict(twin.named_parameters())
    want = dict(zip(NAMES, [big, 2.0, 0.5], strict=True))
    for name, p in model.named_parameters():
        m = modality_of(name)
        expect = plain[name].grad * (want[m] if m else 1.0)
        torch.testing.assert_close(p.grad, expect, rtol=1e-15, atol=0, msg=name)


class SharedStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(3, 3)
        self.enc = nn.ModuleDict({"a": mlp(3), "b": mlp(3)})

    def features(self, x: Tensor) -> dict[str, Tensor]:
        s = torch.tanh(self.stem(x))
        return {n: self.enc[n](s) for n in ("a", "b")}

    def loss(self, feats: Mapping[str, Tensor]) -> Tensor:
        return (feats["a"] * feats["b"]).sum()


class Offsets(nn.Module):
    """Two groups whose parameters autograd hands the very same gradient tensor (``a + b``),
    and a parameter whose gradient arrives as an expanded (stride-0) tensor (``.sum()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(5))
        self.b = nn.Parameter(torch.randn(5))
        self.s = nn.Parameter(torch.randn(5))

    def loss(self, z: Tensor) -> Tensor:
        return ((self.a + self.b) * z).sum() + self.s.sum() * 3.0


def test_a_gradient_tensor_shared_by_two_groups_is_scaled_once_per_group() -> None:
    model = Offsets().to(DEVICE, DTYPE)
    twin = copy.deepcopy(model)
    z = torch.randn(5, dtype=DTYPE, device=DEVICE)
    ctx = gradmod.ModulationContext(
        model,
        encoders={"a": [model.a], "b": [model.b, model.s]},
        method=FixedMethod([[0.3, 1.7]], uses_features=False),
    )
    with ctx(targets=torch.zeros(1)):
        model.loss(z).backward()
    twin.loss(z).backward()
    assert torch.equal(model.a.grad, scaled(twin.a.grad, 0.3))
    assert torch.equal(model.b.grad, scaled(twin.b.grad, 1.7))
    assert torch.equal(model.s.grad, scaled(twin.s.grad, 1.7))


def test_parameter_mode_exact_with_shared_input_layer() -> None:
    """Parameter mode stays exact where feature mode must refuse: a stem feeding two encoders."""
    model = SharedStem().to(DEVICE, DTYPE)
    twin = copy.deepcopy(model)
    x = torch.randn(6, 3, dtype=DTYPE, device=DEVICE)
    ctx = gradmod.ModulationContext(
        model, encoders={"a": "enc.a", "b": "enc.b"}, method=FixedMethod([[0.3, 1.7]])
    )
    feats = model.features(x)
    with ctx(features=feats, targets=torch.zeros(6)):
        model.loss(feats).backward()
    twin.loss(twin.features(x)).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        if name.startswith("stem."):  # outside every group: untouched
            assert torch.equal(p.grad, q.grad), name
        else:
            assert torch.equal(p.grad, scaled(q.grad, 0.3 if ".a." in name else 1.7)), name


# -------------------------------------------------------------------------- feature mode
def test_feature_mode_equals_parameter_mode() -> None:
    model_p = make_model()
    model_f, twin = copy.deepcopy(model_p), copy.deepcopy(model_p)
    xs, y = batch()
    ref = plain_grads(model_p, xs, y)
    step(model_p, fixed_ctx(model_p), xs, y)
    step(model_f, fixed_ctx(model_f, mode="feature"), xs, y)
    plain_step(twin, xs, y)
    c = c_of(COEFFS)
    gp, gt = dict(model_p.named_parameters()), dict(twin.named_parameters())
    for name, p in model_f.named_parameters():
        assert p.grad is not None and p.grad.dtype == DTYPE, name
        m = modality_of(name)
        if m is None:  # the head sees the unscaled upstream gradient in both modes
            assert torch.equal(p.grad, gt[name].grad), name
        else:
            close64(p.grad, gp[name].grad.double(), name, rtol=RTOL, atol=ATOL / 10)
            close64(p.grad, c[m] * ref[name], name)


def _no_grads_anywhere(*modules: nn.Module) -> bool:
    return all(p.grad is None for mod in modules for p in mod.parameters())


def test_feature_mode_refuses_shared_input_layer() -> None:
    model = SharedStem().to(DEVICE, DTYPE)
    method = FixedMethod([[0.5, 2.0]])
    ctx = gradmod.ModulationContext(
        model, encoders={"a": "enc.a", "b": "enc.b"}, method=method, mode="feature"
    )
    feats = model.features(torch.randn(4, 3, dtype=DTYPE, device=DEVICE))
    refused = pytest.raises(gradmod.ConfigurationError)
    with refused as ei, ctx(features=feats, targets=torch.zeros(4)):
        model.loss(feats).backward()  # pragma: no cover - never reached
    assert len(ei.value.problems) == 2  # one per feature
    assert all("outside" in p for p in ei.value.problems), ei.value.problems
    assert method.calls == 0 and _no_grads_anywhere(model)
    assert hook_count(list(model.parameters())) == 0
    assert hook_count(list(feats.values())) == 0


def test_feature_mode_refuses_feature_reaching_another_group() -> None:
    model = make_model()
    method = FixedMethod([COEFFS])
    ctx = gradmod.ModulationContext(
        model, encoders=encoders_of(model), method=method, mode="feature"
    )
    xs, y = batch()
    feats = model.features(xs)
    feats["b"] = feats["b"] + feats["a"].sum(1, keepdim=True)
    with pytest.raises(gradmod.ConfigurationError) as ei, ctx(features=feats, targets=y):
        pass  # pragma: no cover
    assert len(ei.value.problems) == 1
    assert "features['b'] depends on parameters of encoders['a']" in ei.value.problems[0]
    assert method.calls == 0 and _no_grads_anywhere(model)


def test_feature_mode_refuses_group_parameter_that_does_not_feed_its_feature() -> None:
    model = make_model()
    unused = nn.Parameter(torch.ones(2, dtype=DTYPE, device=DEVICE))
    model.enc["a"][0].register_parameter("unused", unused)  # Linear.forward ignores it
    ctx = gradmod.ModulationContext(
        model, encoders=encoders_of(model), method=FixedMethod([COEFFS]), mode="feature"
    )
    xs, y = batch()
    feats = model.features(xs)
    refused = pytest.raises(
        gradmod.ConfigurationError, match=r"1 parameter\(s\) of encoders\['a'\]"
    )
    with refused, ctx(features=feats, targets=y):
        pass  # pragma: no cover


@pytest.mark.parametrize("how", ["detach", "no_grad"])
def test_feature_mode_step_error_for_unattached_feature(how: str) -> None:
    model = make_model()
    method = FixedMethod([COEFFS])
    ctx = gradmod.ModulationContext(
        model, encoders=encoders_of(model), method=method, mode="feature"
    )
    xs, y = batch()
    feats = model.features(xs)
    if how == "detach":
        feats["c"] = feats["c"].detach()
    else:
        with torch.no_grad():
            feats["c"] = model.enc["c"](xs["c"])
    refused = pytest.raises(gradmod.StepError, match=r"features\['c'\] is not attached")
    with refused, ctx(features=feats, targets=y):
        pass  # pragma: no cover
    assert method.calls == 0 and _no_grads_anywhere(model)
    # the context is still usable afterwards
    feats = step(model, ctx, xs, y)
    assert method.calls == 1 and hook_count(list(feats.values())) == 0


# -------------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_gradient_accumulation_each_micro_batch_its_own_coefficients(mode: str) -> None:
    model = make_model()
    twin1, twin2, twin12 = (copy.deepcopy(model) for _ in range(3))
    (x1, y1), (x2, y2) = batch(8, seed=1), batch(5, seed=2)
    g1, g2 = plain_grads(model, x1, y1), plain_grads(model, x2, y2)
    ctx = fixed_ctx(model, COEFFS, COEFFS_2, mode=mode)
    step(model, ctx, x1, y1)
    step(model, ctx, x2, y2)
    plain_step(twin1, x1, y1)
    plain_step(twin2, x2, y2)
    plain_step(twin12, x1, y1)
    plain_step(twin12, x2, y2)
    t1, t2, t12 = (dict(t.named_parameters()) for t in (twin1, twin2, twin12))
    c1, c2 = c_of(COEFFS), c_of(COEFFS_2)
    for name, p in model.named_parameters():
        m = modality_of(name)
        if m is None:
            assert torch.equal(p.grad, t12[name].grad), name
            continue
        close64(p.grad, c1[m] * g1[name] + c2[m] * g2[name], name)
        if mode == "parameter":  # c1*g1 then += c2*g2, exactly as autograd accumulates
            expect = scaled(t1[name].grad, c1[m]) + scaled(t2[name].grad, c2[m])
            assert torch.equal(p.grad, expect), name


# ------------------------------------------------------------------------------ GradScaler
@pytest.mark.parametrize("where", ["before", "inside"])
def test_grad_scaler_unscaled_grads_equal_the_run_without_scaler(where: str) -> None:
    """``scaler.scale(loss)`` before the block, or inside it (``with ctx(...):
    scaler.scale(loss).backward()``, from the very first step: the scale is read when the
    method's gradients are added, inside backward)."""
    model, clfs = make_model(), make_classifiers()
    runs: dict[bool, list[dict[str, Tensor]]] = {}
    for use_scaler in (False, True):
        m, cl = copy.deepcopy(model), copy.deepcopy(clfs)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10) if use_scaler else None
        ctx = cggm_ctx(m, cl, grad_scaler=scaler)
        opt = torch.optim.SGD([*m.parameters(), *ctx.classifier_parameters()], lr=0.5)
        history = []
        for k in range(3):
            xs, y = batch(16, seed=10 + k)
            loss, feats = loss_of(m, xs, y)
            if scaler is not None and where == "inside":
                with ctx(features=feats, targets=y):
                    scaler.scale(loss).backward()
            else:
                to_backward = scaler.scale(loss) if scaler is not None else loss
                with ctx(features=feats, targets=y):
                    to_backward.backward()
            if scaler is not None:
                # before unscaling every gradient carries the loss scale, the method's included
                big = m.head[-1].weight.grad.abs().max() / 2.0**10
                assert big > 1e-4
                scaler.unscale_(opt)
            rec = {f"model.{n}": g for n, g in grads(m).items()}
            rec.update({f"clf.{c}.{n}": g for c in NAMES for n, g in grads(cl[c]).items()})
            rec["coefficients"] = ctx.coefficients
            assert all(v is not None for v in rec.values())
            history.append(rec)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
                assert scaler.get_scale() == 2.0**10  # no inf/NaN step was detected
            else:
                opt.step()
            opt.zero_grad()
        runs[use_scaler] = history
    for k, (plain, amp) in enumerate(zip(runs[False], runs[True], strict=True)):
        assert plain.keys() == amp.keys()
        for key in plain:
            # the loss scale is a power of two: scaling commutes with every rounding, so the
            # unscaled gradients are bit-for-bit those of the run without a scaler
            assert torch.equal(plain[key], amp[key]), (k, key)


def test_grad_scaler_refusal_leaves_no_trace() -> None:
    """A backward with a scaler that never scaled anything is refused (inside backward, when the
    method's gradients would be added); the refused step changes nothing."""
    model, clfs = make_model(), make_classifiers()
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    ctx = cggm_ctx(model, clfs, grad_scaler=scaler)
    xs, y = batch(16)
    loss, feats = loss_of(model, xs, y)
    with pytest.raises(gradmod.StepError, match="no scale yet"), ctx(features=feats, targets=y):
        loss.backward()  # the loss was not scaled
    # found inside backward: the model's own gradients may have landed, the method's did not
    assert _no_grads_anywhere(*clfs.values())
    assert hook_count(list(model.parameters())) == 0
    assert int(ctx.method.steps) == 0, "a refused step advanced CGGM's state"


# ----------------------------------------------------------------------------------- dtype
@pytest.mark.parametrize("mode", ["parameter", "feature"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_grad_dtype_is_kept(dtype: torch.dtype, mode: str) -> None:
    model = make_model(dtype=dtype)
    xs, y = batch(dtype=dtype)
    ref = plain_grads(model, xs, y)  # float64 copy of the same (rounded) weights and inputs
    step(model, fixed_ctx(model, mode=mode), xs, y)
    c = c_of(COEFFS)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype, name
        expect = ref[name] * (c[modality_of(name)] if modality_of(name) else 1.0)  # type: ignore[index]
        if dtype == torch.float64:
            close64(p.grad, expect, name, rtol=1e-12, atol=1e-14)
        else:  # bf16 arithmetic end to end: ~3 significant digits
            scale = float(expect.abs().max()) + 1e-3
            close64(p.grad, expect, name, rtol=3e-2, atol=3e-2 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_zero_dim_parameter_in_a_group(dtype: torch.dtype) -> None:
    """A scalar parameter (a learnable temperature, a layer scale) inside an encoder."""
    model = make_model(dtype=dtype)
    temp = nn.Parameter(torch.tensor(1.5, dtype=dtype, device=DEVICE))
    model.enc["a"].register_parameter("temperature", temp)
    twin = copy.deepcopy(model)
    ctx = fixed_ctx(model)
    xs, y = batch(dtype=dtype)

    def run(mod: MultiModal, ctx: gradmod.ModulationContext | None) -> None:
        feats = mod.features(xs)
        feats["a"] = feats["a"] * mod.enc["a"].temperature
        loss = F.cross_entropy(mod.fuse(feats), y)
        if ctx is None:
            loss.backward()
            return
        with ctx(features=feats, targets=y):
            loss.backward()

    run(model, ctx)
    run(twin, None)
    assert temp.grad is not None and temp.grad.dtype == dtype
    # a 0-d gradient: the float64 product, rounded once to the parameter's dtype
    expect = scaled(twin.enc["a"].temperature.grad, COEFFS[0]).to(dtype)
    assert torch.equal(temp.grad, expect)


class _Scalars(nn.Module):
    """Two scalar parameters, one per modality: ``d(s_a v_a + s_b v_b) / d s_m = v_m`` exactly."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones((), dtype=dtype, device=DEVICE))
        self.b = nn.Parameter(torch.ones((), dtype=dtype, device=DEVICE))


@settings(max_examples=80, deadline=None)
@given(
    v=st.floats(-(2.0**100), 2.0**100, width=32, allow_subnormal=False),
    c=st.floats(1e-3, 8.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    accumulated=st.booleans(),
)
def test_a_scalar_gradient_is_the_float64_product_rounded_once(
    v: float, c: float, dtype: torch.dtype, accumulated: bool
) -> None:
    """``c * g`` of a 0-d gradient, by hand: the float64 product of the float64 coefficient and
    the gradient, rounded once to its dtype (never the product of the coefficient already
    rounded to float32). ``accumulated``: the parameter already holds a (zero) gradient, so
    the new one is scaled by a hook as it arrives; else the engine scales ``.grad`` at the end
    of the backward."""
    model = _Scalars(dtype)
    ctx = gradmod.ModulationContext(
        model,
        encoders={"a": [model.a], "b": [model.b]},
        method=FixedMethod([[c, 1.0]], uses_features=False),
    )
    va = torch.tensor(v, dtype=dtype, device=DEVICE)
    if accumulated:
        model.a.grad = torch.zeros_like(model.a)
    with ctx(targets=torch.zeros(1)):
        (model.a * va + model.b).backward()
    assert model.a.grad is not None
    want = torch.tensor(float(va) * c, dtype=torch.float64).to(dtype)  # Python floats: float64
    assert model.a.grad.dtype == dtype
    assert torch.equal(model.a.grad, want.to(DEVICE)), (float(model.a.grad), float(want))


# ------------------------------------------------------------------------------ hook leaks
def _all_tensors(model: nn.Module, clfs: Mapping[str, nn.Module]) -> list[Tensor]:
    return [*model.parameters(), *(p for c in clfs.values() for p in c.parameters())]


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_hooks_exist_only_inside_the_block(mode: str) -> None:
    model, clfs = make_model(), make_classifiers()
    ctx = cggm_ctx(model, clfs, mode=mode)
    tensors = _all_tensors(model, clfs)
    enc_params = [p for n in NAMES for p in model.enc[n].parameters()]
    xs, y = batch(16)
    loss, feats = loss_of(model, xs, y)
    assert hook_count(tensors) == 0
    with ctx(features=feats, targets=y):
        inside = hook_count(enc_params), hook_count(list(feats.values()))
        fusion_hooks = hook_count([model.head[-1].weight])
        loss.backward()
    # parameter mode: one scaling hook per encoder parameter; feature mode: one hook per feature
    # and, on each encoder's first parameter, gradmod's pass-through marker (its claim)
    assert inside == ((12, 0) if mode == "parameter" else (3, 3))
    assert fusion_hooks == 1  # the direction loss
    assert hook_count(tensors) == 0
    assert hook_count(list(feats.values())) == 0
    assert all(t._backward_hooks is None or len(t._backward_hooks) == 0 for t in tensors)


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["before_backward", "after_backward"])
@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_exception_in_block_propagates_unchanged_and_removes_hooks(mode: str, where: str) -> None:
    model, clfs = make_model(), make_classifiers()
    ctx = cggm_ctx(model, clfs, mode=mode)
    tensors = _all_tensors(model, clfs)
    xs, y = batch(16)
    loss, feats = loss_of(model, xs, y)
    err = Boom("mine")
    with pytest.raises(Boom) as ei, ctx(features=feats, targets=y):
        if where == "after_backward":
            loss.backward()
        raise err
    assert ei.value is err
    assert hook_count(tensors) == 0 and hook_count(list(feats.values())) == 0
    # the method's own gradients land only on a clean exit: none from the failed block
    assert all(p.grad is None for c in clfs.values() for p in c.parameters())
    if where == "before_backward":
        assert all(p.grad is None for p in model.parameters())
    # the context works normally afterwards
    model.zero_grad()
    twin = copy.deepcopy(model)
    step(model, ctx, *batch(16, seed=5))
    plain_step(twin, *batch(16, seed=5))
    k = dict(zip(NAMES, ctx.coefficients.tolist(), strict=True))
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        m = modality_of(name)
        if m is not None:
            close64(p.grad, q.grad.double() * k[m], name)
    assert hook_count(tensors) == 0
    assert all(p.grad is not None for c in clfs.values() for p in c.parameters())


def test_missing_backward_with_direction_loss_is_a_step_error_and_leaves_no_hooks() -> None:
    model, clfs = make_model(), make_classifiers()
    ctx = cggm_ctx(model, clfs)
    xs, y = batch(16)
    _, feats = loss_of(model, xs, y)
    refused = pytest.raises(
        gradmod.StepError, match=r"fusion tensor \(direction loss\) received no gradient"
    )
    with refused, ctx(features=feats, targets=y):
        pass
    assert hook_count(_all_tensors(model, clfs)) == 0


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_thousand_steps_leak_nothing(mode: str) -> None:
    model = make_model()
    ctx = fixed_ctx(model, COEFFS, COEFFS_2, mode=mode)
    params = list(model.parameters())
    xs, y = batch(4)
    refs: list[weakref.ref[Tensor]] = []

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor))

    baseline = 0
    for k in range(1000):
        feats = step(model, ctx, xs, y)
        refs.extend(weakref.ref(f) for f in feats.values())
        assert hook_count(params) == 0
        assert hook_count(list(feats.values())) == 0
        if k == 10:
            del feats
            baseline = live_tensors()
    del feats
    assert live_tensors() <= baseline
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert alive == [], f"{len(alive)} feature tensors of old steps are still referenced"
    # 500 steps of each coefficient vector were applied, nothing more
    assert ctx.method.calls == 1000  # type: ignore[attr-defined]
    total = plain_grads(model, xs, y)
    for name, p in model.named_parameters():
        m = modality_of(name)
        factor = 500 * (c_of(COEFFS)[m] + c_of(COEFFS_2)[m]) if m else 1000.0
        close64(p.grad, factor * total[name], name, rtol=1e-4 if DTYPE != F64 else RTOL)


# ----------------------------------------------------------------------------- re-entrancy
def test_entering_an_active_context_again_raises() -> None:
    model = make_model()
    ctx = fixed_ctx(model)
    xs, y = batch()
    _loss, feats = loss_of(model, xs, y)
    refused = pytest.raises(RuntimeError, match="already active")
    # the same context entered twice: the outer one is active when the inner one enters
    with refused, ctx(features=feats, targets=y), ctx(features=feats, targets=y):
        pass  # pragma: no cover
    assert ctx.method.calls == 1  # type: ignore[attr-defined]
    assert hook_count(list(model.parameters())) == 0
    # usable again: one normal step gives coefficient x plain gradients
    model.zero_grad()
    twin = copy.deepcopy(model)
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        m = modality_of(name)
        assert torch.equal(p.grad, scaled(q.grad, c_of(COEFFS)[m]) if m else q.grad), name


@pytest.mark.parametrize("overlap", ["same", "partial"])
def test_two_contexts_over_the_same_parameters_are_refused(overlap: str) -> None:
    model = make_model()
    twin = copy.deepcopy(model)
    ctx_a = fixed_ctx(model)
    if overlap == "same":
        ctx_b = fixed_ctx(model, COEFFS_2)
    else:  # only encoder 'a' is shared; the other group is the head
        ctx_b = gradmod.ModulationContext(
            model,
            encoders={"a": "enc.a", "h": "head"},
            method=FixedMethod([[2.0, 3.0]], uses_features=False),
        )
    xs, y = batch()
    loss, feats = loss_of(model, xs, y)
    feats_b = feats if overlap == "same" else None
    with ctx_a(features=feats, targets=y):
        for _ in range(2):  # a refused attempt must not clear ctx_a's claim
            refused = pytest.raises(RuntimeError, match="already modulated")
            with refused, ctx_b(features=feats_b, targets=y):
                pass  # pragma: no cover
        loss.backward()
    assert ctx_b.method.calls == 0  # type: ignore[attr-defined]
    plain_step(twin, xs, y)
    tw = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        m = modality_of(name)
        assert torch.equal(p.grad, scaled(tw[name].grad, c_of(COEFFS)[m]) if m else tw[name].grad)
    # after ctx_a exited, ctx_b works
    model.zero_grad()
    loss, feats = loss_of(model, xs, y)
    with ctx_b(features=feats if overlap == "same" else None, targets=y):
        loss.backward()
    assert ctx_b.method.calls == 1  # type: ignore[attr-defined]
    cb = c_of(COEFFS_2) if overlap == "same" else {"a": 2.0, "b": 1.0, "c": 1.0}
    for name, p in model.named_parameters():
        m = modality_of(name)
        factor = cb[m] if m else (1.0 if overlap == "same" else 3.0)
        assert torch.equal(p.grad, scaled(tw[name].grad, factor)), name


# ------------------------------------------------------------------------ CGGM state dict
def _cggm_setup(
    model: MultiModal, clfs: Mapping[str, nn.Module], official: bool
) -> tuple[gradmod.ModulationContext, torch.optim.Optimizer]:
    ctx = cggm_ctx(model, clfs, official=official)
    opt = torch.optim.SGD([*model.parameters(), *ctx.classifier_parameters()], lr=0.5)
    return ctx, opt


def _train(model, clfs, ctx, opt, seeds):  # type: ignore[no-untyped-def]
    for s in seeds:
        step(model, ctx, *batch(16, seed=s))
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("via", ["memory", "bytesio"])
@pytest.mark.parametrize("official", [False, True], ids=["safe", "official"])
def test_state_dict_round_trip(official: bool, via: str) -> None:
    model_a, clfs_a = make_model(), make_classifiers()
    ctx_a, opt_a = _cggm_setup(model_a, clfs_a, official)
    _train(model_a, clfs_a, ctx_a, opt_a, seeds=(30, 31, 32))
    ckpt = {
        "ctx": ctx_a.state_dict(),
        "model": model_a.state_dict(),
        "clfs": {n: c.state_dict() for n, c in clfs_a.items()},
    }
    if via == "bytesio":
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)

    torch.manual_seed(123)  # fresh modules start from different weights
    model_b, clfs_b = make_model(), make_classifiers()
    model_b.load_state_dict(ckpt["model"])
    for n, c in clfs_b.items():
        c.load_state_dict(ckpt["clfs"][n])
    ctx_b, _ = _cggm_setup(model_b, clfs_b, official)
    ctx_b.load_state_dict(ckpt["ctx"])
    # control: the same modules without the method state decide differently
    model_c, clfs_c = copy.deepcopy(model_b), copy.deepcopy(clfs_b)
    ctx_c, _ = _cggm_setup(model_c, clfs_c, official)

    xs, y = batch(16, seed=33)
    step(model_a, ctx_a, xs, y)  # A first: B must not share A's state tensors
    step(model_b, ctx_b, xs, y)
    step(model_c, ctx_c, xs, y)
    assert torch.equal(ctx_a.coefficients, ctx_b.coefficients)
    assert not torch.equal(ctx_a.coefficients, ctx_c.coefficients)
    for mod_a, mod_b in [(model_a, model_b), *((clfs_a[n], clfs_b[n]) for n in NAMES)]:
        for (name, p), q in zip(mod_a.named_parameters(), mod_b.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), name
    sa, sb = ctx_a.state_dict(), ctx_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- CGGM classifiers, direction
def cggm_reference(
    model: MultiModal,
    clfs: Mapping[str, nn.Module],
    xs: Mapping[str, Tensor],
    y: Tensor,
    prev: Sequence[float],
    *,
    rho: float = 1.3,
    lam: float = 0.2,
) -> tuple[list[float], list[float], dict[str, dict[str, Tensor]], Tensor]:
    """Safe-policy CGGM step written out in float64: accuracies, rho*B, classifier grads, dL_gm/du."""
    m64 = copy_as(model)
    c64 = {n: copy_as(c) for n, c in clfs.items()}
    feats = m64.features(cast({k: v.cpu() for k, v in xs.items()}, F64))  # type: ignore[operator]
    yc = y.cpu()
    total = torch.zeros((), dtype=F64)
    acc = []
    for n in NAMES:
        out = c64[n](feats[n].detach())
        total = total + F.cross_entropy(out, yc)
        acc.append(
            sum(int(o == t) for o, t in zip(out.argmax(1).tolist(), yc.tolist(), strict=True))
            / len(yc)
        )
    total.backward()
    clf_grads = {n: {k: p.grad.clone() for k, p in c64[n].named_parameters()} for n in NAMES}
    pos = [max(a - p, 0.0) for a, p in zip(acc, prev, strict=True)]
    s = sum(pos)
    b = [(s - d) / s for d in pos] if s > 1e-6 else [(len(pos) - 1) / len(pos)] * len(pos)
    u = m64.head[-1].weight.detach().clone().requires_grad_(True)
    terms = []
    for bm, n in zip(b, NAMES, strict=True):
        v = c64[n][-1].weight.detach()
        cos = (u * v).sum() / (u.norm() * v.norm())
        terms.append(abs(bm) - bm * cos)
    (g_u,) = torch.autograd.grad(lam * torch.stack(terms).mean(), u)
    return acc, [rho * x for x in b], clf_grads, g_u


def test_cggm_classifiers_learn_from_detached_features_only() -> None:
    model, clfs = make_model(), make_classifiers()
    twin = copy.deepcopy(model)
    xs, y = batch(16, seed=3)
    _acc, coeffs, clf_ref, g_u = cggm_reference(model, clfs, xs, y, prev=[0.0] * 3)
    ctx = cggm_ctx(model, clfs, rho=1.3, lam=0.2)
    step(model, ctx, xs, y)
    plain_step(twin, xs, y)
    plain64 = plain_grads(twin, xs, y)
    close64(
        ctx.coefficients, torch.tensor(coeffs, dtype=F64), "coefficients", rtol=1e-12, atol=1e-12
    )
    assert max(coeffs) - min(coeffs) > 0.05, "degenerate data: coefficients all equal"
    assert g_u.abs().max() > 1e-3, "degenerate data: no direction-loss gradient"
    k = c_of(ctx.coefficients.tolist())
    tw = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        m = modality_of(name)
        if m is not None:  # exactly coefficient x plain: no classifier gradient reached it
            assert torch.equal(p.grad, scaled(tw[name].grad, k[m])), name
        elif name == "head.2.weight":  # plain + lambda * dL_gm/du
            close64(p.grad, plain64[name] + g_u, name)
            close64(p.grad - tw[name].grad, g_u, name, rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(p.grad, tw[name].grad), name
    for n in NAMES:
        for name, p in clfs[n].named_parameters():
            close64(p.grad, clf_ref[n][name], f"classifiers[{n}].{name}")
    # classifier gradients accumulate across steps like any gradient (no zero_grad in between)
    step(model, ctx, xs, y)
    for n in NAMES:
        for name, p in clfs[n].named_parameters():
            close64(p.grad, 2 * clf_ref[n][name], f"classifiers[{n}].{name} (2 steps)")
    close64(
        ctx.coefficients, torch.full((3,), 1.3 * 2 / 3, dtype=F64), "no improvement", rtol=1e-12
    )


# ------------------------------------------------------------------------- never NaN / inf
PREDICTS = {"a": 0, "b": 0, "c": 2}  # class 1 is predicted by no classifier


def constant_classifiers(dtype: torch.dtype = DTYPE) -> dict[str, nn.Module]:
    """Each classifier predicts one fixed class whatever its input (tiny weights, large bias)."""
    out = make_classifiers(dtype)
    with torch.no_grad():
        for n, c in out.items():
            c[-1].weight.mul_(1e-3)
            c[-1].bias.copy_(10.0 * F.one_hot(torch.tensor(PREDICTS[n]), CLASSES))
    return out


def targets(n0: int, n2: int, size: int = 8) -> Tensor:
    """``n0`` samples of class 0, ``n2`` of class 2, the rest class 1."""
    return torch.tensor([0] * n0 + [2] * n2 + [1] * (size - n0 - n2), device=DEVICE)


# (n0, n2) per step -> accuracies (n0/8, n0/8, n2/8)
SCHEDULE = [
    ((4, 2), "all improve from 0"),
    ((4, 2), "no change: sum of deltas 0"),
    ((2, 4), "mixed signs, sum < 0"),
    ((2, 2), "no improvement, one degrades"),
    ((3, 0), "mixed signs, sum of deltas exactly 0"),
    ((0, 0), "all degrade"),
]


def test_safe_cggm_coefficients_stay_finite_and_bounded() -> None:
    model, clfs = make_model(), constant_classifiers()
    ctx = cggm_ctx(model, clfs, rho=1.3)
    prev = [0.0, 0.0, 0.0]
    for (n0, n2), what in SCHEDULE:
        twin = copy.deepcopy(model)
        xs, _ = batch(8)
        y = targets(n0, n2)
        step(model, ctx, xs, y)
        plain_step(twin, xs, y)
        acc = [n0 / 8, n0 / 8, n2 / 8]
        pos = [max(a - p, 0.0) for a, p in zip(acc, prev, strict=True)]
        s = sum(pos)
        b = [(s - d) / s for d in pos] if s > 1e-6 else [2 / 3] * 3
        k = ctx.coefficients
        assert torch.isfinite(k).all() and (k >= 0).all() and (k <= 1.3).all(), what
        close64(k, 1.3 * torch.tensor(b, dtype=F64), what, rtol=1e-12, atol=1e-12)
        close64(k.sum(), torch.tensor(1.3 * 2, dtype=F64), what, rtol=1e-12, atol=1e-12)
        tw = dict(twin.named_parameters())
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), (what, name)
            m = modality_of(name)
            if m is not None:
                assert torch.equal(p.grad, scaled(tw[name].grad, float(k[NAMES.index(m)])))
        for c in clfs.values():
            assert all(torch.isfinite(p.grad).all() for p in c.parameters())
        model.zero_grad()
        for c in clfs.values():
            c.zero_grad()
        prev = acc


def test_official_cggm_explodes_when_deltas_cancel() -> None:
    """Documents official=True (zrguo/CGGM msatrain.py: diff_sum = sum(diff) + 1e-8,
    coeff = (diff_sum - d) / diff_sum): deltas that cancel give |B| ~ 1e7 with mixed signs; no
    change at all gives B = 1, factor rho, for every modality. gradmod applies them as given."""
    model, clfs = make_model(), constant_classifiers()
    ctx = cggm_ctx(model, clfs, rho=1.3, official=True)
    seen = {}
    for (n0, n2), what in [SCHEDULE[i] for i in (0, 1, 3, 4)]:
        twin = copy.deepcopy(model)
        xs, _ = batch(8)
        y = targets(n0, n2)
        step(model, ctx, xs, y)
        plain_step(twin, xs, y)
        k = ctx.coefficients
        seen[what] = k
        assert torch.isfinite(k).all()
        tw = dict(twin.named_parameters())
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), (what, name)
            m = modality_of(name)
            if m is not None:
                expect = scaled(tw[name].grad, float(k[NAMES.index(m)]))
                assert torch.equal(p.grad, expect), (what, name)
        model.zero_grad()
        for c in clfs.values():
            c.zero_grad()
    # no change: (1e-8 - 0) / 1e-8 = 1 for every modality
    assert torch.equal(seen[SCHEDULE[1][1]], torch.full((3,), 1.3, dtype=F64))
    # delta = (+1/8, +1/8, -1/4), sum 0: B = (1e-8 - delta) / 1e-8 = 1 - delta * 1e8
    k = seen[SCHEDULE[4][1]]
    expect = 1.3 * (1 - torch.tensor([0.125e8, 0.125e8, -0.25e8], dtype=F64))
    close64(k, expect, "official explosion", rtol=1e-9, atol=0)
    assert float(k.abs().min()) > 1e7 and math.isfinite(float(k.abs().max()))


# ------------------------------------------------- encoders whose first parameter gets no gradient
class _UnusedFirst(nn.Module):
    """Encoder whose first-registered layer (``aux``, a mask token or an optional projection in
    real models) is unused in this step: its parameters receive no gradient."""

    def __init__(self, n_in: int) -> None:
        super().__init__()
        self.aux = nn.Linear(n_in, 4)
        self.lin = nn.Linear(n_in, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(x))


class _TwoUnusedFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"a": _UnusedFirst(3), "b": _UnusedFirst(5)})
        self.head = nn.Linear(8, CLASSES)

    def loss(self, xs: Mapping[str, Tensor], y: Tensor) -> Tensor:
        feats = [self.enc[n](xs[n]) for n in ("a", "b")]
        return F.cross_entropy(self.head(torch.cat(feats, 1)), y)


_K = (0.25, 4.0)


def _unused_first_setup(
    monitor: bool = False,
) -> tuple[_TwoUnusedFirst, gradmod.ModulationContext, dict[str, Tensor], Tensor]:
    torch.manual_seed(0)
    model = _TwoUnusedFirst().to(DEVICE, F64)
    ctx = gradmod.ModulationContext(
        model,
        encoders={"a": "enc.a", "b": "enc.b"},
        method=FixedMethod([_K], uses_features=False),
        monitor=gradmod.Monitor() if monitor else None,
    )
    g = torch.Generator().manual_seed(1)
    xs = {n: torch.randn(8, d, generator=g, dtype=F64).to(DEVICE) for n, d in (("a", 3), ("b", 5))}
    y = torch.randint(0, CLASSES, (8,), generator=g).to(DEVICE)
    return model, ctx, xs, y


def _expected(model: _TwoUnusedFirst, xs: Mapping[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    """A plain backward on a copy, encoder ``m``'s gradients times ``k_m`` (float64)."""
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    twin.loss(xs, y).backward()
    out = {}
    for name, p in twin.named_parameters():
        if p.grad is not None:
            k = _K[0] if name.startswith("enc.a.") else _K[1] if name.startswith("enc.b.") else 1
            out[name] = p.grad * k
    return out


def test_gradients_are_modulated_when_backward_returns_even_if_first_parameters_get_none() -> None:
    """What the block does after its backward (clipping, an optimizer step) sees the modulated
    gradients, also when no encoder's first-registered parameter receives a gradient."""
    model, ctx, xs, y = _unused_first_setup()
    want = _expected(model, xs, y)
    with ctx(targets=y):
        model.loss(xs, y).backward()
        inside = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert inside.keys() == want.keys()
    for name, g in inside.items():
        torch.testing.assert_close(g, want[name], rtol=1e-12, atol=1e-15, msg=name)
    assert model.enc["a"].aux.weight.grad is None


@pytest.mark.parametrize("path", ["grads-exist", "accumulation", "monitor"])
def test_a_block_whose_first_encoder_parameters_get_no_gradient_is_accepted(path: str) -> None:
    """The per-tensor hook paths (gradients already there, a later micro-batch, a Monitor):
    the block is not refused as 'no modulated gradient', and the gradients are k times the
    plain ones."""
    model, ctx, xs, y = _unused_first_setup(monitor=path == "monitor")
    want = _expected(model, xs, y)
    if path == "grads-exist":  # zero_grad(set_to_none=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
    if path == "accumulation":  # a first micro-batch of a window, then this one
        with ctx(targets=y, boundary=False, weight=0.5):
            model.loss(xs, y).backward()
        first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with ctx(targets=y):
        model.loss(xs, y).backward()
    assert ctx.method.calls == (2 if path == "accumulation" else 1)  # type: ignore[attr-defined]
    for name, p in model.named_parameters():
        if name not in want:
            assert p.grad is None or not p.grad.any(), name
            continue
        expect = want[name] * (2 if path == "accumulation" else 1)
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expect, rtol=1e-12, atol=1e-15, msg=name)
    if path == "accumulation":
        assert first  # the first micro-batch landed too
