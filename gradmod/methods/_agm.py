"""AGM: adaptive gradient modulation of mono-modal responses (Li et al., ICCV 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as GF
from .._protocol import (
    Binding,
    Method,
    Needs,
    Step,
    StepPlan,
    class_index_problem,
    coefficient_dtype,
    finite_step,
)
from ._args import check_args
from ._heads import global_mean
from ._registry import register

__all__ = ["AGM"]

#: Official exponent caps by number of modalities (4: gradmod's choice, the 3-modality value).
_OFFICIAL_CAPS = {2: 10.0, 3: 7.0, 4: 7.0}
#: gradmod's default bound of the exponent's argument, on both sides.
SAFE_CAP = 1.0


@register(
    "agm",
    presets={"agm-official": (lambda m: AGM(official=True), "AGM with the official rule")},
)
class AGM(Method):
    r"""Adaptive gradient modulation, applied to the gradients of mono-modal responses.

    Compute the responses with :func:`gradmod.functional.shapley_responses` (Shapley values of
    the fused output over modality subsets, missing modalities zeroed), train on their sum (the
    fused output) and hand the responses to the context as ``features``::

        feats = model.features(x)
        phi = gradmod.functional.shapley_responses(model.fuse, feats, module=model.head)
        loss = F.cross_entropy(sum(phi.values()), y)
        with ctx(features=phi, targets=y):
            loss.backward()

    Each step, :math:`s_m` (the mean clipped cross-entropy of :math:`\phi_m`, global under DDP)
    and its running mean :math:`\bar s_m` over all previous steps set
    :math:`k = ` :func:`gradmod.functional.agm_coefficients`, and the gradient flowing into
    :math:`\phi_m` is multiplied by :math:`k_m` (activation level: it reaches the encoders and
    the fusion head). AGM both slows and boosts. 2 to 4 modalities (:math:`2^M - 1` passes).

    **Bounded by default.** The official rule bounds the exponent's argument
    :math:`\bar r_m - r_m` from above only (10 or 7), so a coefficient can reach
    :math:`e^{10\alpha}` (5,221 was seen on a real data set, and the run diverged). gradmod's
    default clamps the argument to :math:`[-1, 1]`: the official rule wherever
    :math:`|\bar r_m - r_m| \le 1`, and :math:`k \in [e^{-\alpha}, e^{\alpha}]` always.

    A step whose scores are not all finite (NaN or infinite responses) is neutral: every factor
    is 1 and the running means stay as they were (counted in ``skipped``).

    Args:
        alpha: :math:`\alpha > 0` (official default 1.0, CREMA-D 1.5).
        cap: bound of the exponent's argument; default 1 on both sides, or with
            ``official=True`` an upper bound of 10 for two modalities and 7 for three (official)
            or four (gradmod's choice).
        official: the official rule for parity: the one-sided cap, and the score of the
            official scripts — :math:`-\log\max(p, 10^{-8})` for two modalities (CREMA-D), the
            plain :math:`-\log p` for three or more (URFunny; computed from ``log_softmax``, so
            it stays finite where the official ``log(softmax)`` underflows to infinity).

    State (``state_dict``): ``score_sum`` (sum of :math:`s` over the steps so far), ``steps``,
    ``last_coefficients``, ``skipped``.
    """

    score_sum: Tensor
    steps: Tensor
    last_coefficients: Tensor
    skipped: Tensor

    def __init__(
        self, *, alpha: float = 1.0, cap: float | None = None, official: bool = False
    ) -> None:
        super().__init__()
        checks = [("alpha", alpha, 0.0, False, None)]
        if cap is not None:
            checks.append(("cap", cap, 0.0, False, None))
        check_args("AGM", checks)
        self.alpha = float(alpha)
        self.cap = None if cap is None else float(cap)
        self.official = bool(official)
        self.register_buffer("score_sum", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, cap={self.cap}, official={self.official}"

    def reset(self) -> None:
        self.score_sum = torch.zeros(0, device=self.steps.device)
        self.last_coefficients = torch.zeros(0, device=self.steps.device)
        self.steps.zero_()
        self.skipped.zero_()

    def needs(self) -> Needs:
        return Needs(
            level="responses",
            modalities=(2, 4),
            per_modality_state=("score_sum", "last_coefficients"),
        )

    def running_scores(self) -> Tensor:
        r""":math:`\bar s`, the mean score over the steps so far (zeros before the first)."""
        return self.score_sum / self.steps.clamp_min(1).to(self.score_sum.dtype)

    def exponent_cap(self, m: int) -> float:
        """The bound of the exponent's argument used with ``m`` modalities."""
        if self.cap is not None:
            return self.cap
        return _OFFICIAL_CAPS.get(m, 7.0) if self.official else SAFE_CAP

    def check(self, binding: Binding) -> list[str]:
        """Coefficients reach ``e^(alpha * cap)``: refused where that leaves float32 and some
        encoder is not float64 (float32 and half gradients are scaled by a float32 copy, and a
        coefficient beyond it would leave the gradient unmodulated)."""
        top = self.alpha * self.exponent_cap(len(binding.names))
        narrow = any(p.dtype != torch.float64 for ps in binding.groups.values() for p in ps)
        if narrow and top > _LOG_F32_MAX:
            return [
                f"AGM: alpha * cap = {top:g} lets a coefficient reach e^{top:g}, beyond float32's "
                "range (the precision float32 gradients are scaled in): keep alpha * cap <= "
                f"{_LOG_F32_MAX:.1f} (cap: the cap= argument, default 1, or the official 10 for "
                "two modalities and 7 for three or four)"
            ]
        return []

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        return class_index_problem("AGM", step.targets, batch)

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        names = binding.names
        m = len(names)
        dtype = coefficient_dtype(binding.device)
        # all state on the scores' device (e.g. after loading a CPU checkpoint): the commit
        # updates it in place with device tensors, without a host sync
        self.size_state(binding, {"score_sum": 0.0})
        like = self.score_sum
        floor = 1e-8 if not self.official or m == 2 else 0.0
        with torch.no_grad():
            per_sample = [
                GF.clipped_nll(step.features[n].detach().to(dtype), step.targets, floor=floor)
                for n in names
            ]
            scores = global_mean(per_sample, step.reduce, like)
            k = GF.agm_coefficients(
                scores,
                self.running_scores().to(like.device),
                alpha=self.alpha,
                cap=self.exponent_cap(m),
                symmetric=not self.official,
            )
            k, ok = finite_step(k, scores)

        def commit() -> None:
            with torch.no_grad():
                self.score_sum += torch.where(ok, scores, torch.zeros_like(scores))
                self.steps += ok.to(self.steps.dtype)
                self.skipped += (~ok).to(self.skipped.dtype)
                self.last_coefficients = k.clone()

        return StepPlan(
            k, commit=commit, scores={"score": scores, "running_score": self.running_scores()}
        )


#: ``e^x`` is finite in float32 up to this.
_LOG_F32_MAX = math.log(torch.finfo(torch.float32).max)
