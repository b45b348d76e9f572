"""One block's hooks, registered from a method's plan, and what a monitor sees of them."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ._config import Mode
from ._hooks import GradNorms, HookSet
from ._protocol import Binding, LossScale, Needs, StepPlan, Targets
from .monitor import Monitor

__all__ = ["Wiring"]


class Wiring:
    """Registers each block's hooks from the plan; the hooks read views of ``coefficients``.

    At the update level the scaling hooks read ones instead (the coefficient acts on the
    optimizer's step), while a gradient transform (OGM-GE's noise) still runs.
    """

    def __init__(
        self,
        binding: Binding,
        targets: Targets,
        needs: Needs,
        mode: Mode,
        coefficients: Tensor,
        *,
        update: bool,
    ) -> None:
        self.binding, self.targets, self.needs, self.mode = binding, targets, needs, mode
        self.update = update
        self.coefficients = coefficients
        self.hooks = HookSet(torch.ones_like(coefficients) if update else coefficients)
        self._norms: tuple[GradNorms, GradNorms, bool] | None = None  # the block's, if monitored

    def live_features(self) -> bool:
        """Whether this block hooks the features (they must be in the autograd graph)."""
        n = self.needs
        if self.update:
            return n.injects_into_features
        return self.mode == "feature" or n.level == "responses" or n.injects_into_features

    def _encoder_tensors(self) -> dict[int, list[Tensor]]:
        return {m: list(self.targets.encoders.get(n, ())) for m, n in enumerate(self.binding.names)}

    def register(
        self,
        features: Mapping[str, Tensor],
        plan: StepPlan,
        loss_scale: LossScale,
        weight: float,
        monitor: Monitor | None,
    ) -> None:
        """Register this block's hooks: claims, injections, scaling (or the transform), the
        method's extra hooks, and the monitor's observers."""
        hooks = self.hooks
        on_params = self.needs.level == "encoders" and self.mode == "parameter"
        if self.update:  # the coefficients act on the step, not here
            on_params = on_params and plan.transform is not None
        observe_after = self._observe(on_params) if monitor is not None else None
        if not on_params:
            scaled = {id(t) for t in features.values()}
            heads = [ps[0] for ps in self.binding.groups.values() if ps]
            hooks.claim([p for p in heads if p.requires_grad and id(p) not in scaled])
        # Injections first: a coefficient that scales the same tensor scales them too.
        hooks.inject(plan.inject, loss_scale, weight)
        if plan.transform is not None and not on_params:
            raise RuntimeError("a gradient transform needs parameter hooks (mode='parameter')")
        if on_params:
            hooks.scale(self._encoder_tensors(), plan.transform)
        elif not self.update:  # feature mode, or responses
            hooks.scale({m: [features[n]] for m, n in enumerate(self.binding.names)}, None)
        hooks.extra(plan.hooks)
        if observe_after is not None:
            observe_after()

    # ----------------------------------------------------------------------------- monitor
    def _observe(self, on_params: bool) -> Callable[[], None]:
        """Observe the norm of every encoder parameter's gradient in this block.

        With parameter hooks (``on_params``), registers the observers that run before them
        and returns the registration of those that run after them (leaf hooks run in insertion
        order); without, the parameters receive their final gradient: one observer each, added
        by the returned call.
        """
        groups = [self.binding.groups[n] for n in self.binding.names]
        before, after = GradNorms([len(g) for g in groups]), GradNorms([len(g) for g in groups])
        self._norms = (before, after, on_params)
        tensors = [
            (m, i, p) for m, g in enumerate(groups) for i, p in enumerate(g) if p.requires_grad
        ]
        hooks = self.hooks
        if not on_params:
            return lambda: hooks.observe(tensors, [after])
        hooked = {id(t) for ts in self.targets.encoders.values() for t in ts}
        scaled = [x for x in tensors if id(x[2]) in hooked]
        hooks.observe(scaled, [before])
        hooks.observe([x for x in tensors if id(x[2]) not in hooked], [before, after])
        return lambda: hooks.observe(scaled, [after])

    def report(
        self, monitor: Monitor, plan: StepPlan, boundary: bool, scale: Tensor | None
    ) -> None:
        """Hand a clean block's record to the monitor (device operations only)."""
        norms, self._norms = self._norms, None
        if norms is None:
            return
        before, after, seen = norms
        k = self.coefficients
        norm_after = after.totals(k.dtype, k.device)
        if seen:  # observed on both sides of the scaling hooks
            norm_before = before.totals(k.dtype, k.device)
        elif self.update:  # the coefficients act on the update: nothing scaled
            norm_before = norm_after
        elif self.needs.level == "responses":  # every response reaches every encoder
            norm_before = torch.full_like(norm_after, math.nan)
        else:  # feature mode: encoder m's parameters received k_m times their gradient
            norm_before = torch.where(k == 0, math.nan, norm_after / k.abs())
        if scale is not None:
            norm_before, norm_after = norm_before / scale, norm_after / scale
        monitor._record(self.binding.names, boundary, k, plan.scores, norm_before, norm_after)

    def forget(self) -> None:
        """Drop a block's observations (it raised)."""
        self._norms = None
