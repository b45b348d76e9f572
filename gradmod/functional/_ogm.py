"""OGM-GE's on-the-fly modulation coefficients (Peng et al., CVPR 2022), as a pure function."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._scores import one_vs_others_ratio

__all__ = ["OGMForm", "ogm_ge_coefficients"]

OGMForm = Literal["official", "continuous"]


def ogm_ge_coefficients(
    scores: Tensor, *, alpha: float = 0.1, form: OGMForm = "official"
) -> Tensor:
    r"""OGM's per-modality factors :math:`k \in (0, 1]`: only the dominant modality is slowed.

    With :math:`s_m = \sum_i p_{m,i}` (summed true-class probabilities of modality ``m``'s
    unimodal logits) and the one-vs-others ratio :math:`\rho_m = s_m / \text{mean}_{j\ne m} s_j`:

    * ``form="official"`` (default; the authors' current code):
      :math:`k_m = 1 - \tanh(\alpha \rho_m)` for a dominant modality (:math:`\rho_m > 1`), else 1.
      The factor jumps at :math:`\rho = 1`. For ``M = 2`` an exact tie slows modality 0, as the
      official ``if ratio_v > 1: … else: slow audio`` does.
    * ``form="continuous"`` (the code before mid-2022):
      :math:`k_m = 1 - \tanh(\alpha \cdot \operatorname{relu}(\rho_m - 1))`, 1 at a tie.

    For ``M = 2``, :math:`\rho_m` is exactly the official ratio. For ``M > 2`` the one-vs-others
    average is gradmod's extension (the authors' suggestion), not something they ran; there a
    modality counts as dominant only when :math:`\rho_m` exceeds 1 by more than a few rounding
    errors, so that an exact tie leaves every modality at 1.

    Args:
        scores: :math:`s`, shape ``[M]``, non-negative (see
            :func:`~gradmod.functional.true_class_probability`).
        alpha: :math:`\alpha > 0` (official 0.1 on VGGSound, 0.8 on CREMA-D).
        form: ``"official"`` or ``"continuous"``.

    Returns:
        ``k``, shape ``[M]``, same dtype and device as ``scores``; every entry in ``(0, 1]``
        (exactly 1 for non-dominant modalities), computed as :math:`2\sigma(-2\alpha\rho)` so
        that it stays positive until :math:`\alpha\rho` exceeds ~350 (float64). No host
        synchronisation.
    """
    if scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(f"OGM-GE needs scores of shape [M] with M >= 2; got {tuple(scores.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    rho = one_vs_others_ratio(scores)
    if form == "continuous":
        return _one_minus_tanh(alpha * torch.relu(rho - 1.0))
    if form != "official":
        raise ValueError(f"form must be 'official' or 'continuous'; got {form!r}")
    m = scores.shape[0]
    # M > 2: rho_m must clear 1 by more than a few rounding errors, so that an exact tie is
    # neutral ((s + s + s - s) / 2 / s is not always 1: a tie would slow every modality)
    dominant = rho > 1.0 + 4 * m * torch.finfo(rho.dtype).eps
    if m == 2:
        # official tie-break: when s_1 <= s_0 the else-branch slows modality 0
        dominant = torch.stack([scores[0] >= scores[1], scores[1] > scores[0]])
    return torch.where(dominant, _one_minus_tanh(alpha * rho), torch.ones_like(rho))


def _one_minus_tanh(x: Tensor) -> Tensor:
    r""":math:`1 - \tanh(x) = 2\sigma(-2x)`, without the cancellation that rounds it to 0."""
    return 2.0 * torch.sigmoid(-2.0 * x)
