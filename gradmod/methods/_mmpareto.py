"""MMPareto (Wei & Hu, ICML 2024): each encoder's multimodal and unimodal gradients integrated.

Spec, formulas and the official file:line references: ``docs/methods/mmpareto.md``; the math
is :func:`gradmod.functional.mmpareto_combine`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._protocol import (
    Binding,
    Method,
    Needs,
    Step,
    StepPlan,
    class_index_problem,
    coefficient_dtype,
)
from ..functional import ParetoRescale, Policy, mmpareto_combine
from ._args import check_args
from ._registry import register

__all__ = ["MMPareto"]

Loss = Callable[[Tensor, Tensor], Tensor]
Rows = list[list[Tensor]]


def _live_input(head: nn.Module, h: Tensor) -> Tensor:
    """``h`` in the head's dtype, still in the graph (the unimodal loss trains the encoder)."""
    first = next(head.parameters(), None)
    if first is not None and h.is_floating_point() and h.dtype != first.dtype:
        return h.to(first.dtype)
    return h


def _rank_mean(rows: Rows, step: Step) -> Rows:
    """``rows`` averaged over ``step``'s ranks (one reduction of the flattened tensors);
    ``rows`` itself on one process."""
    flat = [x for row in rows for x in row]
    if step.world == 1 or not flat:
        return rows
    dtype = functools.reduce(torch.promote_types, (x.dtype for x in flat))
    summed = step.reduce(torch.cat([x.reshape(-1).to(dtype) for x in flat])) / step.world
    parts = iter(summed.split([x.numel() for x in flat]))
    return [[next(parts).view_as(x).to(x.dtype) for x in row] for row in rows]


@register(
    "mmpareto",
    presets={
        "mmpareto-official": (
            lambda m: MMPareto(rescale="tensor", policy="official"),
            "MMPareto as the official code: magnitude per parameter tensor, the authors' "
            "arithmetic at cancelling tensors",
        )
    },
)
class MMPareto(Method):
    r"""MMPareto: each encoder's multimodal and unimodal gradients integrated without conflict.

    Every modality has a unimodal head on its **live** encoder output, trained with the task
    loss :math:`L_m` next to the user's fused loss :math:`L_{mm}`. For each encoder, with
    :math:`g = \partial L_{mm}/\partial\theta_m` (what the user's backward gives it, over the
    whole accumulation window) and :math:`u = \partial L_m/\partial\theta_m`, the encoder's
    gradient becomes :func:`~gradmod.functional.mmpareto_combine`\ ``(g, u)``: :math:`\gamma(g +
    u)` when :math:`\langle g, u\rangle > 0`, otherwise the min-norm direction of the segment
    :math:`[g, u]` (a direction that decreases both losses) raised to at least the magnitude of
    :math:`g + u`, times :math:`\gamma`. The heads keep the plain gradient of their loss.

    How gradmod runs it (``Needs.combines_gradients``, :attr:`~gradmod.StepPlan.combine`): on
    entering the block, one ``torch.autograd.grad`` of :math:`\sum_m L_m` over the encoder and
    head parameters (``retain_graph``: the user's backward follows) gives :math:`u` and the
    heads' gradients; during the user's backward the engine stashes :math:`g`; at the block
    with ``boundary=True`` it averages :math:`g` over ranks and this method combines it with
    :math:`u` (summed over the window's blocks times their ``weight=``, averaged over ranks,
    times the ``GradScaler``'s scale). The cost over plain multi-loss training is that one
    extra backward through the encoders (the official code runs four backward passes).

    Each :math:`L_m` must reach only encoder :math:`m` (as in the official model): with an
    encoder that reads another modality, :math:`u` would mix the unimodal losses.

    Parameter mode and the gradient level only (the rule changes directions per tensor, not a
    factor per modality). Coefficients are ones. Scores (``ctx.scores``, the monitor), filled
    at the boundary (NaN in the earlier blocks of a window): ``cosine`` between :math:`g` and
    :math:`u`, ``multimodal_weight`` :math:`\alpha_{mm}` (the unimodal weight is
    :math:`1 - \alpha_{mm}`), ``conflict`` (1 when :math:`\langle g, u\rangle \le 0`).

    No cross-step state. Inside an accumulation window the unimodal gradients of the earlier
    blocks are kept by the method (and the fused ones by the engine), not in ``state_dict()``:
    checkpoint at boundaries.

    Args:
        gamma: :math:`\gamma`, the magnitude factor (official: 1.5, hard-coded).
        rescale: ``"encoder"`` (default): one magnitude factor per encoder, which keeps the
            common descent direction (:math:`\langle\text{out}, g\rangle \ge 0` and
            :math:`\langle\text{out}, u\rangle \ge 0`, the point of the method);
            ``"tensor"`` (official): one per parameter tensor, which can turn the encoder's
            gradient against one of the losses (``docs/methods/mmpareto.md`` has a case).
        policy: ``"safe"`` (default): a tensor whose combined direction cancels to rounding
            noise is not raised to full size (never NaN for finite gradients);
            ``"official"``: the authors' arithmetic (NaN, or rounding noise raised, there).
        loss_fn: ``loss_fn(outputs, targets)`` of the heads (default: cross-entropy, which
            takes class indices).

    The ``mmpareto-official`` preset is ``MMPareto(rescale="tensor", policy="official")``.
    """

    def __init__(
        self,
        *,
        gamma: float = 1.5,
        rescale: ParetoRescale = "encoder",
        policy: Policy = "safe",
        loss_fn: Loss | None = None,
    ) -> None:
        super().__init__()
        choices = []
        if rescale not in ("tensor", "encoder"):
            choices.append(f"MMPareto: rescale must be 'tensor' or 'encoder'; got {rescale!r}")
        if policy not in ("safe", "official"):
            choices.append(f"MMPareto: policy must be 'safe' or 'official'; got {policy!r}")
        check_args("MMPareto", [("gamma", gamma, 0.0, False, None)], choices)
        self.gamma = float(gamma)
        self.rescale: ParetoRescale = rescale
        self.policy: Policy = policy
        self.loss_fn: Loss = loss_fn if loss_fn is not None else F.cross_entropy
        self._default_loss = loss_fn is None
        # The unimodal gradients (times weight=) of the earlier clean blocks of the window.
        self._window: Rows | None = None

    def needs(self) -> Needs:
        return Needs(classifiers="required", trains_classifiers=True, combines_gradients=True)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, rescale={self.rescale!r}, policy={self.policy!r}"

    def reset(self) -> None:
        self._window = None

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        if not self._default_loss:
            return []
        first = next(iter(step.features.values()), None)
        batch = int(first.shape[0]) if isinstance(first, Tensor) and first.dim() else None
        # its unimodal losses decide what a negative index means (cross_entropy ignores -100)
        return class_index_problem("MMPareto", step.targets, batch, negative_ok=True)

    def plan(self, binding: Binding, step: Step) -> StepPlan:
        assert binding.classifiers is not None
        names = binding.names
        chosen = self.targets(binding).encoders
        tensors = [list(chosen.get(n, ())) for n in names]
        heads = [binding.classifiers[n] for n in names]
        head_params: list[list[Tensor]] = [
            [p for p in h.parameters() if p.requires_grad] for h in heads
        ]
        with torch.enable_grad():
            losses = [
                self.loss_fn(h(_live_input(h, step.features[n])), step.targets)
                for n, h in zip(names, heads, strict=True)
            ]
            wrt = [t for ts in tensors for t in ts] + [p for ps in head_params for p in ps]
            total_loss: Tensor = functools.reduce(torch.add, losses)
            grads = torch.autograd.grad(total_loss, wrt, retain_graph=True, allow_unused=True)
        it = iter(grads)
        w = step.weight
        mine = [
            [
                (g * w if w != 1.0 else g) if (g := next(it)) is not None else torch.zeros_like(t)
                for t in ts
            ]
            for ts in tensors
        ]
        accumulate = [(p, g) for ps in head_params for p in ps if (g := next(it)) is not None]
        prior = self._window
        total = (
            mine
            if prior is None
            else [
                [a + b for a, b in zip(pa, ma, strict=True)]
                for pa, ma in zip(prior, mine, strict=True)
            ]
        )

        nan = torch.full(
            (len(names),),
            float("nan"),
            device=binding.device,
            dtype=coefficient_dtype(binding.device),
        )
        scores = {"cosine": nan, "multimodal_weight": nan.clone(), "conflict": nan.clone()}
        unimodal: Rows = []

        def combine(m: int, g: list[Tensor]) -> list[Tensor]:
            if not unimodal:  # once per boundary: over ranks, in the units of the stash
                u = _rank_mean(total, step)
                scale = step.loss_scale()
                if scale is not None:
                    u = [[x * scale.to(x.dtype) for x in row] for row in u]
                unimodal.extend(u)
            res = mmpareto_combine(
                g, unimodal[m], gamma=self.gamma, rescale=self.rescale, policy=self.policy
            )
            dtype = scores["cosine"].dtype
            scores["cosine"][m] = res.cosine.to(dtype)
            scores["multimodal_weight"][m] = res.weights[0].to(dtype)
            scores["conflict"][m] = res.conflict.to(dtype)
            return res.grads

        def commit() -> None:
            self._window = None if step.boundary else total

        return StepPlan(
            torch.ones_like(nan),
            accumulate,
            commit=commit,
            scores=scores,
            combine=combine,
        )

    def _windowed(self) -> Sequence[Sequence[Tensor]] | None:
        """The unimodal gradients kept from the earlier blocks of an open window (tests)."""
        return self._window
