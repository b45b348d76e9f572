"""Pieces shared by the methods that run unimodal heads: forward/backward, unimodal logits off a
linear fusion head, and global means."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import StepError
from .._protocol import Binding, Reduce

__all__ = [
    "HeadRun",
    "fusion_width_problem",
    "global_mean",
    "logits_problems",
    "run_heads",
    "unimodal_logits",
]

Loss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class HeadRun:
    """The result of :func:`run_heads`, one entry per modality (in modality order)."""

    outputs: list[Tensor]  # detached head outputs
    param_grads: list[list[tuple[Tensor, Tensor]]]  # per modality: (parameter, gradient)
    input_grads: list[Tensor] | None  # per modality: d loss / d feature, when asked for
    losses: list[Tensor]  # per modality: the head's loss (detached, before ``weight``)


def _as_input_of(head: nn.Module, h: Tensor) -> Tensor:
    """``h`` in the dtype of ``head``'s parameters (bfloat16 features from autocast, a float32
    head), in the graph of ``h``."""
    first = next(head.parameters(), None)
    if first is not None and h.is_floating_point() and h.dtype != first.dtype:
        h = h.to(first.dtype)
    return h


def _input_of(head: nn.Module, h: Tensor) -> Tensor:
    return _as_input_of(head, h.detach())


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
    return HeadRun(
        [o.detach() for o in outputs], param_grads, inputs_g, [x.detach() for x in losses]
    )


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


def logits_problems(who: str, binding: Binding) -> list[str]:
    """What keeps :func:`unimodal_logits` from reading unimodal logits off ``binding``."""
    if binding.classifiers is None and not isinstance(binding.fusion_module, nn.Linear):
        got = type(binding.fusion_module).__name__ if binding.fusion_module else "nothing"
        return [
            f"{who} reads unimodal logits off the fusion head: pass fusion= one nn.Linear "
            f"over the concatenated features (got {got}), or the per-modality parts of a "
            "sum head as classifiers"
        ]
    return []


def fusion_width_problem(who: str, head: nn.Linear, widths: Sequence[int]) -> str | None:
    """Why ``head`` is not one Linear over features of these widths concatenated, or ``None``."""
    if sum(widths) == head.in_features:
        return None
    return (
        f"the fusion Linear takes {head.in_features} inputs but the features' widths "
        f"{list(widths)} add up to {sum(widths)}: {who} needs the fusion head to be one "
        "Linear over the features concatenated in modality order"
    )


def unimodal_logits(
    who: str,
    binding: Binding,
    features: Sequence[Tensor],
    *,
    live: bool = False,
    detach_head: bool = True,
) -> list[Tensor]:
    r"""Each modality's unimodal logits :math:`z_m`: ``classifiers[m](h_m)``, or for one
    ``nn.Linear`` fusion head over the concatenation, :math:`h_m W_m^\top + b/M` (OGM-GE, OPM,
    InfoReg).

    No gradient, unless ``live``: then the logits are in the graph of the features and of the
    classifiers, and with ``detach_head=False`` of the fusion head's weight and bias too
    (InfoReg trains the head with the unimodal losses; OGM-GE and OPM detach it, as their
    official code does).

    Raises:
        StepError: the fusion head does not take the features' widths.
    """
    feats = list(features) if live else [f.detach() for f in features]
    with torch.set_grad_enabled(live):
        if binding.classifiers is not None:
            heads = [binding.classifiers[n] for n in binding.names]
            return [h(_as_input_of(h, f)) for h, f in zip(heads, feats, strict=True)]
        head = binding.fusion_module
        assert isinstance(head, nn.Linear)
        widths = [f.shape[-1] for f in features]
        problem = fusion_width_problem(who, head, widths)
        if problem is not None:
            raise StepError(problem)
        weight: Tensor = head.weight
        bias: Tensor | None = head.bias
        if detach_head:
            weight, bias = weight.detach(), bias.detach() if bias is not None else None
        m = len(features)
        out = []
        for f, w in zip(feats, weight.split(widths, dim=1), strict=True):
            z = f.to(w.dtype) @ w.T
            out.append(z + bias / m if bias is not None else z)
        return out
