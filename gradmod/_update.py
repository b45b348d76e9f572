"""The update level: each modality's coefficient scales its parameter *update* in the next
``optimizer.step()``, where an adaptive optimizer cannot undo it.

``k_m`` scales modality ``m``'s update exactly as if that step ran with the learning rate of
modality ``m``'s parameters multiplied by ``k_m``:

* **fast path** — a param group that holds parameters of one modality only: its ``lr`` is
  multiplied by ``k_m`` for the step and restored afterwards (no copy; exact for any optimizer,
  since it *is* the reference);
* **general path** — a param group that mixes modalities, or a modality with other parameters:
  the modulated parameters are copied before the step and moved back by a ``foreach`` lerp after
  it, ``θ ← θ⁰ + k (θ¹ - θ⁰)``. Exact for optimizers whose update is proportional to the
  learning rate (SGD with momentum, Adam, AdamW with its decoupled weight decay, RMSprop, ...);
  other optimizers are refused for mixed groups.
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, optim

from ._errors import ConfigurationError, ContextError, StepError

__all__ = ["UpdateLevel", "check_optimizer"]

#: How many frames above the step pre-hook are searched for a stepping ``GradScaler``
#: (``GradScaler.step`` -> ``_maybe_opt_step`` -> the optimizer's step wrappers -> the hook).
_SCALER_FRAMES = 8

#: Optimizers whose update is proportional to the learning rate (with their defaults' other
#: hyperparameters), so that a lerp of the step equals the step with a scaled learning rate.
_PROPORTIONAL: tuple[type[optim.Optimizer], ...] = (
    optim.SGD,
    optim.Adam,
    optim.AdamW,
    optim.Adamax,
    optim.NAdam,
    optim.RAdam,
    optim.RMSprop,
    optim.Adagrad,
    optim.Adadelta,
    optim.SparseAdam,
)
#: Optimizers where scaling the learning rate of one step does not scale that step's update.
_REFUSED: dict[type[optim.Optimizer], str] = {
    optim.LBFGS: "LBFGS takes several closure evaluations and a line search per step",
    optim.Rprop: "Rprop's learning rate only sets the initial step size, which it then adapts",
    optim.ASGD: "ASGD steps with the rate it derived from the previous step's learning rate",
}


def _proportional(opt: optim.Optimizer, group: Mapping[str, Any]) -> bool:
    if isinstance(opt, optim.Adagrad) and group.get("lr_decay", 0) != 0:
        return False  # its effective rate lr / (1 + (t - 1) lr_decay) is not linear in lr
    return isinstance(opt, _PROPORTIONAL)


def check_optimizer(
    opt: object, modality: Sequence[Sequence[Tensor]], names: Sequence[str]
) -> list[str]:
    """Problems with ``opt`` as the optimizer of the update level over these tensors."""
    if not isinstance(opt, optim.Optimizer):
        return [
            "act='update' needs optimizer= the torch.optim.Optimizer that steps the encoders; "
            f"got {type(opt).__name__}"
        ]
    for cls, why in _REFUSED.items():
        if isinstance(opt, cls):
            return [
                f"act='update' scales one step's learning rate, which {type(opt).__name__} does "
                f"not turn into a scaled update ({why}): use act='gradient'"
            ]
    hooks = getattr(opt, "_optimizer_step_pre_hooks", None)
    if not isinstance(hooks, dict):  # a wrapper (accelerate's AcceleratedOptimizer)
        return [
            f"optimizer= is a {type(opt).__name__}, a wrapper that never runs torch's optimizer "
            "step hooks: pass the torch optimizer it wraps (e.g. build the context before "
            "accelerator.prepare, or pass prepared.optimizer)"
        ]
    problems: list[str] = []
    for hook in list(hooks.values()):
        if isinstance(hook, _PreHook) and hook.owner() is not None:
            problems.append(
                "another ModulationContext already scales this optimizer's updates: one context "
                "per optimizer (close() the other first)"
            )
            break
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, ts in zip(names, modality, strict=True):
        missing = sum(1 for t in ts if id(t) not in in_opt)
        if missing:
            problems.append(
                f"{missing} parameter(s) of encoders[{name!r}] are not in the optimizer: their "
                "updates could not be scaled; give the optimizer every encoder parameter"
            )
    return problems


class _PreHook:
    """The optimizer step pre-hook; holds its update level weakly (the optimizer keeps hooks).

    A ``step(closure)`` is given a closure that runs the user's (whose block decides the
    coefficients) and scales the step after it.
    """

    def __init__(self, owner: UpdateLevel) -> None:
        self.owner = weakref.ref(owner)

    def __call__(self, opt: optim.Optimizer, args: Any, kwargs: Any) -> Any:
        level = self.owner()
        if level is None:
            return None
        # ``args`` holds the optimizer itself, then step()'s positional arguments
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            level.before_step()
            return None

        def scaled_after(*a: Any, **kw: Any) -> Any:
            out = closure(*a, **kw)
            level.before_step()
            return out

        if "closure" in kwargs:
            return args, {**kwargs, "closure": scaled_after}
        return (args[0], scaled_after, *args[2:]), kwargs


class _PostHook(_PreHook):
    def __call__(self, opt: optim.Optimizer, args: Any, kwargs: Any) -> None:
        level = self.owner()
        if level is not None:
            level.after_step()


class UpdateLevel:
    """Scales each modality's update in ``optimizer.step()`` by the coefficient of its window.

    The window is the blocks since the last optimizer step (or since a ``boundary`` block that
    no step followed: a step a ``GradScaler`` skipped applies nothing); its coefficient is the
    mean of the window's blocks' coefficients.
    """

    def __init__(
        self,
        opt: optim.Optimizer,
        modality: Sequence[Sequence[Tensor]],
        names: Sequence[str],
        active: Callable[[], bool] = lambda: False,
        scaler: Callable[[], Any] = lambda: None,
    ) -> None:
        problems = check_optimizer(opt, modality, names)
        if problems:
            raise ConfigurationError(problems)
        self.optimizer = opt
        self._active = active  # whether the owner's block is open (no strong reference to it)
        self._scaler = scaler  # the owner's grad_scaler
        self._modality = [list(ts) for ts in modality]
        self._index = {id(t): m for m, ts in enumerate(self._modality) for t in ts}
        self._names = list(names)
        self._layout: tuple[tuple[int, int], ...] | None = None
        self._fast: list[tuple[dict[str, Any], int]] = []
        # the general path's tensors, one list per (modality, dtype, device): one foreach each
        self._mixed: list[tuple[int, list[Tensor]]] = []
        self._check_layout()
        # the window (state_dict: ``sum``, ``count``, ``complete``)
        self.sum: Tensor | None = None
        self.count = 0
        self.complete = False
        self.adds = False  # a block of the window added gradients of the method's own
        # one step in flight
        self._restore: list[tuple[dict[str, Any], Any]] = []
        self._snapshots: list[tuple[list[Tensor], list[Tensor], Tensor]] = []
        pre = opt.register_step_pre_hook(_PreHook(self))
        post = opt.register_step_post_hook(_PostHook(self))
        self._handles = [pre, post]
        self._finalizer = weakref.finalize(self, _remove, pre, post)

    # --------------------------------------------------------------------------- layout
    def _check_layout(self) -> None:
        """Classify the optimizer's param groups (again when they changed)."""
        opt = self.optimizer
        layout = tuple((id(g), len(g["params"])) for g in opt.param_groups)
        if layout == self._layout:
            return
        fast: list[tuple[dict[str, Any], int]] = []
        mixed: dict[tuple[int, torch.dtype, torch.device], list[Tensor]] = {}
        problems: list[str] = []
        for g in opt.param_groups:
            owners = {self._index.get(id(p)) for p in g["params"]}
            mods = owners - {None}
            if not mods:
                continue
            if len(owners) == 1:
                (m,) = mods
                fast.append((g, m))  # type: ignore[arg-type]
                continue
            if not _proportional(opt, g):
                problems.append(
                    f"a param group mixes parameters of {sorted(self._names[m] for m in mods)} "  # type: ignore[index]
                    f"with others, and {type(opt).__name__}'s update is not proportional to "
                    "its learning rate: give each modality's encoder a param group of its own "
                    "(its learning rate is then scaled for the step, exact for any optimizer)"
                )
                continue
            for p in g["params"]:
                m = self._index.get(id(p))
                if m is not None:
                    mixed.setdefault((m, p.dtype, p.device), []).append(p)
        if problems:
            raise ConfigurationError(problems)
        self._layout, self._fast = layout, fast
        self._mixed = [(m, ps) for (m, _, _), ps in mixed.items()]

    # --------------------------------------------------------------------------- window
    def record(self, coefficients: Tensor, boundary: bool, adds: bool = False) -> None:
        """Add one clean block's coefficients to the window (``adds``: the block added gradients
        of the method's own, which a ``GradScaler`` must scale like the loss)."""
        k = coefficients.detach()
        if self.complete or self.sum is None or self.count == 0:
            self.sum = torch.zeros_like(k)
            self.count = 0
            self.adds = False
        self.adds = self.adds or adds
        self.sum = self.sum.to(k) + k
        self.count += 1
        self.complete = bool(boundary)

    def pending(self) -> Tensor | None:
        """The coefficient the next optimizer step applies (``None``: no block since the last)."""
        if self.sum is None or self.count == 0:
            return None
        return self.sum / self.count

    # ----------------------------------------------------------------------------- step
    def before_step(self) -> None:
        if self._active():
            raise ContextError(
                "optimizer.step() was called inside the `with ctx(...)` block of an "
                "act='update' context: the block's coefficients are known when it exits, so "
                "call optimizer.step() after the block"
            )
        self.restore()  # a previous step that raised left its scaling behind
        if self.adds:
            self._check_scaler()
        k = self.pending()
        self.sum, self.count, self.complete, self.adds = None, 0, False, False
        if k is None:
            return
        self._check_layout()
        floats = any(not isinstance(g["lr"], Tensor) for g, _ in self._fast)
        values = k.tolist() if floats else []  # one host sync, for float learning rates only
        for g, m in self._fast:
            lr = g["lr"]
            self._restore.append((g, lr))
            g["lr"] = lr * k[m].to(lr) if isinstance(lr, Tensor) else lr * values[m]
        for m, ps in self._mixed:
            with torch.no_grad():
                snap = list(torch._foreach_mul(ps, 1.0))  # one copy, one foreach
            self._snapshots.append((ps, snap, k[m].to(ps[0].device, ps[0].dtype)))

    def _check_scaler(self) -> None:
        """Refuse a step taken by a ``GradScaler`` that the context was not given.

        Its loss was scaled, so the gradients the method added unscaled are off by the scale
        after ``unscale_``: a silent error. ``scaler.step(optimizer)`` calls ``optimizer.step``
        from its own frame, so the stepping scaler is found among the few frames above this
        hook (read only; nothing else in gradmod looks at frames).
        """
        frame: types.FrameType | None = sys._getframe(1)
        for _ in range(_SCALER_FRAMES):
            if frame is None:
                return
            owner = frame.f_locals.get("self")
            if isinstance(owner, torch.amp.GradScaler):
                if owner is not self._scaler() and owner.is_enabled():
                    raise StepError(
                        "this optimizer step is taken by a GradScaler that the ModulationContext "
                        "was not given: the method's own gradients (head losses, direction "
                        "loss) were added unscaled to a scaled loss's gradients, so the step "
                        "would be wrong; pass grad_scaler=scaler to the context (nothing was "
                        "stepped: zero the gradients and redo the step)"
                    )
                return
            frame = frame.f_back

    def after_step(self) -> None:
        with torch.no_grad():
            for ps, snap, w in self._snapshots:
                # θ⁰ + k (θ¹ - θ⁰), without a host sync; blending from θ⁰ with weight k keeps
                # k's relative precision in bf16/fp16 (a weight 1 - k near 1 would not)
                torch._foreach_lerp_(snap, ps, [w] * len(ps))
                torch._foreach_copy_(ps, snap)
        self._snapshots.clear()
        self.restore()

    def restore(self) -> None:
        """Put back every learning rate scaled for a step (no drift, also after a failed step)."""
        for g, lr in self._restore:
            g["lr"] = lr
        self._restore.clear()
        self._snapshots.clear()

    def close(self) -> None:
        """Remove the optimizer hooks (idempotent)."""
        self.restore()
        self._finalizer()

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "sum": None if self.sum is None else self.sum.clone(),
            "count": self.count,
            "complete": self.complete,
            "adds": self.adds,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = state.get("sum")
        self.sum = None if s is None else torch.as_tensor(s).clone()
        self.count = int(state.get("count", 0))
        self.complete = bool(state.get("complete", False))
        self.adds = bool(state.get("adds", False))


def _remove(*handles: Any) -> None:
    for h in handles:
        h.remove()
