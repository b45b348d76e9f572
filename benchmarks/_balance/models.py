"""Late-fusion model, unimodal heads and CGGM classifiers, built once per seed and copied.

* Encoder per modality, chosen by the setting through the modality's input shape
  (:func:`encoder`): a feature vector of width ``d`` (an ``int``, every setting but ``watch``)
  gets the MLP ``Linear(d, hidden) - ReLU - Linear(hidden, feature) - ReLU``; a multichannel
  time series (a :class:`Series` shape, the ``watch`` sensors) gets the 1-D conv encoder
  ``Conv1d(c, 32, 10, stride 10) - ReLU - Conv1d(32, 32, 3) - ReLU - global average pool -
  Linear(32, feature) - ReLU`` (:func:`conv_encoder`). Either way the encoder outputs
  ``[n, feature]``, and everything below is the same.
* Fused head: ONE ``nn.Linear(M * feature, classes)`` over the concatenated encoder outputs, so
  the fused logits split exactly into per-modality "share" logits
  ``z_m = h_m @ W[:, block_m].T + b / M`` (:func:`share_logits`), which sum to the fused logits.
* Unimodal heads: ``Linear(feature, classes)`` per modality, used on the LIVE encoder output by
  ``alone:<m>`` (encoder + its head) and by the multi-loss objective.
* CGGM classifiers: ``Linear(feature, M * feature) - ReLU - Linear(M * feature, classes)`` per
  modality, fed the detached features; the last weight has the fused head's shape
  ``[classes, M * feature]`` (as in the official code), which CGGM's direction loss compares.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CONV_PATCH",
    "CONV_WIDTH",
    "AloneNet",
    "FusedNet",
    "InputShape",
    "LateFusion",
    "Parts",
    "Series",
    "build_parts",
    "conv_encoder",
    "encoder",
    "share_logits",
]


class Series(NamedTuple):
    """Input shape of a time-series modality: ``[n, channels, length]`` (channels first)."""

    channels: int
    length: int


#: A modality's input shape: a feature width (MLP encoder) or a :class:`Series` (conv encoder).
InputShape = int | Series
#: The conv encoder: channels of its two layers, and the first layer's kernel = stride.
CONV_WIDTH = 32
CONV_PATCH = 10


def conv_encoder(channels: int, feature: int, width: int = CONV_WIDTH) -> nn.Sequential:
    """``Conv1d(c, width, 10, stride 10) - ReLU - Conv1d(width, width, 3) - ReLU - mean over
    time - Linear(width, feature) - ReLU``: ``[n, c, length]`` -> ``[n, feature]``.

    The first layer embeds non-overlapping patches of 10 samples (0.2 s at 50 Hz), the second
    sees 3 patches (0.6 s). Chosen for time: on one CPU core a fwd+bwd of a batch of 64 windows
    of 200 samples costs ~1.3 ms per sensor here against ~7 ms for
    ``Conv1d(c, 32, 5) - ReLU - Conv1d(32, 32, 5, stride 2)`` (one ``watch`` job of all
    variants: ~60 s against ~230 s, the latter with 6 training subjects); the small convs' cost is mostly fixed per-call overhead."""
    return nn.Sequential(
        nn.Conv1d(channels, width, CONV_PATCH, stride=CONV_PATCH),
        nn.ReLU(),
        nn.Conv1d(width, width, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(width, feature),
        nn.ReLU(),
    )


def encoder(shape: InputShape, hidden: int, feature: int) -> nn.Sequential:
    """The encoder of a modality of input ``shape``: conv for a :class:`Series`, else MLP."""
    if isinstance(shape, Series):
        return conv_encoder(shape.channels, feature)
    return nn.Sequential(nn.Linear(shape, hidden), nn.ReLU(), nn.Linear(hidden, feature), nn.ReLU())


def share_logits(head: nn.Linear, feats: list[Tensor]) -> list[Tensor]:
    """Per-modality shares of a linear head on ``cat(feats)``: ``h_m W_m^T + b / M``.

    The shares sum to ``head(torch.cat(feats, 1))`` (up to float rounding).
    """
    widths = [h.shape[1] for h in feats]
    blocks = head.weight.split(widths, dim=1)
    bias = head.bias / len(feats) if head.bias is not None else None
    return [F.linear(h, w, bias) for h, w in zip(feats, blocks, strict=True)]


class LateFusion(nn.Module):
    """One encoder per modality (``encoders.<name>``), fused head ``head`` on the concatenation."""

    def __init__(
        self, dims: dict[str, InputShape], hidden: int, feature: int, classes: int
    ) -> None:
        super().__init__()
        self.names = list(dims)
        self.encoders = nn.ModuleDict({m: encoder(d, hidden, feature) for m, d in dims.items()})
        self.head = nn.Linear(feature * len(dims), classes)

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {m: self.encoders[m](xs[m]) for m in self.names}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        out: Tensor = self.head(torch.cat([feats[m] for m in self.names], dim=1))
        return out

    def shares(self, feats: dict[str, Tensor]) -> dict[str, Tensor]:
        parts = share_logits(self.head, [feats[m] for m in self.names])
        return dict(zip(self.names, parts, strict=True))


class Parts(nn.Module):
    """Everything one seed's runs start from: copy it (``copy.deepcopy``) for every run."""

    def __init__(self, model: LateFusion, heads: nn.ModuleDict, classifiers: nn.ModuleDict):
        super().__init__()
        self.model = model
        self.heads = heads
        self.classifiers = classifiers

    @property
    def names(self) -> list[str]:
        return self.model.names

    def encoder_paths(self) -> dict[str, str]:
        """``{name: "encoders.<name>"}``: the encoders' dotted paths inside :attr:`model`."""
        return {m: f"encoders.{m}" for m in self.names}


def build_parts(
    dims: dict[str, InputShape], hidden: int, feature: int, classes: int, seed: int
) -> Parts:
    """The seed's initialisation (global RNG seeded here; modules built in a fixed order).

    ``dims``: each modality's input shape (:meth:`.data.Split.dims`), which picks its encoder.
    """
    torch.manual_seed(seed)
    model = LateFusion(dims, hidden, feature, classes)
    heads = nn.ModuleDict({m: nn.Linear(feature, classes) for m in dims})
    width = feature * len(dims)
    classifiers = nn.ModuleDict(
        {
            m: nn.Sequential(nn.Linear(feature, width), nn.ReLU(), nn.Linear(width, classes))
            for m in dims
        }
    )
    return Parts(model, heads, classifiers)


class FusedNet(nn.Module):
    """A fused run: the late-fusion model, plus the unimodal heads it trains.

    ``heads``: which unimodal heads belong to the trained network (optimised at the model's
    learning rate and clipped with it): ``None``, ``"linear"`` (:attr:`Parts.heads`) or
    ``"mlp"`` (heads shaped like the CGGM classifiers, for the direction loss).
    Loss: ``CE(fused)`` + (``sum_m CE(head_m(h_m))`` on the live features if ``aux_loss``; the
    gradmod methods MultiLoss/MLB add that term themselves and leave ``aux_loss`` off).
    """

    def __init__(self, parts: Parts, aux_loss: bool, heads: str | None = None) -> None:
        super().__init__()
        self.model = parts.model
        if aux_loss and heads is None:
            heads = "linear"
        chosen = {"linear": parts.heads, "mlp": parts.classifiers, None: nn.ModuleDict()}
        self.heads = chosen[heads]
        self.aux_loss = aux_loss

    @property
    def names(self) -> list[str]:
        return self.model.names

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return self.model.features(xs)

    def predict(self, feats: dict[str, Tensor]) -> Tensor:
        return self.model.fuse(feats)

    def loss(self, feats: dict[str, Tensor], y: Tensor) -> Tensor:
        loss = F.cross_entropy(self.model.fuse(feats), y)
        if self.aux_loss:
            for m in self.names:
                loss = loss + F.cross_entropy(self.heads[m](feats[m]), y)
        return loss

    def shares(self, feats: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return self.model.shares(feats)

    def encoder(self, m: str) -> nn.Module:
        return self.model.encoders[m]


class AloneNet(nn.Module):
    """One modality alone: its encoder and its linear head (both copied from the seed's parts)."""

    def __init__(self, parts: Parts, name: str) -> None:
        super().__init__()
        self.name = name
        self.enc = copy.deepcopy(parts.model.encoders[name])
        self.head = copy.deepcopy(parts.heads[name])

    @property
    def names(self) -> list[str]:
        return [self.name]

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {self.name: self.enc(xs[self.name])}

    def predict(self, feats: dict[str, Tensor]) -> Tensor:
        out: Tensor = self.head(feats[self.name])
        return out

    def loss(self, feats: dict[str, Tensor], y: Tensor) -> Tensor:
        return F.cross_entropy(self.predict(feats), y)

    def shares(self, feats: dict[str, Tensor]) -> dict[str, Tensor] | None:
        return None

    def encoder(self, m: str) -> nn.Module:
        return self.enc
