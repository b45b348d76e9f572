"""Modulation methods: each decides per-step coefficients; the engine applies them."""

from ._base import (
    Binding,
    GradTransform,
    Injection,
    Level,
    Method,
    Reduce,
    Step,
    StepPlan,
    Targets,
)
from ._cggm import CGGM

__all__ = [
    "CGGM",
    "Binding",
    "GradTransform",
    "Injection",
    "Level",
    "Method",
    "Reduce",
    "Step",
    "StepPlan",
    "Targets",
]
