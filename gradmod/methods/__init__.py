"""Modulation methods: each decides per-step coefficients; the engine applies them."""

from .._protocol import (
    Binding,
    GradCombine,
    GradHook,
    GradTransform,
    Injection,
    Level,
    LossScale,
    Method,
    Needs,
    Prepared,
    Reduce,
    Step,
    StepPlan,
    Targets,
    class_index_problem,
    coefficient_dtype,
    epoch_number,
    finite_step,
)
from ._agm import AGM
from ._cggm import CGGM
from ._fixed import Fixed
from ._inforeg import InfoReg
from ._mmpareto import MMPareto
from ._multiloss import MLB, MultiLoss
from ._ogm import OGMGE
from ._opm import OPM
from ._registry import REGISTRY, Registered, register, register_preset

__all__ = [
    "AGM",
    "CGGM",
    "Fixed",
    "InfoReg",
    "MLB",
    "MMPareto",
    "OGMGE",
    "OPM",
    "REGISTRY",
    "Registered",
    "register",
    "register_preset",
    "MultiLoss",
    "Binding",
    "GradCombine",
    "GradHook",
    "GradTransform",
    "Injection",
    "Level",
    "Method",
    "Needs",
    "Prepared",
    "LossScale",
    "Reduce",
    "Step",
    "StepPlan",
    "Targets",
    "class_index_problem",
    "coefficient_dtype",
    "epoch_number",
    "finite_step",
]
