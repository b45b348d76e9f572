"""Pieces shared by the methods that run unimodal heads: forward/backward and global means."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._protocol import Reduce

__all__ = ["HeadRun", "global_mean", "run_heads"]

Loss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class HeadRun:
    """The result of :func:`run_heads`, one entry per modality (in modality order)."""

    outputs: list[Tensor]  # detached head outputs
    param_grads: list[list[tuple[Tensor, Tensor]]]  # per modality: (parameter, gradient)
    input_grads: list[Tensor] | None  # per modality: d loss / d feature, when asked for


def _input_of(head: nn.Module, h: Tensor) -> Tensor:
    first = next(head.parameters(), None)
    h = h.detach()
    if first is not None and h.is_floating_point() and h.dtype != first.dtype:
        h = h.to(first.dtype)
    return h


def run_heads(
    heads: Sequence[nn.Module],
    features: Sequence[Tensor],
    targets: Tensor,
    loss_fn: Loss,
    *,
    input_grads: bool,
    weight: float = 1.0,
) -> HeadRun:
    """Run each head on a detached copy of its feature and differentiate ``weight * loss``.

    The user's graph is never touched: the heads read ``feature.detach()`` (cast to the head's
    dtype). With ``input_grads=True`` the gradient of each head's loss with respect to its
    input is returned as well, so that the caller can inject it into the live feature's
    gradient (a multi-loss objective without editing the user's loss).
    """
    inputs = [_input_of(head, h) for head, h in zip(heads, features, strict=True)]
    if input_grads:
        inputs = [x.requires_grad_(True) for x in inputs]
    outputs, losses = [], []
    with torch.enable_grad():
        for head, x in zip(heads, inputs, strict=True):
            out = head(x)
            outputs.append(out)
            losses.append(loss_fn(out, targets))
        params: list[list[Tensor]] = [
            [p for p in head.parameters() if p.requires_grad] for head in heads
        ]
        wrt: list[Tensor] = [p for ps in params for p in ps]
        if input_grads:
            wrt += inputs
        total = torch.stack(losses).sum() * weight
        grads = torch.autograd.grad(total, wrt, allow_unused=True) if wrt else ()
    it = iter(grads)
    param_grads = [[(p, g) for p in ps if (g := next(it)) is not None] for ps in params]
    inputs_g = None
    if input_grads:
        inputs_g = [
            g if g is not None else torch.zeros_like(x) for g, x in zip(it, inputs, strict=True)
        ]
    return HeadRun([o.detach() for o in outputs], param_grads, inputs_g)


def global_mean(scores: Sequence[Tensor], reduce: Reduce, like: Tensor) -> Tensor:
    """The mean of each modality's score over the global batch, shape ``[M]``.

    Each entry is per-sample scores ``[B]`` (averaged exactly over all ranks, also with unequal
    per-rank batch sizes: sums and counts are all-reduced) or a 0-d batch score (averaged over
    ranks). The result has ``like``'s dtype and device.
    """
    sums, counts = [], []
    for s in scores:
        s = s.detach().to(like.dtype)
        sums.append(s.sum())
        counts.append(s.new_full((), float(s.numel())))  # a fill: no host-to-device copy
    totals = reduce(torch.stack([torch.stack(sums), torch.stack(counts)]).to(like.device))
    return totals[0] / totals[1].clamp_min(1.0)
