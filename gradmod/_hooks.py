"""The hooks of one backward pass: registered on entering the block, removed on leaving it."""

from __future__ import annotations

import collections
import functools
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ._errors import ContextError
from ._protocol import GradHook, GradTransform, Injection, LossScale

__all__ = ["CONFLICT", "KEY", "GradNorms", "HookSet", "observer"]


#: The key of gradmod's entry in a parameter's hook dict: the modulation hook in parameter mode,
#: a pass-through marker otherwise. One entry per tensor at a time, so the entry doubles as the
#: claim that keeps two active contexts from modulating the same parameter. It lives only inside
#: the block, and torch never pickles tensor hooks: nothing of it survives ``torch.save``.
KEY = "gradmod.modulation"
#: The key of an injection's entry (with its slot) in a tensor's hook dict.
INJECT = "gradmod.injection"


_HOOK_DICT = operator.attrgetter("_backward_hooks")
_GRAD_FN = operator.attrgetter("grad_fn")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_DTYPE = operator.attrgetter("dtype")
_GRAD = operator.attrgetter("grad")
_IS_SPARSE = operator.attrgetter("is_sparse")
_POST_ACCUMULATE = operator.attrgetter("_post_accumulate_grad_hooks")
_POP_KEY = operator.methodcaller("pop", KEY, None)  # the dict's own pop (an OrderedDict's too)
#: what :meth:`HookSet.defer` reads of each tensor, and :meth:`HookSet.finish` of each gradient
_TENSOR_STATE = operator.attrgetter("grad", "grad_fn", "_post_accumulate_grad_hooks", "dtype")
_GRAD_STATE = operator.attrgetter("grad.dtype", "grad.requires_grad", "grad.is_sparse")


class _Deferred(NamedTuple):
    """What :meth:`HookSet.defer` keeps for one mapping of tensors."""

    tensors: object  # the mapping it was built for
    flat: list[Tensor]
    factors: list[Tensor]  # the 0-d factor of each tensor's gradient
    claims: list[Callable[[Tensor], None]]  # what each holds in its hook dict meanwhile
    state: list[tuple[object, ...]]  # each tensor's _TENSOR_STATE when it can be deferred
    grads: list[tuple[object, ...]]  # each gradient's _GRAD_STATE where one foreach scales all
    scaled: list[bool]  # HookSet._scaled once the gradients were scaled
    rehook: list[Callable[[Tensor], Tensor]]  # the scaling hooks put back after the backward


#: autograd's engine: ``queue_callback`` runs a function when the current backward ends, before
#: ``backward()`` returns (what DDP and FSDP use for their post-backward work).
_ENGINE: Any = torch.autograd.Variable._execution_engine


def _identity(grad: Tensor) -> Tensor:
    return grad


def _claim_marker() -> Callable[[Tensor], None]:
    """A marker for a tensor claimed without a hook of its own: a C-level callable that takes
    the gradient and returns ``None`` (which leaves the gradient as it is), keeping nothing
    (a deque of length 0): no Python frame per gradient."""
    sink: collections.deque[Tensor] = collections.deque(maxlen=0)
    return sink.append


def _leaf_hooks(t: Tensor) -> dict[object, Callable[[Tensor], Tensor | None]] | None:
    """The hook dict of a leaf tensor (created on first use), or ``None`` where unavailable.

    ``Tensor.register_hook`` stores a leaf's hooks in ``t._backward_hooks``, a dict that autograd
    reads at every backward; once it exists, adding and removing an entry is all a hook needs.
    Non-leaf tensors, and torch versions without that dict, use ``register_hook``.
    """
    if t.grad_fn is not None or not t.requires_grad:
        return None
    hooks = getattr(t, "_backward_hooks", None)
    if hooks is None:
        t.register_hook(_identity).remove()  # creates the dict and installs it
        hooks = getattr(t, "_backward_hooks", None)
    return hooks if isinstance(hooks, dict) else None


def _hook_dict(t: Tensor) -> dict[object, Callable[[Tensor], Tensor | None]] | None:
    """The hook dict of ``t``, leaf (:func:`_leaf_hooks`) or not, or ``None`` where a handle
    must be used: a tensor subclass (its ``register_hook`` may be overridden), or a pure cast
    whose hook goes on its source (:func:`_cast_source`).

    A non-leaf tensor's hooks live in the same ``_backward_hooks`` dict, which its ``grad_fn``
    reads (registered once, as ``Tensor.register_hook`` does): an entry in it is a hook without
    a handle object (a third of ``register_hook``'s cost, which a block pays per feature).
    """
    if t.grad_fn is None:
        return _leaf_hooks(t)
    if type(t) is not Tensor or not t.requires_grad or _cast_source(t) is not None:
        return None
    hooks: dict[object, Callable[[Tensor], Tensor | None]] | None = getattr(
        t, "_backward_hooks", None
    )
    if hooks is None:
        hooks = collections.OrderedDict()
        setattr(t, "_backward_hooks", hooks)  # noqa: B010 - typed as another dict by torch
        t.grad_fn._register_hook_dict(t)
    return hooks if isinstance(hooks, dict) else None


def _cast_source(t: Tensor) -> tuple[Any, int] | None:
    """``(node, output index)`` of the tensor that ``t`` is a pure floating-point cast of
    (``ToCopyBackward0``, same shape and device, a non-leaf source; through a chain of casts),
    or ``None``, also where torch does not expose a node's input metadata.

    Mixed-precision wrappers hand out such casts: a model prepared by Accelerate returns
    ``h.float()`` for every bf16/fp16 output ``h`` while the loss reaches the encoder through
    ``h``, so a hook on the copy would never fire.
    """
    found = None
    node = t.grad_fn
    while node is not None and node.name() == "ToCopyBackward0" and len(node.next_functions) == 1:
        source, index = node.next_functions[0]
        if source is None or not hasattr(source, "register_prehook"):
            break
        metadata = getattr(source, "_input_metadata", None)  # one entry per output
        if (
            metadata is None
            or index >= len(metadata)
            or source.name() == "torch::autograd::AccumulateGrad"
        ):
            break
        meta = metadata[index]
        if (
            meta.device != t.device
            or tuple(meta.shape) != tuple(t.shape)
            or not meta.dtype.is_floating_point
        ):
            break
        found = (source, index)
        node = source
    return found


def _register_hook(t: Tensor, fn: Callable[[Tensor], Tensor | None]) -> RemovableHandle:
    """``t.register_hook(fn)``, or for a pure cast (:func:`_cast_source`) the same hook on the
    gradient of the cast's source: what reaches the encoder output whether or not the loss
    uses the copy (once either way: the copy itself gets no hook)."""
    source = _cast_source(t)
    if source is None:
        plain: RemovableHandle = t.register_hook(fn)
        return plain
    node, index = source

    def pre(grad_outputs: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...] | None:
        grad = grad_outputs[index]
        new = fn(grad) if grad is not None else None
        if new is None:
            return None
        return (*grad_outputs[:index], new, *grad_outputs[index + 1 :])

    handle: RemovableHandle = node.register_prehook(pre)
    return handle


def _witness(flags: list[bool], m: int, fn: Callable[[Tensor], Tensor], grad: Tensor) -> Tensor:
    flags[m] = True
    return fn(grad)


def _wide_factor(t: Tensor) -> bool:
    """Whether ``t``'s gradient is multiplied by the float64 coefficient rather than its float32
    copy: float64 tensors, and 0-d ones of any dtype (0-d times 0-d computes in float64, and the
    product is rounded once to the gradient's dtype, as :func:`_mul_0d` does in a hook)."""
    return t.dtype == torch.float64 or t.dim() == 0


def _mul_0d(k: Tensor, grad: Tensor) -> Tensor:
    return (grad * k).to(grad.dtype)


def _stash(slots: list[Tensor | None], i: int, grad: Tensor) -> Tensor:
    """Keep ``grad`` in ``slots[i]`` (summed with what an earlier backward of the block left
    there) and let zeros through: the gradient reaches ``.grad`` later, combined."""
    prev = slots[i]
    slots[i] = grad if prev is None else prev + grad
    return torch.zeros_like(grad)


class GradNorms:
    """Per-modality norms of the gradients that pass one set of observing hooks.

    One slot per encoder tensor in an ``[M, L]`` device buffer (``L``: the largest group;
    zero where no gradient arrived), written by the hooks with ``vector_norm(..., out=slot)``:
    no allocation per gradient, no host sync. Reused from block to block (:meth:`reset`). A
    tensor whose hook fires twice (two backward passes in one block) marks its modality
    ``repeated``: the norm of the sum of two gradients is not known from their norms.
    """

    __slots__ = ("buffer", "fired", "repeated", "sizes", "views")

    def __init__(self, sizes: Sequence[int], dtype: torch.dtype, device: torch.device) -> None:
        self.sizes = list(sizes)
        self.buffer = torch.zeros(len(sizes), max(sizes, default=0), dtype=dtype, device=device)
        self.views = [[self.buffer[m, i] for i in range(n)] for m, n in enumerate(sizes)]
        self.fired: list[list[bool]] = []
        self.repeated: list[bool] = []
        self.reset()

    def reset(self) -> None:
        """Forget the previous block's norms."""
        self.buffer.zero_()
        self.fired = [[False] * n for n in self.sizes]
        self.repeated = [False] * len(self.sizes)

    def totals(self, dtype: torch.dtype, mask: Tensor | None = None) -> Tensor:
        """Each modality's norm over its tensors (only those where ``mask`` is 1, if given):
        ``[M]`` in ``dtype``, NaN where a tensor received two gradients."""
        norms = self.buffer if mask is None else self.buffer * mask
        out: Tensor = torch.linalg.vector_norm(norms, dim=1).to(dtype)
        for m, repeated in enumerate(self.repeated):
            if repeated:
                out[m] = math.nan
        return out


def _observe(sinks: Sequence[GradNorms], m: int, i: int, grad: Tensor) -> None:
    """Write ``grad``'s norm into slot ``(m, i)`` of every sink; returns ``None``: the gradient
    passes unchanged."""
    g = grad.detach()  # out= refuses a gradient that requires grad (create_graph=True)
    if g.is_sparse:
        g = g.coalesce().values()
    slot = sinks[0].views[m][i]
    torch.linalg.vector_norm(g, dtype=slot.dtype, out=slot)
    for j, sink in enumerate(sinks):
        fired = sink.fired[m]
        if fired[i]:
            sink.repeated[m] = True
        fired[i] = True
        if j:
            sink.views[m][i].copy_(slot)
    return None


def observer(sinks: Sequence[GradNorms], m: int, i: int) -> Callable[[Tensor], None]:
    """The pass-through hook that records the norm of tensor ``i`` of modality ``m``."""
    return functools.partial(_observe, sinks, m, i)


CONFLICT = (
    "some of these encoder parameters are already modulated by another active "
    "ModulationContext; one context per parameter at a time (exit the other block first)"
)


class HookSet:
    """Registers scaling and injection hooks that read one ``[M]`` coefficient tensor.

    Scaling hooks are bound methods of 0-d views of the coefficient tensor (``coeffs[m].mul``):
    no Python frame per gradient, and a new coefficient value never recompiles a compiled
    graph. A 0-d view times a gradient keeps the gradient's dtype, except when the gradient is
    itself 0-d (a scalar parameter): there the float64 product is rounded back to its dtype.
    Gradient transforms receive the same views and must return the gradient's dtype.

    Gradients of a lower precision than float64 are multiplied by views of a float32 copy of
    the coefficients (refreshed when the hooks are registered): the same product bit for bit
    (a 0-d factor is converted to the gradient's dtype, or to float32 for half gradients, before
    the multiply either way), without a float64 scalar to convert for every gradient.

    Injections are added once per block: a second backward through the same tensor inside one
    block (``backward(retain_graph=True)`` twice) passes its gradient through unchanged, so the
    method's objective is counted once, as the heads' own gradients are.
    """

    def __init__(self, coefficients: Tensor) -> None:
        self._coeffs = coefficients
        self._views = [coefficients[i] for i in range(coefficients.shape[0])]
        # a float32 copy for float32 and half gradients (float64 coefficients only)
        self._low = coefficients.float() if coefficients.dtype == torch.float64 else None
        self._low_views = self._views if self._low is None else list(self._low.unbind())
        self._handles: list[RemovableHandle] = []
        self._keyed: list[dict[object, Callable[[Tensor], Tensor | None]]] = []
        self._fired: list[bool] = []
        self._what: list[str] = []
        # one flag per modality, set by its first scaling hook: one list for the HookSet's life,
        # since the cached hooks below hold it
        self._scaled: list[bool] = [False] * len(self._views)
        self._unscaled = [False] * len(self._views)  # what ``_scaled`` is reset to
        # the scaling hooks of the last plain (no transform) ``scale`` call, for the same
        # tensors: (the mapping they came from, flat tensors, hook functions, their dtypes)
        self._prepared: (
            tuple[object, list[Tensor], list[Callable[[Tensor], Tensor]], list[torch.dtype]] | None
        ) = None
        self._observers: list[tuple[dict[object, Callable[[Tensor], Tensor | None]], object]] = []
        self._marker = _claim_marker()
        # the tensors scaled at the end of the backward instead of by hooks (:meth:`defer`)
        self._deferred: Mapping[int, Sequence[Tensor]] | None = None
        self._queued = False  # the end-of-backward scaling is queued with the engine
        # the deferred tensors in one list, the factor of each (by its dtype), and what each
        # holds in its hook dict meanwhile (the claim: the trigger)
        self._flat: _Deferred | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies rebuild their cached hooks: those are methods bound to views of THESE
        coefficients (``copy`` keeps built-in methods as they are), and a fresh claim marker."""
        state = self.__dict__.copy()
        state.update(_prepared=None, _flat=None, _marker=_claim_marker())
        return state

    # --------------------------------------------------------------------------- registering
    def _put(self, t: Tensor, fn: Callable[[Tensor], Tensor | None]) -> None:
        """``fn`` under :data:`KEY` in ``t``'s hook dict, or a handle where there is no dict;
        refuses a tensor that another context holds (after releasing what this one added)."""
        hooks = _hook_dict(t)
        if hooks is None:
            self._handles.append(_register_hook(t, fn))
            return
        if hooks.setdefault(KEY, fn) is not fn:
            self.release()
            raise ContextError(CONFLICT)
        self._keyed.append(hooks)

    def _put_many(
        self, tensors: Sequence[Tensor], fns: Sequence[Callable[[Tensor], Tensor | None]]
    ) -> None:
        """:meth:`_put` for each ``(tensor, fn)``; where every tensor is a leaf that requires
        grad and already has its hook dict (the common case from the second step on), a few
        C-level passes instead of a Python frame per tensor."""
        dicts = list(map(_HOOK_DICT, tensors))
        kinds = set(map(type, dicts))  # OrderedDict (torch's): its own methods keep its order
        kind = kinds.pop() if len(kinds) == 1 else None
        if (
            kind is None
            or not issubclass(kind, dict)
            or any(map(_GRAD_FN, tensors))
            or not all(map(_REQUIRES_GRAD, tensors))
        ):
            for t, fn in zip(tensors, fns, strict=True):
                self._put(t, fn)
            return
        got = list(map(kind.setdefault, dicts, itertools.repeat(KEY), fns))
        if any(map(operator.is_not, got, fns)):  # another context holds some of them
            self._keyed.extend(d for d, g, f in zip(dicts, got, fns, strict=True) if g is f)
            self.release()
            raise ContextError(CONFLICT)
        self._keyed.extend(dicts)

    @staticmethod
    def held_elsewhere(tensors: Sequence[Tensor]) -> bool:
        """Whether another active context holds any of ``tensors`` (checked before planning):
        one C-level pass over their hook dicts (``None`` where a tensor never had a hook)."""
        dicts = filter(None, map(_HOOK_DICT, tensors))
        return any(map(operator.contains, dicts, itertools.repeat(KEY)))

    def claim(self, tensors: Sequence[Tensor]) -> None:
        """Mark ``tensors`` as held by this context without changing their gradients."""
        self._put_many(tensors, [self._marker] * len(tensors))

    def defer(self, tensors: Mapping[int, Sequence[Tensor]]) -> bool:
        """Scale the gradients of ``tensors`` (modality -> leaf tensors, the same mapping at
        every step) in place at the end of the block's backward, instead of by a hook per
        tensor, where that is exact: every tensor is a leaf without a gradient yet
        (``zero_grad()`` sets them to ``None``), so the gradient it holds then is the
        backward's own. Returns ``True``; returns ``False``, registering nothing, where a
        tensor already holds a gradient (an earlier micro-batch of an accumulation window) or
        has a post-accumulate-grad hook (which must see the modulated gradient, e.g. an
        optimizer stepped in backward): then :meth:`scale` hooks them.

        Each tensor's claim is :meth:`_trigger` (a Python call per gradient that returns at
        once after the first): the first gradient to arrive queues the scaling with autograd's
        engine, whatever tensor it reaches, which runs it when that backward ends, after DDP's reduction and before ``backward()`` returns, so that whatever the
        block does after its backward (clipping, an optimizer step) sees the modulated
        gradients, as with hooks. One ``foreach`` multiply over every encoder gradient
        replaces a Python hook call and a new tensor per gradient during backward.
        """
        cached = self._flat
        if cached is None or cached[0] is not tensors:
            cached = self._cache(tensors)
        flat = cached.flat
        if list(map(_TENSOR_STATE, flat)) != cached.state:  # one C-level pass, commonly
            if [t.dtype for t in flat] != [s[-1] for s in cached.state]:  # a model cast
                cached = self._cache(tensors)
            if (
                not all(map(operator.is_, map(_GRAD, flat), itertools.repeat(None)))
                or any(map(_GRAD_FN, flat))
                or any(map(_POST_ACCUMULATE, flat))  # they must see the modulated gradient
            ):
                return False
        self._scaled[:] = self._unscaled
        if self._low is not None:
            self._low.copy_(self._coeffs)
        self._put_many(flat, cached.claims)
        self._deferred = tensors
        self._queued = False
        return True

    def _cache(self, tensors: Mapping[int, Sequence[Tensor]]) -> _Deferred:
        """What :meth:`defer` keeps for ``tensors`` (see :class:`_Deferred`)."""
        flat = [t for ts in tensors.values() for t in ts]
        # every tensor's claim is the trigger: whichever gradient arrives first queues the
        # scaling (a modality's first parameter may get none: an unused branch, a mask token)
        claims: list[Callable[[Tensor], None]] = [self._trigger] * len(flat)
        dtypes = list(map(_DTYPE, flat))  # a model cast later gets new factors and hooks
        cached = self._flat = _Deferred(
            tensors,
            flat,
            self._factors(tensors),
            claims,
            [(None, None, None, d) for d in dtypes],
            [(d, False, False) for d in dtypes],
            [bool(ts) for ts in tensors.values()],
            self._hook_fns(tensors, None, None),
        )
        return cached

    def _trigger(self, grad: Tensor) -> None:
        """A deferred tensor's gradient arrived: queue the scaling for the end of this backward
        (once). Returns ``None``: the gradient passes unchanged."""
        if self._deferred is not None and not self._queued:
            self._queued = True
            _ENGINE.queue_callback(self._requeue)
        return None

    def _requeue(self) -> None:
        """Queue :meth:`_end_of_backward` behind every callback already queued (DDP's
        reduction is queued while backward runs; a callback queued by a callback runs
        after them)."""
        _ENGINE.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """Scale the deferred gradients, then hook the tensors for the rest of the block: a
        second backward in it adds its gradients to the scaled ones, so its own are scaled
        as they arrive (by the hooks :meth:`scale` would register)."""
        cached = self._flat
        if self._deferred is None or cached is None:
            return
        self.finish()
        # every deferred tensor holds this block's claim under KEY: one C-level pass
        collections.deque(
            map(
                operator.setitem, map(_HOOK_DICT, cached.flat), itertools.repeat(KEY), cached.rehook
            ),
            maxlen=0,
        )

    def finish(self) -> None:
        """Multiply the gradients that the deferred tensors received by their modality's
        coefficient (:meth:`defer`), in place: the same product, bit for bit, as the hook (a
        float32 view for float32 and half gradients). Runs once: at the end of the backward,
        or when the block is left if that did not run (no gradient reached a trigger, or the
        backward raised: what reached ``.grad`` is scaled, as the hooks would have)."""
        deferred, self._deferred = self._deferred, None
        cached = self._flat
        if deferred is None or cached is None:
            return
        try:
            state = list(map(_GRAD_STATE, cached.flat))
        except AttributeError:  # a tensor received no gradient
            state = None
        if state == cached.grads:  # the common case: one C++ loop over every gradient
            torch._foreach_mul_(list(map(_GRAD, cached.flat)), cached.factors)
            self._scaled[:] = cached.scaled
            return
        for m, ts in deferred.items():
            for t in ts:
                g = t.grad
                if g is None:
                    continue
                self._scaled[m] = True
                k = self._views[m] if _wide_factor(g) else self._low_views[m]
                if g.is_sparse or g.requires_grad:  # out of place: keeps the graph
                    t.grad = (g * k).to(g.dtype)
                else:
                    g.mul_(k)

    def _factors(self, tensors: Mapping[int, Sequence[Tensor]]) -> list[Tensor]:
        """The 0-d factor of each tensor's gradient: a view of the coefficients (of their
        float32 copy for float32 and half tensors that are not 0-d)."""
        return [
            self._views[m] if _wide_factor(t) else self._low_views[m]
            for m, ts in tensors.items()
            for t in ts
        ]

    def inject(
        self, injections: Sequence[Injection], loss_scale: LossScale, weight: float = 1.0
    ) -> None:
        """Add each injection's gradient (times ``weight`` and the loss scale, read when it
        fires: the loss may be scaled inside the block) to its tensor's gradient, once per
        block (register these first)."""
        for inj in injections:
            g = inj.grad * weight if weight != 1.0 else inj.grad
            self._fired.append(False)
            self._what.append(inj.what)
            slot = len(self._fired) - 1
            adder = self._adder(g, slot, loss_scale)
            hooks = _hook_dict(inj.tensor)
            if hooks is None:
                self._handles.append(_register_hook(inj.tensor, adder))
                continue
            key = (INJECT, slot)
            hooks[key] = adder
            self._observers.append((hooks, key))

    def scale(
        self,
        tensors: Mapping[int, Sequence[Tensor]],
        transform: GradTransform | None,
        stash: Sequence[list[Tensor | None]] | None = None,
        *,
        reuse: bool = False,
    ) -> None:
        """Multiply the gradient of every tensor of modality ``m`` by ``k_m`` (or transform it;
        or, with ``stash``, keep it in ``stash[m][i]`` and let zeros through).

        Leaf tensors (parameters) get their hook under one fixed key of their hook dict
        (:data:`KEY`): two dict operations per tensor and step instead of a handle object.
        ``reuse``: ``tensors`` is the same mapping at every step (the encoder parameters): the
        hooks of a plain scaling (no transform, no stash) depend only on the tensors, so the
        hooks built the first time are kept and put back as they are.
        """
        self._scaled[:] = self._unscaled
        plain = transform is None and stash is None
        if plain and self._low is not None:
            self._low.copy_(self._coeffs)
        prepared = self._prepared
        if (
            plain
            and prepared is not None
            and prepared[0] is tensors
            and list(map(_DTYPE, prepared[1])) == prepared[3]
        ):
            self._put_many(prepared[1], prepared[2])
            return
        flat = [t for ts in tensors.values() for t in ts]
        fns = self._hook_fns(tensors, transform, stash)
        if plain and reuse:
            self._prepared = (tensors, flat, fns, list(map(_DTYPE, flat)))
        self._put_many(flat, fns)

    def _hook_fns(
        self,
        tensors: Mapping[int, Sequence[Tensor]],
        transform: GradTransform | None,
        stash: Sequence[list[Tensor | None]] | None,
    ) -> list[Callable[[Tensor], Tensor]]:
        """The hook of each tensor of :meth:`scale` (in ``tensors``' order)."""
        fns: list[Callable[[Tensor], Tensor]] = []
        for m, ts in tensors.items():
            k = self._views[m]
            for i, t in enumerate(ts):
                fn: Callable[[Tensor], Tensor]
                if stash is not None:
                    fn = functools.partial(_stash, stash[m], i)
                elif transform is not None:
                    fn = functools.partial(transform, k, m, i)
                elif t.dim() == 0:  # 0-d times 0-d would promote (whatever dtype it has later)
                    fn = functools.partial(_mul_0d, k)
                elif t.dtype == torch.float64:
                    fn = k.mul
                else:
                    fn = self._low_views[m].mul
                # every hook witnesses that its modality's gradients went through one (the first
                # tensor may receive no gradient at all: an unused branch, a mask token)
                fns.append(functools.partial(_witness, self._scaled, m, fn))
        return fns

    def observe(
        self, entries: Sequence[tuple[Tensor, Callable[[Tensor], None]]], key: object
    ) -> None:
        """Add pass-through hooks (:func:`observer`) under ``key``, after the hooks already in
        each tensor's hook dict (leaf hooks run in insertion order): registered before
        :meth:`scale` they see what the scaling hook receives, after it what it returns. A key
        of their own: they never count as a claim. Tensors that do not require grad are
        skipped."""
        for t, fn in entries:
            if not t.requires_grad:
                continue
            hooks = _leaf_hooks(t)
            if hooks is None:
                self._handles.append(t.register_hook(fn))
                continue
            hooks[key] = fn
            self._observers.append((hooks, key))

    def extra(self, hooks: Sequence[GradHook]) -> None:
        """Register a method's gradient hooks on other tensors (removed with the rest)."""
        for h in hooks:
            self._handles.append(h.tensor.register_hook(h.fn))

    # ----------------------------------------------------------------------------- leaving
    def scaled_any(self) -> bool:
        """Whether any modality's gradient passed through a scaling hook in this backward."""
        return any(self._scaled)

    def missed(self) -> list[str]:
        """What each injection that never fired was for."""
        if not self._what:
            return []
        return [w for w, f in zip(self._what, self._fired, strict=True) if not f]

    def release(self) -> None:
        self._deferred = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        collections.deque(map(_POP_KEY, self._keyed), maxlen=0)  # one C-level pass
        self._keyed.clear()
        if self._observers:
            for hooks, key in self._observers:
                hooks.pop(key, None)
            self._observers.clear()
        if self._fired:
            self._fired.clear()
            self._what.clear()
        self._scaled[:] = self._unscaled

    def _adder(
        self, g: Tensor, slot: int, loss_scale: LossScale
    ) -> Callable[[Tensor], Tensor | None]:
        fired = self._fired

        def add(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # an output of a compiled graph that only the graph itself used
                return None  # autograd cannot turn "no gradient" into one: reported on exit
            if fired[slot]:  # a second backward in the same block: the objective counts once
                return None
            fired[slot] = True
            scale = loss_scale()
            extra = g * scale.to(g.dtype) if scale is not None else g
            return grad + extra.to(grad.dtype)

        return add
