"""The benchmark's settings: UCI Multiple Features view sets, synthetic competition sets and the
smartwatch sensors.

* UCI (``pix+fou``, ``fac+zer``, ``pix+fou+zer``) and synthetic settings: per seed a stratified
  60/20/20 train/val/test split (:func:`gradmod.datasets.stratified_split`), each modality
  standardised by its training statistics (:func:`gradmod.datasets.standardize`). The synthetic
  generator is documented in :func:`make_synthetic` and in the module docstring of
  ``benchmarks/balance.py``: ``synthetic`` (B noisy, always informative), ``-misleading`` (A's
  noise part shows a wrong class), ``-uninformative`` (B independent of the label: pure noise of
  the informative B's variance) and ``-weak`` (B's noise raised to :data:`WEAK_NOISE_B`, chosen
  from :data:`WEAK_NOISE_GRID` by B's unimodal accuracy only).
* ``watch``: 4 s windows of a smartwatch's accelerometer and gyroscope (``[n, 3, 200]`` each,
  :mod:`.watch`), split by SUBJECT per seed (5 train / 2 validation / 3 test,
  :func:`.watch.subject_split`), each sensor channel standardised by its training statistics
  (:func:`standardize_series`); its encoders are 1-D convs (``Setting.encoder = "conv1d"``,
  :func:`.models.conv_encoder`), every other setting's are MLPs.

Measured unimodal/ensemble/joint accuracies are in ``benchmarks/balance.py``'s docstring.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from gradmod.datasets import load_uci_multifeature, standardize, stratified_split

from . import watch
from .models import InputShape, Series

__all__ = [
    "PARTS",
    "SETTINGS",
    "WEAK_NOISE_B",
    "WEAK_NOISE_GRID",
    "Setting",
    "Split",
    "SyntheticData",
    "SyntheticSpec",
    "load_split",
    "make_synthetic",
    "misleading_permutation",
    "sample_seed",
    "standardize_series",
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
    b_informative: bool = True  # False: B is pure noise sqrt(1 + noise_b^2) e, drawn without y
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


def _labels(spec: SyntheticSpec) -> Tensor:
    """``y = i mod classes``: balanced labels, the same for every seed."""
    return torch.arange(spec.n) % spec.classes


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
    * Modality B: ``x_B = mu_B[y] + noise_b * e`` for every sample (noisy, always informative);
      with ``b_informative=False``, ``x_B = sqrt(1 + noise_b^2) * e``: independent of the label
      (drawn without reading ``y`` or ``mu_B``), with B's per-coordinate variance (the class
      means have unit variance). The random stream is the same either way.

    ``e`` are independent standard normal draws, and the informative samples are chosen, from a
    ``torch.Generator`` seeded with :func:`sample_seed` ``(spec, seed)``.
    """
    if not 0.0 <= spec.informative <= 1.0:
        raise ValueError(f"informative must be in [0, 1]; got {spec.informative}")
    mean_a, mean_b = _class_means(spec)
    gen = torch.Generator().manual_seed(sample_seed(spec, seed))
    y = _labels(spec)
    informative = _informative_mask(y, spec.informative, gen)
    if spec.misleading:
        shown = torch.where(informative, y, misleading_permutation(spec.classes)[y])
        x_a = mean_a[shown] + spec.noise_a * torch.randn(spec.n, spec.dim_a, generator=gen)
    else:
        shown = torch.where(informative, y, torch.full_like(y, -1))
        noise = torch.randn(spec.n, spec.dim_a, generator=gen)
        pure = (1.0 + spec.noise_a**2) ** 0.5 * noise
        x_a = torch.where(informative[:, None], mean_a[y] + spec.noise_a * noise, pure)
    noise_b = torch.randn(spec.n, spec.dim_b, generator=gen)
    if spec.b_informative:
        x_b = mean_b[y] + spec.noise_b * noise_b
    else:
        x_b = (1.0 + spec.noise_b**2) ** 0.5 * noise_b
    return SyntheticData({"A": x_a, "B": x_b}, y, informative, shown)


#: ``synthetic-weak``: the noise levels of B declared before any run, and the one chosen, by
#: B's unimodal ("alone") test accuracy only (target 30-45 % with 10 classes; never by a
#: balancing method's result). See the benchmark's docstring for the measurements.
WEAK_NOISE_GRID: tuple[float, ...] = (4.0, 5.0, 6.0, 7.0, 8.0)
WEAK_NOISE_B = 6.0


@dataclass(frozen=True)
class Setting:
    """One data setting of the benchmark.

    ``encoder``: ``"mlp"`` (feature vectors ``[n, d]``) or ``"conv1d"`` (time series
    ``[n, channels, length]``): the input shape :meth:`Split.dims` reports, which picks the
    encoder (:func:`.models.encoder`).
    """

    name: str
    dataset: str  # "uci", "synthetic" or "watch"
    modalities: tuple[str, ...]
    synthetic: SyntheticSpec | None = None
    encoder: str = "mlp"


SETTINGS: dict[str, Setting] = {
    "pix+fou": Setting("pix+fou", "uci", ("pix", "fou")),
    "fac+zer": Setting("fac+zer", "uci", ("fac", "zer")),
    "pix+fou+zer": Setting("pix+fou+zer", "uci", ("pix", "fou", "zer")),
    "synthetic": Setting("synthetic", "synthetic", ("A", "B"), SyntheticSpec()),
    "synthetic-misleading": Setting(
        "synthetic-misleading", "synthetic", ("A", "B"), SyntheticSpec(misleading=True)
    ),
    "synthetic-uninformative": Setting(
        "synthetic-uninformative", "synthetic", ("A", "B"), SyntheticSpec(b_informative=False)
    ),
    "synthetic-weak": Setting(
        "synthetic-weak", "synthetic", ("A", "B"), SyntheticSpec(noise_b=WEAK_NOISE_B)
    ),
    "watch": Setting("watch", "watch", tuple(watch.CHANNELS), encoder="conv1d"),
}


@dataclass(frozen=True)
class Split:
    """Standardised features ``x[part][modality]`` and labels ``y[part]`` of one seed.

    ``groups[part]``: the subject of every row of a subject-level split (``watch``), else
    ``None``.
    """

    x: dict[str, dict[str, Tensor]]
    y: dict[str, Tensor]
    classes: int
    encoder: str = "mlp"
    groups: dict[str, Tensor] | None = None

    def dims(self) -> dict[str, InputShape]:
        """Each modality's input shape: its width (MLP encoder), or a :class:`.models.Series`
        ``(channels, length)`` (conv encoder)."""
        if self.encoder == "conv1d":
            return {m: Series(t.shape[1], t.shape[2]) for m, t in self.x["train"].items()}
        return {m: t.shape[1] for m, t in self.x["train"].items()}


@functools.cache
def _uci(views: tuple[str, ...]) -> tuple[dict[str, Tensor], Tensor]:
    return load_uci_multifeature(views)


@functools.cache
def _watch() -> watch.WatchWindows:
    return watch.watch_windows(watch.load_watch())


def _raw(setting: Setting, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    if setting.dataset == "uci":
        return _uci(setting.modalities)
    if setting.dataset == "watch":
        w = _watch()
        return w.x, w.y
    assert setting.synthetic is not None
    data = make_synthetic(setting.synthetic, seed)
    return data.x, data.y


def standardize_series(train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """:func:`~gradmod.datasets.standardize` per CHANNEL of ``[n, channels, length]`` series:
    each channel's mean and sd over the training windows and time steps."""
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1]) for t in (train, *others)]
    scaled = standardize(*flat)
    return tuple(
        s.reshape(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)
        for s, t in zip(scaled, (train, *others), strict=True)
    )


def load_split(setting: Setting, seed: int) -> Split:
    """The seed's split, each modality standardised on its training part.

    Stratified 60/20/20 (:func:`~gradmod.datasets.stratified_split`) for the UCI and synthetic
    settings; subject-level 5/2/3 subjects (:func:`.watch.subject_split`) for ``watch``, whose
    sensors are standardised per channel (:func:`standardize_series`).
    """
    xs, y = _raw(setting, seed)
    groups = None
    if setting.dataset == "watch":
        subjects = _watch().subject
        parts, _ = watch.subject_split(subjects, seed=seed)
        idx = dict(zip(PARTS, parts, strict=True))
        groups = {p: subjects[i] for p, i in idx.items()}
    else:
        idx = dict(zip(PARTS, stratified_split(y, seed=seed), strict=True))
    scale = standardize_series if setting.encoder == "conv1d" else standardize
    x: dict[str, dict[str, Tensor]] = {p: {} for p in PARTS}
    for m in setting.modalities:
        scaled = scale(*(xs[m][i] for i in idx.values()))
        for p, s in zip(PARTS, scaled, strict=True):
            x[p][m] = s.contiguous()
    y_parts = {p: y[i] for p, i in idx.items()}
    return Split(x, y_parts, int(y.max()) + 1, setting.encoder, groups)
