"""AGM's adaptive modulation coefficients (Li et al., ICCV 2023), as a pure function."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scores import mean_of_others

__all__ = ["agm_coefficients"]


def agm_coefficients(
    scores: Tensor,
    running_scores: Tensor,
    *,
    alpha: float = 1.0,
    cap: float = 10.0,
    symmetric: bool = False,
) -> Tensor:
    r"""AGM's per-modality factors :math:`k > 0`, which both slow and boost.

    With :math:`s_m` the mean (clipped) cross-entropy of modality ``m``'s mono-modal response
    and :math:`\bar s_m` its running mean over the previous steps,

    .. math::
        r_m = e^{\text{mean}_{j\ne m} s_j - s_m}, \quad
        \bar r_m = e^{\text{mean}_{j\ne m} \bar s_j - \bar s_m}, \quad
        k_m = e^{\alpha \min(\bar r_m - r_m,\ \text{cap})}.

    A modality that is currently *more* ahead than on average (:math:`r_m > \bar r_m`) is
    slowed; one that fell behind is boosted, by at most :math:`e^{\alpha\,\text{cap}}`. When the
    current and running ratios agree, :math:`k = 1`. With ``symmetric=True`` the argument is
    clamped to :math:`[-\text{cap}, \text{cap}]`, so :math:`k \in [e^{-\alpha\,\text{cap}},
    e^{\alpha\,\text{cap}}]` (the official rule bounds it from above only).

    Args:
        scores: :math:`s`, shape ``[M]`` (see :func:`~gradmod.functional.clipped_nll`).
        running_scores: :math:`\bar s`, shape ``[M]`` (zeros at the first step).
        alpha: :math:`\alpha > 0` (official default 1.0, CREMA-D 1.5).
        cap: upper bound of the exponent's argument (official 10 for two modalities, 7 for
            three); ``> 0``.
        symmetric: also bound the argument from below by ``-cap``.

    Returns:
        ``k``, shape ``[M]``, positive and finite for finite inputs; no host synchronisation.
    """
    if scores.shape != running_scores.shape or scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(
            "scores and running_scores must both have shape [M] with M >= 2; got "
            f"{tuple(scores.shape)} and {tuple(running_scores.shape)}"
        )
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0; got {cap}")
    r = torch.exp(mean_of_others(scores) - scores)
    r_bar = torch.exp(mean_of_others(running_scores) - running_scores)
    low = -cap if symmetric else None
    return torch.exp(alpha * torch.clamp(r_bar - r, min=low, max=cap))
