"""Resolve explicitly declared modality groups to parameter lists, collecting every problem."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._protocol import last_weight_matrix

__all__ = [
    "EncoderSpec",
    "FusionSpec",
    "Slot",
    "check_disjoint",
    "fsdp_unsharded",
    "is_sharded",
    "parameter_slots",
    "reachable_leaves",
    "resolve_fusion",
    "resolve_groups",
    "tied_outside",
    "unwrap",
]

#: How a modality's encoder is named: the module itself, a dotted submodule path inside the model
#: (exact, as in ``model.get_submodule``), or an explicit iterable of parameters.
EncoderSpec = nn.Module | str | Iterable[nn.Parameter]
#: The fusion head for CGGM's direction loss: a module or dotted path (its last weight matrix is
#: used), or a tensor.
FusionSpec = nn.Module | str | Tensor
#: Where a parameter is registered: the owning module's ``_parameters`` dict, the key in it and
#: the qualified name of the parameter.
Slot = tuple[dict[str, nn.Parameter | None], str, str]


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers (same parameters)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
            continue
        return model


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard``, or by
    tensor parallelism): its gradient is computed on another tensor and written into ``.grad``.

    A DTensor exists only once ``torch.distributed.tensor`` was imported (FSDP2 imports it):
    looking it up in ``sys.modules`` keeps that import (~1 s) out of gradmod's.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return isinstance(dtensor, type) and isinstance(t, dtensor)


def fsdp_unsharded(root: nn.Module) -> dict[int, int] | None:
    """``id`` of each FSDP2 unsharded parameter -> ``id`` of its sharded parameter.

    FSDP2 runs forward and backward on unsharded copies of the sharded parameters (the autograd
    leaves) and reduce-scatters their gradients into the sharded parameters' ``.grad``. A copy
    exists once its module has been all-gathered (after the first forward). Read off FSDP2's
    private state (``_get_fsdp_state()._fsdp_param_groups[*].fsdp_params``, as in torch 2.13):
    ``None`` where a ``fully_shard``-ed module does not have it (another torch version).
    """
    out: dict[int, int] = {}
    for mod in root.modules():
        get_state = getattr(mod, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            return None
        for group in groups:
            for fp in getattr(group, "fsdp_params", None) or ():
                sharded = getattr(fp, "sharded_param", None)
                if sharded is None:
                    return None
                unsharded = getattr(fp, "_unsharded_param", None)
                if unsharded is not None:
                    out[id(unsharded)] = id(sharded)
    return out


def _lookup(root: nn.Module, path: str) -> nn.Module | Tensor | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    try:
        return root.get_parameter(path)
    except AttributeError:
        return None


def _children_hint(root: nn.Module) -> str:
    names = [n for n, _ in root.named_children()]
    return ", ".join(repr(n) for n in names[:12]) + (" ..." if len(names) > 12 else "")


def resolve_groups(
    model: nn.Module | None,
    encoders: Mapping[str, EncoderSpec],
    problems: list[str],
    *,
    allow_frozen: bool = False,
    skipped: list[nn.Parameter] | None = None,
) -> dict[str, list[nn.Parameter]]:
    """Map each modality name to its (deduplicated, ordered) encoder parameters.

    Appends a readable message to ``problems`` for every path that matches nothing, empty group,
    frozen parameter, parameter outside ``model`` and parameter claimed by two groups. With
    ``allow_frozen``, the frozen parameters left out are appended to ``skipped``.
    """
    root = unwrap(model) if model is not None else None
    in_model = {id(p) for p in root.parameters()} if root is not None else None
    groups: dict[str, list[nn.Parameter]] = {}
    owner: dict[int, str] = {}
    for name, spec in encoders.items():
        where = f"encoders[{name!r}]"
        params: list[nn.Parameter]
        if isinstance(spec, str):
            if root is None:
                problems.append(
                    f"{where} is the path {spec!r} but no model was given to resolve it"
                )
                continue
            found = _lookup(root, spec)
            if found is None:
                problems.append(
                    f"{where} = {spec!r} matches no submodule or parameter of the model (paths are "
                    f"exact, as in model.get_submodule); top-level children: {_children_hint(root)}"
                )
                continue
            params = list(found.parameters()) if isinstance(found, nn.Module) else [found]  # type: ignore[list-item]
        elif isinstance(spec, nn.Module):
            params = list(spec.parameters())
        elif isinstance(spec, Tensor):
            problems.append(
                f"{where} is a single tensor; pass a list of parameters, a module or a path"
            )
            continue
        else:
            try:
                params = list(spec)
            except TypeError:
                problems.append(
                    f"{where} has type {type(spec).__name__}; expected a module, a dotted path or "
                    "an iterable of parameters"
                )
                continue
        unique: list[nn.Parameter] = []
        seen: set[int] = set()
        for p in params:
            if not isinstance(p, Tensor):
                problems.append(f"{where} contains {type(p).__name__}, not a parameter tensor")
                continue
            if id(p) in seen:
                continue
            seen.add(id(p))
            unique.append(p)
        if not unique:
            problems.append(f"{where} has no parameters: every modality needs a non-empty encoder")
            continue
        frozen = sum(1 for p in unique if not p.requires_grad)
        if frozen and not allow_frozen:
            problems.append(
                f"{where} has {frozen} frozen parameter(s) (requires_grad=False) that can never be "
                "modulated; pass only trainable parameters, or allow_frozen=True to skip them"
            )
        if skipped is not None:
            skipped.extend(p for p in unique if not p.requires_grad)
        unique = [p for p in unique if p.requires_grad]
        if in_model is not None:
            outside = sum(1 for p in unique if id(p) not in in_model)
            if outside:
                problems.append(
                    f"{where} has {outside} parameter(s) that are not parameters of the model; "
                    "pass the encoder that the model actually uses"
                )
        for p in unique:
            other = owner.get(id(p))
            if other is not None and other != name:
                problems.append(
                    f"encoders[{other!r}] and {where} share a parameter of shape "
                    f"{tuple(p.shape)}: modality groups must not overlap"
                )
                break
            owner[id(p)] = name
        groups[name] = unique
    return groups


def resolve_fusion(
    model: nn.Module | None, fusion: FusionSpec, problems: list[str]
) -> tuple[nn.Module | None, Tensor | None]:
    """The fusion module (when one is given) and the fusion tensor ``u`` of the direction loss.

    ``u`` is the module's last weight matrix, or the tensor itself when a tensor is given.
    """
    target: nn.Module | Tensor | None
    if isinstance(fusion, str):
        root = unwrap(model) if model is not None else None
        target = _lookup(root, fusion) if root is not None else None
        if target is None:
            problems.append(f"fusion = {fusion!r} matches no submodule or parameter of the model")
            return None, None
    else:
        target = fusion
    if isinstance(target, nn.Module):
        w = last_weight_matrix(target)
        if w is None:
            problems.append("fusion module has no weight matrix (no parameter with >= 2 dims)")
        return target, w
    if isinstance(target, Tensor):
        if not target.requires_grad:
            problems.append(
                "fusion tensor does not require grad: the direction loss cannot move it"
            )
        return None, target
    problems.append(f"fusion has type {type(fusion).__name__}; expected a module, path or tensor")
    return None, None


def check_disjoint(
    groups: Mapping[str, Sequence[Tensor]],
    others: Mapping[str, Sequence[Tensor]],
    problems: list[str],
) -> None:
    """Report any tensor of ``others`` (e.g. classifier or fusion weights) inside an encoder group."""
    ids = {id(p): n for n, ps in groups.items() for p in ps}
    for what, ts in others.items():
        for t in ts:
            if id(t) in ids:
                problems.append(
                    f"{what} is part of encoders[{ids[id(t)]!r}]; keep it outside the encoders"
                )
                break


def reachable_leaves(root: Tensor) -> set[int]:
    """ids of the leaf tensors whose gradient flows through ``root`` (autograd graph walk)."""
    out: set[int] = set()
    fn = root.grad_fn
    if fn is None:
        return out
    stack = [fn]
    seen: set[object] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            out.add(id(var))
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return out


def parameter_slots(root: nn.Module) -> dict[int, list[Slot]]:
    """``id(parameter)`` -> every place it is registered in ``root`` (tied weights and modules
    registered twice appear more than once)."""
    out: dict[int, list[Slot]] = {}
    for mod_name, mod in root.named_modules(remove_duplicate=False):
        for key, p in mod._parameters.items():
            if p is not None:
                qual = f"{mod_name}.{key}" if mod_name else key
                out.setdefault(id(p), []).append((mod._parameters, key, qual))
    return out


def _module_of(root: nn.Module, spec: EncoderSpec) -> nn.Module | None:
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        found = _lookup(root, spec)
        return found if isinstance(found, nn.Module) else None
    return None


def tied_outside(
    root: nn.Module,
    encoders: Mapping[str, EncoderSpec],
    groups: Mapping[str, Sequence[nn.Parameter]],
    slots: Mapping[int, list[Slot]],
) -> list[str]:
    """Encoder parameters registered somewhere outside their encoder as well (a weight tied
    with the fusion head, an encoder layer reused in the head): feature mode would leave the
    gradient they receive there unscaled."""
    problems: list[str] = []
    for name, ps in groups.items():
        enc = _module_of(root, encoders[name])
        paths = (
            [n for n, mod in root.named_modules(remove_duplicate=False) if mod is enc]
            if enc is not None
            else []
        )
        for p in ps:
            quals = [q for _, _, q in slots.get(id(p), [])]
            if len(quals) < 2:
                continue
            if paths and all(any(h == "" or q.startswith(h + ".") for h in paths) for q in quals):
                # Tied within the encoder, or the encoder registered under several names (a
                # ModuleList of the encoders besides the attributes): gradient still flows
                # through the feature. A module registered twice AND called twice is not seen.
                continue
            problems.append(
                f"encoders[{name!r}] has a parameter registered as {' and '.join(map(repr, quals))} "
                "(a tied weight or a module used twice): feature mode scales only the gradient "
                f"that flows through features[{name!r}], so what the other use contributes would "
                "stay unscaled; use mode='parameter', which scales the parameter's whole gradient"
            )
            break
    return problems
