"""CGGM: classifier-guided gradient modulation (Guo et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import functional as GF
from .._protocol import (
    Binding,
    Injection,
    Method,
    Needs,
    Step,
    StepPlan,
    class_index_problem,
    finite_step,
)
from ._args import check_args
from ._direction import WHAT, check_direction, direction_gradient, head_matrices
from ._heads import global_mean, run_heads
from ._registry import register

__all__ = ["CGGM"]

Metric = Callable[[Tensor, Tensor], Tensor]
Loss = Callable[[Tensor, Tensor], Tensor]


def _l1(pred: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(pred.reshape(target.shape), target.to(pred.dtype))


@register(
    "cggm",
    presets={"cggm-official": (lambda m: CGGM(official=True), "CGGM with the official arithmetic")},
)
class CGGM(Method):
    r"""Classifier-guided gradient modulation.

    Every step, each modality's unimodal classifier reads the **detached** output of its
    encoder; its metric :math:`\varepsilon_m` (batch accuracy, or sign accuracy for regression)
    is compared with the previous step's, and the improvements set the encoder factors
    :math:`\rho B_m` (:func:`gradmod.functional.improvement_rate_scale`). The classifiers' own
    loss is back-propagated into their parameters (never into the encoders), so the user's
    optimizer, or a separate one, trains them. With ``lam > 0`` (the default), the gradient of
    :math:`\lambda L_{gm}` (:func:`gradmod.functional.cosine_direction_loss`, with :math:`u` the
    fusion head's last weight matrix and :math:`v_m` classifier ``m``'s last weight matrix,
    :math:`B` constant) is added to the fusion weight's gradient during the same backward: the
    user's loss is not edited. It needs ``fusion=`` on the context; ``lam=0`` turns it off.

    A step whose metrics are not all finite (a user metric that returned NaN) is neutral: every
    factor is 1, it adds no direction loss, and the state stays as it was (counted in
    ``skipped``).

    Args:
        rho: global factor :math:`\rho \ge 0` (official default 1.3).
        lam: weight :math:`\lambda \ge 0` of the direction loss (official default 0.2; 0
            disables it).
        task: ``"classification"`` (cross-entropy, accuracy; targets are class indices ``[B]``)
            or ``"regression"`` (L1 loss, sign accuracy of ``pred > 0`` vs ``target > 0``, as in
            the official code).
        metric: optional ``metric(outputs, targets)`` returning per-sample scores ``[B]`` (exact
            global value under DDP) or a 0-d batch score (averaged over ranks).
        loss_fn: optional ``loss_fn(outputs, targets)`` that trains the classifiers.
        official: ``False`` (default) is gradmod's safe variant: improvements below zero count
            as zero and a step with no improvement gives every modality :math:`(M-1)/M`, so no
            factor is ever negative, exploding or non-finite; the direction loss uses this
            step's :math:`B` and weights. ``True`` reproduces the official step semantics for
            parity: :math:`S = \sum\Delta + 10^{-8}`, :math:`B = (S - \Delta)/S` (every factor
            :math:`\rho` when no metric changed, :math:`|B| \approx 10^7|\Delta|` when the
            improvements cancel out, negative factors possible), and the direction loss built at
            step :math:`t` (from step :math:`t`'s :math:`B` and weights) back-propagated at step
            :math:`t+1`: its gradient is taken at the previous step's fusion and classifier
            weights, and there is none at the first step.
        zero_tol: :math:`\sum \Delta^+` at or below this counts as "no improvement" (safe only).

    State (``state_dict``): ``previous`` metric per modality (starts at 0, carries across
    epochs), ``last_b`` (:math:`B` of the last step), ``last_coefficients``, ``steps``,
    ``skipped``, and with ``official=True`` the direction loss waiting for the next step
    (``direction_b``, ``direction_fusion``, ``direction_heads``: that step's :math:`B` and
    weights).
    """

    previous: Tensor
    last_b: Tensor
    last_coefficients: Tensor
    steps: Tensor
    skipped: Tensor
    direction_b: Tensor
    direction_fusion: Tensor
    direction_heads: Tensor

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
        bad_task = (
            []
            if task in ("classification", "regression")
            else [f"CGGM: task must be 'classification' or 'regression'; got {task!r}"]
        )
        check_args(
            "CGGM",
            [
                ("rho", rho, 0.0, True, None),
                ("lam", lam, 0.0, True, None),
                ("zero_tol", zero_tol, 0.0, True, None),
            ],
            bad_task,
        )
        self.rho = float(rho)
        self.lam = float(lam)
        self.task = task
        self.official = bool(official)
        self.zero_tol = float(zero_tol)
        self._default_metric = metric is None
        self.metric: Metric = metric or (
            GF.correct if task == "classification" else GF.sign_correct
        )
        self.loss_fn: Loss = loss_fn or (F.cross_entropy if task == "classification" else _l1)
        self.register_buffer("previous", torch.zeros(0))
        self.register_buffer("last_b", torch.zeros(0))
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self.register_buffer("direction_b", torch.zeros(0))
        self.register_buffer("direction_fusion", torch.zeros(0))
        self.register_buffer("direction_heads", torch.zeros(0))

    def needs(self) -> Needs:
        return Needs(
            classifiers="required",
            trains_classifiers=True,
            per_modality_state=(
                "previous",
                "last_b",
                "last_coefficients",
                "direction_b",
                "direction_heads",
            ),
            fusion="changes" if self.lam > 0 else "unused",
        )

    def extra_repr(self) -> str:
        return f"rho={self.rho}, lam={self.lam}, task={self.task!r}, official={self.official}"

    def reset(self) -> None:
        for name in (
            "previous",
            "last_b",
            "last_coefficients",
            "direction_b",
            "direction_fusion",
            "direction_heads",
        ):
            setattr(self, name, torch.zeros(0, device=self.steps.device))
        self.steps.zero_()
        self.skipped.zero_()

    def check(self, binding: Binding) -> list[str]:
        return check_direction(binding, "CGGM", "lam") if self.lam > 0 else []

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        if self.task == "classification" and self._default_metric:
            first = next(iter(step.features.values()), None)
            batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
            return class_index_problem("CGGM", step.targets, batch)
        return []

    def _stale_direction(self) -> bool:
        return self.official and self.lam > 0

    def _ensure_state(self, binding: Binding) -> None:
        m = len(binding.names)
        self.size_state(binding, {"previous": 0.0, "last_b": (m - 1) / m, "last_coefficients": 1.0})

    def _ensure_direction_state(self, binding: Binding) -> None:
        """The official direction loss's snapshot, before the first step: zero weights (no loss
        at the first step) at the current fusion and classifier weights (finite cosines)."""
        assert binding.fusion is not None
        u = binding.fusion
        m = len(binding.names)
        if self.direction_fusion.shape == u.shape and self.direction_b.shape == (m,):
            if self.direction_fusion.device != u.device:
                self.direction_fusion = self.direction_fusion.to(u.device)
                self.direction_heads = self.direction_heads.to(u.device)
                self.direction_b = self.direction_b.to(u.device)
            return
        self.direction_b = torch.zeros(m, device=u.device, dtype=self.previous.dtype)
        self.direction_fusion = u.detach().clone()
        self.direction_heads = torch.stack([v.detach().to(u.dtype) for v in head_matrices(binding)])

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        assert binding.classifiers is not None
        names = binding.names
        self._ensure_state(binding)
        heads = [binding.classifiers[n] for n in names]
        run = run_heads(
            heads, [step.features[n] for n in names], step.targets, self.loss_fn, input_grads=False
        )

        with torch.no_grad():
            # a classifier whose loss is not finite (a NaN batch) gets a NaN score: an accuracy
            # alone would stay finite, and the step would not be neutral
            scores = [
                _unless_finite(loss, self.metric(out, step.targets))
                for out, loss in zip(run.outputs, run.losses, strict=True)
            ]
            metric = global_mean(scores, step.reduce, self.previous)
            policy: GF.Policy = "official" if self.official else "safe"
            b = GF.improvement_rate_scale(
                self.previous, metric, rho=1.0, policy=policy, zero_tol=self.zero_tol
            )
            coefficients, ok = finite_step(self.rho * b, metric, b)
            b = torch.where(ok, b, torch.zeros_like(b))  # a neutral step: no direction loss
            # nor classifier gradients (NaN ones, from the NaN batch's losses)
            accumulate = [
                (p, torch.where(ok.to(g.device), g, torch.zeros_like(g)))
                for pairs in run.param_grads
                for p, g in pairs
            ]

        inject: list[Injection] = []
        snapshot: tuple[Tensor, Tensor] | None = None
        if binding.fusion is not None and self.lam > 0:
            vs = head_matrices(binding)
            if self._stale_direction():
                # Official: the loss built at the previous step, differentiated at its weights.
                self._ensure_direction_state(binding)
                g = direction_gradient(
                    self.direction_fusion, list(self.direction_heads), self.direction_b, self.lam
                )
                snapshot = (
                    binding.fusion.detach().clone(),
                    torch.stack([v.detach().to(binding.fusion.dtype) for v in vs]),
                )
            else:
                g = direction_gradient(binding.fusion, vs, b, self.lam)
            inject.append(Injection(binding.fusion, g, WHAT))

        def commit() -> None:
            with torch.no_grad():
                self.previous.copy_(torch.where(ok, metric, self.previous))
                self.last_b.copy_(torch.where(ok, b, self.last_b))
                self.last_coefficients.copy_(coefficients)
                self.steps += 1
                self.skipped += (~ok).to(self.skipped.dtype)
                if snapshot is not None:
                    self.direction_b.copy_(b)
                    self.direction_fusion.copy_(snapshot[0])
                    self.direction_heads.copy_(snapshot[1])

        return StepPlan(
            coefficients,
            accumulate,
            inject,
            commit=commit,
            scores={"metric": metric, "improvement": metric - self.previous, "b": b},
        )


def _unless_finite(loss: Tensor, score: Tensor) -> Tensor:
    """``score`` (per sample ``[B]``, or one batch score), all NaN where the classifier's
    ``loss`` is not finite (a NaN batch); an empty per-sample score stays empty."""
    return torch.where(torch.isfinite(loss).to(score.device), score, torch.nan)
