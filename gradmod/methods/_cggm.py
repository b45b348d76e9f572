"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as GF
from ._base import Binding, Method, Step, StepPlan
from ._direction import check_direction, direction_injection
from ._heads import global_mean, run_heads

__all__ = ["CGGM"]

Metric = Callable[[Tensor, Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred.reshape(target.shape), target.to(pred.dtype))


class CGGM(Method):
    r"""Classifier-guided gradient modulation.

    Every step, each modality's unimodal classifier reads the **detached** output of its
    encoder; its metric :math:`\varepsilon_m` (batch accuracy, or sign accuracy for regression)
    is compared with the previous step's, and the improvements set the encoder factors
    :math:`\rho B_m` (:func:`gradmod.functional.improvement_rate_scale`). The classifiers' own
    loss is back-propagated into their parameters (never into the encoders), so the user's
    optimizer, or a separate one, trains them. With a fusion tensor configured and
    ``lam > 0``, the gradient of :math:`\lambda L_{gm}`
    (:func:`gradmod.functional.cosine_direction_loss`, with :math:`u` the fusion head's last
    weight matrix and :math:`v_m` classifier ``m``'s last weight matrix, :math:`B` constant) is
    added to the fusion weight's gradient during the same backward: the user's loss is not
    edited.

    Args:
        rho: global factor :math:`\rho` (official default 1.3).
        lam: weight :math:`\lambda` of the direction loss (official default 0.2; 0 disables it).
        task: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (L1 loss,
            sign accuracy of ``pred > 0`` vs ``target > 0``, as in the official code).
        metric: optional ``metric(outputs, targets)`` returning per-sample scores ``[B]`` (exact
            global value under DDP) or a 0-d batch score (averaged over ranks).
        loss_fn: optional ``loss_fn(outputs, targets)`` that trains the classifiers.
        official: ``False`` (default) is gradmod's safe variant: improvements below zero count
            as zero and a step with no improvement gives every modality :math:`(M-1)/M`, so no
            factor is ever negative, exploding or non-finite; the direction loss uses this
            step's :math:`B`. ``True`` reproduces the official step semantics for parity: the
            ``1e-8``-guarded division (:math:`|B| \approx 10^7` when :math:`\sum\Delta = 0`,
            negative factors possible) and the direction loss of the previous step's :math:`B`
            applied one step late (none at the first step).
        zero_tol: :math:`\sum \Delta^+` at or below this counts as "no improvement" (safe only).

    State (``state_dict``): ``previous`` metric per modality (starts at 0, carries across
    epochs), ``last_b`` (:math:`B` of the last step), ``last_coefficients`` and ``steps``.
    """

    classifier_use = "required"
    trains_classifiers = True
    previous: Tensor
    last_b: Tensor
    last_coefficients: Tensor
    steps: Tensor

    def __init__(
        self,
        *,
        rho: float = 1.3,
        lam: float = 0.2,
        task: Literal["classification", "regression"] = "classification",
        metric: Metric | None = None,
        loss_fn: Loss | None = None,
        official: bool = False,
        zero_tol: float = 1e-6,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression'; got {task!r}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        self.rho = float(rho)
        self.lam = float(lam)
        self.task = task
        self.official = bool(official)
        self.zero_tol = float(zero_tol)
        self.metric: Metric = metric or (
            GF.correct if task == "classification" else GF.sign_correct
        )
        self.loss_fn: Loss = loss_fn or (F.cross_entropy if task == "classification" else _l1)
        self.register_buffer("previous", torch.zeros(0))
        self.register_buffer("last_b", torch.zeros(0))
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"rho={self.rho}, lam={self.lam}, task={self.task!r}, official={self.official}"

    def reset(self) -> None:
        for name in ("previous", "last_b", "last_coefficients"):
            setattr(self, name, torch.zeros(0, device=self.steps.device))
        self.steps.zero_()

    def check(self, binding: Binding) -> list[str]:
        if self.lam == 0 or binding.fusion is None:
            return []
        return check_direction(binding, "CGGM")

    def _ensure_state(self, m: int, device: torch.device) -> None:
        if self.previous.shape == (m,):
            if self.previous.device != device:
                self.to(device)
            return
        if self.previous.numel() and int(self.steps) > 0:
            raise ValueError(
                f"this CGGM instance holds state for {self.previous.numel()} modalities but is "
                f"used with {m}; call reset() or use a new instance"
            )
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.previous = torch.zeros(m, device=device, dtype=dtype)
        self.last_b = torch.full((m,), (m - 1) / m, device=device, dtype=dtype)
        self.last_coefficients = torch.ones(m, device=device, dtype=dtype)
        self.steps = self.steps.to(device)

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        assert binding.classifiers is not None
        names = binding.names
        self._ensure_state(len(names), binding.device)
        heads = [binding.classifiers[n] for n in names]
        run = run_heads(
            heads, [step.features[n] for n in names], step.targets, self.loss_fn, input_grads=False
        )
        accumulate = [pair for pairs in run.param_grads for pair in pairs]

        with torch.no_grad():
            scores = [self.metric(out, step.targets) for out in run.outputs]
            metric = global_mean(scores, step.reduce, self.previous)
            policy: GF.Policy = "official" if self.official else "safe"
            b = GF.improvement_rate_scale(
                self.previous, metric, rho=1.0, policy=policy, zero_tol=self.zero_tol
            )
            coefficients = self.rho * b

        inject = []
        if binding.fusion is not None and self.lam > 0:
            # Official: the previous step's B, one step late (a zero loss at the first step).
            b_dir = self.last_b * (self.steps > 0) if self.official else b
            inject.append(direction_injection(binding, b_dir, self.lam))

        with torch.no_grad():
            self.previous.copy_(metric)
            self.last_b.copy_(b)
            self.last_coefficients.copy_(coefficients)
            self.steps += 1
        return StepPlan(coefficients, accumulate, inject)
