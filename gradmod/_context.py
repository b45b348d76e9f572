"""The hook engine: ``with ModulationContext(...): loss.backward()``.

This module keeps the context's lifecycle: construction, entering and leaving a block, state,
copies and closing. What it sequences lives elsewhere: the argument checks (``_config``), the
engine built from them (``_build``), a step's checks (``_steps``), each block's hooks and
coefficients (``_wiring``), the forward link of ``prepare`` (``_forward``) and the update level
(``_update``).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from . import _dist
from ._build import build
from ._config import Mode, check_state, configure
from ._errors import ConfigurationError, ContextError
from ._forward import ForwardLink
from ._groups import EncoderSpec, FusionSpec
from ._hooks import CONFLICT, HookSet
from ._protocol import Act, Method, Needs, Step, StepPlan, epoch_number
from ._steps import block_weight, check_half, check_step, check_weight, no_gradient
from ._validate import check_feature_graph
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
        self.mode: Mode = cfg.mode
        self.act: Act = cfg.act
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self.monitor = monitor
        self._needs, self._binding, self._targets = cfg.needs, cfg.binding, cfg.targets
        self._model = cfg.root
        self._update, self._wiring, self._watch, self._members = build(cfg, optimizer, self)
        self._lock = threading.Lock()
        self._closed = False
        self._boundary = True
        self._window_open = False  # a boundary=False block exited since the last boundary
        self._plan: StepPlan | None = None
        self._scores: Mapping[str, Tensor] = {}
        self._weight = 1.0
        self._feature_checked = False
        self._forward = ForwardLink(self.method, cfg.needs.forward)
        self._one_shot: _Inputs | None = (
            (features, targets, True, None) if features is not None or targets is not None else None
        )

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles (``copy.deepcopy`` of a module that holds the context) leave the
        lock out; an active block is not part of the state."""
        state = self.__dict__.copy()
        del state["_lock"]
        state["_plan"] = None
        state["_forward"] = ForwardLink(self.method, self._needs.forward)  # no pending forward
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
        return self._wiring.coefficients.detach().clone()

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
        """Tell the method the current epoch (OGM-GE's modulation window counts epochs).

        Raises:
            ValueError: ``epoch`` is not an integer >= 0 (a bool, a float, a negative number).
        """
        self.method.set_epoch(epoch_number("set_epoch", epoch))

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
            ConfigurationError: the state holds a non-finite value, was saved for another
                number of modalities, or by another method (other keys); nothing is loaded then.
        """
        problems = check_state(state_dict, self.names, self._needs, self.method)
        if problems:
            raise ConfigurationError(problems)
        update = {k[7:]: v for k, v in state_dict.items() if k.startswith("update.")}
        method = {k: v for k, v in state_dict.items() if not k.startswith("update.")}
        self.method.load_state_dict(method)
        if self._update is not None:
            self._update.load_state_dict(update)

    def prepare(self, features: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """The features the fusion head should consume, for a method that acts in the forward.

        Call it after the encoders and before the fusion head, and enter the next block with
        the same ``features`` (the encoder outputs, not what this returns)::

            feats = {"audio": model.audio(xa), "video": model.video(xv)}
            fused = model.head(torch.cat([*ctx.prepare(feats, y).values()], 1))
            with ctx(features=feats, targets=y):
                F.cross_entropy(fused, y).backward()

        OPM drops the dominant modality's features here. For every other method, in
        evaluation (the model not in training mode) and with grad disabled, it returns the
        features unchanged (a new dict), so a loop may always call it. In training, a block of
        a forward-acting method without it is refused (:class:`~gradmod.StepError`).

        Raises:
            StepError: the features or targets are unusable (as when entering a block).
            ContextError: called inside a block, or on a closed context.
        """
        return self._forward.prepare(
            features,
            lambda: self._check(features, targets, boundary=True, needs=self._needs),
            self._binding,
            self._model,
            usable=not (self._closed or self._lock.locked()),
        )

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
        if weight is not None:
            weight = block_weight(weight)
        return _Block(self, (features, targets, bool(boundary), weight))

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
            self._weight = weight if weight is not None else 1.0
            self._boundary = boundary
            if self._update is not None:
                self._update.restore()  # a step that raised left a scaled learning rate behind
            members = self._members
            if members and members[0].device != self._binding.device:  # the model moved
                wiring = self._wiring = self._wiring.to(members[0].device)
                self._binding = wiring.binding
            step = self._check(
                features, targets, boundary=boundary, needs=self._needs, weight=self._weight
            )
            if self.mode == "feature" and not self._feature_checked and features is not None:
                check_feature_graph(self._model, self._binding, features)
                self._feature_checked = True
            if HookSet.held_elsewhere(self._members):
                raise ContextError(CONFLICT)
            step, consume_forward = self._forward.take(step, self._model)
            plan = self.method.plan(self._binding, step)
            check_weight(
                self.method,
                plan,
                boundary=boundary,
                explicit=weight is not None,
                window_open=self._window_open,
            )
            feats: Mapping[str, Tensor] = features or {}
            check_half(plan, feats, self.grad_scaler)
            self._wiring.set_coefficients(plan, self.method)
            self._scores = plan.scores
            self._wiring.register(feats, plan, self._loss_scale, self._weight, self.monitor)
            self._plan = plan
            consume_forward()
        except BaseException:
            self._plan = None
            self._wiring.hooks.release()
            self._wiring.forget()
            self._lock.release()
            raise

    def _exit(self, exc_type: type[BaseException] | None) -> None:
        """Remove the hooks; after a clean backward, land the method's own gradients and
        advance its state. A block that raised leaves both untouched."""
        plan, self._plan = self._plan, None
        if plan is None:  # not active: nothing to leave
            return
        try:
            wiring = self._wiring
            hooks = wiring.hooks
            hooks.finish()  # parameter gradients scaled on leaving (HookSet.defer)
            missed, scaled = hooks.missed(), hooks.scaled_any()
            hooks.release()
            if exc_type is not None:
                wiring.forget()
                return
            if missed or not (scaled or self._update is not None):
                raise no_gradient(missed, self.method)
            # The method's own gradients (head losses) land only after a clean backward, so a
            # failing block leaves no partial gradient behind.
            scale = _dist.loss_scale(self.grad_scaler)
            if plan.accumulate:
                _dist.accumulate(plan.accumulate, self.process_group, scale, self._weight)
            wiring.land(plan, self._boundary, self.process_group)
            if plan.commit is not None:
                plan.commit()
            self._window_open = not self._boundary
            if self._update is not None:
                adds = bool(plan.inject or plan.accumulate or plan.transform)
                self._update.record(wiring.coefficients, self._boundary, adds)
            if self.monitor is not None:
                wiring.report(self.monitor, plan, self._boundary, scale)
        finally:
            self._lock.release()

    def _check(
        self,
        features: Mapping[str, Tensor] | None,
        targets: Tensor | None,
        *,
        boundary: bool,
        needs: Needs | None = None,
        weight: float = 1.0,
    ) -> Step:
        """This step's inputs as a :class:`Step` (see :func:`check_step`), with this process's
        rank and the number of ranks of the reduction."""
        rank, world = _dist.rank_and_world(self.process_group)
        return check_step(
            self.method,
            self._binding,
            self._watch,
            features,
            targets,
            live=self._wiring.live,
            reduce=self._reduce,
            loss_scale=self._loss_scale,
            boundary=boundary,
            needs=needs,
            weight=weight,
            rank=rank,
            world=world,
        )

    def _reduce(self, t: Tensor) -> Tensor:
        return _dist.reduce_sum(t, self.process_group)

    def _loss_scale(self) -> Tensor | None:
        """The scaler's scale, read inside backward (after ``scaler.scale(loss)``)."""
        return _dist.loss_scale(self.grad_scaler)
