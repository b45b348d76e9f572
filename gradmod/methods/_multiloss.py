"""Multi-loss training and MLB (Kontras et al., BMVC 2024): unimodal heads in the objective."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as GF
from .._protocol import (
    Binding,
    GradHook,
    Injection,
    Method,
    Needs,
    Step,
    StepPlan,
    class_index_problem,
    coefficient_dtype,
    finite_step,
)
from ._args import Check, check_args
from ._direction import check_direction, direction_injection
from ._heads import global_mean, run_heads
from ._registry import register

__all__ = ["MLB", "MultiLoss"]

Loss = Callable[[Tensor, Tensor], Tensor]
Task = Literal["classification", "regression"]


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(pred.reshape(target.shape), target.to(pred.dtype))


def _squared_errors(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error, shape ``[B]``."""
    p = pred.reshape(pred.shape[0], -1)
    return (p - target.reshape(p.shape).to(p.dtype)).square().mean(dim=1)


@register("multiloss")
class MultiLoss(Method):
    r"""Plain multi-loss training: :math:`L = L_\text{fused} + w \sum_m L_m`, no coefficients.

    Each modality's unimodal head reads the **live** encoder output (its loss trains the
    encoder too). You keep your own loss and ``backward()``: inside the block, gradmod adds
    :math:`w\,\partial L_m/\partial h_m` to the gradient of each feature :math:`h_m` (exact, since
    backprop is linear), and the heads' own gradients land on their parameters when the block
    exits (give :meth:`ModulationContext.classifier_parameters` to your optimizer). This is the
    baseline that every coefficient method has to beat.

    Args:
        weight: :math:`w`, the weight of the unimodal losses (official MLB: 1).
        task: ``"classification"`` (cross-entropy) or ``"regression"`` (mean squared error).
        loss_fn: optional ``loss_fn(outputs, targets)`` for the heads.
        direction: :math:`\lambda` of CGGM's direction loss added on top (0: off); its weights
            are the method's coefficients (all 1 here). Needs ``fusion=``.
    """

    steps: Tensor
    skipped: Tensor
    last_coefficients: Tensor

    def __init__(
        self,
        *,
        weight: float = 1.0,
        task: Task = "classification",
        loss_fn: Loss | None = None,
        direction: float = 0.0,
    ) -> None:
        super().__init__()
        self._check_args(weight=weight, task=task, direction=direction)
        self.weight = float(weight)
        self.task: Task = task
        self.loss_fn: Loss = loss_fn or (F.cross_entropy if task == "classification" else _mse)
        self.direction = float(direction)
        self.register_buffer("last_coefficients", torch.zeros(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))

    def _check_args(
        self,
        *,
        weight: float,
        task: str,
        direction: float,
        more: Sequence[Check] = (),
        choices: Sequence[str] = (),
    ) -> None:
        who = type(self).__name__
        bad_task = list(choices)
        if task not in ("classification", "regression"):
            bad_task.append(f"{who}: task must be 'classification' or 'regression'; got {task!r}")
        checks: list[Check] = [
            ("weight", weight, 0.0, False, None),
            ("direction", direction, 0.0, True, None),
            *more,
        ]
        check_args(who, checks, bad_task)

    def needs(self) -> Needs:
        return Needs(
            classifiers="required",
            trains_classifiers=True,
            injects_into_features=True,
            per_modality_state=("last_coefficients",),
            fusion="changes" if self.direction > 0 else "unused",
        )

    def extra_repr(self) -> str:
        return f"weight={self.weight}, task={self.task!r}, direction={self.direction}"

    def reset(self) -> None:
        self.last_coefficients = torch.zeros(0, device=self.steps.device)
        self.steps.zero_()
        self.skipped.zero_()

    def check(self, binding: Binding) -> list[str]:
        if self.direction > 0:
            return check_direction(binding, type(self).__name__, "direction")
        return []

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        """Targets with one entry per sample; their form (class indices, soft labels, per-frame
        targets) is the heads' loss's to check."""
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        if batch is not None and (step.targets.dim() == 0 or step.targets.shape[0] != batch):
            return [
                f"MultiLoss needs targets with one entry per sample, shape [{batch}, ...]; got "
                f"targets of shape {tuple(step.targets.shape)}"
            ]
        return []

    def coefficients(
        self, outputs: list[Tensor], step: Step, like: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """This step's coefficients from the heads' outputs (all ones for plain multi-loss), and
        the scores they were decided from (none for plain multi-loss)."""
        return torch.ones_like(like), {}

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        assert binding.classifiers is not None
        names = binding.names
        m = len(names)
        dtype = coefficient_dtype(binding.device)
        like = torch.zeros(m, device=binding.device, dtype=dtype)
        run = run_heads(
            [binding.classifiers[n] for n in names],
            [step.features[n] for n in names],
            step.targets,
            self.loss_fn,
            input_grads=True,
            weight=self.weight,
        )
        with torch.no_grad():
            k, scores = self.coefficients(run.outputs, step, like)
            k, ok = finite_step(k)
            # a head loss that is not finite (a NaN batch): none of the heads' gradients (NaN)
            # reaches a gradient (this rank's; head gradients are then averaged over ranks)
            finite = torch.stack([torch.isfinite(x).all() for x in run.losses]).all()
        accumulate = [
            (p, _if_ok(finite, self._scale_head_grad(g, k[i])))
            for i, pairs in enumerate(run.param_grads)
            for p, g in pairs
        ]
        assert run.input_grads is not None
        inject = [
            Injection(step.features[n], _if_ok(finite, g), f"features[{n!r}] (unimodal loss)")
            for n, g in zip(names, run.input_grads, strict=True)
        ]
        if self.direction > 0:
            inject.append(direction_injection(binding, k, self.direction))

        def commit() -> None:
            with torch.no_grad():
                self.last_coefficients = k.clone()
                self.steps = self.steps.to(k.device) + 1
                self.skipped = self.skipped.to(k.device) + (~ok).to(self.skipped.dtype)

        return StepPlan(
            k,
            accumulate,
            inject,
            hooks=self.grad_hooks(binding, step, k),
            commit=commit,
            scores=scores,
        )

    def grad_hooks(self, binding: Binding, step: Step, k: Tensor) -> list[GradHook]:
        """Gradient hooks on other tensors for this step (none for plain multi-loss)."""
        return []

    def _scale_head_grad(self, g: Tensor, k: Tensor) -> Tensor:
        return g


def _if_ok(ok: Tensor, g: Tensor) -> Tensor:
    """``g``, or zeros where ``ok`` is false (no host sync)."""
    return torch.where(ok.to(g.device), g, torch.zeros_like(g))


@register(
    "mlb",
    presets={
        "mlb-official": (
            lambda m: MLB(scale="official"),
            "MLB as the official code: the fusion weight's column blocks scaled too",
        )
    },
)
class MLB(MultiLoss):
    r"""Multi-loss balanced modulation: multi-loss training plus balancing coefficients.

    Each step, the mean true-class probability :math:`s_m` of every unimodal head (on this
    batch, global under DDP) gives :math:`k_m = 1 + \tanh(\alpha(r_m - 1))` with
    :math:`r_m = \text{mean}_{j\ne m} s_j / s_m` (:func:`gradmod.functional.mlb_coefficients`):
    the strong modality is slowed, the weak one accelerated, and :math:`k \to 1` as every head
    fits. For regression :math:`s_m` is head ``m``'s mean squared error and the ratio inverts.

    Args:
        alpha: :math:`\alpha` (official 0.8 on CREMA-D and AVE, 1.0 on UCF101).
        beta: optional cap of the boost (:math:`k < \beta`); ``None``: none.
        gate: gradmod's extension for a modality with nothing to give
            (:func:`gradmod.functional.mlb_coefficients`): ``"boost"`` scales a head's boost by
            how far it is above chance, relative to the best head; ``"both"`` also scales the
            slowing of a modality by how far the OTHER heads are above chance. Chance is the
            mean true-class probability of a head predicting the label prior,
            :math:`\sum_c \pi_c^2`, estimated without bias from the global batch's label counts
            (:math:`\sum_c n_c(n_c - 1) / (n(n-1))`). Classification only. ``None``: MLB as
            published.
        scale: what :math:`k_m` multiplies. ``"encoder"`` (default): encoder ``m``'s gradient,
            including the part that comes from its own unimodal loss. ``"official"``: also
            head ``m``'s gradient and modality ``m``'s column block of a linear fusion head
            (``fusion=`` must be one ``nn.Linear`` over the concatenated features), as the
            authors' code does.
        weight, task, loss_fn, direction: as in :class:`MultiLoss` (the direction loss weighs
            modality ``m`` by :math:`k_m`).

    State (``state_dict``): ``last_coefficients`` and ``steps`` (MLB needs no history: its
    coefficients depend on the current batch only).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.8,
        beta: float | None = None,
        scale: Literal["encoder", "official"] = "encoder",
        gate: GF.Gate | None = None,
        weight: float = 1.0,
        task: Task = "classification",
        loss_fn: Loss | None = None,
        direction: float = 0.0,
    ) -> None:
        more: list[Check] = [("alpha", alpha, 0.0, False, None)]
        if beta is not None:
            more.append(("beta (the cap of the boost)", beta, 1.0, True, None))
        choices = []
        if scale not in ("encoder", "official"):
            choices.append(f"MLB: scale must be 'encoder' or 'official'; got {scale!r}")
        if gate not in (None, "boost", "both"):
            choices.append(f"MLB: gate must be None, 'boost' or 'both'; got {gate!r}")
        if gate is not None and task != "classification":
            choices.append("MLB: gate= compares scores with chance: classification only")
        self._check_args(weight=weight, task=task, direction=direction, more=more, choices=choices)
        super().__init__(weight=weight, task=task, loss_fn=loss_fn, direction=direction)
        self.alpha = float(alpha)
        self.beta = beta
        self.scale = scale
        self.gate: GF.Gate | None = gate

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, scale={self.scale!r}, gate={self.gate!r}, "
            + super().extra_repr()
        )

    def needs(self) -> Needs:
        base = super().needs()
        if self.scale != "official":
            return base
        # the column blocks of the fusion weight have no per-modality update
        return dataclasses.replace(base, fusion="changes")

    def check(self, binding: Binding) -> list[str]:
        problems = super().check(binding)
        if self.scale == "official" and not isinstance(binding.fusion_module, nn.Linear):
            problems.append(
                "MLB(scale='official') scales each modality's column block of a linear fusion "
                "head: pass fusion= one nn.Linear over the concatenated features, or use "
                "scale='encoder'"
            )
        if self.scale == "official" and binding.act == "update":
            problems.append(
                "MLB(scale='official') scales a column block of the fusion weight too, which has "
                "no per-modality update: use act='gradient' (or MLB(scale='encoder'))"
            )
        return problems

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        problems: list[str] = []
        fusion = binding.fusion_module
        if self.scale == "official" and isinstance(fusion, nn.Linear):
            widths = [int(step.features[n].shape[-1]) for n in binding.names]
            if sum(widths) != fusion.weight.shape[-1]:
                problems.append(
                    f"the fusion weight has {fusion.weight.shape[-1]} input columns but the "
                    f"features' widths {widths} add up to {sum(widths)}: the fusion head must "
                    "be one Linear over the features concatenated in modality order"
                )
        if self.task != "classification":
            return problems
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        return problems + class_index_problem("MLB", step.targets, batch)

    def grad_hooks(self, binding: Binding, step: Step, k: Tensor) -> list[GradHook]:
        """Official preset: column block ``m`` of the linear fusion weight's gradient times
        ``k_m`` (the block's width is features[m]'s)."""
        fusion = binding.fusion_module
        if self.scale != "official" or not isinstance(fusion, nn.Linear):
            return []
        widths = [int(step.features[n].shape[-1]) for n in binding.names]
        cols = torch.cat([k[m].expand(w) for m, w in enumerate(widths)]).to(fusion.weight.dtype)
        return [GradHook(fusion.weight, cols.mul)]

    def coefficients(
        self, outputs: list[Tensor], step: Step, like: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.task == "classification":
            per_sample = [
                GF.true_class_probability(o.to(like.dtype), step.targets) for o in outputs
            ]
        else:
            per_sample = [_squared_errors(o.to(like.dtype), step.targets) for o in outputs]
        scores = global_mean(per_sample, step.reduce, like)
        chance = None
        if self.gate is not None:
            # the mean true-class probability of a head that predicts the label prior pi:
            # sum_c pi_c^2, estimated without bias from the global batch's label counts n_c as
            # sum_c n_c (n_c - 1) / (n (n - 1)) (the plug-in sum of squared frequencies is
            # biased up by (1 - sum pi^2) / n: many classes and small batches would hide a head)
            y = step.targets.reshape(-1).long()
            counts = like.new_zeros(outputs[0].shape[-1]).index_add_(
                0, y, torch.ones(y.shape, dtype=like.dtype, device=like.device)
            )  # a fixed size: no host sync (torch.bincount sizes by the largest label)
            counts = step.reduce(counts)
            n = counts.sum()
            chance = (counts * (counts - 1)).sum() / (n * (n - 1)).clamp_min(1.0)
        k = GF.mlb_coefficients(
            scores,
            alpha=self.alpha,
            beta=self.beta,
            higher_is_better=self.task == "classification",
            gate=self.gate,
            chance=chance,
        )
        name = "true_class_probability" if self.task == "classification" else "squared_error"
        named = {name: scores}
        if chance is not None:
            named["chance"] = chance.expand_as(scores)
        return k, named

    def _scale_head_grad(self, g: Tensor, k: Tensor) -> Tensor:
        return (g * k).to(g.dtype) if self.scale == "official" else g
