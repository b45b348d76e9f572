"""torch.distributed reductions and the GradScaler's loss scale: the engine's two outside links."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._errors import StepError

__all__ = [
    "accumulate",
    "loss_scale",
    "mean_over_ranks",
    "rank_and_world",
    "reduce_sum",
    "world_size",
]


def world_size(group: Any) -> int:
    """The number of ranks in ``group`` (1 outside an initialised process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def rank_and_world(group: Any) -> tuple[int, int]:
    """:func:`rank` and :func:`world_size` of ``group``, with one check of the process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return int(dist.get_rank(group)), int(dist.get_world_size(group))


def reduce_sum(t: Tensor, group: Any) -> Tensor:
    """``t`` summed over the ranks of ``group`` (a new tensor; ``t`` itself outside DDP)."""
    if world_size(group) == 1:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def loss_scale(scaler: Any) -> Tensor | None:
    """The current scale of an enabled ``GradScaler`` (``None`` without one)."""
    if scaler is None or scaler is False or not scaler.is_enabled():
        return None
    scale = getattr(scaler, "_scale", None)
    if scale is None:
        raise StepError(
            "grad_scaler has no scale yet: this backward's loss was not scaled; call "
            "scaler.scale(loss).backward() (inside the block or before it), and zero the "
            "gradients of this step"
        )
    return scale  # type: ignore[no-any-return]


def mean_over_ranks(grads: list[Tensor], group: Any) -> list[Tensor]:
    """``grads`` averaged over the ranks of ``group`` (one all-reduce; ``grads`` itself outside
    DDP). The tensors share one dtype."""
    if world_size(group) == 1 or not grads:
        return grads
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= world_size(group)
    return [
        f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
    ]


def accumulate(
    pairs: Sequence[tuple[Tensor, Tensor]], group: Any, scale: Tensor | None, weight: float
) -> None:
    """Add each gradient (averaged over ranks, times the loss scale and ``weight``) to its
    tensor's ``.grad``."""
    if not pairs:
        return
    with torch.no_grad():
        grads = mean_over_ranks([g for _, g in pairs], group)
        for (p, _), g in zip(pairs, grads, strict=True):
            g = g * scale.to(g.dtype) if scale is not None else g
            g = g * weight if weight != 1.0 else g
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.add_(g.to(p.grad.dtype))
