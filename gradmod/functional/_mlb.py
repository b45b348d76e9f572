"""MLB's multi-loss balancing coefficients (Kontras et al., BMVC 2024), as a pure function."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._scores import mean_of_others

__all__ = ["Gate", "mlb_coefficients"]


Gate = Literal["boost", "both"]


def mlb_coefficients(
    scores: Tensor,
    *,
    alpha: float = 0.8,
    beta: float | None = None,
    higher_is_better: bool = True,
    gate: Gate | None = None,
    chance: Tensor | float | None = None,
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
        gate: gradmod's extension for modalities with nothing to give (classification scores
            only). With :math:`c` the ``chance`` score (the mean true-class probability of a head
            that predicts the label prior, :math:`\sum_c \pi_c^2`), each head's
            *informativeness* is :math:`q_m = \text{clip}((s_m - c) / (\max_j s_j - c), 0, 1)`
            (0 for every head when none beats chance).
            ``"boost"``: a boost is scaled by the head's own :math:`q_m`,
            :math:`k_m \leftarrow 1 + (k_m - 1) q_m` where :math:`k_m > 1` (a head at chance is
            not boosted). ``"both"``: in addition a slowing is scaled by the mean informativeness
            of the other heads, :math:`k_m \leftarrow 1 - (1 - k_m)\,\text{mean}_{j \ne m}
            q_j` where :math:`k_m < 1` (a modality is not slowed for others that have nothing
            to learn). ``None``: MLB's rule as published.
        chance: :math:`c`, needed with ``gate``.

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
    if gate is not None and (
        gate not in ("boost", "both") or chance is None or not higher_is_better
    ):
        raise ValueError(
            "gate must be 'boost' or 'both', with chance given, for scores where higher is "
            f"better; got gate={gate!r}, chance={chance!r}, higher_is_better={higher_is_better}"
        )
    tiny = torch.finfo(scores.dtype).tiny
    others = mean_of_others(scores)
    r = others / scores.clamp_min(tiny) if higher_is_better else scores / others.clamp_min(tiny)
    x = alpha * (r - 1.0)
    k = 2.0 * torch.sigmoid(2.0 * x)  # = 1 + tanh(x), accurate for x << 0
    if beta is not None:
        k = torch.where(x > 0, 1.0 + (beta - 1.0) * torch.tanh(x), k)
    if gate is None:
        return k
    c = torch.as_tensor(chance, dtype=scores.dtype, device=scores.device)
    q = ((scores - c) / (scores.max() - c).clamp_min(tiny)).clamp(0.0, 1.0)
    k = torch.where(k > 1, 1.0 + (k - 1.0) * q, k)
    if gate == "both":
        k = torch.where(k < 1, 1.0 - (1.0 - k) * mean_of_others(q), k)
    return k
