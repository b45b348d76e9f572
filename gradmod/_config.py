"""A context's configuration: every check of the constructor's arguments, all problems at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._errors import ConfigurationError
from ._groups import (
    EncoderSpec,
    FusionSpec,
    Slot,
    check_disjoint,
    parameter_slots,
    resolve_fusion,
    resolve_groups,
    tied_outside,
    unwrap,
)
from ._protocol import Act, Binding, Method, Needs, Targets
from ._recommended import balanced
from ._update import check_optimizer
from ._validate import (
    check_classifiers,
    check_ddp_heads,
    check_sharded,
    check_targets,
)
from .monitor import Monitor

__all__ = ["Config", "Mode", "check_state", "configure"]

Mode = Literal["parameter", "feature"]


@dataclass(frozen=True)
class Config:
    """What :func:`configure` resolved: everything the context keeps from its arguments."""

    method: Method
    needs: Needs
    binding: Binding
    targets: Targets
    mode: Mode
    act: Act
    root: nn.Module | None
    slots: Mapping[int, list[Slot]]
    skipped: list[nn.Parameter]


def configure(
    model: nn.Module | None,
    classifiers: Mapping[str, nn.Module] | None,
    *,
    encoders: Mapping[str, EncoderSpec] | None,
    method: Method | None,
    fusion: FusionSpec | None,
    mode: Mode | None,
    allow_frozen: bool,
    act: Act | None,
    optimizer: torch.optim.Optimizer | None,
    monitor: Monitor | None,
) -> Config:
    """Resolve and check a context's arguments.

    Raises:
        ConfigurationError: listing every problem found (method-level checks run once the
            binding is consistent).
    """
    chosen: Method = method if method is not None else balanced()
    problems: list[str] = []
    who = type(chosen).__name__
    if not isinstance(chosen, Method):
        raise ConfigurationError(
            [f"method must be a gradmod.Method (e.g. gradmod.balanced()); got {who}"]
        )
    needs = chosen.needs()
    if mode not in (None, "parameter", "feature"):
        problems.append(f"mode must be 'parameter' or 'feature'; got {mode!r}")
    if needs.level == "responses" and mode is not None:
        problems.append(
            f"{who} scales the gradient of the responses handed to it as features; "
            f"mode={mode!r} does not apply: leave mode unset"
        )
    resolved_mode: Mode = "feature" if mode == "feature" else "parameter"
    if act is None:
        act = "update" if optimizer is not None else "gradient"
    if act not in ("gradient", "update"):
        problems.append(f"act must be 'gradient' or 'update'; got {act!r}")
    if act == "update" and needs.level == "responses":
        problems.append(
            f"{who} scales the gradients of its responses, which reach the fusion head as "
            "well as the encoders: it has no per-modality update; use act='gradient'"
        )

    if needs.combines_gradients:
        if resolved_mode == "feature":
            problems.append(
                f"{who} combines each encoder tensor's gradient with gradients of its own: it "
                "needs parameter hooks; use mode='parameter' (the default)"
            )
        if act == "update":
            problems.append(
                f"{who} replaces the encoders' gradients by a combination, not by a factor per "
                "modality: it has no update-level form; use act='gradient' (without optimizer=)"
            )
    if act == "gradient" and optimizer is not None:
        problems.append(
            "optimizer= puts the coefficients on its updates, but act='gradient' was asked "
            "for: drop one of them"
        )
    if monitor is not None and not isinstance(monitor, Monitor):
        problems.append(f"monitor must be a gradmod.Monitor; got {type(monitor).__name__}")
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
    lo, hi = needs.modalities
    if len(names) < lo or (hi is not None and len(names) > hi):
        allowed = f"{lo} to {hi}" if hi is not None else f"at least {lo}"
        problems.append(f"{who} needs {allowed} modalities; got {len(names)} ({list(names)})")
    skipped: list[nn.Parameter] = []
    groups = resolve_groups(model, encoders, problems, allow_frozen=allow_frozen, skipped=skipped)
    clfs = check_classifiers(chosen, classifiers, names, problems)
    fusion_module, u = (
        resolve_fusion(model, fusion, problems) if fusion is not None else (None, None)
    )
    others: dict[str, list[Tensor]] = {}
    for k, c in (clfs or {}).items():
        others[f"a parameter of classifiers[{k!r}]"] = list(c.parameters())
    if u is not None:
        others["the fusion tensor"] = [u]
    check_disjoint(groups, others, problems)
    check_ddp_heads(model, chosen, clfs, problems)
    root = unwrap(model) if model is not None else None
    check_sharded(model, chosen, groups, clfs, u, resolved_mode, act, optimizer, problems)
    slots = parameter_slots(root) if root is not None else {}
    if resolved_mode == "feature" and root is not None and not problems:
        problems.extend(tied_outside(root, encoders, groups, slots))

    device = next((p.device for ps in groups.values() for p in ps), torch.device("cpu"))
    binding = Binding(names, groups, clfs, fusion_module, u, resolved_mode, device, act)
    if not problems:  # method-level checks need a consistent binding
        problems.extend(chosen.check(binding))
        targets = check_targets(chosen, binding, problems)
        if act == "update" and not problems:
            problems.extend(
                check_optimizer(optimizer, [targets.encoders.get(n, []) for n in names], names)
            )
    if problems:
        raise ConfigurationError(problems)

    return Config(chosen, needs, binding, targets, resolved_mode, act, root, slots, skipped)


def check_state(
    state_dict: Mapping[str, Any], names: tuple[str, ...], needs: Needs, method: Method
) -> list[str]:
    """Problems with a state dict about to be loaded into a context over ``names`` whose
    method is ``method`` (its own keys are those of ``method.state_dict()``; the update
    level's are ``update.*``)."""
    m = len(names)
    problems: list[str] = []
    given = {k for k in state_dict if not k.startswith("update.")}
    expected = set(method.state_dict())
    if given != expected:
        missing, unexpected = sorted(expected - given), sorted(given - expected)
        problems.append(
            f"the state does not fit {type(method).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected} (a checkpoint of another method, preset or gradmod "
            "version): load the state of a context built with the same method"
        )
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            problems.append(f"state {key!r} holds non-finite values: the checkpoint is corrupt")
        if (
            (key in needs.per_modality_state or key == "update.sum")
            and value.numel()
            and value.shape[0] != m
        ):
            problems.append(
                f"state {key!r} was saved for {value.shape[0]} modalities, but this context "
                f"has {m} ({list(names)}): load the state of a context over the same "
                "modalities"
            )
    return problems
