"""Fixed coefficients: constants per modality, or a function of the step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._errors import ConfigurationError, StepError
from .._protocol import Binding, Method, Needs, Step, StepPlan, coefficient_dtype
from ._registry import register

__all__ = ["Fixed"]

Schedule = Callable[[int], Sequence[float] | Mapping[str, float] | Tensor]


@register("fixed", make=lambda m: Fixed([0.5 + i for i in range(m)]))
class Fixed(Method):
    r"""Coefficients you choose: a constant per modality, or a function of the step.

    With ``act="update"`` a constant per modality is a modality-specific learning rate
    (``Fixed({"text": 0.02, "audio": 1.0})`` runs the text encoder at 2 % of the optimizer's
    learning rate); with ``act="gradient"`` it scales the encoders' gradients. A schedule
    ``fn(step) -> coefficients`` (``step`` counts the clean blocks from 0) gives warm-ups or any
    rule of your own. Reads no features and no classifiers.

    Args:
        coefficients: one number per modality — a mapping ``{name: k}`` (every modality named),
            a sequence in the context's modality order, or a callable of the step returning
            either (or an ``[M]`` tensor). Every value must be finite and ``>= 0``; a schedule's
            values are checked at every step (a ``StepError`` names the step).

    State (``state_dict``): ``steps`` (the schedule's step counter).
    """

    steps: Tensor

    def __init__(self, coefficients: Mapping[str, float] | Sequence[float] | Schedule) -> None:
        super().__init__()
        self._fn: Schedule | None = None
        self._values: Mapping[str, float] | Sequence[float] | None = None
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        if callable(coefficients):
            self._fn = coefficients
        else:
            values = _plain(coefficients)
            problems = _value_problems(values)
            if problems:
                raise ConfigurationError(problems)
            self._values = values  # type: ignore[assignment]
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def needs(self) -> Needs:
        return Needs(features=False)

    def extra_repr(self) -> str:
        return "schedule" if self._fn is not None else f"coefficients={self._values!r}"

    def reset(self) -> None:
        self.steps.zero_()

    def check(self, binding: Binding) -> list[str]:
        if isinstance(self._values, Mapping):
            missing = [n for n in binding.names if n not in self._values]
            extra = [k for k in self._values if k not in binding.names]
            if missing or extra:
                return [
                    f"Fixed: coefficients name {sorted(self._values)}, the modalities are "
                    f"{list(binding.names)} (missing: {missing}, unknown: {extra})"
                ]
        elif self._values is not None and len(self._values) != len(binding.names):
            return [
                f"Fixed: {len(self._values)} coefficients for {len(binding.names)} modalities "
                f"{list(binding.names)}"
            ]
        return []

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        dtype = coefficient_dtype(binding.device)
        step_index = int(self.steps)  # a host-side counter: no device sync
        if self._fn is None:
            k = self._constant(binding, dtype)
        else:
            k = self._scheduled(binding, dtype, step_index)

        def commit() -> None:
            self.steps += 1

        return StepPlan(k, commit=commit)

    def _constant(self, binding: Binding, dtype: torch.dtype) -> Tensor:
        """The constants as a tensor, built once per device and dtype."""
        key = (binding.device, dtype)
        k = self._cache.get(key)
        if k is None:
            values = self._values
            assert values is not None
            seq = (
                [values[n] for n in binding.names] if isinstance(values, Mapping) else list(values)
            )
            k = self._cache[key] = torch.tensor(seq, device=binding.device, dtype=dtype)
        return k

    def _scheduled(self, binding: Binding, dtype: torch.dtype, step_index: int) -> Tensor:
        """The schedule's values at ``step_index``, checked (a tensor is checked on the device:
        one host sync)."""
        assert self._fn is not None
        returned = self._fn(step_index)
        if isinstance(returned, Tensor):
            k = returned.detach().to(binding.device, dtype).reshape(-1)
            if k.shape != (len(binding.names),) or not bool((torch.isfinite(k) & (k >= 0)).all()):
                raise StepError(
                    f"Fixed: the schedule returned {tuple(returned.shape)} values at step "
                    f"{step_index}; expected {len(binding.names)} finite numbers >= 0"
                )
            return k
        values = _plain(returned)
        problems = _value_problems(values)
        if isinstance(values, Mapping):
            missing = [n for n in binding.names if n not in values]
            extra = [n for n in values if n not in binding.names]
            if missing or extra:
                problems.append(f"modalities missing: {missing}, unknown: {extra}")
            seq = [values.get(n, math.nan) for n in binding.names]
        else:
            seq = list(values) if isinstance(values, Sequence) else []
            if len(seq) != len(binding.names):
                problems.append(f"{len(seq)} values for {len(binding.names)} modalities")
        if problems:
            raise StepError(f"Fixed: at step {step_index}: " + "; ".join(problems))
        return torch.tensor(seq, device=binding.device, dtype=dtype)


def _plain(values: object) -> object:
    """Tensors and numpy arrays as Python lists (a 0-d one stays a scalar: refused)."""
    if not isinstance(values, Mapping) and hasattr(values, "tolist"):
        return values.tolist()
    return values


def _value_problems(values: object) -> list[str]:
    if isinstance(values, Mapping):
        items: list[tuple[object, object]] = list(values.items())
    elif isinstance(values, Sequence) and not isinstance(values, str):
        items = list(enumerate(values))
    else:
        return [f"Fixed: coefficients must be a mapping, a sequence or a callable; got {values!r}"]
    bad = [
        f"{k!r}: {v!r}"
        for k, v in items
        if isinstance(v, bool)
        or not isinstance(v, numbers.Real)
        or not math.isfinite(float(v))
        or float(v) < 0
    ]
    if bad:
        return [f"Fixed: every coefficient must be a finite number >= 0; got {', '.join(bad)}"]
    return []
