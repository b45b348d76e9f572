"""gradmod.Fixed: constants or a schedule, checked against plain autograd times the factor."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _models import F64, NAMES, batch, loss_of, make_model

import gradmod

ENC = {n: f"enc.{n}" for n in NAMES}


def run(method: gradmod.Method, steps: int = 1, **kw: object) -> gradmod.ModulationContext:
    model = make_model(F64)
    ctx = gradmod.ModulationContext(model, encoders=ENC, method=method, **kw)  # type: ignore[arg-type]
    for t in range(steps):
        xs, y = batch(seed=t, dtype=F64)
        loss, feats = loss_of(model, xs, y)
        with ctx(features=feats, targets=y):
            loss.backward()
        model.zero_grad()
    return ctx


@pytest.mark.parametrize(
    "coefficients", [{"a": 0.5, "b": 2.0, "c": 0.0}, [0.5, 2.0, 0.0], torch.tensor([0.5, 2.0, 0.0])]
)
def test_constant_coefficients_scale_each_encoder(coefficients: object) -> None:
    model = make_model(F64)
    twin = copy.deepcopy(model)
    ctx = gradmod.ModulationContext(
        model,
        encoders=ENC,
        method=gradmod.Fixed(coefficients),  # type: ignore[arg-type]
    )
    xs, y = batch(dtype=F64)
    loss, _ = loss_of(model, xs, y)
    with ctx(targets=y):  # reads no features
        loss.backward()
    loss_of(twin, xs, y)[0].backward()
    k = {"a": 0.5, "b": 2.0, "c": 0.0}
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        factor = k.get(name.split(".")[1], 1.0) if name.startswith("enc.") else 1.0
        assert torch.equal(p.grad, q.grad * factor), name  # type: ignore[operator]


def test_schedule_gets_the_clean_step_count_and_resumes() -> None:
    seen: list[int] = []

    def schedule(step: int) -> list[float]:
        seen.append(step)
        return [1.0 + step, 1.0, 0.5]

    ctx = run(gradmod.Fixed(schedule), steps=3)
    assert seen == [0, 1, 2] and ctx.coefficients.tolist() == [3.0, 1.0, 0.5]
    resumed = gradmod.Fixed(schedule)
    resumed.load_state_dict(ctx.state_dict())
    seen.clear()
    run(resumed, steps=1)
    assert seen == [3]


@pytest.mark.parametrize(
    "bad",
    [
        {"a": 1.0, "b": -1.0, "c": 1.0},
        [1.0, math.nan, 1.0],
        [1.0, "2", 1.0],
        3.0,
        torch.tensor(0.5),
        np.array([1.0, -1.0, 1.0]),
    ],
    ids=["negative", "nan", "string", "scalar", "0-d tensor", "numpy negative"],
)
def test_bad_constants_are_configuration_errors(bad: object) -> None:
    with pytest.raises(gradmod.ConfigurationError, match="Fixed"):
        gradmod.Fixed(bad)  # type: ignore[arg-type]


def test_constants_must_name_every_modality() -> None:
    with pytest.raises(gradmod.ConfigurationError, match="missing"):
        run(gradmod.Fixed({"a": 1.0, "b": 2.0}))
    with pytest.raises(gradmod.ConfigurationError, match="2 coefficients for 3 modalities"):
        run(gradmod.Fixed([1.0, 2.0]))


def test_a_bad_schedule_value_is_a_step_error_before_anything_changes() -> None:
    method = gradmod.Fixed(lambda step: [1.0, -2.0, 1.0])
    with pytest.raises(gradmod.StepError, match="at step 0"):
        run(method)
    assert int(method.steps) == 0


def test_fixed_on_the_update_level_is_a_modality_specific_learning_rate() -> None:
    model = make_model(F64)
    twin = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ctx = gradmod.ModulationContext(
        model,
        encoders=ENC,
        method=gradmod.Fixed({"a": 0.1, "b": 1.0, "c": 3.0}),
        act="update",
        optimizer=opt,
    )
    groups = [
        {"params": list(twin.enc[n].parameters()), "lr": 1e-2 * k}
        for n, k in zip(NAMES, (0.1, 1.0, 3.0), strict=True)
    ]
    ref = torch.optim.Adam([*groups, {"params": list(twin.head.parameters())}], lr=1e-2)
    for t in range(3):
        xs, y = batch(seed=t, dtype=F64)
        loss, _ = loss_of(model, xs, y)
        with ctx(targets=y):
            loss.backward()
        opt.step()
        opt.zero_grad()
        loss_of(twin, xs, y)[0].backward()
        ref.step()
        ref.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13)


def test_numpy_constants_and_a_schedule_mapping_with_an_unknown_name() -> None:
    ctx = run(gradmod.Fixed(np.array([0.5, 2.0, 1.0])))
    assert ctx.coefficients.tolist() == [0.5, 2.0, 1.0]
    with pytest.raises(gradmod.StepError, match="unknown"):
        run(gradmod.Fixed(lambda step: {"a": 1.0, "b": 1.0, "c": 1.0, "d": 2.0}))
