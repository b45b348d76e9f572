"""The engine on ``torch.compile``d models: exact gradients and no recompilation per coefficient.

Parameter hooks sit on the leaves, outside the compiled graph, and the coefficients live in one
tensor updated in place, so new coefficients must never trigger a new compilation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from _models import (
    F64,
    NAMES,
    FixedMethod,
    MultiModal,
    batch,
    hook_count,
    make_classifiers,
    make_model,
    modality_of,
    plain_grads,
)
from settings import ATOL, RTOL
from torch._dynamo.testing import CompileCounterWithBackend

import gradmod

pytestmark = pytest.mark.slow

SCHEDULE = [(0.3, 1.7, -0.55), (1.25, 0.0, 0.6), (2.0, 0.5, 1.1)]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def check_step(
    model: MultiModal, eager: MultiModal, coeffs: Sequence[float], xs: dict, y: torch.Tensor
) -> None:
    """``model``'s grads == coefficient x ``eager``'s grads (and x the float64 reference)."""
    ref = plain_grads(eager, xs, y)
    logits, _ = eager(xs)
    F.cross_entropy(logits, y).backward()
    c = dict(zip(NAMES, coeffs, strict=True))
    # by position: a compiled submodule renames its parameters ('enc.a._orig_mod.0.weight')
    pairs = zip(model.named_parameters(), eager.named_parameters(), strict=True)
    for (name, p), (eager_name, q) in pairs:
        m = modality_of(name)
        k = c[m] if m is not None else 1.0
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad * k, rtol=RTOL, atol=ATOL, msg=name)
        torch.testing.assert_close(
            p.grad.to("cpu", F64), ref[eager_name] * k, rtol=RTOL, atol=ATOL, msg=name
        )
    model.zero_grad()
    eager.zero_grad()


def run_parameter_mode(backend: object) -> None:
    model = make_model()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)  # type: ignore[arg-type]
    ctx = gradmod.ModulationContext(
        compiled, encoders={n: f"enc.{n}" for n in NAMES}, method=FixedMethod(SCHEDULE)
    )
    for k, coeffs in enumerate(SCHEDULE * 2):
        xs, y = batch(8, seed=k)
        logits, feats = compiled(xs)
        with ctx(features=feats, targets=y):
            F.cross_entropy(logits, y).backward()
        assert hook_count(list(model.parameters())) == 0
        check_step(model, eager, coeffs, xs, y)


def test_compiled_parameter_mode_exact_and_never_recompiles() -> None:
    counter = CompileCounterWithBackend("aot_eager")
    run_parameter_mode(counter)
    assert counter.frame_count == 1  # six steps, six coefficient vectors, one compilation
    assert counter.op_count > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_parameter_mode_with_inductor() -> None:
    """The default backend (~20 s cold on 2 CPU cores, less with inductor's on-disk cache)."""
    torch._dynamo.utils.counters.clear()
    run_parameter_mode("inductor")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compiled_cggm_matches_eager_cggm_without_recompiling() -> None:
    """CGGM's coefficients change every step; compiled and eager runs decide the same ones."""
    model, clfs = make_model(), make_classifiers()
    runs = {}
    counter = CompileCounterWithBackend("aot_eager")
    for compile_it in (False, True):
        m, cl = copy.deepcopy(model), copy.deepcopy(clfs)
        net = torch.compile(m, backend=counter) if compile_it else m
        ctx = gradmod.ModulationContext(
            net, cl, encoders={n: f"enc.{n}" for n in NAMES}, method=gradmod.CGGM(), fusion="head"
        )
        opt = torch.optim.SGD([*m.parameters(), *ctx.classifier_parameters()], lr=0.5)
        history = []
        for k in range(4):
            xs, y = batch(16, seed=40 + k)
            logits, feats = net(xs)
            with ctx(features=feats, targets=y):
                F.cross_entropy(logits, y).backward()
            history.append((ctx.coefficients, {n: p.grad.clone() for n, p in m.named_parameters()}))
            opt.step()
            opt.zero_grad()
        runs[compile_it] = history
    assert counter.frame_count == 1
    distinct = {tuple(c.tolist()) for c, _ in runs[True]}
    assert len(distinct) >= 3, "degenerate data: the coefficients did not change"
    for (c_e, g_e), (c_c, g_c) in zip(runs[False], runs[True], strict=True):
        assert torch.equal(c_e, c_c)
        for name in g_e:
            torch.testing.assert_close(g_c[name], g_e[name], rtol=RTOL, atol=ATOL, msg=name)


def test_feature_mode_with_separately_compiled_encoders() -> None:
    """Feature mode needs each feature's graph to stop at its own encoder: compile per encoder."""
    model = make_model()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    for n in NAMES:
        model.enc[n] = torch.compile(model.enc[n], backend=counter)
    ctx = gradmod.ModulationContext(
        model,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=FixedMethod(SCHEDULE),
        mode="feature",
    )
    for k, coeffs in enumerate(SCHEDULE):
        xs, y = batch(8, seed=k)
        logits, feats = model(xs)
        with ctx(features=feats, targets=y):
            F.cross_entropy(logits, y).backward()
        check_step(model, eager, coeffs, xs, y)
    # one graph per encoder (the three have different input widths), none per coefficient
    assert counter.frame_count == 3


@pytest.mark.parametrize("kind", ["mlb", "ogm-ge"])
def test_compiled_methods_match_eager_without_recompiling(kind: str) -> None:
    """MLB injects gradients into the compiled graph's outputs; OGM-GE transforms parameter
    gradients with noise: compiled and eager runs agree, and nothing recompiles."""
    model = make_model()
    heads = {n: torch.nn.Linear(4, 3).to(model.head[0].weight) for n in NAMES}
    counter = CompileCounterWithBackend("aot_eager")
    runs = {}
    for compile_it in (False, True):
        m, hs = copy.deepcopy(model), copy.deepcopy(heads)
        net = m
        if compile_it and kind == "mlb":  # the features must be outputs used outside a graph
            for n in NAMES:
                m.enc[n] = torch.compile(m.enc[n], backend=counter)  # type: ignore[assignment]
        elif compile_it:
            net = torch.compile(m, backend=counter)  # type: ignore[assignment]
        method = gradmod.MLB(alpha=0.8) if kind == "mlb" else gradmod.OGMGE(alpha=0.5, seed=2)
        ctx = gradmod.ModulationContext(
            net, hs, encoders={n: f"enc.{n}" for n in NAMES}, method=method
        )
        params = [*m.parameters(), *(p for h in hs.values() for p in h.parameters())]
        opt = torch.optim.SGD(params, lr=0.5)
        history = []
        for k in range(3):
            xs, y = batch(16, seed=60 + k)
            logits, feats = net(xs)
            with ctx(features=feats, targets=y):
                F.cross_entropy(logits, y).backward()
            history.append((ctx.coefficients, {n: p.grad.clone() for n, p in m.named_parameters()}))
            opt.step()
            opt.zero_grad()
        runs[compile_it] = history
    # one graph per compiled module (three encoder input widths for MLB)
    assert counter.frame_count == (3 if kind == "mlb" else 1)
    for (c_e, g_e), (c_c, g_c) in zip(runs[False], runs[True], strict=True):
        torch.testing.assert_close(c_c, c_e, rtol=RTOL, atol=ATOL)
        for (name, g), g2 in zip(g_e.items(), g_c.values(), strict=True):  # compiled names differ
            torch.testing.assert_close(g2, g, rtol=RTOL, atol=ATOL, msg=name)
    assert len({tuple(c.tolist()) for c, _ in runs[True]}) == 3


def test_injection_into_features_used_only_inside_a_compiled_graph_is_reported() -> None:
    model = make_model()
    heads = {n: torch.nn.Linear(4, 3).to(model.head[0].weight) for n in NAMES}
    net = torch.compile(model, backend="aot_eager")
    ctx = gradmod.ModulationContext(
        net, heads, encoders={n: f"enc.{n}" for n in NAMES}, method=gradmod.MultiLoss()
    )
    xs, y = batch(8)
    logits, feats = net(xs)
    lost = pytest.raises(gradmod.StepError, match="compile the encoders")
    with lost, ctx(features=feats, targets=y):
        F.cross_entropy(logits, y).backward()
    assert hook_count([*model.parameters(), *heads["a"].parameters()]) == 0
