"""The checks of one step: its inputs and its plan, before anything changes, and its backward,
on leaving the block."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import Tensor

from ._errors import StepError
from ._protocol import Binding, LossScale, Method, Needs, Reduce, Step, StepPlan
from ._validate import ParameterWatch, check_features

__all__ = [
    "adds_own_gradients",
    "block_weight",
    "check_half",
    "check_step",
    "check_weight",
    "no_gradient",
]


def block_weight(weight: float) -> float:
    """A block's ``weight=`` as a float (see ``ModulationContext.__call__``).

    Raises:
        StepError: not a finite number > 0.
    """
    if isinstance(weight, bool) or not (
        isinstance(weight, numbers.Real) and weight > 0 and math.isfinite(weight)
    ):
        raise StepError(
            f"weight must be a finite number > 0 (1/n for n micro-batches); got {weight!r}"
        )
    return float(weight)


def check_step(
    method: Method,
    binding: Binding,
    watch: ParameterWatch,
    features: Mapping[str, Tensor] | None,
    targets: Tensor | None,
    *,
    live: bool,
    boundary: bool,
    reduce: Reduce,
    loss_scale: LossScale,
    needs: Needs | None = None,
    weight: float = 1.0,
    rank: int = 0,
    world: int = 1,
) -> Step:
    """This step's inputs as a :class:`Step`, or a ``StepError`` listing every problem (the
    encoders' identity, the targets, the features, the method's own step checks). ``needs``:
    the method's declaration read at construction (default: asked again)."""
    problems = watch.problems()
    if targets is None:
        problems.append("no targets for this step: enter with ctx(features=..., targets=y)")
    elif not isinstance(targets, Tensor):
        problems.append(f"targets must be a tensor; got {type(targets).__name__}")
    check_features(method, binding.names, features, live, problems, needs)
    step = None
    if not problems:
        assert targets is not None
        step = Step(
            features or {},
            targets,
            reduce,
            boundary,
            loss_scale,
            rank=rank,
            world=world,
            weight=weight,
        )
        problems.extend(method.check_step(binding, step))
    if problems:
        raise StepError("; ".join(problems))
    assert step is not None
    return step


def adds_own_gradients(plan: StepPlan) -> bool:
    """Whether the plan adds gradients of the method's own (injected, accumulated, or combined
    into the encoders'), which the user's loss scaling and averaging do not reach."""
    return bool(plan.inject or plan.accumulate or plan.combine)


def check_weight(
    method: Method, plan: StepPlan, *, boundary: bool, explicit: bool, window_open: bool
) -> None:
    """Refuse a block of an accumulation window without ``weight=`` when the method adds
    gradients of its own: whether the user's loss is divided by ``n`` is not knowable."""
    if explicit or not adds_own_gradients(plan):
        return
    if boundary and not window_open:
        return
    which = "" if not boundary else " before this one"
    raise StepError(
        f"gradient accumulation (a block with boundary=False{which}) needs weight= on every "
        f"block of the window: {type(method).__name__} adds gradients of its own (head losses, "
        "direction loss) that must be divided like your loss: pass weight=1/n if you divide "
        "the loss by the n micro-batches, weight=1.0 if you sum them"
    )


def check_half(plan: StepPlan, features: Mapping[str, Tensor], grad_scaler: object) -> None:
    """Refuse float16 features without a ``grad_scaler`` when the method adds gradients of its
    own: float16 training scales its loss with a ``GradScaler``, and gradients added without its
    scale would be off by it after ``unscale_`` (``grad_scaler=False``: no scaler, on purpose)."""
    if grad_scaler is not None or not adds_own_gradients(plan):
        return
    if any(f.dtype == torch.float16 for f in features.values()):
        raise StepError(
            "float16 features but no grad_scaler: with a GradScaler, pass grad_scaler=scaler "
            "(the method's own gradients must be scaled like the loss); training float16 "
            "without one, pass grad_scaler=False"
        )


def no_gradient(missed: list[str], method: Method) -> StepError:
    """The error of a clean block whose backward left the modulation unused: the injections in
    ``missed`` never fired, or (none missed) no modulated gradient passed at all."""
    if not missed:
        return StepError(
            "no modulated gradient passed through the block: call loss.backward() "
            "inside `with ctx(...)`, with a loss that reaches the encoders"
        )
    return StepError(
        f"{', '.join(missed)} received no gradient inside the block, so "
        f"{type(method).__name__}'s extra gradient was lost (zero the "
        "gradients of this step): call loss.backward() inside the block with a loss "
        "that uses it. A torch.compile'd model that consumes its features inside "
        "the compiled graph gives them no gradient of their own: compile the "
        "encoders separately"
    )
