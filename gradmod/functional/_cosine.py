"""Cosine similarity between (lists of) tensors, and CGGM's direction loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TensorOrList = Tensor | Sequence[Tensor]

__all__ = ["TensorOrList", "cosine_direction_loss", "flat_cosine"]


def _as_list(x: TensorOrList) -> list[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _check_pairs(a: list[Tensor], b: list[Tensor]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(
            f"cosine needs two non-empty lists of equal length; got {len(a)} and {len(b)}"
        )
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x.shape != y.shape:
            raise ValueError(
                f"cosine: tensor {i} has shape {tuple(x.shape)} on one side and {tuple(y.shape)} "
                "on the other; both sides must list tensors of the same shapes"
            )


def flat_cosine(a: TensorOrList, b: TensorOrList, *, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of the flattened concatenations of ``a`` and ``b``, without building them.

    Each side is one tensor or a list of tensors (paired by position, equal shapes). The dot
    product is a sum of per-tensor ``torch.dot`` partials and the norms come from
    ``torch._foreach_norm``: faster and more accurate in float32 than ``torch.cat`` +
    ``F.cosine_similarity`` on large lists. The product of the norms is clamped below by ``eps``
    so that zero vectors give cosine 0 with a finite gradient.
    """
    la, lb = _as_list(a), _as_list(b)
    _check_pairs(la, lb)
    dot = torch.stack(
        [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(la, lb, strict=True)]
    ).sum()
    na = torch.stack(torch._foreach_norm(la)).norm() if len(la) > 1 else la[0].norm()
    nb = torch.stack(torch._foreach_norm(lb)).norm() if len(lb) > 1 else lb[0].norm()
    out: Tensor = dot / (na * nb).clamp_min(eps)
    return out


def cosine_direction_loss(
    coefficients: Tensor,
    unimodal: Sequence[TensorOrList],
    fusion: TensorOrList,
    *,
    eps: float = 1e-12,
) -> Tensor:
    r"""CGGM's direction loss :math:`L_{gm} = \frac1M \sum_m \left(|B_m| - B_m \cos(u, v_m)\right)`.

    Args:
        coefficients: :math:`B`, shape ``[M]``. Treated as given: detach it if it should act as
            a constant (CGGM does).
        unimodal: ``M`` entries, :math:`v_m`, each one tensor or a list of tensors (modality
            ``m``'s classifier weights, or their gradients).
        fusion: :math:`u`, one tensor or a list of tensors of the same shapes as each
            ``unimodal[m]`` (the fusion head's weights, or their gradient).

    Returns:
        A 0-d tensor, always :math:`\ge 0`, and 0 exactly when every :math:`\cos(u, v_m)` equals
        :math:`\operatorname{sign}(B_m)` (or :math:`B_m = 0`).
    """
    if coefficients.dim() != 1 or coefficients.shape[0] != len(unimodal):
        raise ValueError(
            f"coefficients must have shape [M] with M = len(unimodal) = {len(unimodal)}; "
            f"got {tuple(coefficients.shape)}"
        )
    cos = torch.stack([flat_cosine(fusion, v, eps=eps) for v in unimodal])
    return (coefficients.abs() - coefficients * cos.to(coefficients.dtype)).mean()
