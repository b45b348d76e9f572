"""Per-sample metrics that CGGM turns into improvement rates."""

from __future__ import annotations

from torch import Tensor

__all__ = ["accuracy", "correct", "sign_accuracy", "sign_correct"]


def correct(logits: Tensor, targets: Tensor) -> Tensor:
    """1.0 where ``argmax(logits, -1) == targets``, else 0.0; shape ``[B]`` (float of ``logits``)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"correct: expected logits [B, C] and integer targets [B]; got {tuple(logits.shape)} "
            f"and {tuple(targets.shape)}"
        )
    return (logits.argmax(dim=-1) == targets).to(logits.dtype)


def sign_correct(predictions: Tensor, targets: Tensor) -> Tensor:
    """Per-sample agreement of ``predictions > 0`` with ``targets > 0``, shape ``[B]``.

    CGGM's regression metric. Both are flattened per sample (``[B]`` and ``[B, 1]`` mix
    freely); with several outputs per sample the agreement is averaged over them.
    """
    p = predictions.reshape(predictions.shape[0], -1)
    t = targets.reshape(targets.shape[0], -1)
    if p.shape != t.shape:
        raise ValueError(
            f"sign_correct: predictions {tuple(predictions.shape)} and targets "
            f"{tuple(targets.shape)} do not match"
        )
    return ((p > 0) == (t > 0)).to(predictions.dtype).mean(dim=1)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Batch classification accuracy as a 0-d tensor (no host synchronisation)."""
    return correct(logits, targets).mean()


def sign_accuracy(predictions: Tensor, targets: Tensor) -> Tensor:
    """Batch sign accuracy (``pred > 0`` vs ``target > 0``) as a 0-d tensor."""
    return sign_correct(predictions, targets).mean()
