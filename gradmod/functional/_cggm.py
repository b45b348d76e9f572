"""CGGM's improvement-rate scaling (Guo et al., NeurIPS 2024), as a pure tensor function."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Policy = Literal["safe", "official"]

__all__ = ["Policy", "improvement_rate_scale"]


def improvement_rate_scale(
    previous: Tensor,
    current: Tensor,
    *,
    rho: float = 1.0,
    policy: Policy = "safe",
    zero_tol: float = 1e-6,
) -> Tensor:
    r"""CGGM's gradient-magnitude factors :math:`\rho B` for ``M`` modalities.

    With the improvement :math:`\Delta_m = \varepsilon_m(t) - \varepsilon_m(t-1)` of each
    modality's unimodal metric,

    .. math:: B_m = \frac{\sum_j \Delta_j - \Delta_m}{\sum_j \Delta_j},

    so the modality that improved most gets the smallest factor, and :math:`\sum_m B_m = M - 1`
    ("scale normalization").

    Args:
        previous: metric of each modality at the previous step, shape ``[M]``.
        current: metric of each modality at this step, shape ``[M]`` (same dtype and device).
        rho: the global factor :math:`\rho` (official default 1.3).
        policy: ``"safe"`` (default) or ``"official"``.

            * ``"official"`` is the authors' arithmetic, kept for parity: with
              :math:`S = \sum\Delta + 10^{-8}`, :math:`B = (S - \Delta) / S` (the
              :math:`10^{-8}` enters the numerator too). When no metric changed
              (every :math:`\Delta = 0`) every :math:`B` is exactly 1 (factor :math:`\rho`);
              when the :math:`\Delta` cancel out (:math:`\sum\Delta = 0`, some
              :math:`\Delta \ne 0`) it explodes (:math:`|B| \approx 10^7 |\Delta|`); when one
              modality improves while another degrades it can turn negative (gradient *ascent*).
            * ``"safe"`` never returns a negative, exploding or non-finite factor:
              a degradation counts as no improvement (:math:`\Delta^+ = \max(\Delta, 0)`,
              non-finite :math:`\Delta` count as 0), so :math:`B_m \in [0, 1]`; and when no
              modality improved (:math:`\sum\Delta^+ \le` ``zero_tol``) every modality gets the
              equal-improvement value :math:`B_m = (M-1)/M`. Hence :math:`\sum_m B_m = M - 1`
              holds at every step, and equal improvements give the same factors in both policies.
        zero_tol: below this, :math:`\sum\Delta^+` counts as zero (``"safe"`` only).

    Returns:
        :math:`\rho B`, shape ``[M]``, same dtype and device as ``current``. Differentiable in
        ``previous`` and ``current``; no host synchronisation.
    """
    if previous.shape != current.shape or current.dim() != 1:
        raise ValueError(
            f"previous and current must both have shape [M]; got {tuple(previous.shape)} and "
            f"{tuple(current.shape)}"
        )
    m = current.shape[0]
    if m < 2:
        raise ValueError(f"CGGM needs at least 2 modalities; got M = {m}")
    delta = current - previous
    if policy == "official":
        total = delta.sum() + 1e-8
        return rho * (total - delta) / total
    if policy != "safe":
        raise ValueError(f"policy must be 'safe' or 'official'; got {policy!r}")
    delta = torch.nan_to_num(delta, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    total = delta.sum()
    informative = total > zero_tol
    denom = torch.where(informative, total, torch.ones_like(total))
    b = torch.where(informative, (total - delta) / denom, torch.full_like(delta, (m - 1) / m))
    return rho * b
