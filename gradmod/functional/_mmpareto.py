"""MMPareto's per-encoder gradient integration (Wei & Hu, ICML 2024), as pure tensor functions.

Spec, formulas and the official file:line references: ``docs/methods/mmpareto.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._cggm import Policy
from ._cosine import TensorOrList, _as_list, _check_pairs

__all__ = ["ParetoCombination", "ParetoRescale", "mmpareto_combine", "mmpareto_weights"]

#: Where MMPareto's magnitude rescaling is measured: per parameter tensor (the official code) or
#: once over the whole encoder (gradmod's option; keeps the combined direction).
ParetoRescale = Literal["tensor", "encoder"]

# The clamped ends of the two-vector min-norm solver the official code uses (MGDA's
# ``_min_norm_element_from2``): weight 0.999 on the multimodal gradient when <g, u> >= <g, g>,
# 0.001 when <g, u> >= <u, u>. With a conflict (<g, u> <= 0) these fire only for a zero gradient.
_HIGH = 0.999
_LOW = 0.001
#: ``rtol`` of the safe policy, in units of the gradients' machine epsilon.
_CANCEL_EPS = 16.0


class ParetoCombination(NamedTuple):
    """The result of :func:`mmpareto_combine` for one encoder.

    Attributes:
        grads: the integrated gradient, one tensor per input tensor (same shapes and dtypes as
            the multimodal gradient; new tensors, the inputs are not modified).
        weights: ``[2]``, float64: :math:`(\\alpha_{mm}, \\alpha_{uni})`, in :math:`[0, 1]`,
            summing to 1; ``(0.5, 0.5)`` when the two gradients do not conflict.
        cosine: 0-d float64, the cosine between the two gradients over the whole encoder (0 when
            either is zero).
        conflict: 0-d bool, whether the min-norm branch was taken (:math:`\\langle g, u\\rangle
            \\le 0`).
        factor: the magnitude factor :math:`\\max(1, r)` applied on top of :math:`\\gamma`,
            float64: shape ``[n]`` (one per tensor) for ``rescale="tensor"``, 0-d for
            ``"encoder"``.
    """

    grads: list[Tensor]
    weights: Tensor
    cosine: Tensor
    conflict: Tensor
    factor: Tensor


def mmpareto_weights(mm_sq: Tensor, dot: Tensor, uni_sq: Tensor) -> Tensor:
    r"""MMPareto's weights of the multimodal and unimodal gradient, from their inner products.

    With :math:`g` the multimodal and :math:`u` the unimodal gradient of one encoder,

    .. math::

        (\alpha_{mm}, \alpha_{uni}) = \begin{cases}
            (\tfrac12, \tfrac12) & \langle g, u\rangle > 0 \text{ (no conflict)}\\
            (c, 1 - c),\ c = \arg\min_{c \in [0, 1]} \lVert c\,g + (1 - c)\,u\rVert & \text{else}
        \end{cases}

    where the min-norm solution is the official two-vector solver's:
    :math:`c = \frac{\langle u, u\rangle - \langle g, u\rangle}{\lVert g - u\rVert^2}`, except
    :math:`c = 0.999` when :math:`\langle g, u\rangle \ge \langle g, g\rangle` and
    :math:`c = 0.001` when :math:`\langle g, u\rangle \ge \langle u, u\rangle` (checked in that
    order). In the conflict branch those two ends are reached only by a zero :math:`g` (then
    0.999) or a zero :math:`u` (then 0.001); elsewhere the denominator is
    :math:`\ge \lVert g\rVert^2 + \lVert u\rVert^2 > 0`.

    Vectorised: the three arguments broadcast together (e.g. shape ``[M]``, one entry per
    modality). Scale-free: multiplying both gradients by :math:`s > 0` (a ``GradScaler``'s scale)
    leaves the weights unchanged.

    Args:
        mm_sq: :math:`\langle g, g\rangle`.
        dot: :math:`\langle g, u\rangle`.
        uni_sq: :math:`\langle u, u\rangle`.

    Returns:
        ``[..., 2]``: :math:`(\alpha_{mm}, \alpha_{uni})` in the promoted floating dtype of the
        inputs. Non-finite inputs give non-finite weights. No host synchronisation.
    """
    gg, gu, uu = torch.broadcast_tensors(mm_sq, dot, uni_sq)
    den = gg + uu - 2.0 * gu
    interior = (uu - gu) / torch.where(den > 0, den, torch.ones_like(den))
    c = torch.where(
        gu > 0,
        torch.full_like(gg, 0.5),
        torch.where(
            gu >= gg,
            torch.full_like(gg, _HIGH),
            torch.where(gu >= uu, torch.full_like(gg, _LOW), interior),
        ),
    )
    # non-finite inputs: every comparison above is False, so c is the interior value; make it NaN
    # whatever the denominator guard produced
    c = torch.where(torch.isfinite(gg + gu + uu), c, torch.full_like(c, math.nan))
    return torch.stack([c, 1.0 - c], dim=-1)


def _acc(x: Tensor) -> Tensor:
    """The tensor in a dtype whose reductions neither overflow nor lose much precision."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _dots(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``[<x_i, y_i>]`` in float64: one ``torch.dot`` per pair (no concatenation). Squared norms
    are taken this way too, not as a rounded norm squared."""
    return torch.stack(
        [torch.dot(_acc(x).reshape(-1), _acc(y).reshape(-1)) for x, y in zip(xs, ys, strict=True)]
    ).to(torch.float64)


def mmpareto_combine(
    multimodal: TensorOrList,
    unimodal: TensorOrList,
    *,
    gamma: float = 1.5,
    rescale: ParetoRescale = "tensor",
    policy: Policy = "safe",
    rtol: float | None = None,
) -> ParetoCombination:
    r"""MMPareto's integrated gradient for one encoder's parameters.

    With :math:`g` the gradient of the multimodal loss and :math:`u` the gradient of the
    encoder's own unimodal loss (lists of tensors paired by position, one per parameter tensor),
    and :math:`(\alpha_{mm}, \alpha_{uni})` from :func:`mmpareto_weights` on the inner products
    over the whole encoder:

    .. math::

        d_i = 2\alpha_{mm}\,g_i + 2\alpha_{uni}\,u_i, \qquad
        r_i = \frac{\lVert g_i + u_i\rVert}{\lVert d_i\rVert}, \qquad
        \text{out}_i = \gamma \max(1, r_i)\, d_i .

    Without a conflict :math:`d = g + u` (the uniform sum) and :math:`r = 1`, so the result is
    :math:`\gamma (g + u)` exactly. With a conflict :math:`d` is twice the min-norm element of
    the segment :math:`[g, u]`, a direction that decreases both losses; its magnitude is raised
    to at least that of the uniform sum :math:`g + u`, then multiplied by :math:`\gamma`.

    Args:
        multimodal: :math:`g`, one tensor or a list of tensors (the encoder's parameter
            gradients of the multimodal loss).
        unimodal: :math:`u`, the same shapes (of the encoder's unimodal loss).
        gamma: :math:`\gamma > 0`, the magnitude factor (official: 1.5, hard-coded).
        rescale: ``"tensor"`` (default, the official code): :math:`r_i` per parameter tensor.
            This raises each tensor to its own magnitude, so the encoder's final direction is no
            longer :math:`d` and, with a conflict, can conflict with :math:`g` or :math:`u`
            (``docs/methods/mmpareto.md`` has an example). ``"encoder"`` (gradmod's option):
            one :math:`r = \lVert g + u\rVert / \lVert d\rVert` over the whole encoder, which
            keeps the direction :math:`d` and its guarantee
            (:math:`\langle \text{out}, g\rangle \ge 0`, :math:`\langle\text{out}, u\rangle\ge 0`).
        policy: ``"safe"`` (default) or ``"official"``; they differ only where :math:`d_i`
            cancels (a Pareto-stationary tensor, e.g. :math:`u = -c\,g` on a one-tensor
            encoder).

            * ``"official"``: the authors' arithmetic. :math:`\lVert d_i\rVert = 0` with
              :math:`g_i + u_i \ne 0` gives :math:`r_i = \infty` and a NaN gradient
              (:math:`\infty \cdot 0`); a :math:`d_i` that is rounding noise is raised to
              magnitude :math:`\lVert g_i + u_i\rVert` in whatever direction the noise has (its
              sign decided by rounding). :math:`0/0` counts as :math:`r_i \le 1`.
            * ``"safe"``: a :math:`d_i` with :math:`\lVert d_i\rVert \le` ``rtol``
              :math:`\cdot (\lVert g_i\rVert + \lVert u_i\rVert)` counts as cancelled and is not
              raised (:math:`\text{out}_i = \gamma d_i`, about 0): never NaN for finite
              inputs (whose inner products do not overflow).
        rtol: the safe policy's cancellation threshold; default ``16 * eps`` of the gradients'
            dtype (rounding noise measured at about ``1 * eps``). With ``rescale="encoder"``
            the norms are the encoder's.

    Returns:
        A :class:`ParetoCombination`. Inner products are taken per tensor (``torch.dot``, in
        float32 for half-precision inputs; no concatenated copy), then summed and combined in
        float64; :math:`d_i` is computed in the gradients' dtype. Besides the result, only one
        temporary of one tensor's size lives at a time (:math:`g_i + u_i`, whose norm is taken
        directly rather than from the inner products, so that it is exactly 0 for
        :math:`u_i = -g_i`). As in the official code, products are formed in the gradients'
        dtype: in float32, entries below about 1e-19 (whose squares underflow) count as zero.
        Non-finite inputs propagate to the result (never an exception). No host
        synchronisation. Positively homogeneous: scaling both inputs by :math:`s > 0` scales the
        result by :math:`s` and leaves the weights unchanged.
    """
    g, u = _as_list(multimodal), _as_list(unimodal)
    _check_pairs(g, u)
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0; got {gamma}")
    if rescale not in ("tensor", "encoder"):
        raise ValueError(f"rescale must be 'tensor' or 'encoder'; got {rescale!r}")
    if policy not in ("safe", "official"):
        raise ValueError(f"policy must be 'safe' or 'official'; got {policy!r}")
    if rtol is None:
        rtol = _CANCEL_EPS * torch.finfo(g[0].dtype).eps
    elif not (math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol must be a finite number >= 0; got {rtol}")

    f64 = torch.float64
    gg, gu, uu = _dots(g, g), _dots(g, u), _dots(u, u)
    sgg, sgu, suu = gg.sum(), gu.sum(), uu.sum()
    weights = mmpareto_weights(sgg, sgu, suu)
    conflict = ~(sgu > 0)
    cosine = sgu / (sgg.sqrt() * suu.sqrt()).clamp_min(torch.finfo(f64).tiny)
    a, b = 2.0 * weights[0], 2.0 * weights[1]

    d = [torch.mul(x, a).to(x.dtype) for x in g]
    for di, y in zip(d, u, strict=True):
        di.addcmul_(y, b)
    nd_sq = _dots(d, d)

    # |g_i + u_i| from the sum itself, not from the inner products: no cancellation error where
    # the sum is small
    s_sq = (
        torch.stack(
            [torch.linalg.vector_norm(_acc(x) + _acc(y)) for x, y in zip(g, u, strict=True)]
        )
        .to(f64)
        .square()
    )
    if rescale == "tensor":
        n_sq, scale_ref = nd_sq, gg.sqrt() + uu.sqrt()
    else:
        s_sq, n_sq, scale_ref = s_sq.sum(), nd_sq.sum(), sgg.sqrt() + suu.sqrt()
    s, nd = s_sq.sqrt(), n_sq.sqrt()
    if policy == "official":
        r = s / nd  # x/0 = inf (then inf * 0 = NaN in the result), 0/0 = NaN (counts as <= 1)
        factor = torch.where(r > 1, r, torch.ones_like(r))
    else:
        cancelled = nd <= rtol * scale_ref
        r = s / torch.where(cancelled, torch.ones_like(nd), nd)
        factor = torch.where(cancelled | ~(r > 1), torch.ones_like(r), r)
    # no conflict: d = g + u, so r = 1 exactly (the computed ratio differs from 1 by rounding)
    factor = torch.where(conflict, factor, torch.ones_like(factor))
    scale = gamma * factor
    for i, di in enumerate(d):
        di.mul_(scale[i] if rescale == "tensor" else scale)
    return ParetoCombination(d, weights, cosine, conflict, factor)
