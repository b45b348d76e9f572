"""CGGM's direction loss as a composable piece: a gradient injected into the fusion weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import functional as GF
from .._protocol import Binding, Injection, last_weight_matrix

__all__ = ["check_direction", "direction_gradient", "direction_injection", "head_matrices"]

WHAT = "the fusion tensor (direction loss)"


def check_direction(binding: Binding, who: str, arg: str) -> list[str]:
    """Problems that keep the direction loss from running with this configuration.

    ``arg`` names the argument that turns the direction loss on (``"lam"``, ``"direction"``).
    """
    if binding.fusion is None:
        return [
            f"{who}({arg}>0): the direction loss needs the fusion head, but no fusion= was "
            f"given: pass fusion= (the fusion head as a module, path or tensor), or set {arg}=0 "
            "to train without it"
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
                f"shape, or set {arg}=0"
            )
    return problems


def head_matrices(binding: Binding) -> list[Tensor]:
    """Each modality's head's last weight matrix :math:`v_m`, in modality order."""
    assert binding.classifiers is not None
    out = []
    for n in binding.names:
        v = last_weight_matrix(binding.classifiers[n])
        assert v is not None  # refused by check_direction
        out.append(v)
    return out


def direction_gradient(u: Tensor, vs: Sequence[Tensor], weights: Tensor, lam: float) -> Tensor:
    r"""The gradient of :math:`\lambda L_{gm}` with respect to :math:`u`, evaluated at ``u``.

    :math:`L_{gm} = \frac1M\sum_m (|w_m| - w_m \cos(u, v_m))`
    (:func:`gradmod.functional.cosine_direction_loss`); the weights :math:`w` and the
    :math:`v_m` are constants. Computed on detached copies: nothing here touches a graph.
    """
    leaf = u.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = lam * GF.cosine_direction_loss(
            weights.detach().to(leaf.dtype), [v.detach().to(leaf.dtype) for v in vs], leaf
        )
        (g,) = torch.autograd.grad(loss, leaf)
    return g


def direction_injection(binding: Binding, weights: Tensor, lam: float) -> Injection:
    """The direction loss's gradient at the current weights, injected into the fusion tensor."""
    assert binding.fusion is not None
    g = direction_gradient(binding.fusion, head_matrices(binding), weights, lam)
    return Injection(binding.fusion, g, WHAT)
