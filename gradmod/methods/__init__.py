"""Modulation methods: each decides per-step coefficients; the engine applies them."""

from ._base import Binding, Method, Reduce, StepPlan
from ._cggm import CGGM

__all__ = ["CGGM", "Binding", "Method", "Reduce", "StepPlan"]
