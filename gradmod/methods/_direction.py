"""CGGM's direction loss as a composable piece: a gradient injected into the fusion weight."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as GF
from .._groups import last_weight_matrix
from ._base import Binding, Injection

__all__ = ["check_direction", "direction_injection"]


def check_direction(binding: Binding, who: str) -> list[str]:
    """Problems that keep the direction loss from running with this configuration."""
    if binding.fusion is None:
        return [
            f"{who}'s direction loss needs the fusion head: pass fusion= (a module, path or "
            "tensor), or turn the direction loss off"
        ]
    if binding.classifiers is None:
        return [f"{who}'s direction loss compares the fusion head with unimodal heads: pass them"]
    problems: list[str] = []
    u = binding.fusion
    for name in binding.names:
        clf = binding.classifiers.get(name)
        if clf is None:
            continue
        v = last_weight_matrix(clf)
        if v is None:
            problems.append(f"classifiers[{name!r}] has no weight matrix for the direction loss")
        elif v.shape != u.shape:
            problems.append(
                f"the direction loss compares the fusion head's last weight matrix "
                f"{tuple(u.shape)} with classifiers[{name!r}]'s last weight matrix "
                f"{tuple(v.shape)}: end each classifier in a layer of the fusion head's "
                "shape, or turn the direction loss off"
            )
    return problems


def direction_injection(binding: Binding, weights: Tensor, lam: float) -> Injection:
    r"""The gradient of :math:`\lambda L_{gm}` with respect to the fusion weight :math:`u`.

    :math:`L_{gm} = \frac1M\sum_m (|w_m| - w_m \cos(u, v_m))` with :math:`v_m` the last weight
    matrix of head ``m`` and the weights :math:`w` treated as constants
    (:func:`gradmod.functional.cosine_direction_loss`). Only :math:`u` moves.
    """
    assert binding.fusion is not None and binding.classifiers is not None
    u = binding.fusion.detach().requires_grad_(True)
    vs = [last_weight_matrix(binding.classifiers[n]) for n in binding.names]
    with torch.enable_grad():
        loss = lam * GF.cosine_direction_loss(
            weights.detach().to(u.dtype), [v.detach().to(u.dtype) for v in vs if v is not None], u
        )
        (g_u,) = torch.autograd.grad(loss, u)
    return Injection(binding.fusion, g_u, "the fusion tensor (direction loss)")
