"""The link between a forward-acting method's ``ctx.prepare`` and the block after it.

A method that declares ``Needs(forward=True)`` (OPM) changes the features the fusion head
consumes, in the forward: ``ctx.prepare(features=..., targets=...)`` checks them as a step,
hands them to :meth:`~gradmod.Method.prepare` and returns what the fusion head should consume
(:meth:`ForwardLink.prepare`); the
:class:`~gradmod.Prepared` carry waits here for the block that backpropagates those features,
whose ``Step.carry`` it becomes. The engine calls :meth:`ForwardLink.take` on entering a block.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import ContextError, StepError
from ._protocol import Binding, Method, Step

__all__ = ["ForwardLink"]


class ForwardLink:
    """Holds one prepared forward's carry until a block takes it.

    The carry is kept with weak references to the encoder outputs it was prepared for: the
    block must be entered with those very tensors, and a forward that never reaches a block
    keeps no graph alive.
    """

    def __init__(self, method: Method, active: bool) -> None:
        self.method = method
        self.active = active
        self._pending: tuple[dict[str, weakref.ref[Tensor]], Any] | None = None

    @staticmethod
    def training(model: nn.Module | None) -> bool:
        """Whether a forward trains: grad enabled and the model (if any) in training mode."""
        return torch.is_grad_enabled() and (model is None or model.training)

    def prepare(
        self,
        features: Mapping[str, Tensor],
        check: Callable[[], Step],
        binding: Binding,
        model: nn.Module | None,
        *,
        usable: bool,
    ) -> dict[str, Tensor]:
        """The features the fusion head should consume (see ``ModulationContext.prepare``):
        ``features`` unchanged (a new dict) unless a forward-acting method trains, else the
        method's for the step that ``check`` makes of them. ``usable``: the context is open and
        not in a block.

        Raises:
            StepError: from ``check``.
            ContextError: not ``usable``.
        """
        if not self.active or not self.training(model):
            return dict(features)
        if not usable:
            raise ContextError(
                "ctx.prepare belongs to the forward, before the block: call it outside "
                "`with ctx(...)`, on an open context"
            )
        step = check()
        out = self.method.prepare(binding, step)
        feats = dict(out.features)
        bad = [
            n
            for n in binding.names
            if not isinstance(feats.get(n), Tensor) or feats[n].shape != step.features[n].shape
        ]
        if sorted(feats) != sorted(binding.names) or bad:
            raise RuntimeError(
                f"{type(self.method).__name__}.prepare must return one tensor per modality, "
                f"each of its input's shape; got {[(k, type(v).__name__) for k, v in feats.items()]}"
            )
        self._pending = ({n: weakref.ref(step.features[n]) for n in binding.names}, out.carry)
        return feats

    def take(self, step: Step, model: nn.Module | None) -> tuple[Step, Callable[[], None]]:
        """``step`` with the carry of its prepared forward, and the call that consumes it (made
        once the block is entered: a refused block leaves the carry for a corrected retry).

        Raises:
            StepError: a training block of a forward-acting method whose features were not
                handed to ``ctx.prepare`` (or not these features).
        """
        if not self.active:
            return step, lambda: None
        pending = self._pending
        who = type(self.method).__name__
        if pending is None:
            if not self.training(model):  # eval-mode backward: the forward was left unchanged
                return step, lambda: None
            raise StepError(
                f"{who} acts in the forward: call feats_for_fusion = ctx.prepare(features="
                "feats, targets=y) after the encoders and feed the fusion head with what it "
                "returns, then enter the block with the same feats (a block that raised "
                "consumed its forward: run the forward again)"
            )
        refs, carry = pending
        if any(refs[n]() is not step.features[n] for n in refs):
            raise StepError(
                f"the features of this block are not those handed to ctx.prepare: {who} "
                "decided its forward for the tensors given to ctx.prepare; enter the block with "
                "the same dict of encoder outputs (not the prepared ones)"
            )

        def consume() -> None:
            self._pending = None

        return dataclasses.replace(step, carry=carry), consume
