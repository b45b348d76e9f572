"""The contract between the hook engine and a modulation method."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Binding", "Method", "Reduce", "StepPlan"]

#: Sums a tensor over all ranks (the identity outside ``torch.distributed``).
Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Binding:
    """What the engine resolved from the user's configuration, handed to the method."""

    names: tuple[str, ...]
    groups: Mapping[str, list[nn.Parameter]]
    classifiers: Mapping[str, nn.Module] | None
    fusion: Tensor | None
    device: torch.device


@dataclass
class StepPlan:
    """What a method decided for one backward pass.

    Attributes:
        coefficients: one factor per modality, shape ``[M]``; the engine multiplies modality
            ``m``'s encoder gradients by ``coefficients[m]`` during backward.
        accumulate: ``(tensor, grad)`` pairs added to ``tensor.grad`` when the block exits
            without an exception (e.g. the unimodal classifiers' own loss); averaged over ranks
            under DDP and
            multiplied by the loss scale of a ``GradScaler`` given to the engine.
        add_in_backward: ``(tensor, grad)`` pairs added to ``tensor``'s gradient during the
            user's backward, before accumulation (so before DDP's all-reduce); multiplied by
            the loss scale. ``grad`` must be identical on every rank.
    """

    coefficients: Tensor
    accumulate: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    add_in_backward: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class Method(nn.Module):
    """Base class of modulation methods.

    A method is an ``nn.Module`` so that its cross-step state lives in buffers and round-trips
    through ``state_dict()``. Buffers whose size depends on the number of modalities start
    empty and are sized on first use; ``load_state_dict`` resizes them to the checkpoint.
    """

    #: Whether the method needs one unimodal classifier per modality.
    uses_classifiers: bool = False
    #: Whether the method reads each modality's features (encoder outputs) at every step.
    uses_features: bool = True

    def check(self, binding: Binding) -> list[str]:
        """Configuration problems specific to this method (empty when all is well)."""
        return []

    def plan(
        self,
        binding: Binding,
        features: Mapping[str, Tensor],
        targets: Tensor,
        reduce: Reduce,
    ) -> StepPlan:
        """Decide this step's coefficients (and extra gradients); update the method's state."""
        raise NotImplementedError

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
