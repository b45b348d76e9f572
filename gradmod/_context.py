"""The hook engine: ``with ModulationContext(...): loss.backward()``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import ConfigurationError, StepError
from ._groups import (
    EncoderSpec,
    FusionSpec,
    check_disjoint,
    reachable_leaves,
    resolve_fusion,
    resolve_groups,
    unwrap,
)
from ._hooks import HookSet
from .methods import CGGM, Binding, Method, Step, StepPlan, Targets

__all__ = ["Mode", "ModulationContext"]

Mode = Literal["parameter", "feature"]
#: Attribute of every encoder parameter: a one-item list naming the context that currently
#: modulates it (or ``None``), shared by every context built over that parameter.
_CLAIM = "_gradmod_claim"


def _coef_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _claim_cell(p: Tensor) -> list[object]:
    cell = p.__dict__.get(_CLAIM)
    if not isinstance(cell, list):
        cell = [None]
        setattr(p, _CLAIM, cell)
    return cell


class ModulationContext:
    r"""Modulates each modality encoder's gradients during the ``backward()`` inside its block.

    Build it once, before the training loop, and enter it around every backward, handing it
    the step's encoder outputs and targets::

        ctx = gradmod.ModulationContext(model, classifiers, method=gradmod.CGGM(), fusion="head")
        for x_audio, x_video, y in loader:
            feats = {"audio": model.audio(x_audio), "video": model.video(x_video)}
            loss = F.cross_entropy(model.head(torch.cat([*feats.values()], 1)), y)
            with ctx(features=feats, targets=y):
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    On entering, the method reads the features (CGGM: its classifiers on the detached
    features) and decides one coefficient per modality; the engine then registers, for the
    duration of the block only, hooks that multiply encoder ``m``'s gradients by that
    coefficient. Hooks are removed on exit, also when the block raises. Every method is used
    the same way; switching method is changing the ``method=`` argument.

    Args:
        model: the user's model (may be wrapped in DDP, DataParallel or ``torch.compile``).
            Dotted paths are resolved in it, and encoder parameters must belong to it.
        classifiers: modality name -> unimodal head. CGGM: auxiliary classifiers fed the
            detached features; MLB / MultiLoss: heads on the live features, part of the
            objective; OGM-GE: the per-modality linears of a "sum" fusion head.
        encoders: modality name -> encoder, as a module, an exact dotted submodule path of
            ``model`` or an iterable of parameters. Default: each classifier key is the path
            of its encoder in ``model`` (``{"audio": "audio"}``). Never substring matching.
        method: the modulation method, which keeps the cross-step state; default ``CGGM()``.
        fusion: the fusion head (module, path or tensor): the tensor moved by a direction loss
            (its last weight matrix), OGM-GE's linear head, MLB's sliced head. ``None``: none.
        mode: how encoder gradients are scaled. ``"parameter"`` (the default) hooks every
            encoder parameter (exact in all cases); ``"feature"`` hooks each encoder's output
            tensor instead, one multiply per modality at almost no cost. Feature mode is exact
            **provided encoder m's parameters receive gradient only through features[m]**; at
            the first step the engine walks the autograd graph and refuses a feature that
            depends on another group's parameters or on trainable parameters outside its
            group, and a group parameter that does not feed its feature. It cannot see a loss
            that reads an encoder's inner activations directly: use parameter mode then.
            Methods that scale their responses (AGM) take no mode.
        grad_scaler: the ``torch.amp.GradScaler`` that scales the loss, if any: gradients the
            method adds itself (head losses, direction loss) are scaled alike, so that after
            ``scaler.unscale_`` every gradient equals the run without a scaler.
        process_group: the ``torch.distributed`` group over which scores and head gradients
            are reduced (default: the world, when initialised with > 1 rank).
        allow_frozen: skip, instead of refusing, frozen parameters in an encoder group.
        features, targets: this step's inputs, for one-shot use; usually given by calling the
            context, ``with ctx(features=..., targets=...)``.

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
        features: Mapping[str, Tensor] | None = None,
        targets: Tensor | None = None,
    ) -> None:
        self.method: Method = method if method is not None else CGGM()
        problems: list[str] = []
        who = type(self.method).__name__
        if mode not in (None, "parameter", "feature"):
            problems.append(f"mode must be 'parameter' or 'feature'; got {mode!r}")
        if self.method.level == "responses" and mode is not None:
            problems.append(
                f"{who} scales the gradient of the responses handed to it as features; "
                f"mode={mode!r} does not apply: leave mode unset"
            )
        resolved_mode: Mode = "feature" if mode == "feature" else "parameter"
        if encoders is None:
            if classifiers is None:
                raise ConfigurationError(
                    [
                        "pass encoders={name: module | 'dotted.path' | [params]} (or classifiers "
                        "whose keys are the encoders' paths in the model)"
                    ]
                )
            encoders = {name: name for name in classifiers}
        names = tuple(encoders)
        lo, hi = self.method.min_modalities, self.method.max_modalities
        if len(names) < lo or (hi is not None and len(names) > hi):
            allowed = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
            problems.append(f"{who} needs {allowed} modalities; got {len(names)} ({list(names)})")
        groups = resolve_groups(model, encoders, problems, allow_frozen=allow_frozen)
        clfs = self._resolve_classifiers(classifiers, names, problems)
        fusion_module, u = (
            resolve_fusion(model, fusion, problems) if fusion is not None else (None, None)
        )

        others: dict[str, list[Tensor]] = {}
        for k, c in (clfs or {}).items():
            others[f"a parameter of classifiers[{k!r}]"] = list(c.parameters())
        if u is not None:
            others["the fusion tensor"] = [u]
        check_disjoint(groups, others, problems)
        if (
            isinstance(model, nn.parallel.DistributedDataParallel)
            and clfs is not None
            and self.method.trains_classifiers
        ):
            in_ddp = {id(p) for p in model.parameters()}
            if any(id(p) in in_ddp for c in clfs.values() for p in c.parameters()):
                problems.append(
                    f"the classifiers are inside the DDP-wrapped model, but {who} trains them "
                    "outside its forward (DDP would wait for their gradients); keep them outside "
                    "the DDP module: gradmod all-reduces their gradients itself"
                )

        device = next((p.device for ps in groups.values() for p in ps), torch.device("cpu"))
        self._binding = Binding(names, groups, clfs, fusion_module, u, resolved_mode, device)
        self._targets: Targets | None = None
        if not problems:  # method-level checks need a consistent binding
            problems.extend(self.method.check(self._binding))
            self._targets = self._resolve_targets(problems)
        if problems:
            raise ConfigurationError(problems)
        assert self._targets is not None

        self.mode: Mode = resolved_mode
        self.grad_scaler = grad_scaler
        self.process_group = process_group
        self._model = unwrap(model) if model is not None else None
        # float64: exact for float64 models; a 0-d factor never promotes a bf16/fp32 gradient.
        self._coeffs = torch.ones(len(names), device=device, dtype=_coef_dtype(device))
        self._hooks = HookSet(self._coeffs)
        self._claims = [_claim_cell(p) for ps in self._binding.groups.values() for p in ps]
        self._claimed = False
        self._deferred: list[tuple[Tensor, Tensor]] = []
        self._active = False
        self._feature_checked = False
        self._pending: tuple[Mapping[str, Tensor] | None, Tensor | None, bool, float] = (
            features,
            targets,
            True,
            1.0,
        )
        self._weight = 1.0
        self._target_tensors = [t for ts in self._targets.encoders.values() for t in ts]

    def _resolve_classifiers(
        self,
        classifiers: Mapping[str, nn.Module] | None,
        names: tuple[str, ...],
        problems: list[str],
    ) -> dict[str, nn.Module] | None:
        who = type(self.method).__name__
        use = self.method.classifier_use
        if classifiers is None:
            if use == "required":
                problems.append(
                    f"{who} needs one unimodal classifier per modality: pass classifiers={{name: module}}"
                )
            return None
        if use == "unused":
            problems.append(
                f"{who} uses no unimodal classifiers, but classifiers were given: drop them "
                "(nothing would read them)"
            )
        missing = [n for n in names if n not in classifiers]
        extra = [k for k in classifiers if k not in names]
        if missing or extra:
            problems.append(
                f"classifier keys {sorted(classifiers)} do not match encoder keys "
                f"{list(names)} (missing: {missing}, unknown: {extra})"
            )
        bad = [k for k, c in classifiers.items() if not isinstance(c, nn.Module)]
        if bad:
            problems.append(f"classifiers {bad} are not nn.Module instances")
        return {k: c for k, c in classifiers.items() if isinstance(c, nn.Module)}

    def _resolve_targets(self, problems: list[str]) -> Targets | None:
        b = self._binding
        targets = self.method.targets(b)
        for n in b.names:
            chosen = list(targets.encoders.get(n, ()))
            if not chosen and self.method.level == "encoders":
                problems.append(
                    f"{type(self.method).__name__} selects no tensor of encoders[{n!r}] to "
                    "modulate: check its parameter filter"
                )
            if b.mode == "feature" and {id(t) for t in chosen} != {id(p) for p in b.groups[n]}:
                problems.append(
                    f"feature mode scales the whole of encoders[{n!r}], but "
                    f"{type(self.method).__name__} modulates only part of it: use "
                    "mode='parameter'"
                )
        return targets

    # ----------------------------------------------------------------------------------- API
    @property
    def names(self) -> tuple[str, ...]:
        """Modality names, in the order of :attr:`coefficients`."""
        return self._binding.names

    @property
    def coefficients(self) -> Tensor:
        """The factors applied in the latest (or current) backward, shape ``[M]`` (a copy)."""
        return self._coeffs.detach().clone()

    def parameters(self) -> dict[str, list[nn.Parameter]]:
        """The encoder parameters of each modality."""
        return {n: list(ps) for n, ps in self._binding.groups.items()}

    def classifier_parameters(self) -> list[nn.Parameter]:
        """The parameters of the heads that the method trains (to hand to an optimizer).

        Empty when the method does not train heads of its own (OGM-GE's sum-head parts belong
        to the model and are already among its parameters).
        """
        cl = self._binding.classifiers or {}
        if not self.method.trains_classifiers:
            return []
        return [p for n in self.names if n in cl for p in cl[n].parameters()]

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (OGM-GE's modulation window counts epochs)."""
        self.method.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """The method's cross-step state (classifiers are the user's modules: save them too)."""
        return self.method.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.method.load_state_dict(state_dict)

    def __call__(
        self,
        features: Mapping[str, Tensor] | None = None,
        targets: Tensor | None = None,
        *,
        boundary: bool = True,
        weight: float = 1.0,
    ) -> ModulationContext:
        """Give this step's inputs; returns the context to enter.

        Args:
            features: modality -> this step's encoder output (live, in the graph); for
                response-level methods (AGM), the mono-modal responses.
            targets: this step's labels or regression targets.
            boundary: ``False`` for the earlier micro-batches of a gradient-accumulation
                window, ``True`` (default) for the backward after which the optimizer steps.
                Only methods that act once per optimizer step (OGM-GE's noise) read it.
            weight: multiplies every gradient the method adds itself (head losses, direction
                loss). With gradient accumulation over ``n`` micro-batches, if you divide your
                loss by ``n``, pass ``weight=1/n`` so that those terms are divided alike.
        """
        if not (weight > 0 and math.isfinite(weight)):
            raise StepError(f"weight must be a finite number > 0; got {weight}")
        self._pending = (features, targets, boundary, float(weight))
        return self

    def __repr__(self) -> str:
        return (
            f"ModulationContext(names={list(self.names)}, method={self.method!r}, "
            f"mode={self.mode!r})"
        )

    # ------------------------------------------------------------------------------ engine
    def __enter__(self) -> ModulationContext:
        if self._active:
            raise RuntimeError("this ModulationContext is already active: contexts do not nest")
        features, targets, boundary, self._weight = self._pending
        self._pending = (None, None, True, 1.0)
        self._follow_device()
        loss_scale = self._check_step(features, targets)
        assert targets is not None
        feats: Mapping[str, Tensor] = features or {}
        try:
            self._mark()
            step = Step(feats, targets, self._reduce, boundary, loss_scale)
            plan = self.method.plan(self._binding, step)
            self._set_coefficients(plan)
            self._register(feats, plan, loss_scale)
            self._deferred = plan.accumulate
        except BaseException:
            self._deferred = []
            self._release()
            raise
        self._active = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        missed = self._hooks.missed()
        scaled = self._hooks.scaled_any()
        deferred, self._deferred = self._deferred, []
        self._release()
        if exc_type is not None:
            return
        # The method's own gradients (head losses) land only after a clean backward, so a
        # failing block leaves no partial gradient behind.
        self._accumulate(deferred)
        if not missed and not scaled:
            raise StepError(
                "no modulated gradient passed through the block: call loss.backward() inside "
                "`with ctx(...)`, with a loss that reaches the encoders (if the encoder "
                "parameters were replaced after the context was built, e.g. by "
                "load_state_dict(assign=True), build the context again)"
            )
        if missed:
            raise StepError(
                f"{', '.join(missed)} received no gradient inside the block, so "
                f"{type(self.method).__name__}'s extra gradient was lost (zero the gradients "
                "of this step): call loss.backward() inside the block with a loss that uses it. "
                "A torch.compile'd model that consumes its features inside the compiled graph "
                "gives them no gradient of their own: compile the encoders separately"
            )

    def _follow_device(self) -> None:
        """Move the coefficients (and hooks) to the encoders' device if the model moved."""
        device = self._target_tensors[0].device if self._target_tensors else self._coeffs.device
        if device == self._coeffs.device:
            return
        self._coeffs = torch.ones(len(self.names), device=device, dtype=_coef_dtype(device))
        self._hooks = HookSet(self._coeffs)
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

    def _release(self) -> None:
        self._hooks.release()
        if self._claimed:
            for cell in self._claims:
                cell[0] = None
            self._claimed = False
        self._active = False

    def _mark(self) -> None:
        """Claim the encoder parameters for this backward, or refuse if another context has."""
        if any(cell[0] is not None for cell in self._claims):
            raise RuntimeError(
                "some of these encoder parameters are already modulated by an active "
                "ModulationContext; one context per parameter at a time (exit the other first)"
            )
        for cell in self._claims:
            cell[0] = self
        self._claimed = True

    def _hooks_features(self) -> bool:
        m = self.method
        return self.mode == "feature" or m.level == "responses" or m.injects_into_features

    def _check_step(
        self, features: Mapping[str, Tensor] | None, targets: Tensor | None
    ) -> Tensor | None:
        """Validate one step's inputs before anything is touched; returns the loss scale."""
        problems: list[str] = []
        if targets is None:
            problems.append("no targets for this step: enter with ctx(features=..., targets=y)")
        if self.method.level == "encoders" and self.mode == "parameter":
            frozen = [t for t in self._target_tensors if not t.requires_grad]
            if frozen:
                problems.append(
                    f"{len(frozen)} encoder parameter(s) (the first of shape "
                    f"{tuple(frozen[0].shape)}) stopped requiring grad after the context was "
                    "built: build it again after freezing (allow_frozen=True skips them)"
                )
        assert self._targets is not None
        columns = self._targets.columns
        need = self.method.uses_features or self._hooks_features() or columns is not None
        if features is None:
            if need:
                problems.append(
                    "no features for this step: enter with ctx(features={name: encoder output}, "
                    "targets=y)"
                )
        else:
            keys = list(features)
            if sorted(keys) != sorted(self.names):
                problems.append(
                    f"features keys {keys} do not match the modalities {list(self.names)}"
                )
            for k, h in features.items():
                if not isinstance(h, Tensor):
                    problems.append(f"features[{k!r}] is a {type(h).__name__}, not a tensor")
                elif self._hooks_features() and not h.requires_grad:
                    problems.append(
                        f"features[{k!r}] is not attached to the autograd graph (detached, or "
                        f"computed under no_grad): {type(self.method).__name__} in this mode "
                        "hooks the live tensor"
                    )
            if columns is not None and not problems:
                widths = [int(features[n].shape[-1]) for n in self.names]
                if sum(widths) != columns.shape[-1]:
                    problems.append(
                        f"the fusion weight has {columns.shape[-1]} input columns but the "
                        f"features' widths {widths} add up to {sum(widths)}: the fusion head "
                        "must be one Linear over the features concatenated in modality order"
                    )
        try:
            loss_scale = self._loss_scale()
        except StepError as e:
            problems.append(str(e))
            loss_scale = None
        if problems:
            raise StepError("; ".join(problems))
        if self.mode == "feature" and not self._feature_checked and features is not None:
            self._check_feature_precondition(features)
            self._feature_checked = True
        return loss_scale

    def _check_feature_precondition(self, features: Mapping[str, Tensor]) -> None:
        problems: list[str] = []
        model_params = (
            {id(p) for p in self._model.parameters() if p.requires_grad} if self._model else set()
        )
        group_ids = {n: {id(p) for p in ps} for n, ps in self._binding.groups.items()}
        for n in self.names:
            leaves = reachable_leaves(features[n])
            missing = len(group_ids[n] - leaves)
            if missing:
                problems.append(
                    f"{missing} parameter(s) of encoders[{n!r}] do not feed features[{n!r}]: "
                    "feature mode would not modulate them; use mode='parameter'"
                )
            for j in self.names:
                if j != n and group_ids[j] & leaves:
                    problems.append(
                        f"features[{n!r}] depends on parameters of encoders[{j!r}]: feature "
                        "mode needs disjoint encoders; use mode='parameter'"
                    )
            foreign = (leaves & model_params) - set().union(*group_ids.values())
            if foreign:
                problems.append(
                    f"features[{n!r}] depends on {len(foreign)} trainable parameter(s) outside "
                    f"encoders[{n!r}] (a shared input layer?): feature mode would scale their "
                    "gradients too; add them to the group or use mode='parameter'"
                )
        if problems:
            raise ConfigurationError(problems)

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return int(dist.get_world_size(self.process_group))

    def _reduce(self, t: Tensor) -> Tensor:
        if self._world() == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.process_group)
        return t

    def _loss_scale(self) -> Tensor | None:
        s = self.grad_scaler
        if s is None or not s.is_enabled():
            return None
        scale = getattr(s, "_scale", None)
        if scale is None:
            raise StepError(
                "grad_scaler has no scale yet: call scaler.scale(loss) before entering the block"
            )
        return scale  # type: ignore[no-any-return]

    def _accumulate(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        if pairs:
            with torch.no_grad():
                self._accumulate_now(pairs)

    def _accumulate_now(self, pairs: list[tuple[Tensor, Tensor]]) -> None:
        grads = [g for _, g in pairs]
        world = self._world()
        if world > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.process_group)
            flat /= world
            grads = [
                f.view_as(g)
                for f, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)
            ]
        scale = self._loss_scale()
        for (p, _), g in zip(pairs, grads, strict=True):
            g = g * scale.to(g.dtype) if scale is not None else g
            g = g * self._weight if self._weight != 1.0 else g
            if p.grad is None:
                p.grad = g.to(p.dtype).clone()
            else:
                p.grad.add_(g.to(p.grad.dtype))

    def _register(
        self, features: Mapping[str, Tensor], plan: StepPlan, loss_scale: Tensor | None
    ) -> None:
        assert self._targets is not None
        hooks = self._hooks
        # Injections first: a coefficient that scales the same tensor scales them too.
        hooks.inject(plan.inject, loss_scale, self._weight)
        if self.method.level == "responses" or self.mode == "feature":
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
        if self._targets.columns is not None:
            widths = [int(features[n].shape[-1]) for n in self.names]
            hooks.scale_columns(self._targets.columns, widths)
