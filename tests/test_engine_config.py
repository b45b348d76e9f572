"""Configuration checks of ModulationContext: every problem reported at once, before any gradient.

Group contents are checked by identity (``is``) against the modules the test built, never by name.
"""

from __future__ import annotations

import pytest
import torch
from _models import (
    CLASSES,
    HID,
    NAMES,
    FixedMethod,
    batch,
    classifier,
    hook_count,
    make_model,
)
from settings import DEVICE, DTYPE
from torch import nn

import gradmod


def ids(params: list[nn.Parameter]) -> list[int]:
    return [id(p) for p in params]


def no_grads(*modules: nn.Module) -> bool:
    return all(p.grad is None for m in modules for p in m.parameters())


class Zoo(nn.Module):
    """Encoders of every kind of trouble: a parameterless module, a frozen one, a shared one."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4)})
        self.empty = nn.ReLU()
        self.frozen = nn.Linear(3, 4)
        self.frozen.weight.requires_grad_(False)
        self.head = nn.Linear(8, 2)


def test_every_problem_is_reported_together() -> None:
    model = Zoo().to(DEVICE, DTYPE)
    stranger = nn.Parameter(torch.zeros(2, device=DEVICE, dtype=DTYPE))
    encoders = {
        "typo": "enc.c",  # matches nothing
        "relu": "empty",  # a module without parameters
        "a": "enc.a",
        "a_again": [model.enc["a"].weight],  # overlaps with "a"
        "frozen": "frozen",  # one frozen parameter
        "outside": [stranger],  # not a parameter of the model
    }
    classifiers = {n: nn.Linear(4, 2) for n in ("typo", "relu", "a", "a_again", "frozen", "extra")}
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(
            model, classifiers, encoders=encoders, method=FixedMethod([[1.0] * 6])
        )
    problems = ei.value.problems
    expected = [
        "encoders['typo'] = 'enc.c' matches no submodule",
        "encoders['relu'] has no parameters",
        "encoders['a'] and encoders['a_again'] share a parameter",
        "encoders['frozen'] has 1 frozen parameter",
        "encoders['outside'] has 1 parameter(s) that are not parameters of the model",
        "classifier keys",
        "FixedMethod uses no unimodal classifiers, but classifiers were given",
    ]
    assert len(problems) == len(expected), problems
    for e in expected:
        assert sum(e in p for p in problems) == 1, (e, problems)
    key_problem = next(p for p in problems if "classifier keys" in p)
    assert "missing: ['outside']" in key_problem and "unknown: ['extra']" in key_problem
    # the message lists them all too
    assert all(p in str(ei.value) for p in problems)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, gradmod.GradmodError)
    assert no_grads(model, *classifiers.values())


def test_more_problem_kinds_are_collected() -> None:
    model = Zoo().to(DEVICE, DTYPE)
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(
            model,
            {"a": nn.Linear(4, 2), "b": "not a module"},  # type: ignore[dict-item]
            encoders={"a": model.enc["a"].weight, "b": 3},  # type: ignore[dict-item]
            method=gradmod.CGGM(),
            fusion="head.nope",
            mode="everything",  # type: ignore[arg-type]
        )
    problems = ei.value.problems
    for e in (
        "mode must be 'parameter' or 'feature'",
        "encoders['a'] is a single tensor",
        "encoders['b'] has type int",
        "classifiers ['b'] are not nn.Module instances",
        "fusion = 'head.nope' matches no submodule",
    ):
        assert sum(e in p for p in problems) == 1, (e, problems)
    assert len(problems) == 5, problems


def test_fewer_than_two_modalities() -> None:
    model = make_model()
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(model, encoders={"a": "enc.a"}, method=FixedMethod([[1.0]]))
    assert len(ei.value.problems) == 1 and "at least 2 modalities" in ei.value.problems[0]
    with pytest.raises(gradmod.ConfigurationError, match="at least 2 modalities"):
        gradmod.ModulationContext(model, {"a": classifier()}, encoders={"a": "enc.a"})


def test_default_encoders_are_the_classifier_keys_and_none_given_is_refused() -> None:
    model = make_model()
    clfs = {f"enc.{n}": classifier().to(DEVICE, DTYPE) for n in NAMES}
    ctx = gradmod.ModulationContext(model, clfs)
    groups = ctx.parameters()
    assert list(groups) == [f"enc.{n}" for n in NAMES]
    for n in NAMES:
        assert ids(groups[f"enc.{n}"]) == ids(list(model.enc[n].parameters()))
    with pytest.raises(gradmod.ConfigurationError, match="pass encoders="):
        gradmod.ModulationContext(model, method=FixedMethod([[1.0] * 3]))


def test_frozen_parameters_are_refused_or_skipped_with_allow_frozen() -> None:
    model = make_model()
    frozen = model.enc["b"][0].weight
    frozen.requires_grad_(False)
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(
            model, encoders={n: f"enc.{n}" for n in NAMES}, method=FixedMethod([[1.0] * 3])
        )
    assert len(ei.value.problems) == 1
    assert "encoders['b'] has 1 frozen parameter" in ei.value.problems[0]
    ctx = gradmod.ModulationContext(
        model,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=FixedMethod([[1.0] * 3]),
        allow_frozen=True,
    )
    expected_b = [p for p in model.enc["b"].parameters() if p is not frozen]
    assert ids(ctx.parameters()["b"]) == ids(expected_b) and len(expected_b) == 3
    assert ids(ctx.parameters()["a"]) == ids(list(model.enc["a"].parameters()))


def test_classifier_inside_an_encoder_group_is_refused() -> None:
    model = make_model()
    clfs = {n: classifier().to(DEVICE, DTYPE) for n in NAMES}
    with pytest.raises(gradmod.ConfigurationError, match=r"classifiers\['a'\] is part of"):
        gradmod.ModulationContext(
            model,
            clfs,
            encoders={
                "a": [*model.enc["a"].parameters(), *clfs["a"].parameters()],
                "b": "enc.b",
                "c": "enc.c",
            },
        )


# ----------------------------------------------------------------------------- CGGM shapes
def test_cggm_fusion_and_classifier_last_weights_must_match() -> None:
    model = make_model()
    clfs = {
        "a": classifier(),  # [CLASSES, HID], matches the head's last Linear
        "b": nn.Sequential(nn.Linear(4, HID + 1), nn.Tanh(), nn.Linear(HID + 1, CLASSES)),
        "c": nn.Linear(4, CLASSES),
    }
    clfs = {k: v.to(DEVICE, DTYPE) for k, v in clfs.items()}
    enc = {n: f"enc.{n}" for n in NAMES}
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(model, clfs, encoders=enc, method=gradmod.CGGM(), fusion="head")
    problems = ei.value.problems
    assert len(problems) == 2, problems
    assert f"({CLASSES}, {HID + 1})" in problems[0] and "classifiers['b']" in problems[0]
    assert f"({CLASSES}, 4)" in problems[1] and "classifiers['c']" in problems[1]
    # without the direction loss the same classifiers are fine
    gradmod.ModulationContext(model, clfs, encoders=enc, method=gradmod.CGGM(lam=0), fusion=None)
    gradmod.ModulationContext(model, clfs, encoders=enc, method=gradmod.CGGM(lam=0), fusion="head")
    assert no_grads(model, *clfs.values())


def test_cggm_needs_classifiers() -> None:
    model = make_model()
    with pytest.raises(gradmod.ConfigurationError, match="needs one unimodal classifier"):
        gradmod.ModulationContext(
            model, encoders={n: f"enc.{n}" for n in NAMES}, method=gradmod.CGGM()
        )


# ------------------------------------------------------------------------- exact paths only
class Eleven(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict({str(i): nn.Linear(2, 2) for i in range(11)})

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"m{i}": self.enc[str(i)](x) for i in range(11)}


def test_dotted_paths_are_exact_never_substrings() -> None:
    model = Eleven().to(DEVICE, DTYPE)
    enc = {f"m{i}": f"enc.{i}" for i in range(11)}
    ctx = gradmod.ModulationContext(model, encoders=enc, method=FixedMethod([[1.0] * 11]))
    groups = ctx.parameters()
    for i in range(11):
        assert ids(groups[f"m{i}"]) == ids(list(model.enc[str(i)].parameters())), i
    assert len(groups["m1"]) == 2  # 'enc.1' did not also take enc.10's weight and bias
    # a single parameter by exact path; prefixes of names are not paths
    ctx = gradmod.ModulationContext(
        model,
        encoders={"w1": "enc.1.weight", "w10": "enc.10.weight"},
        method=FixedMethod([[1.0, 1.0]]),
    )
    assert ctx.parameters()["w1"][0] is model.enc["1"].weight
    assert ctx.parameters()["w10"][0] is model.enc["10"].weight
    with pytest.raises(gradmod.ConfigurationError) as ei:
        gradmod.ModulationContext(
            model, encoders={"x": "enc.1.we", "y": "en"}, method=FixedMethod([[1.0, 1.0]])
        )
    assert len(ei.value.problems) == 2


def test_eleven_modalities_each_get_their_own_factor() -> None:
    model = Eleven().to(DEVICE, DTYPE)
    twin = Eleven().to(DEVICE, DTYPE)
    twin.load_state_dict(model.state_dict())
    coeffs = [0.1 * (i + 1) for i in range(11)]
    ctx = gradmod.ModulationContext(
        model, encoders={f"m{i}": f"enc.{i}" for i in range(11)}, method=FixedMethod([coeffs])
    )
    x = torch.randn(3, 2, dtype=DTYPE, device=DEVICE)
    feats = model.features(x)
    with ctx(features=feats, targets=torch.zeros(3)):
        sum((f * (i + 1)).sum() for i, f in enumerate(feats.values())).backward()
    sum((f * (i + 1)).sum() for i, f in enumerate(twin.features(x).values())).backward()
    for i in range(11):
        for p, q in zip(model.enc[str(i)].parameters(), twin.enc[str(i)].parameters(), strict=True):
            assert torch.equal(p.grad, q.grad * torch.tensor(coeffs[i], dtype=torch.float64)), i


# --------------------------------------------------------------------------------- wrappers
def test_paths_resolve_through_a_compile_wrapper() -> None:
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    assert isinstance(compiled, nn.Module) and compiled is not model
    clfs = {n: classifier().to(DEVICE, DTYPE) for n in NAMES}
    ctx = gradmod.ModulationContext(
        compiled,
        clfs,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=gradmod.CGGM(),
        fusion="head",
    )
    for n in NAMES:
        assert ids(ctx.parameters()[n]) == ids(list(model.enc[n].parameters()))
    # fusion="head" found the inner head's last weight: its direction-loss hook sits there
    xs, y = batch(8)
    logits, feats = compiled(xs)
    with ctx(features=feats, targets=y):
        assert hook_count([model.head[-1].weight]) == 1
        nn.functional.cross_entropy(logits, y).backward()
    assert hook_count(list(model.parameters())) == 0
    # a parameter of the inner model counts as a parameter of the wrapped one
    gradmod.ModulationContext(
        compiled,
        encoders={"a": [model.enc["a"][0].weight], "b": model.enc["b"]},
        method=FixedMethod([[1.0, 1.0]]),
    )


def test_encoders_given_as_modules_or_parameter_lists() -> None:
    model = make_model()
    ps = list(model.enc["c"].parameters())
    ctx = gradmod.ModulationContext(
        model,
        encoders={"a": model.enc["a"], "b": (p for p in model.enc["b"].parameters()), "c": ps + ps},
        method=FixedMethod([[1.0] * 3]),
    )
    assert ids(ctx.parameters()["a"]) == ids(list(model.enc["a"].parameters()))
    assert ids(ctx.parameters()["b"]) == ids(list(model.enc["b"].parameters()))
    assert ids(ctx.parameters()["c"]) == ids(ps)  # deduplicated, order kept
    assert ctx.names == ("a", "b", "c")


# ------------------------------------------------------------------- nothing touched on error
def test_feature_mode_precondition_error_is_raised_before_any_gradient() -> None:
    model = make_model()
    shared = nn.Linear(4, 4).to(DEVICE, DTYPE)  # trainable, inside the model, outside the groups
    model.add_module("shared", shared)
    clfs = {n: classifier().to(DEVICE, DTYPE) for n in NAMES}
    method = gradmod.CGGM()
    ctx = gradmod.ModulationContext(
        model,
        clfs,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=method,
        fusion="head",
        mode="feature",
    )
    g = torch.Generator().manual_seed(0)
    xs = {
        n: torch.randn(6, d, generator=g, dtype=torch.float64).to(DEVICE, DTYPE)
        for n, d in zip(NAMES, (5, 4, 3), strict=True)
    }
    y = torch.randint(0, CLASSES, (6,), generator=g).to(DEVICE)
    feats = model.features(xs)
    feats["a"] = shared(feats["a"])
    loss = nn.functional.cross_entropy(model.fuse(feats), y)
    with pytest.raises(gradmod.ConfigurationError) as ei, ctx(features=feats, targets=y):
        loss.backward()  # pragma: no cover
    assert len(ei.value.problems) == 1 and "outside encoders['a']" in ei.value.problems[0]
    assert no_grads(model, *clfs.values())
    assert int(method.steps) == 0 and method.previous.numel() == 0
