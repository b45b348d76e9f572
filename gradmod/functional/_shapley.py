"""Mono-modal responses of a fused model: Shapley values over modality subsets (AGM)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["shapley_responses"]

#: The default refusal threshold: 2**M - 1 forward passes per step.
MAX_MODALITIES = 4


def _weights(m: int) -> list[list[float]]:
    """``A[i][s]``: the weight of coalition ``s`` (bitmask ``s + 1``) in modality ``i``'s value.

    Shapley: :math:`\\phi_i = \\sum_{S \\not\\ni i} \\frac{|S|!(M-|S|-1)!}{M!}(v(S \\cup i) - v(S))`
    with :math:`v(\\emptyset) = 0`, so each non-empty coalition ``S`` enters with
    ``+w(|S|-1)`` when ``i in S`` and ``-w(|S|)`` when not.
    """

    def w(size: int) -> float:
        return math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)

    rows = []
    for i in range(m):
        row = []
        for mask in range(1, 2**m):
            size = bin(mask).count("1")
            row.append(w(size - 1) if mask >> i & 1 else -w(size))
        rows.append(row)
    return rows


def shapley_responses(
    fn: Callable[[dict[str, Tensor]], Tensor],
    inputs: Mapping[str, Tensor],
    *,
    module: nn.Module | None = None,
    max_modalities: int = MAX_MODALITIES,
) -> dict[str, Tensor]:
    r"""Each modality's Shapley share of ``fn``'s output, with missing modalities set to zero.

    For every non-empty subset :math:`S` of the modalities, :math:`v(S)` is ``fn`` applied to
    ``inputs`` with the modalities outside :math:`S` replaced by zeros; the empty coalition is
    worth 0 (as in AGM's official code), so the responses add up to the full output:
    :math:`\sum_m \phi_m = v(\text{all}) = f(\text{inputs})`. For two modalities
    :math:`\phi_a = \tfrac12(T - F_v + F_a)` with :math:`T = f(a, v)`, :math:`F_a = f(a, 0)`,
    :math:`F_v = f(0, v)`.

    All :math:`2^M - 1` passes stay in the autograd graph. ``inputs`` can be raw inputs (``fn`` =
    the whole model) or encoder outputs (``fn`` = the fusion head: :math:`2^M - 1` passes of the
    head only, much cheaper).

    Args:
        fn: maps a dict ``{name: tensor}`` (same keys as ``inputs``) to an output tensor.
        inputs: one tensor per modality.
        module: if given, the masked passes (all but the full one) run with ``module`` in eval
            mode (dropout off, batch-norm statistics untouched, as in AGM's official code); every
            submodule's ``training`` flag is restored afterwards, also on an exception.
        max_modalities: refuse more modalities than this (the cost is exponential).

    Returns:
        ``{name: phi_m}`` in the order of ``inputs``, each shaped like ``fn``'s output.
    """
    names = list(inputs)
    m = len(names)
    if m < 2:
        raise ValueError(f"shapley_responses needs at least 2 modalities; got {m}")
    if m > max_modalities:
        raise ValueError(
            f"shapley_responses with {m} modalities needs {2**m - 1} forward passes per step; "
            f"the limit is max_modalities={max_modalities}. Raise it if you mean it, or group "
            "modalities"
        )
    zeros = {n: torch.zeros_like(x) for n, x in inputs.items()}

    def value(mask: int) -> Tensor:
        return fn({n: inputs[n] if mask >> i & 1 else zeros[n] for i, n in enumerate(names)})

    full_mask = 2**m - 1
    values: dict[int, Tensor] = {full_mask: value(full_mask)}
    flags = [(sub, sub.training) for sub in module.modules()] if module is not None else []
    try:
        if module is not None:
            module.eval()
        for mask in range(1, full_mask):
            values[mask] = value(mask)
    finally:
        for sub, flag in flags:
            sub.training = flag
    # Python-float weights: no host-to-device copy of a weight matrix on every call
    coalitions = [values[mask] for mask in range(1, 2**m)]
    out = {}
    for name, row in zip(names, _weights(m), strict=True):
        out[name] = sum(w * v for w, v in zip(row, coalitions, strict=True))
    return out  # type: ignore[return-value]
