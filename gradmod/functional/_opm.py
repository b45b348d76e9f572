"""OPM and the revised OGM of the TPAMI 2024 extension of OGM-GE, as pure tensor functions.

Wei, Hu, Du and Wen, "On-the-fly Modulation for Balanced Multimodal Learning", TPAMI 2024
(official code: GeWu-Lab/BML_TPAMI2024). Both rules read the same per-modality scores as OGM-GE
(:math:`s_m = \\sum_i p_{m,i}`, summed true-class probabilities of the unimodal logits read off
the fusion head) and their ratio :math:`\\rho`:

* **OPM** (on-the-fly *prediction* modulation) acts in the forward: the dominant modality's
  features are zeroed for a random subset of the batch before fusion
  (:func:`opm_drop_probability`, :func:`opm_drop`, :func:`opm_feature_scale`).
* **OGM** (on-the-fly *gradient* modulation, the revised form) slows the dominant modality's
  encoder gradient, or, in the code's "plus" variant, boosts the weak one
  (:func:`ogm_tpami_coefficients`).

``docs/methods/opm.md`` gives the official formulas with file:line and a test vector.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._ogm import _one_minus_tanh

__all__ = [
    "OGMVariant",
    "OPMDrop",
    "Rescale",
    "ogm_tpami_coefficients",
    "opm_drop",
    "opm_drop_probability",
    "opm_feature_scale",
]

#: How OPM rescales the features it keeps (see :func:`opm_feature_scale`).
Rescale = Literal["shared", "per_modality", "none"]
#: The revised OGM's two official variants (see :func:`ogm_tpami_coefficients`).
OGMVariant = Literal["slow", "boost"]


def _check_scores(scores: Tensor, who: str) -> None:
    if scores.dim() != 1 or scores.shape[0] < 2:
        raise ValueError(f"{who} needs scores of shape [M] with M >= 2; got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise ValueError(f"{who} needs floating-point scores; got {scores.dtype}")


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ratio(s: Tensor) -> tuple[Tensor, Tensor]:
    """``(rho, dominant)``: rho_m = s_m / mean_{j != m} s_j (zero denominators replaced by the
    dtype's smallest normal number, as in one_vs_others_ratio) and whether rho_m > 1.

    For M = 2, exactly s_m / s_other and the official test rho > 1. For M > 2 the sums of the
    others are taken directly (no cancellation in sum(s) - s_m) and rho must exceed 1 by more than
    a few rounding errors, so that an exact tie is neutral: (3s - s) / 2 is not always s.
    """
    tiny = torch.finfo(s.dtype).tiny
    m = s.shape[0]
    if m == 2:
        other = s.flip(0)
        rho = s / other.clamp_min(tiny)
        # where the other score is 0 the official ratio is inf (the coefficient 0), not s / tiny
        rho = torch.where((other == 0) & (s > 0), torch.inf, rho)
        return rho, s > other
    off_diagonal = ~torch.eye(m, dtype=torch.bool, device=s.device)
    others = torch.where(off_diagonal, s.unsqueeze(0), torch.zeros_like(s)).sum(dim=1) / (m - 1)
    rho = s / others.clamp_min(tiny)
    return rho, rho > 1.0 + 4 * m * torch.finfo(s.dtype).eps


def opm_drop_probability(scores: Tensor, *, q_base: float = 0.5, lam: float = 0.5) -> Tensor:
    r"""OPM's per-modality dropping probabilities :math:`q \in [0, 1]`.

    With the one-vs-others ratio :math:`\rho_m = s_m / \text{mean}_{j\ne m} s_j` (for ``M = 2``
    exactly the official :math:`s_m / s_{\text{other}}`):

    .. math::
        q_m = \begin{cases}
            \min\bigl(1,\ q_{\text{base}}\,(1 + \lambda \tanh(\rho_m - 1))\bigr)
                & \rho_m > 1 \text{ (dominant)} \\
            0 & \text{otherwise.}
        \end{cases}

    Only a dominant modality is ever dropped; at balance (:math:`\rho = 1`) nothing is. The
    probability jumps from 0 to :math:`q_{\text{base}}` as :math:`\rho` crosses 1 (as in the
    official code) and then grows towards :math:`q_{\text{base}}(1 + \lambda)`. The weakest
    modality always has :math:`\rho \le 1`, so it is never dropped and no sample loses every
    modality.

    The official code (``calcu_q``) computes the same in float32 on the host, with a Python
    branch per modality; this function is vectorised and free of host synchronisation, and
    treats what the official arithmetic treats as "no dominance" alike: a NaN ratio (e.g. both
    scores 0) gives :math:`q = 0`; a zero partner score makes the other modality dominant by far
    (:math:`q = \min(1, q_{\text{base}}(1 + \lambda))`). For ``M > 2`` the one-vs-others ratio is
    gradmod's extension (as for OGM-GE); several modalities can then be dominant, and a modality
    counts as dominant only when :math:`\rho_m` exceeds 1 by more than a few rounding errors
    (so that an exact tie is neutral).

    Args:
        scores: :math:`s`, shape ``[M]``, non-negative (summed true-class probabilities, see
            :func:`~gradmod.functional.true_class_probability`). Not differentiated through.
        q_base: :math:`q_{\text{base}} \in [0, 1]` (official default 0.5).
        lam: :math:`\lambda \ge 0` (official default 0.5).

    Returns:
        ``q``, shape ``[M]``, same dtype and device as ``scores``, every entry in ``[0, 1]``
        (detached).
    """
    _check_scores(scores, "opm_drop_probability")
    if not (_finite(q_base) and 0.0 <= q_base <= 1.0):
        raise ValueError(f"q_base must be in [0, 1]; got {q_base}")
    if not (_finite(lam) and lam >= 0.0):
        raise ValueError(f"lam must be a finite number >= 0; got {lam}")
    rho, dominant = _ratio(scores.detach())  # dominant is False for a NaN ratio
    # where rho > 1, relu(rho - 1) = rho - 1; tanh(inf) = 1
    q = q_base * (1.0 + lam * torch.tanh(torch.where(dominant, rho - 1.0, torch.zeros_like(rho))))
    return torch.where(dominant, q, torch.zeros_like(q)).clamp(0.0, 1.0)


def opm_feature_scale(
    drop_prob: Tensor, *, dims: Sequence[int], rescale: Rescale = "shared"
) -> Tensor:
    r"""The factor by which OPM multiplies the features it keeps, per modality, shape ``[M]``.

    * ``"shared"`` (the official code): one factor for every modality,
      :math:`1 / (1 - \theta)` with :math:`\theta = \sum_m d_m q_m / \sum_m d_m` the
      width-weighted mean dropping probability (:math:`d_m` the feature width of modality
      ``m``; official widths 512 and 512, so :math:`\theta = (q_0 + q_1)/2`). In expectation
      the kept features of modality ``m`` are multiplied by :math:`(1 - q_m)/(1 - \theta)`:
      below 1 for the dropped (dominant) modality, above 1 for the others, while evaluation
      (no dropping) uses factor 1: a train/eval difference that the official code has.
    * ``"per_modality"``: inverted dropout per modality, :math:`1 / (1 - q_m)`, so every
      modality's features are unbiased in expectation.
    * ``"none"``: 1.

    A modality dropped with certainty (:math:`q_m = 1`, or :math:`\theta = 1`) has no kept
    features; its factor is set to 1 instead of infinity.

    Args:
        drop_prob: :math:`q`, shape ``[M]``, entries in ``[0, 1]``.
        dims: :math:`d`, the per-sample feature size of each modality (``"shared"`` only).
        rescale: ``"shared"``, ``"per_modality"`` or ``"none"``.

    Returns:
        Shape ``[M]``, dtype and device of ``drop_prob``; finite. No host synchronisation.
    """
    if drop_prob.dim() != 1:
        raise ValueError(f"drop_prob must have shape [M]; got {tuple(drop_prob.shape)}")
    q = torch.nan_to_num(drop_prob.detach(), nan=0.0).clamp(0.0, 1.0)
    one = torch.ones_like(q)
    if rescale == "none":
        return one
    if rescale == "per_modality":
        keep = 1.0 - q
        return torch.where(keep > 0, 1.0 / torch.where(keep > 0, keep, one), one)
    if rescale != "shared":
        raise ValueError(f"rescale must be 'shared', 'per_modality' or 'none'; got {rescale!r}")
    widths = [int(w) for w in dims]
    if len(widths) != q.shape[0] or min(widths, default=0) < 1:
        raise ValueError(
            f"dims must give one positive width per modality ({q.shape[0]}); got {list(dims)}"
        )
    total = sum(widths)  # host numbers: no host-to-device copy per forward
    theta = torch.stack([q[i] * (w / total) for i, w in enumerate(widths)]).sum()
    keep_all = (1.0 - theta) * one
    return torch.where(keep_all > 0, 1.0 / torch.where(keep_all > 0, keep_all, one), one)


class OPMDrop(NamedTuple):
    """What :func:`opm_drop` did to one batch.

    Attributes:
        features: the features to fuse, one per modality, each ``features[m] * keep[m] *
            scale[m]`` (broadcast over the non-batch dimensions); in the autograd graph of the
            inputs, not of the probabilities.
        keep: ``[M, B]`` bool, which samples kept modality ``m`` (all ``True`` when the step
            did not drop).
        executed: 0-d bool, whether this step dropped at all (probability ``p_exe``).
        scale: ``[M]``, the factor applied to the kept features (1 when not executed).
    """

    features: list[Tensor]
    keep: Tensor
    executed: Tensor
    scale: Tensor


def opm_drop(
    features: Sequence[Tensor],
    drop_prob: Tensor,
    *,
    generator: torch.Generator | None = None,
    p_exe: float = 1.0,
    execute_generator: torch.Generator | None = None,
    rescale: Rescale = "shared",
    dims: Sequence[int] | None = None,
) -> OPMDrop:
    r"""OPM's feature dropping: zero modality ``m``'s features of each sample with probability
    :math:`q_m`, on a step drawn with probability ``p_exe``, and rescale what is kept.

    For a batch of ``B`` samples:

    1. ``keep[m, i] ~ Bernoulli(1 - q_m)``, independently per sample and modality, drawn from
       ``generator`` (``torch.bernoulli`` over the float32 keep probabilities, sample-major:
       on the CPU, a generator seeded ``s`` gives exactly the masks of the official
       ``torch.distributions.Bernoulli(1 - q).sample([B, 1])`` after ``torch.manual_seed(s)``).
    2. ``executed = u >= 1 - p_exe`` with ``u ~ U[0, 1)`` drawn *after* the masks from
       ``execute_generator`` (default: ``generator``); the official code draws ``u`` from
       NumPy's global generator. When not executed, the features pass unchanged.
    3. ``out[m] = features[m] * keep[m] * scale[m]`` with ``scale`` =
       :func:`opm_feature_scale` (``dims`` default: each feature's per-sample size).

    The number of random draws does not depend on the outcome (``B·M`` masks and one ``u`` per
    call), so the result is a pure function of the inputs and the generators' states:
    deterministic for a given seed, and identical on every DDP rank whose generators are seeded
    alike (same device type). Seed ``generator`` per rank and ``execute_generator`` alike on
    every rank to get independent masks with one shared decision. The probabilities are treated
    as constants: no gradient reaches ``drop_prob`` (the official ``custom_autograd`` sends one
    through :math:`\theta` into the scores, see ``docs/methods/opm.md``). The gradient reaching
    ``features[m]`` is the incoming one times ``keep[m] * scale[m]``. Samples are never removed
    (the official code removes those that lost every modality, which its rule never produces;
    ``keep`` tells them apart should another rule produce some).

    Call it in training only (the official evaluation never drops), on the features that feed
    the fusion head, after the scores are taken from the undropped features.

    Args:
        features: one ``[B, ...]`` tensor per modality, same ``B`` and device.
        drop_prob: :math:`q`, shape ``[M]`` (:func:`opm_drop_probability`), on the features'
            device; NaN counts as 0, values are clamped to ``[0, 1]``.
        generator: draws the masks (and ``u`` unless ``execute_generator`` is given); on the
            features' device. ``None``: the device's default generator.
        p_exe: probability that a step drops at all (official default 0.7).
        execute_generator: draws ``u``; on the features' device.
        rescale: see :func:`opm_feature_scale` (``"shared"``: the official code).
        dims: per-sample feature sizes for ``"shared"`` (official: the configured widths).

    Returns:
        :class:`OPMDrop`. No host synchronisation.
    """
    feats = list(features)
    m = len(feats)
    if m < 1 or drop_prob.shape != (m,):
        raise ValueError(
            f"opm_drop needs one dropping probability per feature tensor; got {m} features and "
            f"drop_prob of shape {tuple(drop_prob.shape)}"
        )
    if any(f.dim() < 1 for f in feats) or len({f.shape[0] for f in feats}) != 1:
        raise ValueError(
            "opm_drop needs features [B, ...] with the same batch size B; got shapes "
            f"{[tuple(f.shape) for f in feats]}"
        )
    if not (_finite(p_exe) and 0.0 <= p_exe <= 1.0):
        raise ValueError(f"p_exe must be in [0, 1]; got {p_exe}")
    device = feats[0].device
    if any(f.device != device for f in feats):
        raise ValueError(
            f"opm_drop needs all features on one device; got {[f.device for f in feats]}"
        )
    for name, gen in (("generator", generator), ("execute_generator", execute_generator)):
        if gen is not None and gen.device.type != device.type:
            raise ValueError(
                f"opm_drop: {name} is on {gen.device} but the features are on {device}: draw on "
                "the features' device (a generator elsewhere would need a copy, a host sync)"
            )
    b = int(feats[0].shape[0])
    q = torch.nan_to_num(drop_prob.detach().to(device), nan=0.0).clamp(0.0, 1.0)
    keep_prob = (1.0 - q).to(torch.float32)
    draws = torch.bernoulli(keep_prob.unsqueeze(0).expand(b, m), generator=generator)  # [B, M]
    u_dtype = torch.float32 if device.type == "mps" else torch.float64
    u_gen = execute_generator if execute_generator is not None else generator
    u = torch.rand((), generator=u_gen, device=device, dtype=u_dtype)
    executed = u >= 1.0 - p_exe
    keep = (draws.T > 0) | ~executed
    if dims is None:
        dims = [math.prod(f.shape[1:]) for f in feats]
    scale = opm_feature_scale(q, dims=dims, rescale=rescale)
    scale = torch.where(executed, scale, torch.ones_like(scale))
    out = []
    for i, f in enumerate(feats):
        factor = keep[i].to(scale.dtype) * scale[i]
        out.append(f * factor.to(f.dtype).view(b, *([1] * (f.dim() - 1))))
    return OPMDrop(out, keep, executed, scale)


def ogm_tpami_coefficients(
    scores: Tensor, *, alpha: float = 1.0, variant: OGMVariant = "slow", boost: float = 4.0
) -> Tensor:
    r"""The revised OGM's per-modality factors (the TPAMI 2024 code's ``--use_modulation``).

    With :math:`\rho_m = s_m / \text{mean}_{j\ne m} s_j`:

    * ``variant="slow"`` (the official default, ``train_ogm.sh``): the dominant modality gets
      :math:`k = 1 - \tanh(\alpha\rho)`, the others 1 — the same rule as
      :func:`~gradmod.functional.ogm_ge_coefficients` (``form="official"``), except the
      tie-break: for ``M = 2`` an exact tie slows modality **1** here (the TPAMI code tests
      :math:`s_0 / s_1 > 1` first), modality 0 in the CVPR code.
    * ``variant="boost"`` (the official ``--use_OGM_plus``): the dominant modality keeps 1 and
      the other gets the constant ``boost`` (official 4; a ``1 + tanh`` form is commented out
      in the official code); an exact tie boosts modality 0.

    For ``M > 2`` (gradmod's extension): ``"slow"`` slows every modality with
    :math:`\rho_m > 1`, ``"boost"`` boosts every modality with :math:`\rho_m < 1`; an exact
    tie is neutral (:math:`\rho` must clear 1 by more than a few rounding errors).

    :math:`1 - \tanh(x)` is computed as :math:`2\sigma(-2x)`: positive where the official
    float32 arithmetic rounds it to exactly 0 (:math:`\alpha\rho \gtrsim 9`, a frozen encoder).

    Args:
        scores: :math:`s`, shape ``[M]``, non-negative.
        alpha: :math:`\alpha > 0` (official default 1.0; ``train_ogm.sh`` 0.8).
        variant: ``"slow"`` or ``"boost"``.
        boost: the weak modality's factor in ``"boost"`` (> 0).

    Returns:
        ``k``, shape ``[M]``, same dtype and device as ``scores``. No host synchronisation.
    """
    _check_scores(scores, "ogm_tpami_coefficients")
    if not (_finite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0; got {alpha}")
    if not (_finite(boost) and boost > 0):
        raise ValueError(f"boost must be a finite number > 0; got {boost}")
    s = scores.detach()
    rho, dominant = _ratio(s)
    one = torch.ones_like(rho)
    if s.shape[0] == 2:
        # the official test s_0 / s_1 > 1 slows modality 0; otherwise ("else") modality 1
        dominant = torch.stack([dominant[0], ~dominant[0]])
    if variant == "slow":
        return torch.where(dominant, _one_minus_tanh(alpha * rho), one)
    if variant != "boost":
        raise ValueError(f"variant must be 'slow' or 'boost'; got {variant!r}")
    weak = ~dominant if s.shape[0] == 2 else rho < 1.0 - 4 * s.shape[0] * torch.finfo(s.dtype).eps
    return torch.where(weak, torch.full_like(rho, boost), one)
