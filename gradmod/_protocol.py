"""The method protocol: the contract between the hook engine and a modulation method.

The bottom of the package: it imports nothing from gradmod. A method is a :class:`Method`: it
declares what it needs once (:meth:`Method.needs`) and decides each step in :meth:`Method.plan`,
returning a :class:`StepPlan`; the engine (``ModulationContext``) validates, applies the plan
inside the user's backward and commits it on a clean exit. ``docs/adding-a-method.md`` walks
through writing one.
"""

from __future__ import annotations

import operator
from abc import ABCMeta, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "Act",
    "Binding",
    "class_index_problem",
    "coefficient_dtype",
    "finite_step",
    "GradCombine",
    "GradHook",
    "GradTransform",
    "Injection",
    "last_weight_matrix",
    "Level",
    "LossScale",
    "Method",
    "Needs",
    "Prepared",
    "Reduce",
    "Step",
    "StepPlan",
    "Targets",
]

#: Sums a tensor over all ranks (the identity outside ``torch.distributed``).
Reduce = Callable[[Tensor], Tensor]
#: Where a method's coefficients act: on the encoders' gradients, or on the gradient of the
#: per-modality tensors handed to the context as ``features`` (AGM's mono-modal responses).
Level = Literal["encoders", "responses"]
#: The ``GradScaler``'s current scale (0-d tensor), or ``None`` without an enabled scaler. Call it
#: inside backward (in a hook or transform): the scale exists once the loss was scaled, which
#: may happen inside the block (``with ctx(...): scaler.scale(loss).backward()``).
LossScale = Callable[[], "Tensor | None"]
#: ``transform(k, modality, index, grad) -> new grad`` for encoder tensor ``index`` of
#: ``modality`` (``k`` the 0-d coefficient, in a dtype that keeps ``grad``'s).
GradTransform = Callable[[Tensor, int, int, Tensor], Tensor]
#: ``combine(modality, grads) -> gradients to add``: ``grads`` holds the gradient that modality
#: ``m``'s selected encoder tensors (:attr:`Targets.encoders`, in that order) received over the
#: accumulation window, averaged over ranks, in the units of ``.grad`` (times the loss scale of
#: a ``GradScaler``); returns one tensor per entry, same shapes, added to their ``.grad``.
GradCombine = Callable[[int, list[Tensor]], list[Tensor]]
#: Where a method's coefficients act: ``"gradient"`` (inside backward) or ``"update"`` (the
#: optimizer's step).
Act = Literal["gradient", "update"]


@dataclass(frozen=True)
class Needs:
    """What a method needs from the engine: one declaration, read once at construction.

    Attributes:
        classifiers: one unimodal head per modality: ``"required"``, ``"optional"`` or
            ``"unused"`` (giving heads is then an error).
        trains_classifiers: the method computes its heads' gradients itself (gradmod adds them
            after backward and all-reduces them: the heads must stay out of DDP's reduction).
        features: the method reads ``features`` at every step.
        injects_into_features: the method adds gradients to the live features (they must be
            in the graph).
        level: where the coefficients act: the encoders' gradients, or the gradients of the
            per-modality responses handed over as ``features`` (AGM).
        modalities: fewest and most (``None``: no limit) modalities.
        per_modality_state: buffers whose leading dimension is the number of modalities
            (checked when a state dict is loaded into a context).
        fusion: how the method uses the ``fusion=`` head: not at all, ``"reads"`` it, or
            ``"changes"`` its gradient (a direction loss, a column scaling).
        transforms_gradients: the method replaces ``k * grad`` per encoder tensor (a
            :data:`GradTransform`): it needs parameter hooks (``mode="parameter"``).
        combines_gradients: the method replaces the encoders' gradients by a combination of
            the whole window's gradient with gradients of its own (:attr:`StepPlan.combine`):
            it needs parameter hooks and live features, and has no update-level form (the
            engine refuses ``mode="feature"`` and ``act="update"`` at construction).
        forward: the method acts in the forward (:meth:`Method.prepare`): in training, every
            block must follow a ``ctx.prepare(features=..., targets=...)`` of its features.

    A method that cannot act as configured (e.g. on the update level: ``binding.act``) says so
    in :meth:`Method.check`.
    """

    classifiers: Literal["required", "optional", "unused"] = "unused"
    trains_classifiers: bool = False
    features: bool = True
    injects_into_features: bool = False
    level: Level = "encoders"
    modalities: tuple[int, int | None] = (2, None)
    per_modality_state: tuple[str, ...] = ()
    fusion: Literal["unused", "reads", "changes"] = "unused"
    transforms_gradients: bool = False
    combines_gradients: bool = False
    forward: bool = False


class GradHook(NamedTuple):
    """A gradient hook on a tensor other than the encoders', for one block (e.g. MLB's official
    scaling of each modality's column block of the fusion weight). ``fn(grad) -> new grad``."""

    tensor: Tensor
    fn: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Binding:
    """What the engine resolved from the user's configuration, handed to the method.

    Attributes:
        names: modality names, in the order of every ``[M]`` tensor.
        groups: modality -> its encoder's trainable parameters.
        classifiers: modality -> unimodal head (CGGM's classifiers, MLB's heads, the
            per-modality parts of a "sum" fusion head), or ``None``.
        fusion_module: the fusion head given as ``fusion=`` (a module), or ``None``.
        fusion: the tensor that a direction loss moves: the fusion head's last weight matrix
            (or the tensor given as ``fusion=``), or ``None``.
        mode: ``"parameter"`` or ``"feature"`` (how encoder gradients are scaled).
        device: where the coefficients live.
        act: where the coefficients act (``"gradient"`` or ``"update"``).
    """

    names: tuple[str, ...]
    groups: Mapping[str, list[nn.Parameter]]
    classifiers: Mapping[str, nn.Module] | None
    fusion_module: nn.Module | None
    fusion: Tensor | None
    mode: Literal["parameter", "feature"]
    device: torch.device
    act: Act = "gradient"


@dataclass(frozen=True)
class Step:
    """The inputs of one backward pass.

    Attributes:
        features: modality -> the encoder output of this step (live, in the graph), or the
            mono-modal response for response-level methods.
        targets: the labels (or regression targets) of this step.
        reduce: sums a tensor over all ranks (identity without ``torch.distributed``).
        boundary: ``True`` when this backward completes the gradients of the next optimizer
            step (``False`` for the earlier micro-batches of a gradient-accumulation window).
        loss_scale: returns the ``GradScaler``'s current scale (see :data:`LossScale`); call
            it inside backward (or in a :data:`GradCombine`), not in :meth:`Method.plan`.
        carry: what :meth:`Method.prepare` returned for these features (:class:`Prepared`),
            handed to :meth:`Method.plan`; ``None`` for methods that do not act in the forward,
            and in :meth:`Method.prepare` itself.
        rank, world: this process's rank and the number of ranks of the reduction (0 and 1
            outside ``torch.distributed``).
        weight: the block's ``weight=`` (1 when not given). The engine applies it to
            ``inject`` and ``accumulate``; a method that keeps gradients of its own across the
            blocks of a window (for :attr:`StepPlan.combine`) multiplies them by it.
    """

    features: Mapping[str, Tensor]
    targets: Tensor
    reduce: Reduce
    boundary: bool = True
    loss_scale: LossScale = field(default=lambda: None)
    carry: Any = None
    rank: int = 0
    world: int = 1
    weight: float = 1.0


class Prepared(NamedTuple):
    """What :meth:`Method.prepare` made of one forward's features.

    Attributes:
        features: modality -> the tensor the fusion head consumes instead of the encoder
            output (e.g. OPM's dropped and rescaled features), in the autograd graph of it.
        carry: anything the next block's :meth:`Method.plan` needs (``Step.carry``): what was
            drawn, the scores it was decided from.
    """

    features: Mapping[str, Tensor]
    carry: Any = None


class Injection(NamedTuple):
    """A gradient added to ``tensor``'s gradient during the user's backward.

    The engine multiplies ``grad`` by the loss scale of a ``GradScaler`` given to it, and
    raises :class:`~gradmod.StepError` after the block if ``tensor`` received no gradient (the
    injection would have been lost). Injections act before any scaling hook on the same
    tensor, so a coefficient that scales ``tensor`` scales the injected gradient too.
    """

    tensor: Tensor
    grad: Tensor
    what: str  # named in the error when the tensor receives no gradient


@dataclass(frozen=True)
class Targets:
    """What coefficient ``k_m`` multiplies, fixed at configuration time.

    Attributes:
        encoders: modality -> the encoder tensors whose whole gradient is scaled (default: the
            whole group). In feature mode this must be the whole group.
    """

    encoders: Mapping[str, Sequence[Tensor]]


@dataclass
class StepPlan:
    """What a method decided for one backward pass.

    Attributes:
        coefficients: one factor per modality, shape ``[M]``; the engine multiplies what
            :meth:`Method.targets` names (or the response gradients) by it during backward.
            Non-finite entries are replaced by 1 before they reach any gradient.
        accumulate: ``(tensor, grad)`` pairs added to ``tensor.grad`` when the block exits
            without an exception (e.g. the unimodal heads' own loss); averaged over ranks under
            DDP and multiplied by the loss scale of a ``GradScaler`` given to the engine.
        inject: gradients added inside the user's backward (see :class:`Injection`).
        transform: replaces ``k * grad`` on every encoder tensor (parameter mode only), e.g.
            OGM-GE's generalisation-enhancement noise; declare ``transforms_gradients``.
        hooks: gradient hooks on other tensors for this block (see :class:`GradHook`).
        combine: replaces the encoders' gradients by a combination (parameter mode only;
            declare ``combines_gradients``, and then always set it). The hook on every
            selected encoder tensor stashes the gradient it receives (summed over repeated
            backwards in the block) and returns zeros; on a clean exit the block's stash joins
            the window's (a block that raises drops its own); on a clean exit with
            ``boundary=True`` the engine averages the window's stash over ranks, calls
            ``combine(m, g_m)`` for each modality (see :data:`GradCombine`) and adds the
            results to ``.grad``, before ``commit``. The coefficients are not applied to the
            stashed gradients (a combining method returns ones). Scores that the combination
            computes may be written into the tensors of ``scores`` inside ``combine``.
        scores: what the coefficients were decided from, by name (each ``[M]``, in modality
            order), for monitoring and logging; e.g. MLB's mean true-class probability per
            head. Read-only views for the user: the engine copies them.
        commit: advances the method's cross-step state; the engine calls it once, after the
            block exits cleanly (its backward completed and every injection landed). A block
            that raises leaves the state as it was, so a step that is redone counts once.
            :meth:`Method.plan` itself must not change the state.
    """

    coefficients: Tensor
    accumulate: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    inject: list[Injection] = field(default_factory=list)
    transform: GradTransform | None = None
    hooks: list[GradHook] = field(default_factory=list)
    commit: Callable[[], None] | None = None
    scores: Mapping[str, Tensor] = field(default_factory=dict)
    combine: GradCombine | None = None


class Method(nn.Module, metaclass=ABCMeta):
    """Base class of modulation methods.

    A method is an ``nn.Module`` so that its cross-step state lives in buffers and round-trips
    through ``state_dict()``. Buffers whose size depends on the number of modalities start
    empty and are sized on first use; ``load_state_dict`` resizes them to the checkpoint.

    Subclasses declare :meth:`needs` and implement :meth:`plan`; they may refine :meth:`check`,
    :meth:`check_step`, :meth:`targets`, :meth:`set_epoch` and :meth:`reset`. A method that
    acts in the forward declares ``Needs(forward=True)`` and implements :meth:`prepare`.
    """

    def needs(self) -> Needs:
        """What this method needs from the engine (read once, when a context is built)."""
        return Needs()

    def check(self, binding: Binding) -> list[str]:
        """Configuration problems specific to this method (empty when all is well)."""
        return []

    def check_step(self, binding: Binding, step: Step) -> list[str]:
        """Problems with one step's inputs (e.g. targets of the wrong kind), before :meth:`plan`."""
        return []

    def targets(self, binding: Binding) -> Targets:
        """What each coefficient scales (default: the whole encoder group)."""
        return Targets(encoders={n: list(ps) for n, ps in binding.groups.items()})

    @abstractmethod
    def plan(self, binding: Binding, step: Step) -> StepPlan:
        """Decide this step's coefficients (and extra gradients).

        State changes go into :attr:`StepPlan.commit`, which the engine runs after a clean
        block; a step whose scores are not finite must leave the state unchanged and return
        neutral coefficients (ones).
        """

    def size_state(self, binding: Binding, fills: Mapping[str, float]) -> None:
        """Size the per-modality buffers named in ``fills`` to ``[M]`` (filled with the given
        value, in the coefficients' dtype) where they are still empty, and move every buffer
        to the binding's device — the one rule for lazily sized state.

        Raises:
            ValueError: a buffer holds state for another number of modalities (call
                :meth:`reset`, or use a new instance).
        """
        m, device = len(binding.names), binding.device
        for name, fill in fills.items():
            buf = getattr(self, name)
            if buf.shape == (m,):
                continue
            if buf.numel():
                raise ValueError(
                    f"this {type(self).__name__} instance holds state for {buf.shape[0]} "
                    f"modalities but is used with {m}; call reset() or use a new instance"
                )
            setattr(
                self, name, torch.full((m,), fill, device=device, dtype=coefficient_dtype(device))
            )
        for name, buf in list(self.named_buffers(recurse=False)):
            if buf.device != device:
                setattr(self, name, buf.to(device))

    def prepare(self, binding: Binding, step: Step) -> Prepared:
        """Change one training forward's features before fusion (``Needs(forward=True)``).

        Called by ``ctx.prepare`` in training with grad enabled, on the encoder outputs
        (``step.boundary`` is not known yet and ``step.carry`` is ``None``); the result's
        ``carry`` reaches the :meth:`plan` of the block that backpropagates these features. Like
        :meth:`plan`, it must not change the method's state (a block that raises is redone with
        the same draws); its randomness is a function of the state and ``step.rank``.
        """
        return Prepared(dict(step.features), None)

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the current epoch (methods with an epoch window use it; an
        override checks it with :func:`epoch_number`). Here: checked, then unused.

        Raises:
            ValueError: ``epoch`` is not an integer >= 0.
        """
        epoch_number(type(self).__name__, epoch)

    def reset(self) -> None:
        """Forget all cross-step state."""
        for name, buf in list(self.named_buffers(recurse=False)):
            setattr(self, name, buf.new_zeros((0,) * buf.dim()))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # Lazily sized buffers take the checkpoint's shape before the copy.
        for name, buf in list(self.named_buffers(recurse=False)):
            saved = state_dict.get(prefix + name)
            if isinstance(saved, Tensor) and saved.shape != buf.shape:
                setattr(self, name, torch.empty_like(saved, device=buf.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def epoch_number(who: str, epoch: object) -> int:
    """``epoch`` as an ``int`` >= 0 (a Python or NumPy integer, a 0-d integer tensor).

    Raises:
        ValueError: a bool, a float (2.7 is not truncated), a string, or a negative number.
    """
    try:
        if isinstance(epoch, bool):
            raise TypeError
        value = operator.index(epoch)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{who}: epoch must be an integer >= 0; got {epoch!r}") from None
    if value < 0:
        raise ValueError(f"{who}: epoch must be an integer >= 0; got {epoch!r}")
    return int(value)


def class_index_problem(
    who: str, targets: Tensor, batch: int | None, *, negative_ok: bool = False
) -> list[str]:
    """The problem with ``targets`` as class indices ``[B]``, if any (no host synchronisation
    off the CPU).

    Float labels are refused rather than truncated (``y + 0.9`` would silently count as ``y``).
    On the CPU, a negative index (``cross_entropy``'s ``ignore_index=-100``) is refused too,
    unless ``negative_ok`` (a method whose only use of the labels is a loss that ignores them):
    a score that counts every sample has no class to read for it.
    """
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return [
            f"{who} with task='classification' needs integer class indices as targets; got "
            f"{targets.dtype} of shape {tuple(targets.shape)} (soft or float labels are not "
            "class indices: cast integral labels with .long(), or use task='regression')"
        ]
    if targets.dim() != 1 or (batch is not None and targets.shape[0] != batch):
        want = f"[{batch}]" if batch is not None else "[B]"
        return [
            f"{who} needs one class index per sample, shape {want}; got targets of shape "
            f"{tuple(targets.shape)}"
        ]
    if not negative_ok and targets.device.type == "cpu" and targets.numel():
        low = int(targets.min())
        if low < 0:
            return [
                f"{who} needs a class index >= 0 for every sample; got {low} (an ignore_index "
                "of cross_entropy?): its scores count every sample, so drop the ignored samples "
                "from the features and targets of the block"
            ]
    return []


def last_weight_matrix(module: nn.Module) -> Tensor | None:
    """The last parameter of ``module`` with two or more dimensions (its output layer's weight):
    what :attr:`Binding.fusion` is for a fusion module, and a head's matrix for a direction
    loss."""
    found: Tensor | None = None
    for p in module.parameters():
        if p.dim() >= 2:
            found = p
    return found


def coefficient_dtype(device: torch.device) -> torch.dtype:
    """The dtype of coefficients and scores: float64, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def finite_step(coefficients: Tensor, *scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(coefficients, ok)``: ``ok`` is a 0-d bool, whether the coefficients and every score are
    finite; where not, the coefficients are ones (a neutral step). No host synchronisation: a
    method keeps its state with ``torch.where(ok, new, old)`` in its commit."""
    ok = torch.isfinite(coefficients).all()
    for s in scores:
        ok = ok & torch.isfinite(s).all()
    return torch.where(ok, coefficients, torch.ones_like(coefficients)), ok
