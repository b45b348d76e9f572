r"""InfoReg's information-acquisition regulation (Huang et al., CVPR 2025), as pure tensor functions.

InfoReg slows the *prime* modality (the one whose unimodal predictions are currently best) while
training is in its "prime learning window", by a proximal pull of that modality's encoder toward
its weights at the start of the epoch. Four pieces, each a function here:

* :func:`fisher_trace` — one step's contribution to each encoder's "information amount" (the
  official diagonal-Fisher trace: squared gradients, averaged per weight tensor, summed);
* :func:`acquisition_rate` — the information acquisition rate from the per-epoch traces (a
  10-epoch moving-sum growth rate), which opens and closes the window;
* :func:`inforeg_beta` — the per-modality regulation strength :math:`\beta_m` from the scores and
  the rate (0 for every modality that is not regulated);
* :func:`proximal_gradient` / :func:`proximal_penalty` — the regulation itself,
  :math:`\beta_m (\theta - \tilde\theta)`, the gradient of
  :math:`\tfrac{\beta_m}{2}\lVert\theta - \tilde\theta\rVert^2`.

The formulas, with the official file:line, are in ``docs/methods/inforeg.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from ._cggm import Policy

__all__ = [
    "Versus",
    "acquisition_rate",
    "fisher_trace",
    "inforeg_beta",
    "proximal_gradient",
    "proximal_penalty",
]

#: What the prime modality's score is compared with: the best other modality (``"runner_up"``)
#: or the mean of the others (``"mean"``). Both are the official ``s_a - s_v`` for ``M = 2``.
Versus = Literal["runner_up", "mean"]


def fisher_trace(
    groups: Sequence[Sequence[Tensor]], *, dtype: torch.dtype = torch.float64
) -> Tensor:
    r"""One step's diagonal-Fisher trace of each encoder, :math:`\sum_W \operatorname{mean}(g_W^2)`.

    For encoder ``m`` with weight tensors :math:`W` (the official code takes the ``weight`` of
    every ``Conv2d`` and ``Linear`` module of the encoder: no biases, no normalisation layers)
    and their current gradients :math:`g_W`,

    .. math:: F_m = \sum_W \frac{1}{|W|} \sum_i g_{W,i}^2 .

    Summed over the steps of an epoch, this is the official per-epoch "FIM trace" of the
    encoder: the official code accumulates :math:`g_W \odot g_W` elementwise over the epoch and
    then takes each tensor's mean, and the mean is linear. Accumulating this ``[M]`` statistic
    instead needs no per-parameter buffers.

    Args:
        groups: one sequence of gradient tensors per modality (an empty group gives 0; so does
            an empty tensor). Read only, never modified.
        dtype: dtype of the result (default float64). Each tensor's sum of squares is taken in
            its own dtype, or float32 for float16 / bfloat16 gradients, then cast.

    Returns:
        ``[M]`` tensor of ``dtype``, on the device of the first gradient (CPU when there is
        none). No host synchronisation. Gradients of a ``GradScaler``-scaled loss must be
        unscaled first (or the result divided by the squared scale).
    """
    device = next((g.device for grads in groups for g in grads), torch.device("cpu"))
    out = []
    for grads in groups:
        terms = []
        for g in grads:
            if g.numel() == 0:
                continue
            x = g.detach().reshape(-1)
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            terms.append((torch.dot(x, x) / x.numel()).to(device=device, dtype=dtype))
        out.append(
            torch.stack(terms).sum() if terms else torch.zeros((), dtype=dtype, device=device)
        )
    if not out:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.stack(out)


def acquisition_rate(history: Tensor, *, window: int = 10, policy: Policy = "safe") -> Tensor:
    r"""InfoReg's information acquisition rate :math:`k` at the start of epoch :math:`e`.

    ``history`` holds the per-epoch traces :math:`T_0, \dots, T_{e-1}` of the epochs completed so
    far (oldest first; see :func:`fisher_trace`). With epochs before 0 counting as
    :math:`T = 0` (the official list starts with ten zeros) and :math:`w` = ``window``:

    .. math::

        k = \frac{\bar T_{\text{now}} - \bar T_{\text{before}}}{\bar T_{\text{now}}}
          = \frac{T_{e-1} - T_{e-1-w}}{\sum_{j=e-w}^{e-1} T_j},

    the relative growth of the ``w``-epoch moving average of the trace from one epoch to the
    next; :math:`k = 1` at epoch 0 (empty history). The prime learning window is open while
    :math:`k` exceeds a threshold (official 0.05). With a constant trace :math:`k = 1/e` for
    :math:`e \le w`, so the window stays open for at least the first ``w`` epochs unless the
    trace falls.

    Args:
        history: ``[E]`` or ``[E, M]`` (one column per modality) per-epoch traces, ``E >= 0``;
            only the last ``window + 1`` epochs matter.
        window: :math:`w \ge 1` (official 10).
        policy: ``"safe"`` (default) or ``"official"``.

            * ``"official"``: the authors' arithmetic (both sums divided by ``window``, then the
              ratio). A zero denominator (no gradient in the last ``w`` epochs) gives ``nan``
              or ``±inf`` here; the official Python floats raise ``ZeroDivisionError``.
            * ``"safe"``: non-finite or negative traces count as 0, and a window with no
              information (:math:`\sum T \le 0`, or sums that overflow) gives :math:`k = 0`
              (window closed). Always finite and :math:`\le 1`; otherwise equal to
              ``"official"`` (up to rounding).

    Returns:
        ``k``: 0-d for ``[E]`` history, ``[M]`` for ``[E, M]``; same dtype and device as
        ``history``. No host synchronisation.
    """
    if history.dim() not in (1, 2):
        raise ValueError(
            f"history must be [E] or [E, M] (per-epoch traces); got {tuple(history.shape)}"
        )
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1; got {window!r}")
    if policy not in ("safe", "official"):
        raise ValueError(f"policy must be 'safe' or 'official'; got {policy!r}")
    if history.shape[0] == 0:
        return history.new_ones(history.shape[1:])
    h = history[-(window + 1) :]
    if policy == "safe":
        h = torch.nan_to_num(h, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    pad = window + 1 - h.shape[0]
    if pad > 0:  # the epochs before 0 count as T = 0
        h = torch.cat([h.new_zeros((pad, *h.shape[1:])), h])
    now = h[1:].sum(0) / window
    before = h[:-1].sum(0) / window
    if policy == "official":
        return (now - before) / now
    informative = now > 0
    k = torch.where(informative, (now - before) / torch.where(informative, now, 1.0), 0.0)
    return torch.where(torch.isfinite(k), k, 0.0)  # sums that overflow count as no information


def inforeg_beta(
    scores: Tensor,
    rate: Tensor | float,
    *,
    strength: Tensor | float,
    threshold: float = 0.05,
    versus: Versus = "runner_up",
) -> Tensor:
    r"""InfoReg's regulation strength :math:`\beta_m` per modality (0 = not regulated).

    With the scores :math:`s_m` (official: summed true-class probabilities of modality ``m``'s
    unimodal logits over the batch), the gap :math:`\delta_m = s_m - \max_{j \ne m} s_j`
    (``versus="runner_up"``) or :math:`s_m - \operatorname{mean}_{j \ne m} s_j`
    (``versus="mean"``), and the acquisition rate :math:`k` (:func:`acquisition_rate`):

    .. math::

        \beta_m = \begin{cases}
            \lambda_m \, e^{\tanh \delta_m} & \delta_m > 0 \text{ and } k > \tau \\
            0 & \text{otherwise}
        \end{cases}

    so :math:`\beta_m \in [\lambda_m, e\lambda_m]` for a regulated modality (the upper end once
    :math:`\tanh` saturates in floating point). With ``"runner_up"`` at most one modality (the
    strict leader) is regulated and an exact tie regulates none, as in the official two-modality
    code; ``"mean"`` regulates every modality ahead of the mean of the others. The gaps are taken
    pairwise (:math:`\delta_m` is the min, or the mean, of :math:`s_m - s_j` over
    :math:`j \ne m`), so for ``M = 2`` both are bit for bit the official ``s_a - s_v`` and tied
    scores give exactly 0. ``M > 2`` is gradmod's extension. Non-finite scores or rate regulate
    nothing, except a score of ``+inf`` ahead of finite ones (:math:`\beta = e\lambda`), as in
    the official code.

    Args:
        scores: :math:`s`, shape ``[M]``, ``M >= 2``.
        rate: :math:`k`: one rate for every modality (0-d or a float; the official code uses
            the first modality's, audio's, for both) or one per modality (``[M]``).
        strength: :math:`\lambda \ge 0`: one value, or ``[M]`` (official
            ``[0.95, 0.1]`` for ``[audio, visual]``).
        threshold: :math:`\tau` (official 0.05; 0.04 in the March 2025 upload).
        versus: ``"runner_up"`` (default) or ``"mean"``.

    Returns:
        :math:`\beta`, shape ``[M]``, same dtype and device as ``scores``. No host
        synchronisation; differentiable in ``scores`` where :math:`\beta > 0`.
    """
    if scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(
            f"InfoReg needs scores of shape [M] with M >= 2; got {tuple(scores.shape)}"
        )
    if versus not in ("runner_up", "mean"):
        raise ValueError(f"versus must be 'runner_up' or 'mean'; got {versus!r}")
    if isinstance(strength, (int, float)) and not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be a finite number >= 0; got {strength!r}")
    m = scores.shape[0]
    # pairwise gaps s_m - s_j (row m), the diagonal masked: the official s_a - s_v exactly for
    # M = 2, and exact zeros for tied scores at any M (no (sum - s) cancellation)
    eye = torch.eye(m, dtype=torch.bool, device=scores.device)
    pairwise = scores.unsqueeze(1) - scores.unsqueeze(0)
    if versus == "runner_up":
        gap = pairwise.masked_fill(eye, math.inf).amin(dim=1)
    else:
        gap = pairwise.masked_fill(eye, 0.0).sum(dim=1) / (m - 1)
    lam = torch.as_tensor(strength, dtype=scores.dtype, device=scores.device)
    k = torch.as_tensor(rate, dtype=scores.dtype, device=scores.device)
    if k.dim() > 1 or (k.dim() == 1 and k.shape[0] != m) or lam.dim() > 1:
        raise ValueError(
            f"rate and strength must be scalars or [M] = [{m}]; got {tuple(k.shape)} and "
            f"{tuple(lam.shape)}"
        )
    active = (gap > 0) & (k > threshold)
    safe_gap = torch.where(active, gap, torch.zeros_like(gap))  # no nan/inf off the branch
    return torch.where(active, lam * torch.exp(torch.tanh(safe_gap)), torch.zeros_like(gap))


def _check_pairs(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> None:
    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    for i, (p, a) in enumerate(zip(params, anchors, strict=True)):
        if p.shape != a.shape:
            raise ValueError(
                f"parameter {i} has shape {tuple(p.shape)} but its anchor {tuple(a.shape)}"
            )


def proximal_gradient(
    params: Sequence[Tensor], anchors: Sequence[Tensor], beta: Tensor | float
) -> list[Tensor]:
    r"""The regulation gradient :math:`\beta (\theta - \tilde\theta)` for every tensor.

    The gradient of :func:`proximal_penalty` with :math:`\beta` held constant: what the
    official code adds to each ``.grad`` of the regulated encoder after backward and before the
    optimizer step, with :math:`\tilde\theta` the weights at the start of the epoch.

    Args:
        params: the current tensors :math:`\theta` (read, detached).
        anchors: :math:`\tilde\theta`, one per parameter, same shapes.
        beta: :math:`\beta` (0-d tensor or float; see :func:`inforeg_beta`). A 0-d float64
            tensor keeps each parameter's dtype (0-d tensors do not promote).

    Returns:
        New tensors, one per parameter, in the parameter's dtype and device (zeros where
        :math:`\beta = 0`). No host synchronisation.
    """
    _check_pairs(params, anchors)
    if isinstance(beta, Tensor) and beta.dim() != 0:
        raise ValueError(f"beta must be 0-d; got shape {tuple(beta.shape)}")
    if not params:
        return []
    with torch.no_grad():
        diffs = torch._foreach_sub([p.detach() for p in params], list(anchors))
        if isinstance(beta, Tensor):
            return [d.mul_(beta.detach().to(d.device)) for d in diffs]
        torch._foreach_mul_(diffs, float(beta))
        return list(diffs)


def proximal_penalty(
    params: Sequence[Tensor], anchors: Sequence[Tensor], beta: Tensor | float
) -> Tensor:
    r""":math:`\tfrac{\beta}{2} \sum_W \lVert W - \tilde W \rVert_2^2`, differentiable in ``params``.

    Adding it to the loss gives the same parameter gradient as :func:`proximal_gradient` (when
    ``beta`` does not require grad). The official code adds the gradient directly; its
    ``calculate_proximal_term`` helpers, which compute an unsquared norm of the first tensor
    only, are never called.

    Returns:
        0-d tensor on the first parameter's device, in the promoted dtype of ``beta`` and the
        squared norms (float64 for a 0-d float64 ``beta``); 0 for no parameters.
    """
    _check_pairs(params, anchors)
    if not params:
        return beta.new_zeros(()) if isinstance(beta, Tensor) else torch.zeros(())
    dev = params[0].device
    sq = torch.stack(
        [(p - a).pow(2).sum().to(dev) for p, a in zip(params, anchors, strict=True)]
    ).sum()
    return 0.5 * (beta.to(dev) if isinstance(beta, Tensor) else beta) * sq
