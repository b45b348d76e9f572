"""Naive float64 references for the method tests: plain Python loops and plain autograd.

Nothing here imports gradmod: each reference is an independent re-derivation of a method's
published rule, used to check what the hook engine produces.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

F64 = torch.float64


def softmax_true(logits: Tensor, y: Tensor) -> list[float]:
    """softmax(z_i)[y_i] for every sample, as a Python loop."""
    out = []
    for row, c in zip(logits.tolist(), y.tolist(), strict=True):
        mx = max(row)
        den = sum(math.exp(v - mx) for v in row)
        out.append(math.exp(row[c] - mx) / den)
    return out


def mean_others(xs: Sequence[float], m: int) -> float:
    return sum(x for j, x in enumerate(xs) if j != m) / (len(xs) - 1)


def mlb_k(scores: Sequence[float], alpha: float, higher: bool = True) -> list[float]:
    out = []
    for m, s in enumerate(scores):
        r = mean_others(scores, m) / s if higher else s / mean_others(scores, m)
        out.append(1 + math.tanh(alpha * (r - 1)))
    return out


def mlb_gated_k(scores: Sequence[float], alpha: float, chance: float, gate: str) -> list[float]:
    """gradmod's gated MLB, from its spec: q_m = clip((s_m - c) / (max s - c), 0, 1); a boost
    k > 1 becomes 1 + (k - 1) q_m; with "both", a slowing k < 1 becomes
    1 - (1 - k) * mean_{j != m} q_j."""
    k = mlb_k(scores, alpha)
    top = max(scores)
    if top <= chance:  # no head beats chance: nothing is informative
        q = [0.0] * len(scores)
    else:
        q = [min(max((s - chance) / (top - chance), 0.0), 1.0) for s in scores]
    out = []
    for m, km in enumerate(k):
        if km > 1:
            km = 1 + (km - 1) * q[m]
        elif km < 1 and gate == "both":
            km = 1 - (1 - km) * mean_others(q, m)
        out.append(km)
    return out


def ogm_k(scores: Sequence[float], alpha: float) -> list[float]:
    """The official discontinuous rule; one-vs-others for M > 2; M = 2 tie slows modality 0."""
    if len(scores) == 2:
        s_a, s_v = scores
        if s_v / s_a > 1:
            return [1.0, 1 - math.tanh(alpha * s_v / s_a)]
        return [1 - math.tanh(alpha * s_a / s_v), 1.0]
    out = []
    for m, s in enumerate(scores):
        rho = s / mean_others(scores, m)
        out.append(1 - math.tanh(alpha * rho) if rho > 1 else 1.0)
    return out


def agm_k(
    s: Sequence[float],
    s_bar: Sequence[float],
    alpha: float,
    cap: float,
    lower: float = -math.inf,
) -> list[float]:
    """AGM's rule: official ``exp(alpha * min(r_bar - r, cap))``; ``lower`` also bounds the
    exponent's argument from below (gradmod's default: -cap)."""
    out = []
    for m in range(len(s)):
        r = math.exp(mean_others(s, m) - s[m])
        r_bar = math.exp(mean_others(s_bar, m) - s_bar[m])
        out.append(math.exp(alpha * max(min(r_bar - r, cap), lower)))
    return out


def agm_score(logits: Tensor, y: Tensor, floor: float) -> float:
    """Mean of -log(softmax(z_i)[y_i]), with p floored at ``floor`` (official two-modality
    script: 1e-8; three-modality script: no floor, ``floor=0``), from log-sum-exp in a loop."""
    total = 0.0
    for row, c in zip(logits.tolist(), y.tolist(), strict=True):
        mx = max(row)
        logp = row[c] - mx - math.log(sum(math.exp(v - mx) for v in row))
        total += -max(logp, math.log(floor)) if floor > 0 else -logp
    return total / len(y)


def shapley(
    fn: Callable[[dict[str, Tensor]], Tensor], xs: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Average marginal contribution over all orderings; the empty coalition is worth 0."""
    names = list(xs)

    def v(present: frozenset[str]) -> Tensor | float:
        if not present:
            return 0.0
        return fn({n: xs[n] if n in present else torch.zeros_like(xs[n]) for n in names})

    orders = list(itertools.permutations(names))
    out: dict[str, Tensor | float] = {n: 0.0 for n in names}
    for order in orders:
        seen: frozenset[str] = frozenset()
        for n in order:
            out[n] = out[n] + v(seen | {n}) - v(seen)
            seen = seen | {n}
    return {n: o / len(orders) for n, o in out.items()}  # type: ignore[misc]


def cosine(u: Tensor, v: Tensor) -> Tensor:
    """Cosine of the flattened tensors, written out."""
    return (u * v).sum() / (u.norm() * v.norm())
