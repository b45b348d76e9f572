"""Per-sample scores and one-vs-others ratios that the modulation rules are built from."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["clipped_nll", "mean_of_others", "one_vs_others_ratio", "true_class_probability"]


def _check(logits: Tensor, targets: Tensor, what: str) -> None:
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"{what}: expected logits [B, C] and integer targets [B]; got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )


def true_class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    r""":math:`p_i = \operatorname{softmax}(z_i)[y_i]` per sample, shape ``[B]``.

    OGM-GE sums it over the batch, MLB averages it. Computed as ``exp(log_softmax)`` for
    accuracy; differentiable.
    """
    _check(logits, targets, "true_class_probability")
    return F.log_softmax(logits, dim=-1).gather(1, targets.long().unsqueeze(1)).squeeze(1).exp()


def clipped_nll(logits: Tensor, targets: Tensor, *, floor: float = 1e-8) -> Tensor:
    r"""AGM's per-sample score :math:`-\log\max(p_i, \text{floor})`, shape ``[B]``.

    The floor (official ``1e-8`` in the two-modality script) bounds the score by
    :math:`-\log(\text{floor}) \approx 18.4`; ``floor=0`` gives the plain negative
    log-likelihood (the official three-modality script), computed from ``log_softmax`` so that
    it stays finite for finite logits.
    """
    _check(logits, targets, "clipped_nll")
    logp = F.log_softmax(logits, dim=-1).gather(1, targets.long().unsqueeze(1)).squeeze(1)
    return -logp.clamp_min(math.log(floor)) if floor > 0 else -logp


def mean_of_others(x: Tensor) -> Tensor:
    r""":math:`\frac{1}{M-1}\sum_{j \ne m} x_j` for every ``m``, shape ``[M]`` (``M >= 2``)."""
    if x.dim() != 1 or x.shape[0] < 2:
        raise ValueError(
            f"expected one score per modality, shape [M] with M >= 2; got {tuple(x.shape)}"
        )
    return (x.sum() - x) / (x.shape[0] - 1)


def one_vs_others_ratio(scores: Tensor) -> Tensor:
    r""":math:`r_m = s_m / \frac{1}{M-1}\sum_{j \ne m} s_j`, shape ``[M]``; finite for scores >= 0.

    For ``M = 2`` this is the plain ratio :math:`s_0 / s_1` (and its inverse). A zero
    denominator is replaced by the smallest positive normal number of the dtype, so the ratio
    stays finite (a modality whose partners score exactly 0 is then "dominant" by far).
    """
    tiny = torch.finfo(scores.dtype).tiny
    return scores / mean_of_others(scores).clamp_min(tiny)
