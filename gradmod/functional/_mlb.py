"""MLB's multi-loss balancing coefficients (Kontras et al., BMVC 2024), as a pure function."""

from __future__ import annotations

import torch
from torch import Tensor

from ._scores import mean_of_others

__all__ = ["mlb_coefficients"]


def mlb_coefficients(
    scores: Tensor,
    *,
    alpha: float = 0.8,
    beta: float | None = None,
    higher_is_better: bool = True,
) -> Tensor:
    r"""MLB's per-modality factors :math:`k \in (0, 2)`: slow the strong, boost the weak.

    .. math:: r_m = \frac{\text{mean}_{j\ne m} s_j}{s_m}, \qquad k_m = 1 + \tanh(\alpha (r_m - 1))

    for scores where higher is better (mean true-class probability of each unimodal head). For
    errors (``higher_is_better=False``: the regression variant, :math:`s_m` a mean squared
    error) the ratio is inverted, :math:`r_m = s_m / \text{mean}_{j\ne m} s_j`. At balance
    :math:`k = 1`; as every head fits the data the ratios tend to 1 and the modulation phases
    out.

    Args:
        scores: :math:`s`, shape ``[M]``, non-negative.
        alpha: :math:`\alpha > 0` (official 0.8 on CREMA-D and AVE, 1.0 on UCF101).
        beta: optional cap of the boost: where :math:`r_m > 1`,
            :math:`k_m = 1 + (\beta - 1)\tanh(\alpha(r_m - 1)) < \beta`. ``None``: no cap (the
            boost tends to 2).
        higher_is_better: ``True`` for probabilities/accuracies, ``False`` for errors.

    Returns:
        ``k``, shape ``[M]``, finite; no host synchronisation. A zero denominator is replaced by
        the smallest positive normal number of the dtype.
    """
    if scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(f"MLB needs scores of shape [M] with M >= 2; got {tuple(scores.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    if beta is not None and beta < 1:
        raise ValueError(f"beta caps the boost and must be >= 1; got {beta}")
    tiny = torch.finfo(scores.dtype).tiny
    others = mean_of_others(scores)
    r = others / scores.clamp_min(tiny) if higher_is_better else scores / others.clamp_min(tiny)
    x = alpha * (r - 1.0)
    one_plus_tanh = 2.0 * torch.sigmoid(2.0 * x)  # = 1 + tanh(x), accurate for x << 0
    if beta is None:
        return one_plus_tanh
    return torch.where(x > 0, 1.0 + (beta - 1.0) * torch.tanh(x), one_plus_tanh)
