"""Modulation methods: each decides per-step coefficients; the engine applies them."""

from ._agm import AGM
from ._base import (
    Binding,
    GradTransform,
    Injection,
    Level,
    LossScale,
    Method,
    Reduce,
    Step,
    StepPlan,
    Targets,
    coefficient_dtype,
)
from ._cggm import CGGM
from ._fixed import Fixed
from ._multiloss import MLB, MultiLoss
from ._ogm import OGMGE

__all__ = [
    "AGM",
    "CGGM",
    "Fixed",
    "MLB",
    "OGMGE",
    "MultiLoss",
    "Binding",
    "GradTransform",
    "Injection",
    "Level",
    "Method",
    "LossScale",
    "Reduce",
    "Step",
    "StepPlan",
    "Targets",
    "coefficient_dtype",
]
