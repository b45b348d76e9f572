"""Hugging Face Accelerate: ``accelerator.backward(loss)`` inside a gradmod block.

::

    from gradmod.integrations.accelerate import Modulator

    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="bf16")
    heads = {m: nn.Linear(32, 5).to(accelerator.device) for m in ("audio", "video")}
    head_params = [p for h in heads.values() for p in h.parameters()]
    optimizer = torch.optim.Adam([*model.parameters(), *head_params], lr=1e-3)
    ctx = gradmod.ModulationContext(model, heads, optimizer=optimizer)  # before prepare()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    modulator = Modulator(accelerator, ctx)

    for xa, xv, y in loader:
        with accelerator.accumulate(model):
            logits, feats = model(xa, xv)
            modulator.backward(F.cross_entropy(logits, y), features=feats, targets=y)
            optimizer.step()
            optimizer.zero_grad()

:meth:`Modulator.backward` is ``accelerator.backward(loss)`` inside ``with ctx(...)``, with the
block's arguments read off the accelerator:

* ``boundary=accelerator.sync_gradients`` (the micro-batch after which the prepared optimizer
  steps);
* ``weight=1 / accelerator.gradient_accumulation_steps``: ``accelerator.backward`` divides the
  loss by the number of accumulation steps (always, also at a shorter last window of the data
  loader), and the gradients the method adds itself (head losses, direction loss) are divided
  alike;
* the accelerator's ``GradScaler`` (``accelerator.scaler``, fp16 mixed precision) is given to
  the context, which scales the method's own gradients like the loss.

Rules:

* **Heads the method trains** (MLB, ``gradmod.balanced()``, multi-loss, CGGM's classifiers)
  stay **outside** the prepared model: don't make them submodules of the model, don't pass
  them to ``accelerator.prepare``; move them with ``.to(accelerator.device)`` and put their
  parameters in the optimizer you prepare. gradmod computes their gradients itself and
  averages them over processes; inside a DDP module, DDP would wait for gradients that never
  come. Refused when running on more than one process.
* **Update level** (``optimizer=``): build the context with the torch optimizer, before
  ``accelerator.prepare`` (or after it with ``prepared.optimizer``, the optimizer it wraps).
* **Mixed precision**: a prepared model returns fp32 copies of its bf16/fp16 outputs; hand
  those features to :meth:`Modulator.backward` as they are: gradmod follows a pure dtype cast
  to the tensor that the loss reaches.
* DeepSpeed, FSDP, Megatron-LM and XLA are refused (their backward or gradient reduction is
  not DDP's).

This module imports ``accelerate``; ``import gradmod`` never does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import accelerate  # type: ignore[import-untyped]
from accelerate.utils import DistributedType  # type: ignore[import-untyped]
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .._context import ModulationContext
from .._errors import ConfigurationError

__all__ = ["Modulator"]

#: Distributed types whose backward or gradient reduction is not DDP's.
_UNSUPPORTED = {
    DistributedType.DEEPSPEED: "DeepSpeed runs its own backward and gradient partitioning",
    DistributedType.FSDP: "FSDP flattens and shards the parameters that gradmod hooks",
    DistributedType.MEGATRON_LM: "accelerator.backward does not run backward under Megatron-LM",
    DistributedType.XLA: "XLA reduces gradients in the optimizer step, which gradmod does not see",
}


class Modulator:
    """Runs ``accelerator.backward(loss)`` inside a :class:`~gradmod.ModulationContext` block.

    Args:
        accelerator: the ``accelerate.Accelerator`` that prepared the model and optimizer.
        ctx: the context, built on the model (before or after ``accelerator.prepare``) and, for
            the update level, on the torch optimizer (not the prepared wrapper). Its
            ``grad_scaler`` is set to the accelerator's ``GradScaler`` when there is one.

    Raises:
        ConfigurationError: listing every problem: a distributed type gradmod does not support
            (DeepSpeed, FSDP, Megatron-LM, XLA), a context given another ``GradScaler`` than
            the accelerator's (or one while the accelerator scales no loss), heads the method
            trains inside the model (or prepared by the accelerator) on more than one process.
    """

    def __init__(self, accelerator: accelerate.Accelerator, ctx: ModulationContext) -> None:
        if not isinstance(ctx, ModulationContext):
            raise ConfigurationError(
                [f"ctx must be a gradmod.ModulationContext; got {type(ctx).__name__}"]
            )
        problems: list[str] = []
        kind = accelerator.distributed_type
        if kind in _UNSUPPORTED:
            problems.append(
                f"distributed type {kind.value} is not supported ({_UNSUPPORTED[kind]}): use "
                "DDP (multi-GPU/multi-CPU) or a single process"
            )
        scaler = accelerator.scaler
        if ctx.grad_scaler is not None and ctx.grad_scaler is not scaler:
            problems.append(
                "the context was given a grad_scaler that is not the accelerator's "
                f"({'it has none' if scaler is None else 'accelerator.scaler'}): build the "
                "context without grad_scaler=; the Modulator hands it accelerator.scaler"
            )
        problems.extend(_head_problems(ctx, accelerator.num_processes))
        if problems:
            raise ConfigurationError(problems)
        if scaler is not None:
            ctx.grad_scaler = scaler  # read inside backward and at the optimizer step
        self._accelerator = accelerator
        self._ctx = ctx

    @property
    def accelerator(self) -> accelerate.Accelerator:
        """The accelerator whose ``backward`` runs inside the block."""
        return self._accelerator

    @property
    def ctx(self) -> ModulationContext:
        """The context entered around every backward (coefficients, scores, state)."""
        return self._ctx

    def backward(
        self,
        loss: Tensor,
        *,
        features: Mapping[str, Tensor] | None,
        targets: Tensor | None,
        **kwargs: Any,
    ) -> None:
        """``accelerator.backward(loss, **kwargs)`` inside ``with ctx(features=features,
        targets=targets, boundary=accelerator.sync_gradients,
        weight=1 / accelerator.gradient_accumulation_steps)``.

        Call it where you would call ``accelerator.backward(loss)`` (inside
        ``accelerator.accumulate(model)`` for gradient accumulation), with the features the
        prepared model returned (fp32 copies under mixed precision are fine). The hooks are
        removed also when backward raises; the method's state then stays as it was.

        Raises:
            StepError: as :meth:`ModulationContext.__call__` (the step's inputs).
        """
        acc = self._accelerator
        block = self._ctx(
            features,
            targets,
            boundary=bool(acc.sync_gradients),
            weight=1.0 / acc.gradient_accumulation_steps,
        )
        with block:
            acc.backward(loss, **kwargs)

    def __repr__(self) -> str:
        return f"Modulator({self._ctx!r})"


def _head_problems(ctx: ModulationContext, processes: int) -> list[str]:
    """Heads that the method trains must stay outside the DDP module that ``prepare`` builds."""
    classifiers = ctx._binding.classifiers or {}
    if processes <= 1 or not ctx.method.needs().trains_classifiers or not classifiers:
        return []
    problems: list[str] = []
    wrapped = sorted(k for k, c in classifiers.items() if isinstance(c, DistributedDataParallel))
    if wrapped:
        problems.append(
            f"classifiers {wrapped} were prepared by the accelerator (DDP-wrapped), but "
            f"{type(ctx.method).__name__} trains them outside the model's forward: don't pass "
            "the heads to accelerator.prepare; move them with .to(accelerator.device) "
            "(gradmod averages their gradients over processes itself)"
        )
    model = ctx._model
    if model is not None:
        in_model = {id(p) for p in model.parameters()}
        inside = sorted(
            k for k, c in classifiers.items() if any(id(p) in in_model for p in c.parameters())
        )
        if inside:
            problems.append(
                f"classifiers {inside} are inside the model that accelerator.prepare wraps in "
                f"DDP, but {type(ctx.method).__name__} trains them outside its forward (DDP "
                "would wait for their gradients): keep the heads outside the model; gradmod "
                "averages their gradients over processes itself"
            )
    return problems
