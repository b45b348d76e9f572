"""One block's coefficients and hooks, registered from a method's plan, and what a monitor sees
of them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import _dist
from ._config import Mode
from ._hooks import GradNorms, HookSet, observer
from ._protocol import Binding, LossScale, Needs, StepPlan, Targets, coefficient_dtype
from .monitor import Monitor

__all__ = ["Wiring"]

#: The largest float32: a coefficient beyond it would be inf in the float32 copy that float32
#: and half gradients are multiplied by.
_F32_MAX = torch.finfo(torch.float32).max


class Wiring:
    """Registers each block's hooks from the plan; the hooks read views of ``coefficients``
    (``[M]``, on the binding's device: set from each plan by :meth:`set_coefficients`; a model
    moved to another device gets a new wiring there, :meth:`to`).

    At the update level the scaling hooks read ones instead (the coefficient acts on the
    optimizer's step), while a gradient transform (OGM-GE's noise) still runs.

    With a combining plan (:attr:`StepPlan.combine`) the hooks stash the encoders' gradients
    instead: this block's stash (``_block``) joins the window's (``_window``) on a clean exit,
    and the window is combined into ``.grad`` at its boundary (:meth:`land`).
    """

    def __init__(
        self, binding: Binding, targets: Targets, needs: Needs, mode: Mode, *, update: bool
    ) -> None:
        self.binding, self.targets, self.needs, self.mode = binding, targets, needs, mode
        self.update = update
        # whether a block hooks the features (they must be in the autograd graph)
        self.live = needs.injects_into_features or (
            not update
            and (mode == "feature" or needs.level == "responses" or needs.combines_gradients)
        )
        device = binding.device
        # float64: exact for float64 models; a 0-d factor never promotes a bf16/fp32 gradient.
        coefficients = torch.ones(
            len(binding.names), device=device, dtype=coefficient_dtype(device)
        )
        self.coefficients = coefficients
        self._on_cpu = coefficients.device.type == "cpu"
        self.hooks = HookSet(torch.ones_like(coefficients) if update else coefficients)
        self._seen: _Observation | None = None  # the monitor's hooks, built on first use
        self._how: str | None = None  # how this block's norms are read, when monitored
        self._encoders: dict[int, list[Tensor]] | None = None
        self._block: list[list[Tensor | None]] | None = None  # this block's stash (combine)
        self._window: list[list[Tensor | None]] | None = None  # the earlier clean blocks'
        self._landed: Tensor | None = None  # norms of what the latest boundary added

    def to(self, device: torch.device) -> Wiring:
        """A new wiring over the same binding on ``device`` (the model moved), with its own
        coefficients there."""
        binding = dataclasses.replace(self.binding, device=device)
        return Wiring(binding, self.targets, self.needs, self.mode, update=self.update)

    def set_coefficients(self, plan: StepPlan, method: object) -> None:
        """Take the plan's coefficients (the hooks read them)."""
        c, k = plan.coefficients, self.coefficients
        if c.shape != k.shape:
            raise RuntimeError(
                f"{type(method).__name__}.plan returned coefficients of shape "
                f"{tuple(c.shape)}; expected {tuple(k.shape)}"
            )
        k.copy_(c.detach() if c.requires_grad else c)
        # Defensive: a coefficient that is not finite never reaches a gradient (1 = untouched),
        # nor one beyond float32's range where an encoder tensor is not float64 (float32 and
        # half gradients are multiplied by its float32 copy, which would be inf). On the CPU
        # the values are read first (no op when all are usable); elsewhere no host sync.
        if self._on_cpu:
            values = k.tolist()
            if all(map(math.isfinite, values)) and (
                max(map(abs, values), default=0.0) <= _F32_MAX or not self._narrow()
            ):
                return
        k.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)
        if self._narrow():
            k.masked_fill_(k.abs() > _F32_MAX, 1.0)

    def _narrow(self) -> bool:
        """Whether some encoder tensor is not float64 (its gradient is scaled in float32)."""
        return any(t.dtype != torch.float64 for ts in self._encoder_tensors().values() for t in ts)

    def _encoder_tensors(self) -> dict[int, list[Tensor]]:
        """The tensors of each modality that get a parameter hook (built once: the same mapping
        at every step lets the hook set reuse its hooks)."""
        if self._encoders is None:
            names = self.binding.names
            self._encoders = {
                m: list(self.targets.encoders.get(n, ())) for m, n in enumerate(names)
            }
        return self._encoders

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
        observe_after = (
            self._observe(on_params, plan.transform is not None, plan.combine is not None)
            if monitor is not None
            else None
        )
        if not on_params:
            scaled = {id(t) for t in features.values()}
            heads = [ps[0] for ps in self.binding.groups.values() if ps]
            hooks.claim([p for p in heads if p.requires_grad and id(p) not in scaled])
        # Injections first: a coefficient that scales the same tensor scales them too.
        hooks.inject(plan.inject, loss_scale, weight)
        if plan.transform is not None and not on_params:
            raise RuntimeError("a gradient transform needs parameter hooks (mode='parameter')")
        if (plan.combine is not None) != self.needs.combines_gradients or (
            plan.combine is not None and (not on_params or plan.transform is not None)
        ):
            raise RuntimeError(
                "StepPlan.combine: set exactly when Needs.combines_gradients is declared, "
                "without a transform, with parameter hooks (mode='parameter')"
            )
        if on_params:
            tensors = self._encoder_tensors()
            if plan.combine is not None:
                self._block = [[None] * len(ts) for ts in tensors.values()]
            plain = plan.transform is None and plan.combine is None and monitor is None
            if not (plain and hooks.defer(tensors)):
                hooks.scale(tensors, plan.transform, self._block, reuse=True)
        elif not self.update:  # feature mode, or responses
            hooks.scale({m: [features[n]] for m, n in enumerate(self.binding.names)}, None)
        hooks.extra(plan.hooks)
        if observe_after is not None:
            observe_after()

    def land(self, plan: StepPlan, boundary: bool, group: Any) -> None:
        """After a clean block: its stash joins the window's; at a boundary, the window's
        gradients (averaged over ranks) are combined by the plan and added to ``.grad``."""
        block, self._block = self._block, None
        if block is None or plan.combine is None:
            return
        window = self._window
        if window is not None:
            block = [
                [b if w is None else w if b is None else w + b for w, b in zip(wr, br, strict=True)]
                for wr, br in zip(window, block, strict=True)
            ]
        self._window = None if boundary else block
        if not boundary:
            return
        tensors = list(self._encoder_tensors().values())
        with torch.no_grad():
            g = [
                [s if s is not None else torch.zeros_like(t) for s, t in zip(row, ts, strict=True)]
                for row, ts in zip(block, tensors, strict=True)
            ]
            flat = [x for row in g for x in row]
            # one all-reduce per dtype, in first-seen order (a set's order may differ by rank)
            for dtype in dict.fromkeys(x.dtype for x in flat):
                idx = [j for j, x in enumerate(flat) if x.dtype == dtype]
                for j, x in zip(
                    idx, _dist.mean_over_ranks([flat[j] for j in idx], group), strict=True
                ):
                    flat[j] = x
            it = iter(flat)
            norms: list[Tensor] | None = [] if self._how is not None else None  # monitored
            for m, ts in enumerate(tensors):
                out = plan.combine(m, [next(it) for _ in ts])
                if len(out) != len(ts) or any(
                    o.shape != t.shape for o, t in zip(out, ts, strict=True)
                ):
                    raise RuntimeError("StepPlan.combine returned gradients of other shapes")
                for t, o in zip(ts, out, strict=True):
                    if t.grad is None:
                        t.grad = o.detach().to(t.dtype, copy=True)
                    else:
                        t.grad.add_(o.to(t.grad.dtype))
                if norms is not None:
                    norms.append(_norm(out, ts[0].device if ts else None))
            self._landed = torch.stack(norms) if norms is not None else None

    # ----------------------------------------------------------------------------- monitor
    def _observe(self, on_params: bool, transform: bool, combine: bool) -> Callable[[], None]:
        """Observe the norm of every encoder parameter's gradient in this block (one
        ``vector_norm`` per tensor; two where a gradient transform runs; with a combine, what
        the hooks stash, the rest at the boundary: :meth:`land`).

        Registers the observers that run before gradmod's parameter hooks (leaf hooks run in
        insertion order) and returns the registration of those that run after them.
        """
        groups = [self.binding.groups[n] for n in self.binding.names]
        dtype = torch.float64 if any(g[0].dtype == torch.float64 for g in groups if g) else None
        seen = self._seen
        if seen is None or seen.dtype != (dtype or torch.float32):
            hooked = {id(t) for ts in self.targets.encoders.values() for t in ts}
            seen = self._seen = _Observation(self, groups, hooked, dtype or torch.float32)
        seen.before.reset()
        seen.after.reset()
        hooks = self.hooks
        if not on_params:  # the parameters receive their final gradient
            self._how = "final"
            return lambda: hooks.observe(seen.final, seen.key_after)
        if combine:  # the hooks let zeros through; what lands is measured when it lands
            self._how = "combined"
            hooks.observe(seen.pre, seen.key_before)
            return lambda: None
        if not transform:  # the hooks multiply by k: |k| times the norm they receive
            self._how = "scaled"
            hooks.observe(seen.received, seen.key_before)
            return lambda: None
        self._how = "observed"  # on both sides of the transform
        hooks.observe(seen.pre, seen.key_before)
        return lambda: hooks.observe(seen.post, seen.key_after)

    def report(
        self, monitor: Monitor, plan: StepPlan, boundary: bool, scale: Tensor | None
    ) -> None:
        """Hand a clean block's record to the monitor (device operations only)."""
        how, self._how = self._how, None
        landed, self._landed = self._landed, None
        seen = self._seen
        if how is None or seen is None:
            return
        k = self.coefficients
        if how == "combined":  # after: the unhooked tensors', and what the boundary added
            norm_before, norm_after = seen.before.totals(k.dtype), seen.after.totals(k.dtype)
            if landed is not None:
                norm_after = torch.hypot(landed.to(norm_after), norm_after)
        elif how == "observed":  # on both sides of the scaling hooks
            norm_before, norm_after = seen.before.totals(k.dtype), seen.after.totals(k.dtype)
        elif how == "scaled":  # the hooked tensors' gradients were multiplied by k
            norm_before = seen.before.totals(k.dtype)
            if seen.mask is None:  # every encoder tensor was multiplied by k
                norm_after = k.abs() * norm_before
            else:  # only the hooked ones: the others enter unscaled
                norm_after = torch.hypot(
                    k.abs() * seen.before.totals(k.dtype, seen.mask),
                    seen.before.totals(k.dtype, 1 - seen.mask),
                )
        else:
            norm_after = seen.after.totals(k.dtype)
            if self.update:  # the coefficients act on the update: nothing scaled
                norm_before = norm_after
            elif self.needs.level == "responses":  # every response reaches every encoder
                norm_before = torch.full_like(norm_after, math.nan)
            else:  # feature mode: encoder m's parameters received k_m times their gradient
                norm_before = torch.where(k == 0, math.nan, norm_after / k.abs())
        if scale is not None:
            norm_before, norm_after = norm_before / scale, norm_after / scale
        monitor._record(self.binding.names, boundary, k, plan.scores, norm_before, norm_after)

    def forget(self) -> None:
        """Drop a block's observations and stash (it raised)."""
        self._how = None
        self._block = None


class _Observation:
    """A monitored context's observing hooks, built once: the norm buffers (``before``,
    ``after``) and, for each way of reading the norms, the ``(tensor, hook)`` pairs to add."""

    def __init__(
        self,
        owner: object,
        groups: list[list[nn.Parameter]],
        hooked: set[int],
        dtype: torch.dtype,
    ) -> None:
        sizes = [len(g) for g in groups]
        device = next((p.device for g in groups for p in g), torch.device("cpu"))
        self.dtype = dtype
        self.before = GradNorms(sizes, dtype, device)
        self.after = GradNorms(sizes, dtype, device)
        self.key_before = ("gradmod.monitor", id(owner), "before")
        self.key_after = ("gradmod.monitor", id(owner), "after")
        items = [(m, i, p) for m, g in enumerate(groups) for i, p in enumerate(g)]
        b, a, both = [self.before], [self.after], [self.before, self.after]
        # no parameter hooks: the final gradient, once
        self.final = [(p, observer(a, m, i)) for m, i, p in items]
        # parameter hooks that multiply: what they receive (and |k| times it)
        self.received = [(p, observer(b, m, i)) for m, i, p in items]
        # a transform (or a combine): before the hooked tensors' hooks (and after them); the
        # tensors without a hook once, for both
        self.pre = [(p, observer(b if id(p) in hooked else both, m, i)) for m, i, p in items]
        self.post = [(p, observer(a, m, i)) for m, i, p in items if id(p) in hooked]
        # hooked tensors (1) among the slots, where some are not
        self.mask: Tensor | None = None
        if any(id(p) not in hooked for _, _, p in items):
            mask = torch.zeros(len(sizes), max(sizes, default=0), dtype=torch.float64)
            for m, i, p in items:
                mask[m, i] = float(id(p) in hooked)
            self.mask = mask.to(device)


def _norm(tensors: list[Tensor], device: torch.device | None) -> Tensor:
    """The L2 norm over ``tensors`` as the monitor takes it (per tensor in float32, float64 for
    float64; 0-d float64; 0 for none)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = [
        torch.linalg.vector_norm(
            t, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32
        ).double()
        for t in tensors
    ]
    total: Tensor = torch.linalg.vector_norm(torch.stack(norms))
    return total
