"""The hook engine: ``with ModulationContext(...): loss.backward()``."""

from __future__ import annotations

import dataclasses
import math
import numbers
import threading
import weakref
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import _dist
from ._config import Mode, check_state, configure
from ._errors import ConfigurationError, ContextError, StepError
from ._groups import EncoderSpec, FusionSpec
from ._hooks import CONFLICT, GradNorms, HookSet
from ._protocol import Act, Method, Step, StepPlan, coefficient_dtype
from ._update import UpdateLevel
from ._validate import (
    ParameterWatch,
    check_feature_graph,
    check_features,
    slot_list,
)
from .monitor import Monitor

__all__ = ["Act", "Mode", "ModulationContext"]

_Inputs = tuple[Mapping[str, Tensor] | None, Tensor | None, bool, float | None]


class _Block:
    """One ``with`` block of a context, carrying that step's inputs (see
    :meth:`ModulationContext.__call__`)."""

    __slots__ = ("_ctx", "_inputs")

    def __init__(self, ctx: ModulationContext, inputs: _Inputs) -> None:
        self._ctx = ctx
        self._inputs = inputs

    def __enter__(self) -> ModulationContext:
        self._ctx._enter(self._inputs)
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._ctx._exit(exc_type)


class ModulationContext:
    r"""Modulates each modality encoder's gradients during the ``backward()`` inside its block.

    Build it once, before the training loop, and enter it around every backward, handing it
    the step's encoder outputs and targets::

        ctx = gradmod.ModulationContext(model, heads)  # gradmod.balanced() by default
        optimizer = torch.optim.Adam([*model.parameters(), *ctx.classifier_parameters()])
        for x_audio, x_video, y in loader:
            feats = {"audio": model.audio(x_audio), "video": model.video(x_video)}
            loss = F.cross_entropy(model.head(torch.cat([*feats.values()], 1)), y)
            with ctx(features=feats, targets=y):
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    On entering, the method reads the features (MLB: its unimodal heads on the live features;
    CGGM: its classifiers on the detached features) and decides one coefficient per modality;
    the engine then registers, for the duration of the block only, hooks that multiply encoder
    ``m``'s gradients by that coefficient. Hooks are removed on exit, also when the block
    raises. The method's state advances only when the block exits cleanly. Every method is used
    the same way; switching method is changing the ``method=`` argument.

    Args:
        model: the user's model (may be wrapped in DDP, DataParallel or ``torch.compile``).
            Dotted paths are resolved in it, and encoder parameters must belong to it.
        classifiers: modality name -> unimodal head. MLB / MultiLoss (and the default,
            :func:`gradmod.balanced`): heads on the live features, part of the objective;
            CGGM: auxiliary classifiers fed the detached features; OGM-GE: the per-modality
            linears of a "sum" fusion head.
        encoders: modality name -> encoder, as a module, an exact dotted submodule path of
            ``model`` or an iterable of parameters. Default: each classifier key is the path
            of its encoder in ``model`` (``{"audio": "audio"}``). Never substring matching.
        method: the modulation method, which keeps the cross-step state; default
            :func:`gradmod.balanced` (the recommended configuration).
        fusion: the fusion head (module, path or tensor): the tensor moved by a direction loss
            (its last weight matrix), OGM-GE's linear head, MLB's sliced head. ``None``: none.
        mode: how encoder gradients are scaled. ``"parameter"`` (the default) hooks every
            encoder parameter (exact in all cases); ``"feature"`` hooks each encoder's output
            tensor instead, one multiply per modality at almost no cost. Feature mode is exact
            **provided encoder m's parameters receive gradient only through features[m]**; the
            engine refuses encoder parameters registered elsewhere too (a weight tied with the
            fusion head), and at the first step it walks the autograd graph and refuses a
            feature that depends on another group's parameters or on trainable parameters
            outside its group, and a group parameter that does not feed its feature. It cannot
            see a loss that reads an encoder's inner activations, or a head that uses an
            encoder's weight tensor directly: use parameter mode then. Methods that scale their
            responses (AGM) take no mode.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: gradients the
            method adds itself (head losses, direction loss) are scaled alike, so that after
            ``scaler.unscale_`` every gradient equals the run without a scaler. Float16
            features without one are refused when the method adds gradients (pass ``False``
            to train float16 without a scaler); with ``optimizer=``, a step taken by a scaler
            the context was not given is refused.
        process_group: the ``torch.distributed`` group over which scores and head gradients
            are reduced (default: the world, when initialised with > 1 rank).
        allow_frozen: skip, instead of refusing, frozen parameters in an encoder group.
        act: where the coefficients act. ``"gradient"``: on the encoders' gradients, inside
            backward. ``"update"``: on the encoders' parameter *updates*, in the next
            ``optimizer.step()`` — modality ``m``'s update is the one its parameters would get
            with their learning rate multiplied by ``k_m`` (the mean of the coefficients of the
            blocks since the last step), on unscaled gradients, so an adaptive optimizer (Adam,
            AdamW) cannot cancel it; the method's own gradients (head losses, direction loss)
            are still added inside backward, unscaled. Default (``None``): ``"update"`` when an
            ``optimizer`` is given, else ``"gradient"``.
        optimizer: the optimizer that steps the encoders: puts the coefficients on its updates
            (the recommended use; ``act="gradient"`` with an optimizer is refused as ambiguous).
        monitor: a :class:`gradmod.Monitor` that records every clean block's coefficients,
            scores and encoder gradient norms before and after modulation (``None``: no
            recording, no extra hook).
        features, targets: this step's inputs, for one-shot use
            (``with ModulationContext(model, heads, features=f, targets=y): loss.backward()``);
            usually given by calling the context, ``with ctx(features=..., targets=...)``.

    Raises:
        ConfigurationError: listing every configuration problem at once.
    """

    def __init__(
        self,
        model: nn.Module | None,
        classifiers: Mapping[str, nn.Module] | None = None,
        *,
        encoders: Mapping[str, EncoderSpec] | None = None,
        method: Method | None = None,
        fusion: FusionSpec | None = None,
        mode: Mode | None = None,
        grad_scaler: Any = None,
        process_group: Any = None,
        allow_frozen: bool = False,
        act: Act | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        monitor: Monitor | None = None,
        features: Mapping[str, Tensor] | None = None,
        targets: Tensor | None = None,
    ) -> None:
        cfg = configure(
            model,
            classifiers,
            encoders=encoders,
            method=method,
            fusion=fusion,
            mode=mode,
            allow_frozen=allow_frozen,
            act=act,
            optimizer=optimizer,
            monitor=monitor,
        )
        self.method: Method = cfg.method
        self._needs = cfg.needs
        self._binding = cfg.binding
        self._targets = cfg.targets
        names, root, groups = cfg.binding.names, cfg.root, cfg.binding.groups
        act, device = cfg.act, cfg.binding.device
        self.mode: Mode = cfg.mode
        self.act: Act = act
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.monitor = monitor
        self._norms: tuple[GradNorms, GradNorms, bool] | None = None  # the block's, if monitored
        self._model = root
        # float64: exact for float64 models; a 0-d factor never promotes a bf16/fp32 gradient.
        self._coeffs = torch.ones(len(names), device=device, dtype=coefficient_dtype(device))
        self._update: UpdateLevel | None = None
        if act == "update":
            assert optimizer is not None
            me = weakref.ref(self)
            self._update = UpdateLevel(
                optimizer,
                [self._targets.encoders.get(n, []) for n in names],
                names,
                active=lambda: (c := me()) is not None and c._plan is not None,
                scaler=lambda: None if (c := me()) is None else c.grad_scaler,
            )
        self._hooks = HookSet(self._hook_coefficients())
        hooked = (
            [t for ts in self._targets.encoders.values() for t in ts]
            if cfg.needs.level == "encoders" and self.mode == "parameter" and act == "gradient"
            else []
        )  # tensors that get a parameter hook: they must keep requiring grad
        self._watch = ParameterWatch(slot_list(root, cfg.slots, groups), cfg.skipped, hooked)
        # Where no parameter hook holds the encoders (feature mode, response-level methods, the
        # update level), each group is held by a pass-through marker on its first parameter (one
        # call per modality and backward); every group parameter is checked for another context
        # on entering.
        self._members = [p for ps in groups.values() for p in ps]
        self._lock = threading.Lock()
        self._closed = False
        self._boundary = True
        self._window_open = False  # a boundary=False block exited since the last boundary
        self._plan: StepPlan | None = None
        self._scores: Mapping[str, Tensor] = {}
        self._weight = 1.0
        self._feature_checked = False
        self._one_shot: _Inputs | None = (
            (features, targets, True, None) if features is not None or targets is not None else None
        )

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy`` of a module that holds the context) leave the
        lock out; an active block is not part of the state."""
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None
        if state["_update"] is not None:  # a copy is not attached to the optimizer
            state["_update"] = None
            state["_closed"] = True
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------------------------- API
    @property
    def names(self) -> tuple[str, ...]:
        """Modality names, in the order of :attr:`coefficients`."""
        return self._binding.names

    @property
    def coefficients(self) -> Tensor:
        """The factors the method decided in the latest (or current) block, shape ``[M]`` (a
        copy): applied to that backward's gradients (``act="gradient"``), or recorded for the
        next optimizer step (``act="update"``, see :attr:`pending_update`)."""
        return self._coeffs.detach().clone()

    @property
    def scores(self) -> dict[str, Tensor]:
        """What the method decided the latest block's coefficients from, by name (each ``[M]``,
        copies), e.g. MLB's ``true_class_probability`` per head, CGGM's ``metric`` and ``b``."""
        return {k: v.detach().clone() for k, v in self._scores.items()}

    @property
    def pending_update(self) -> Tensor | None:
        """``act="update"``: the factors the next ``optimizer.step()`` applies to each
        modality's update (the mean over the blocks of the window), or ``None`` when no block
        ran since the last step (or at the gradient level)."""
        k = self._update.pending() if self._update is not None else None
        return None if k is None else k.detach().clone()

    def parameters(self) -> dict[str, list[nn.Parameter]]:
        """The encoder parameters of each modality."""
        return {n: list(ps) for n, ps in self._binding.groups.items()}

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The parameters of the heads that the method trains (to hand to an optimizer).

        Empty when the method does not train heads of its own (OGM-GE's sum-head parts belong
        to the model and are already among its parameters).
        """
        cl = self._binding.classifiers or {}
        if not self._needs.trains_classifiers:
            return []
        return [p for n in self.names if n in cl for p in cl[n].parameters()]

    def close(self) -> None:
        """Detach from the optimizer (``act="update"``): its step hooks are removed and any
        learning rate still scaled is restored. The context cannot be entered afterwards. Done
        automatically when the context is garbage-collected."""
        if self._update is not None:
            self._update.close()
        self._closed = True

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (OGM-GE's modulation window counts epochs)."""
        self.method.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The method's cross-step state, and with ``act="update"`` the coefficients waiting for
        the next optimizer step (``update.*``). Classifiers are the user's modules: save them
        with the model."""
        state: dict[str, Any] = dict(self.method.state_dict())
        if self._update is not None:
            state.update({f"update.{k}": v for k, v in self._update.state_dict().items()})
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the method's state saved by :meth:`state_dict`.

        Raises:
            ConfigurationError: the state holds a non-finite value, or was saved for another
                number of modalities; nothing is loaded then.
        """
        problems = check_state(state_dict, self.names, self._needs)
        if problems:
            raise ConfigurationError(problems)
        update = {k[7:]: v for k, v in state_dict.items() if k.startswith("update.")}
        method = {k: v for k, v in state_dict.items() if not k.startswith("update.")}
        self.method.load_state_dict(method)
        if self._update is not None:
            self._update.load_state_dict(update)

    def __call__(
        self,
        features: Mapping[str, Tensor] | None = None,
        targets: Tensor | None = None,
        *,
        boundary: bool = True,
        weight: float | None = None,
    ) -> _Block:
        """Give this step's inputs; returns the block to enter (``with ctx(...):``).

        Args:
            features: modality -> this step's encoder output (live, in the graph); for
                response-level methods (AGM), the mono-modal responses.
            targets: this step's labels or regression targets.
            boundary: ``False`` for the earlier micro-batches of a gradient-accumulation
                window, ``True`` (default) for the backward after which the optimizer steps.
                Read by what acts once per optimizer step: OGM-GE's noise, and with
                ``act="update"`` the window whose mean coefficient the step applies (a block with
                ``boundary=True`` closes it: pass ``False`` on every micro-batch but the last).
            weight: multiplies every gradient the method adds itself (head losses, direction
                loss); default 1. Under gradient accumulation over ``n`` micro-batches it is
                required: ``weight=1/n`` if you divide your loss by ``n`` (those terms are then
                divided alike), ``weight=1.0`` if you sum the micro-batch losses. A block of an
                accumulation window (``boundary=False``, or the block that closes one) without
                ``weight=`` is refused when the method adds gradients of its own.

        Raises:
            StepError: ``weight`` is not a finite number > 0.
        """
        if weight is not None and (
            isinstance(weight, bool)
            or not (isinstance(weight, numbers.Real) and weight > 0 and math.isfinite(weight))
        ):
            raise StepError(
                f"weight must be a finite number > 0 (1/n for n micro-batches); got {weight!r}"
            )
        return _Block(
            self, (features, targets, bool(boundary), None if weight is None else float(weight))
        )

    def __repr__(self) -> str:
        return (
            f"ModulationContext(names={list(self.names)}, method={self.method!r}, "
            f"mode={self.mode!r})"
        )

    def __enter__(self) -> ModulationContext:
        """Enter with the ``features`` and ``targets`` given to the constructor (one-shot use)."""
        inputs, self._one_shot = self._one_shot, None
        self._enter(inputs if inputs is not None else (None, None, True, None))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leave the block: see :meth:`_exit`."""
        self._exit(exc_type)

    # ------------------------------------------------------------------------------ engine
    def _enter(self, inputs: _Inputs) -> None:
        """Check the step, let the method plan it and register this backward's hooks.

        Nothing changes (no state, no gradient, no hook) when this raises.
        """
        if not self._lock.acquire(blocking=False):
            raise ContextError(
                "this ModulationContext is already active (a nested block, or a block in "
                "another thread): enter it once at a time, and build one context per thread"
            )
        try:
            if self._closed:
                raise ContextError(
                    "this ModulationContext was closed (or is a copy of an act='update' context, "
                    "which is not attached to any optimizer): build a new one"
                )
            features, targets, boundary, weight = inputs
            explicit_weight = weight is not None
            self._weight = weight if weight is not None else 1.0
            self._boundary = boundary
            if self._update is not None:
                self._update.restore()  # a step that raised left a scaled learning rate behind
            self._follow_device()
            feats: Mapping[str, Tensor] = features or {}
            step = self._check_step(features, targets, boundary)
            if self._hooks.held_elsewhere(self._members):
                raise ContextError(CONFLICT)
            plan = self.method.plan(self._binding, step)
            self._set_coefficients(plan)
            self._scores = plan.scores
            self._check_weight(plan, boundary, explicit_weight)
            self._check_half(plan, feats)
            self._register(feats, plan)
            self._plan = plan
        except BaseException:
            self._plan = None
            self._hooks.release()
            self._lock.release()
            raise

    def _exit(self, exc_type: type[BaseException] | None) -> None:
        """Remove the hooks; after a clean backward, land the method's own gradients and
        advance its state. A block that raised leaves both untouched."""
        plan, self._plan = self._plan, None
        norms, self._norms = self._norms, None
        if plan is None:  # not active: nothing to leave
            return
        try:
            missed = self._hooks.missed()
            scaled = self._hooks.scaled_any()
            self._hooks.release()
            if exc_type is not None:
                return
            if not missed and not scaled and self._update is None:
                raise StepError(
                    "no modulated gradient passed through the block: call loss.backward() "
                    "inside `with ctx(...)`, with a loss that reaches the encoders"
                )
            if missed:
                raise StepError(
                    f"{', '.join(missed)} received no gradient inside the block, so "
                    f"{type(self.method).__name__}'s extra gradient was lost (zero the "
                    "gradients of this step): call loss.backward() inside the block with a loss "
                    "that uses it. A torch.compile'd model that consumes its features inside "
                    "the compiled graph gives them no gradient of their own: compile the "
                    "encoders separately"
                )
            # The method's own gradients (head losses) land only after a clean backward, so a
            # failing block leaves no partial gradient behind.
            _dist.accumulate(
                plan.accumulate,
                self.process_group,
                _dist.loss_scale(self.grad_scaler),
                self._weight,
            )
            if plan.commit is not None:
                plan.commit()
            self._window_open = not self._boundary
            if self._update is not None:
                adds = bool(plan.inject or plan.accumulate or plan.transform)
                self._update.record(self._coeffs, self._boundary, adds)
            if norms is not None:
                self._report(plan, *norms)
        finally:
            self._lock.release()

    def _follow_device(self) -> None:
        """Move the coefficients (and hooks) to the encoders' device if the model moved."""
        device = self._members[0].device if self._members else self._coeffs.device
        if device == self._coeffs.device:
            return
        self._coeffs = torch.ones(len(self.names), device=device, dtype=coefficient_dtype(device))
        self._hooks = HookSet(self._hook_coefficients())
        self._binding = dataclasses.replace(self._binding, device=device)

    def _set_coefficients(self, plan: StepPlan) -> None:
        c = plan.coefficients
        if c.shape != self._coeffs.shape:
            raise RuntimeError(
                f"{type(self.method).__name__}.plan returned coefficients of shape "
                f"{tuple(c.shape)}; expected {tuple(self._coeffs.shape)}"
            )
        self._coeffs.copy_(c.detach())
        # Defensive: a non-finite coefficient never reaches a gradient (1 = untouched).
        self._coeffs.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)

    def _hook_coefficients(self) -> Tensor:
        """What the hooks multiply by: the coefficients, or ones at the update level (where a
        gradient transform, OGM-GE's noise, still runs but the coefficient acts on the step)."""
        if self._update is None:
            return self._coeffs
        return torch.ones_like(self._coeffs)

    def _hooks_features(self) -> bool:
        n = self._needs
        if self.act == "update":
            return n.injects_into_features
        return self.mode == "feature" or n.level == "responses" or n.injects_into_features

    def _check_step(
        self, features: Mapping[str, Tensor] | None, targets: Tensor | None, boundary: bool
    ) -> Step:
        """Validate one step's inputs before anything is touched."""
        problems = self._watch.problems()
        if targets is None:
            problems.append("no targets for this step: enter with ctx(features=..., targets=y)")
        elif not isinstance(targets, Tensor):
            problems.append(f"targets must be a tensor; got {type(targets).__name__}")
        check_features(
            self.method,
            self.names,
            features,
            self._hooks_features(),
            problems,
        )
        step = None
        if not problems:
            assert targets is not None
            step = Step(features or {}, targets, self._reduce, boundary, self._loss_scale)
            problems.extend(self.method.check_step(self._binding, step))
        if problems:
            raise StepError("; ".join(problems))
        assert step is not None
        if self.mode == "feature" and not self._feature_checked and features is not None:
            check_feature_graph(self._model, self._binding, features)
            self._feature_checked = True
        return step

    def _check_weight(self, plan: StepPlan, boundary: bool, explicit: bool) -> None:
        """Refuse a block of an accumulation window without ``weight=`` when the method adds
        gradients of its own: whether the user's loss is divided by ``n`` is not knowable."""
        if explicit or not (plan.inject or plan.accumulate):
            return
        if boundary and not self._window_open:
            return
        raise StepError(
            f"gradient accumulation (a block with boundary=False{'' if not boundary else ' before this one'}) "
            f"needs weight= on every block of the window: {type(self.method).__name__} adds "
            "gradients of its own (head losses, direction loss) that must be divided like your "
            "loss: pass weight=1/n if you divide the loss by the n micro-batches, weight=1.0 if "
            "you sum them"
        )

    def _check_half(self, plan: StepPlan, features: Mapping[str, Tensor]) -> None:
        """Refuse float16 features without a ``grad_scaler`` when the method adds gradients of
        its own: float16 training scales its loss with a ``GradScaler``, and gradients added
        without its scale would be off by it after ``unscale_`` (``grad_scaler=False``: no
        scaler, on purpose)."""
        if self.grad_scaler is not None or not (plan.inject or plan.accumulate):
            return
        if any(f.dtype == torch.float16 for f in features.values()):
            raise StepError(
                "float16 features but no grad_scaler: with a GradScaler, pass "
                "grad_scaler=scaler (the method's own gradients must be scaled like the loss); "
                "training float16 without one, pass grad_scaler=False"
            )

    def _reduce(self, t: Tensor) -> Tensor:
        return _dist.reduce_sum(t, self.process_group)

    def _loss_scale(self) -> Tensor | None:
        """The scaler's scale, read inside backward (after ``scaler.scale(loss)``)."""
        return _dist.loss_scale(self.grad_scaler)

    def _register(self, features: Mapping[str, Tensor], plan: StepPlan) -> None:
        hooks = self._hooks
        on_params = self._needs.level == "encoders" and self.mode == "parameter"
        if self._update is not None:  # the coefficients act on the step, not here
            on_params = on_params and plan.transform is not None
        observe_after = self._observe(on_params) if self.monitor is not None else None
        if not on_params:
            scaled = {id(t) for t in features.values()}
            heads = [ps[0] for ps in self._binding.groups.values() if ps]
            hooks.claim([p for p in heads if p.requires_grad and id(p) not in scaled])
        # Injections first: a coefficient that scales the same tensor scales them too.
        hooks.inject(plan.inject, self._loss_scale, self._weight)
        if self._update is not None:
            if plan.transform is not None and on_params:
                hooks.scale(
                    {m: list(self._targets.encoders.get(n, ())) for m, n in enumerate(self.names)},
                    plan.transform,
                )
            elif plan.transform is not None:
                raise RuntimeError(
                    f"{type(self.method).__name__} transforms parameter gradients, which needs "
                    "mode='parameter'"
                )
        elif self._needs.level == "responses" or self.mode == "feature":
            if plan.transform is not None:
                raise RuntimeError(
                    f"{type(self.method).__name__} transforms parameter gradients, which needs "
                    "mode='parameter'"
                )
            hooks.scale({m: [features[n]] for m, n in enumerate(self.names)}, None)
        else:
            hooks.scale(
                {m: list(self._targets.encoders.get(n, ())) for m, n in enumerate(self.names)},
                plan.transform,
            )
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
        groups = [self._binding.groups[n] for n in self.names]
        before, after = GradNorms([len(g) for g in groups]), GradNorms([len(g) for g in groups])
        self._norms = (before, after, on_params)
        tensors = [
            (m, i, p) for m, g in enumerate(groups) for i, p in enumerate(g) if p.requires_grad
        ]
        hooks = self._hooks
        if not on_params:
            return lambda: hooks.observe(tensors, [after])
        hooked = {id(t) for ts in self._targets.encoders.values() for t in ts}
        scaled = [x for x in tensors if id(x[2]) in hooked]
        hooks.observe(scaled, [before])
        hooks.observe([x for x in tensors if id(x[2]) not in hooked], [before, after])
        return lambda: hooks.observe(scaled, [after])

    def _report(self, plan: StepPlan, before: GradNorms, after: GradNorms, seen: bool) -> None:
        """Hand a clean block's record to the monitor (device operations only)."""
        assert self.monitor is not None
        dtype, device = self._coeffs.dtype, self._coeffs.device
        norm_after = after.totals(dtype, device)
        if seen:  # observed on both sides of the scaling hooks
            norm_before = before.totals(dtype, device)
        elif self._update is not None:  # the coefficients act on the update: nothing scaled
            norm_before = norm_after
        elif self._needs.level == "responses":  # every response reaches every encoder
            norm_before = torch.full_like(norm_after, math.nan)
        else:  # feature mode: encoder m's parameters received k_m times their gradient
            k = self._coeffs.abs()
            norm_before = torch.where(k == 0, math.nan, norm_after / k)
        scale = _dist.loss_scale(self.grad_scaler)
        if scale is not None:
            norm_before, norm_after = norm_before / scale, norm_after / scale
        self.monitor._record(
            self.names, self._boundary, self._coeffs, plan.scores, norm_before, norm_after
        )
