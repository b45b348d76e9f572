"""AGM: adaptive gradient modulation of mono-modal responses (Li et al., ICCV 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional as GF
from ._base import Binding, Method, Step, StepPlan
from ._heads import global_mean

__all__ = ["AGM"]

#: Official exponent caps by number of modalities (4: gradmod's choice, the 3-modality value).
_CAPS = {2: 10.0, 3: 7.0, 4: 7.0}


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

    Args:
        alpha: :math:`\alpha` (official default 1.0, CREMA-D 1.5).
        cap: bound of the exponent's argument; default 10 for two modalities and 7 for three
            (official) or four (gradmod's choice).

    State (``state_dict``): ``score_sum`` (sum of :math:`s` over the steps so far), ``steps``,
    ``last_coefficients``.
    """

    level = "responses"
    max_modalities = 4
    score_sum: Tensor
    steps: Tensor
    last_coefficients: Tensor

    def __init__(self, *, alpha: float = 1.0, cap: float | None = None) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0; got {alpha}")
        self.alpha = float(alpha)
        self.cap = cap
        self.register_buffer("score_sum", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_coefficients", torch.zeros(0))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, cap={self.cap}"

    def reset(self) -> None:
        self.score_sum = torch.zeros(0, device=self.steps.device)
        self.last_coefficients = torch.zeros(0, device=self.steps.device)
        self.steps.zero_()

    def running_scores(self) -> Tensor:
        """:math:`\bar s`, the mean score over the steps so far (zeros before the first)."""
        return self.score_sum / self.steps.clamp_min(1).to(self.score_sum.dtype)

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        names = binding.names
        m = len(names)
        dtype = torch.float32 if binding.device.type == "mps" else torch.float64
        if self.score_sum.shape != (m,):
            if int(self.steps) > 0:
                raise ValueError(
                    f"this AGM instance holds state for {self.score_sum.numel()} modalities but "
                    f"is used with {m}; call reset() or use a new instance"
                )
            self.score_sum = torch.zeros(m, device=binding.device, dtype=dtype)
        if self.score_sum.device != binding.device:  # e.g. loaded from a CPU checkpoint
            self.score_sum = self.score_sum.to(binding.device)
        like = self.score_sum
        with torch.no_grad():
            per_sample = [
                GF.clipped_nll(step.features[n].detach().to(dtype), step.targets) for n in names
            ]
            scores = global_mean(per_sample, step.reduce, like)
            cap = self.cap if self.cap is not None else _CAPS.get(m, 7.0)
            k = GF.agm_coefficients(
                scores, self.running_scores().to(like.device), alpha=self.alpha, cap=cap
            )
            self.score_sum += scores
            self.steps += 1
            self.last_coefficients = k.clone()
        return StepPlan(k)
