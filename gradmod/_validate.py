"""Configuration and step checks of a context: every problem found is reported at once."""

from __future__ import annotations

import operator
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn, optim

from ._errors import ConfigurationError
from ._groups import Slot, fsdp_unsharded, is_sharded, reachable_leaves
from ._protocol import Binding, Method, Needs, Targets

_REQUIRES_GRAD = operator.attrgetter("requires_grad")

__all__ = [
    "ParameterWatch",
    "check_classifiers",
    "check_ddp_heads",
    "check_feature_graph",
    "check_features",
    "check_parameters",
    "check_sharded",
    "check_targets",
]


def check_classifiers(
    method: Method,
    classifiers: Mapping[str, nn.Module] | None,
    names: Sequence[str],
    problems: list[str],
) -> dict[str, nn.Module] | None:
    """The classifiers the method will use, with a problem for each mismatch."""
    who = type(method).__name__
    use = method.needs().classifiers
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


def check_ddp_heads(
    model: nn.Module | None,
    method: Method,
    classifiers: Mapping[str, nn.Module] | None,
    problems: list[str],
) -> None:
    """Heads that the method trains must stay out of DDP's gradient reduction: outside the
    DDP-wrapped model, or among the parameters it ignores."""
    if not (
        isinstance(model, nn.parallel.DistributedDataParallel)
        and classifiers is not None
        and method.needs().trains_classifiers
    ):
        return
    ignored = set(getattr(model, "parameters_to_ignore", ()))
    in_ddp = {id(p) for n, p in model.module.named_parameters() if n not in ignored}
    if any(id(p) in in_ddp for c in classifiers.values() for p in c.parameters()):
        problems.append(
            f"the classifiers are inside the DDP-wrapped model, but {type(method).__name__} "
            "trains them outside its forward (DDP would wait for their gradients); keep them "
            "outside the DDP module, or leave them out of its reduction before wrapping "
            "(DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, "
            "[their parameter names])): gradmod all-reduces their gradients itself"
        )


def check_sharded(
    model: nn.Module | None,
    method: Method,
    groups: Mapping[str, Sequence[Tensor]],
    classifiers: Mapping[str, nn.Module] | None,
    fusion: Tensor | None,
    mode: str,
    act: str | None,
    optimizer: object,
    problems: list[str],
) -> None:
    """FSDP: a problem naming the fix for each use of sharded (``DTensor``) parameters that
    gradmod cannot make exact.

    FSDP2 (``fully_shard``) runs forward and backward on unsharded copies of the parameters and
    reduce-scatters their gradients into the sharded parameters' ``.grad`` outside autograd: a
    hook on a sharded parameter never fires, and a gradient gradmod adds to one is lost or
    wrong. Exact (coefficients are global, and FSDP averages gradients over ranks like DDP):
    hooks on the features (``mode="feature"``) or on AGM's responses, reading the fusion head
    inside the block (OGM-GE), and the update level's fast path (a learning rate scaled per
    param group).
    """
    # looked up, not imported: a model wrapped by FSDP1 has imported it already
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if (
        model is not None
        and isinstance(fsdp1, type)
        and any(isinstance(m, fsdp1) for m in model.modules())
    ):
        problems.append(
            "the model is wrapped by FullyShardedDataParallel (FSDP1), which flattens "
            "parameters into one tensor per unit, so no modality group can be told apart: "
            "shard it with torch.distributed.fsdp.fully_shard (FSDP2) and use "
            "mode='feature', or use DistributedDataParallel"
        )
        return
    who = type(method).__name__
    sharded = [n for n, ps in groups.items() if any(is_sharded(p) for p in ps)]
    needs = method.needs()
    ge = (
        f" ({who} transforms parameter gradients: it needs them)"
        if needs.transforms_gradients
        else ""
    )
    if sharded and mode == "parameter" and act != "update" and needs.level == "encoders":
        problems.append(
            f"encoders {sharded} have FSDP-sharded (DTensor) parameters: a parameter-mode hook "
            "on them never fires (FSDP computes gradients on unsharded copies and writes the "
            "reduce-scattered result into .grad): use mode='feature', which hooks the encoder "
            f"outputs instead{ge}"
        )
    if fusion is not None and is_sharded(fusion) and needs.fusion == "changes":
        problems.append(
            f"the fusion head given as fusion= is FSDP-sharded, and {who} changes its gradient "
            "(a direction loss, or MLB's official column scaling) outside FSDP's backward, "
            "where the sharded weight never receives it as such: leave fusion= unset "
            "(CGGM(lam=0), MLB(scale='encoder') without direction=) or use "
            "DistributedDataParallel"
        )
    if classifiers is not None:
        inside = [k for k, c in classifiers.items() if any(is_sharded(p) for p in c.parameters())]
        if inside:
            problems.append(
                f"classifiers {inside} are FSDP-sharded: gradmod runs them and all-reduces "
                "their gradients itself, outside FSDP's backward, and they would train wrong "
                "without an error; keep them out of fully_shard"
            )
    if sharded and act == "update" and isinstance(optimizer, optim.Optimizer):
        owner = {id(p): n for n, ps in groups.items() for p in ps}
        for g in optimizer.param_groups:
            owners = {owner.get(id(p)) for p in g["params"]}
            mods = sorted(n for n in owners if n is not None)
            if mods and len(owners) > 1 and any(n in sharded for n in mods):
                problems.append(
                    f"a param group holds FSDP-sharded parameters of encoders {mods} together "
                    "with other parameters: the update level would copy and blend them after "
                    "the step, which DTensors do not support (no sharding strategy for "
                    "aten._foreach_copy_); give each modality's encoder a param group of its "
                    "own (its learning rate is then scaled for the step, exact)"
                )
                break


def check_targets(method: Method, binding: Binding, problems: list[str]) -> Targets:
    """What the method scales, with a problem where the mode cannot honour it."""
    targets = method.targets(binding)
    who = type(method).__name__
    for n in binding.names:
        chosen = list(targets.encoders.get(n, ()))
        if not chosen and method.needs().level == "encoders":
            problems.append(
                f"{who} selects no tensor of encoders[{n!r}] to modulate: check its parameter "
                "filter"
            )
        if binding.mode == "feature" and {id(t) for t in chosen} != {
            id(p) for p in binding.groups[n]
        }:
            problems.append(
                f"feature mode scales the whole of encoders[{n!r}], but {who} modulates only "
                "part of it: use mode='parameter'"
            )
    return targets


class ParameterWatch:
    """Encoder parameters changed since the context was built, checked at every step.

    ``slots``: where each encoder parameter and the modules above it were registered;
    ``skipped``: the frozen parameters ``allow_frozen=True`` left out; ``hooked``: the tensors
    that get a parameter hook. The common case (nothing changed) is three C-level passes over
    prebuilt lists: no Python frame per parameter, no host sync.
    """

    def __init__(
        self, slots: Sequence[Registration], skipped: Sequence[Tensor], hooked: Sequence[Tensor]
    ) -> None:
        self._dicts = [d for d, _, _ in slots]
        self._keys = [k for _, k, _ in slots]
        self._objects = [o for _, _, o in slots]
        self._skipped = list(skipped)
        self._hooked = list(hooked)

    def problems(self) -> list[str]:
        current = map(dict.get, self._dicts, self._keys)
        if (
            not any(map(operator.is_not, current, self._objects))
            and not any(map(_REQUIRES_GRAD, self._skipped))
            and all(map(_REQUIRES_GRAD, self._hooked))
        ):
            return []
        return check_parameters(
            list(zip(self._dicts, self._keys, self._objects, strict=True)),
            self._skipped,
            self._hooked,
        )


def check_parameters(
    slots: Sequence[Registration],
    skipped: Sequence[Tensor],
    hooked: Sequence[Tensor],
) -> list[str]:
    """The problems :class:`ParameterWatch` found, described."""
    problems: list[str] = []
    replaced = sum(1 for d, k, p in slots if d.get(k) is not p and not _unsharded(d.get(k), p))
    if replaced:
        problems.append(
            f"{replaced} encoder parameter(s) or layer(s) were replaced after the context was "
            "built (e.g. by load_state_dict(assign=True) on the model or an encoder layer, or by "
            "assigning a new layer): the new ones would not be modulated; build the context "
            "again"
        )
    thawed = sum(1 for p in skipped if p.requires_grad)
    if thawed:
        problems.append(
            f"{thawed} encoder parameter(s) that allow_frozen=True skipped because they were "
            "frozen now require grad: they would train unmodulated; build the context again "
            "after unfreezing"
        )
    frozen = [t for t in hooked if not t.requires_grad]
    if frozen:
        problems.append(
            f"{len(frozen)} encoder parameter(s) (the first of shape {tuple(frozen[0].shape)}) "
            "stopped requiring grad after the context was built: build it again after freezing "
            "(allow_frozen=True skips them)"
        )
    return problems


def _unsharded(current: object, registered: object) -> bool:
    """Whether ``current`` is FSDP2's unsharded copy of the sharded parameter ``registered``:
    FSDP2 swaps the two in the module while the module is all-gathered (a root module keeps its
    parameters unsharded from forward to backward)."""
    return (
        isinstance(registered, Tensor)
        and is_sharded(registered)
        and isinstance(current, nn.Parameter)
        and not is_sharded(current)
        and current.shape == registered.shape
    )


def check_features(
    method: Method,
    names: Sequence[str],
    features: Mapping[str, Tensor] | None,
    live: bool,
    problems: list[str],
    needs: Needs | None = None,
) -> None:
    """One step's features: keys and types, and graph attachment where hooks need it
    (``needs``: the method's declaration, read at construction; default: asked again)."""
    if features is not None and not isinstance(features, Mapping):
        problems.append(
            f"features must be a mapping {{modality name: tensor}}; got a {type(features).__name__}"
        )
        return
    who = type(method).__name__
    need = live or (needs if needs is not None else method.needs()).features
    if features is None:
        if need:
            problems.append(
                "no features for this step: enter with ctx(features={name: encoder output}, "
                "targets=y)"
            )
        return
    keys = list(features)
    if sorted(keys) != sorted(names):
        problems.append(f"features keys {keys} do not match the modalities {list(names)}")
        return
    for k, h in features.items():
        if not isinstance(h, Tensor):
            problems.append(f"features[{k!r}] is a {type(h).__name__}, not a tensor")
        elif live and not h.requires_grad:
            problems.append(
                f"features[{k!r}] is not attached to the autograd graph (detached, or computed "
                f"under no_grad): {who} in this mode hooks the live tensor"
            )


def check_feature_graph(
    model: nn.Module | None, binding: Binding, features: Mapping[str, Tensor]
) -> None:
    """Feature mode's precondition, read off the autograd graph of the first step's features."""
    problems: list[str] = []
    # FSDP2: the graph's leaves are unsharded copies of the sharded parameters
    alias = fsdp_unsharded(model) if model is not None else {}
    if alias is None:
        if any(is_sharded(p) for ps in binding.groups.values() for p in ps):
            raise ConfigurationError(
                [
                    "the encoders are FSDP-sharded, and this torch's FSDP2 does not expose its "
                    "unsharded parameters where gradmod reads them (see gradmod._groups."
                    "fsdp_unsharded), so feature mode's check cannot run: use "
                    "DistributedDataParallel"
                ]
            )
        alias = {}
    model_params = (
        {alias.get(id(p), id(p)) for p in model.parameters() if p.requires_grad}
        if model is not None
        else set()
    )
    group_ids = {n: {id(p) for p in ps} for n, ps in binding.groups.items()}
    training = {n: {id(p) for p in ps if p.requires_grad} for n, ps in binding.groups.items()}
    for n in binding.names:
        leaves = {alias.get(i, i) for i in reachable_leaves(features[n])}
        missing = len(training[n] - leaves)  # a parameter frozen since needs no modulation
        if missing:
            problems.append(
                f"{missing} parameter(s) of encoders[{n!r}] do not feed features[{n!r}]: "
                "feature mode would not modulate them; use mode='parameter'"
            )
        for j in binding.names:
            if j != n and group_ids[j] & leaves:
                problems.append(
                    f"features[{n!r}] depends on parameters of encoders[{j!r}]: feature mode "
                    "needs disjoint encoders; use mode='parameter'"
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


Registration = tuple[dict[str, Any], str, object]


def slot_list(
    root: nn.Module | None,
    slots: Mapping[int, list[Slot]],
    groups: Mapping[str, Sequence[nn.Parameter]],
) -> list[Registration]:
    """``(owner dict, key, object)`` for every registration of every encoder parameter, and for
    every module on the path from ``root`` to it (so that a replaced layer is seen too)."""
    out: list[Registration] = []
    seen: set[tuple[int, str]] = set()
    for ps in groups.values():
        for p in ps:
            for d, k, qual in slots.get(id(p), []):
                out.append((d, k, p))
                if root is None:
                    continue
                parent = root
                for name in qual.split(".")[:-1]:
                    child = parent._modules.get(name)
                    if child is None:
                        break
                    if (id(parent._modules), name) not in seen:
                        seen.add((id(parent._modules), name))
                        out.append((parent._modules, name, child))
                    parent = child
    return out
