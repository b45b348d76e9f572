"""The benchmark's settings: real UCI Multiple Features view sets and synthetic competition sets.

Every setting gives, per seed, a stratified 60/20/20 train/val/test split
(:func:`gradmod.datasets.stratified_split`) with each modality standardised by its training
statistics (:func:`gradmod.datasets.standardize`). The synthetic generator is documented in
:func:`make_synthetic` and in the module docstring of ``benchmarks/balance.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmod.datasets import load_uci_multifeature, standardize, stratified_split

__all__ = [
    "PARTS",
    "SETTINGS",
    "Setting",
    "Split",
    "SyntheticData",
    "SyntheticSpec",
    "load_split",
    "make_synthetic",
    "misleading_permutation",
    "sample_seed",
]

PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic modality-competition generator (see :func:`make_synthetic`).

    The defaults were tuned (see the benchmark's docstring) so that joint training under-uses
    modality B with both Adam and SGD: the fused model falls clearly below the probability
    ensemble of the two unimodal models.
    """

    n: int = 2000  # samples (split 60/20/20 like the UCI data)
    classes: int = 10
    dim_a: int = 256  # A: clean, informative for part of the samples
    dim_b: int = 64  # B: noisy, informative for every sample
    informative: float = 0.6  # fraction of each class where A carries the class
    noise_a: float = 0.5  # sd of A's noise around its class mean (class means have sd 1)
    noise_b: float = 3.0  # sd of B's noise around its class mean (class means have sd 1)
    misleading: bool = False  # A's uninformative part shows the WRONG class pi(y), not noise
    world_seed: int = 20240601  # class means: one fixed "world"; samples are drawn per seed


@dataclass(frozen=True)
class SyntheticData:
    """One draw of the synthetic generator.

    Attributes:
        x: ``{"A": [n, dim_a], "B": [n, dim_b]}`` raw (unstandardised) float32 features.
        y: int64 labels ``[n]``.
        informative: bool ``[n]``: whether A carries the true class of the sample.
        shown: int64 ``[n]``: the class whose mean A was drawn around (``y`` where informative,
            ``pi(y)`` where misleading) or ``-1`` where A is pure noise.
    """

    x: dict[str, Tensor]
    y: Tensor
    informative: Tensor
    shown: Tensor


def misleading_permutation(classes: int) -> Tensor:
    """The fixed wrong label of the misleading variant: ``pi(c) = (c + 1) mod classes``."""
    return (torch.arange(classes) + 1) % classes


def sample_seed(spec: SyntheticSpec, seed: int) -> int:
    """The generator seed of the samples of ``seed``: mixed with ``world_seed`` so that it never
    equals the seed of :func:`gradmod.datasets.stratified_split` (the same seed there would draw
    the same per-class permutations, and the informative samples would all land in train)."""
    return (seed * 0x9E3779B1 + spec.world_seed) % (2**63)


def _class_means(spec: SyntheticSpec) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(spec.world_seed)
    mean_a = torch.randn(spec.classes, spec.dim_a, generator=gen)
    mean_b = torch.randn(spec.classes, spec.dim_b, generator=gen)
    return mean_a, mean_b


def _informative_mask(y: Tensor, fraction: float, gen: torch.Generator) -> Tensor:
    """Exactly ``round(fraction * n_c)`` random samples of each class ``c`` are informative."""
    mask = torch.zeros(y.numel(), dtype=torch.bool)
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        chosen = idx[torch.randperm(idx.numel(), generator=gen)[: round(fraction * idx.numel())]]
        mask[chosen] = True
    return mask


def make_synthetic(spec: SyntheticSpec, seed: int) -> SyntheticData:
    """Draw the synthetic two-modality competition set; deterministic in ``(spec, seed)``.

    * Labels: ``y = i mod classes`` (balanced).
    * Class means: ``mu_A[c]``, ``mu_B[c]`` with i.i.d. N(0, 1) entries, drawn once from
      ``spec.world_seed`` (the same "world" for every seed).
    * Modality A: on an informative sample (exactly ``round(informative * n_c)`` per class),
      ``x_A = mu_A[y] + noise_a * e``. On the others it is pure noise,
      ``x_A = sqrt(1 + noise_a^2) * e`` (same per-coordinate variance, no class information),
      or, with ``misleading=True``, ``x_A = mu_A[pi(y)] + noise_a * e`` with the fixed wrong
      label ``pi(c) = (c + 1) mod classes`` (:func:`misleading_permutation`).
    * Modality B: ``x_B = mu_B[y] + noise_b * e`` for every sample (noisy, always informative).

    ``e`` are independent standard normal draws, and the informative samples are chosen, from a
    ``torch.Generator`` seeded with :func:`sample_seed` ``(spec, seed)``.
    """
    if not 0.0 <= spec.informative <= 1.0:
        raise ValueError(f"informative must be in [0, 1]; got {spec.informative}")
    mean_a, mean_b = _class_means(spec)
    gen = torch.Generator().manual_seed(sample_seed(spec, seed))
    y = torch.arange(spec.n) % spec.classes
    informative = _informative_mask(y, spec.informative, gen)
    if spec.misleading:
        shown = torch.where(informative, y, misleading_permutation(spec.classes)[y])
        x_a = mean_a[shown] + spec.noise_a * torch.randn(spec.n, spec.dim_a, generator=gen)
    else:
        shown = torch.where(informative, y, torch.full_like(y, -1))
        noise = torch.randn(spec.n, spec.dim_a, generator=gen)
        pure = (1.0 + spec.noise_a**2) ** 0.5 * noise
        x_a = torch.where(informative[:, None], mean_a[y] + spec.noise_a * noise, pure)
    x_b = mean_b[y] + spec.noise_b * torch.randn(spec.n, spec.dim_b, generator=gen)
    return SyntheticData({"A": x_a, "B": x_b}, y, informative, shown)


@dataclass(frozen=True)
class Setting:
    """One data setting of the benchmark."""

    name: str
    dataset: str  # "uci" or "synthetic"
    modalities: tuple[str, ...]
    synthetic: SyntheticSpec | None = None


SETTINGS: dict[str, Setting] = {
    "pix+fou": Setting("pix+fou", "uci", ("pix", "fou")),
    "fac+zer": Setting("fac+zer", "uci", ("fac", "zer")),
    "pix+fou+zer": Setting("pix+fou+zer", "uci", ("pix", "fou", "zer")),
    "synthetic": Setting("synthetic", "synthetic", ("A", "B"), SyntheticSpec()),
    "synthetic-misleading": Setting(
        "synthetic-misleading", "synthetic", ("A", "B"), SyntheticSpec(misleading=True)
    ),
}


@dataclass(frozen=True)
class Split:
    """Standardised features ``x[part][modality]`` and labels ``y[part]`` of one seed."""

    x: dict[str, dict[str, Tensor]]
    y: dict[str, Tensor]
    classes: int

    def dims(self) -> dict[str, int]:
        return {m: t.shape[1] for m, t in self.x["train"].items()}


@functools.cache
def _uci(views: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    return load_uci_multifeature(views)


def _raw(setting: Setting, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    if setting.dataset == "uci":
        return _uci(setting.modalities)
    assert setting.synthetic is not None
    data = make_synthetic(setting.synthetic, seed)
    return data.x, data.y


def load_split(setting: Setting, seed: int) -> Split:
    """The seed's stratified 60/20/20 split, each modality standardised on its training part."""
    xs, y = _raw(setting, seed)
    idx = dict(zip(PARTS, stratified_split(y, seed=seed), strict=True))
    x: dict[str, dict[str, Tensor]] = {p: {} for p in PARTS}
    for m in setting.modalities:
        scaled = standardize(*(xs[m][i] for i in idx.values()))
        for p, s in zip(PARTS, scaled, strict=True):
            x[p][m] = s.contiguous()
    return Split(x, {p: y[i] for p, i in idx.items()}, int(y.max()) + 1)
