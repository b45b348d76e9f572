"""Pure, typed tensor functions behind gradmod's methods.

Every function is tensor-in/tensor-out, vectorised over modalities, free of host
synchronisation (no ``.item()``, no numpy) and differentiable where it matters, so it can be used
on its own, inside a compiled region, or as the reference that the hook engine is tested against.
"""

from ._cggm import Policy, improvement_rate_scale
from ._cosine import TensorOrList, cosine_direction_loss, flat_cosine
from ._metrics import accuracy, correct, sign_accuracy, sign_correct

__all__ = [
    "Policy",
    "TensorOrList",
    "accuracy",
    "correct",
    "cosine_direction_loss",
    "flat_cosine",
    "improvement_rate_scale",
    "sign_accuracy",
    "sign_correct",
]
