"""Small models, a fixed-coefficient method and float64 references shared by the engine tests.

Nothing here imports gradmod's internals: the references are plain autograd on copies of the
model, so that each engine test compares gradmod against an independent computation.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from settings import DEVICE, DTYPE
from torch import Tensor, nn

import gradmod

F64 = torch.float64
NAMES = ("a", "b", "c")
IN_DIMS = {"a": 5, "b": 4, "c": 3}
FEAT = 4  # width of every encoder output
HID = 6  # width of the fusion head's hidden layer (= input width of its last Linear)
CLASSES = 3


class FixedMethod(gradmod.Method):
    """Returns the coefficients of a user-set schedule, one entry per call (cycling).

    Isolates the engine from CGGM's rule: the test knows exactly which factor each backward uses.
    """

    def __init__(self, schedule: Sequence[Sequence[float]], *, uses_features: bool = True) -> None:
        super().__init__()
        self.schedule = [list(map(float, c)) for c in schedule]
        self.uses_features = uses_features
        self.calls = 0

    def needs(self) -> gradmod.Needs:
        return gradmod.Needs(features=self.uses_features)

    def plan(self, binding: gradmod.Binding, step: gradmod.Step) -> gradmod.StepPlan:
        c = self.schedule[self.calls % len(self.schedule)]
        self.calls += 1
        assert len(c) == len(binding.names)
        return gradmod.StepPlan(torch.tensor(c, dtype=F64, device=binding.device))


def mlp(n_in: int, n_out: int = FEAT, hidden: int = 7) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


class MultiModal(nn.Module):
    """Encoders ``enc.<name>`` and a fusion head ``head`` on their concatenated outputs."""

    def __init__(self, names: Sequence[str] = NAMES, in_dims: Mapping[str, int] = IN_DIMS):
        super().__init__()
        self.names = tuple(names)
        self.enc = nn.ModuleDict({n: mlp(in_dims[n]) for n in self.names})
        self.head = nn.Sequential(
            nn.Linear(FEAT * len(self.names), HID), nn.Tanh(), nn.Linear(HID, CLASSES)
        )

    def features(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.enc[n](xs[n]) for n in self.names}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats[n] for n in self.names], dim=1))

    def forward(self, xs: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.features(xs)
        return self.fuse(feats), feats


def classifier() -> nn.Module:
    """A unimodal head whose last weight matrix has the fusion head's shape [CLASSES, HID]."""
    return nn.Sequential(nn.Linear(FEAT, HID), nn.Tanh(), nn.Linear(HID, CLASSES))


def make_model(dtype: torch.dtype = DTYPE, device: torch.device = DEVICE) -> MultiModal:
    return MultiModal().to(device=device, dtype=dtype)


def make_classifiers(
    dtype: torch.dtype = DTYPE, device: torch.device = DEVICE
) -> dict[str, nn.Module]:
    return {n: classifier().to(device=device, dtype=dtype) for n in NAMES}


def batch(
    n: int = 8,
    *,
    seed: int = 1,
    dtype: torch.dtype = DTYPE,
    device: torch.device = DEVICE,
) -> tuple[dict[str, Tensor], Tensor]:
    """A float64 batch drawn on the CPU from its own generator, then cast (same data everywhere)."""
    g = torch.Generator().manual_seed(seed)
    xs = {k: torch.randn(n, IN_DIMS[k], generator=g, dtype=F64) for k in NAMES}
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return {k: v.to(device=device, dtype=dtype) for k, v in xs.items()}, y.to(device)


def cast(xs: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) for k, v in xs.items()}


def copy_as(module: nn.Module, dtype: torch.dtype = F64, device: str = "cpu") -> nn.Module:
    return copy.deepcopy(module).to(device=device, dtype=dtype)


def loss_of(model: MultiModal, xs: Mapping[str, Tensor], y: Tensor) -> tuple[Tensor, dict]:
    logits, feats = model(xs)
    return F.cross_entropy(logits, y), feats


def plain_grads(
    model: nn.Module, xs: Mapping[str, Tensor], y: Tensor, *, dtype: torch.dtype = F64
) -> dict[str, Tensor]:
    """Named gradients of the unmodulated loss on a copy of ``model`` in ``dtype`` (CPU)."""
    ref = copy_as(model, dtype)
    assert isinstance(ref, MultiModal)
    loss, _ = loss_of(ref, cast({k: v.cpu() for k, v in xs.items()}, dtype), y.cpu())
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}


def grads(module: nn.Module) -> dict[str, Tensor | None]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else None)
        for n, p in module.named_parameters()
    }


def hook_count(tensors: Sequence[Tensor]) -> int:
    """Number of tensor (pre-accumulation) hooks currently registered on ``tensors``."""
    return sum(len(t._backward_hooks or {}) for t in tensors)


def modality_of(param_name: str) -> str | None:
    """'enc.b.0.weight' -> 'b'; head parameters -> None."""
    parts = param_name.split(".")
    return parts[1] if parts[0] == "enc" else None
