"""The smartwatch exercise data set shipped in the ``seglearn`` 1.2.5 wheel, read offline.

``seglearn/data/watch_dataset.npy`` (installed with ``python -m pip install --no-deps
seglearn==1.2.5``; seglearn is never imported, its own dependencies are not needed) is a
pickled dict of 140 recordings of 7 shoulder-rehabilitation exercises by 10 subjects: each
subject did each exercise twice, once per ``side`` (70 recordings each). A recording is a
float64 array ``[T, 6]`` sampled at 50 Hz (T = 947 to 2618 samples, 244 102 in all), columns
``ax ay az`` (accelerometer) and ``wx wy wz`` (gyroscope); the dict keys are ``X`` (list of the
140 arrays), ``y`` (int64 exercise 0-6), ``y_labels`` (``PEN ABD FEL IR ER TRAP ROW``),
``subject`` (int64 1-10), ``side`` (float64 0/1, unused here) and ``X_labels`` (the 6 column
names).

Because the file is a pickle (unpickling runs code), :func:`load_watch` reads it only from the
pinned distribution: the installed ``seglearn`` must be exactly version :data:`VERSION` and the
file's SHA-256 must be :data:`SHA256` (recorded from the 1.2.5 wheel), both checked BEFORE the
file is unpickled; anything else is refused with the install command (:data:`INSTALL_HINT`).

:func:`watch_windows` cuts every recording into windows of 200 samples (4 s) with a step of
100 (50 % overlap), starting at sample 0, the incomplete tail dropped: 2229 windows, each
labelled with its recording's exercise and subject; a window never crosses two recordings.
:func:`subject_split` partitions the SUBJECTS per seed (5 train / 2 validation / 3 test, a
rotation: every subject is tested 3 times in seeds 0-9), so that one subject's windows are
never on two sides of a split.
"""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHANNELS",
    "EXERCISES",
    "INSTALL_HINT",
    "LENGTH",
    "SHA256",
    "SPLIT_SUBJECTS",
    "STEP",
    "SUBJECTS",
    "VERSION",
    "WatchDataError",
    "WatchRecordings",
    "WatchWindows",
    "data_path",
    "load_watch",
    "subject_split",
    "watch_windows",
]

#: The distribution version whose data file is read, and that file's SHA-256 (1.2.5 wheel).
VERSION = "1.2.5"
SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
#: The command that installs it (seglearn's own dependencies are not needed: never imported).
INSTALL_HINT = f"python -m pip install --no-deps seglearn=={VERSION}"

_DISTRIBUTION = "seglearn"
_FILE = "seglearn/data/watch_dataset.npy"

#: The exercises (label order of the file) and the sensors: modality -> its 3 columns.
EXERCISES = ("PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW")
CHANNELS: dict[str, tuple[str, ...]] = {"acc": ("ax", "ay", "az"), "gyro": ("wx", "wy", "wz")}
SUBJECTS = 10
RATE_HZ = 50
#: Window length and step in samples (4 s windows, 50 % overlap).
LENGTH, STEP = 4 * RATE_HZ, 2 * RATE_HZ
#: Subjects per part of :func:`subject_split`: train, validation, test.
SPLIT_SUBJECTS = (5, 2, 3)


class WatchDataError(RuntimeError):
    """The installed data is not the pinned seglearn 1.2.5 file (the message says how to fix)."""


def _verified() -> tuple[Path, bytes]:
    """The installed data file's path and bytes, after the version and SHA-256 checks."""
    try:
        dist = metadata.distribution(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the smartwatch data ships inside the {_DISTRIBUTION!r} package, which is not "
            f"installed; install it with `{INSTALL_HINT}`"
        ) from None
    if dist.version != VERSION:
        raise WatchDataError(
            f"refusing to unpickle {_FILE} from {_DISTRIBUTION} {dist.version}: only the file of "
            f"version {VERSION} is trusted; install it with `{INSTALL_HINT}`"
        )
    path = Path(str(dist.locate_file(_FILE)))
    if not path.is_file():
        raise WatchDataError(
            f"{path} not found in the installed {_DISTRIBUTION} {dist.version}; reinstall it with "
            f"`{INSTALL_HINT}`"
        )
    blob = path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SHA256:
        raise WatchDataError(
            f"refusing to unpickle {path}: its SHA-256 is {digest}, not the {VERSION} wheel's "
            f"{SHA256}; reinstall it with `{INSTALL_HINT} --force-reinstall`"
        )
    return path, blob


def data_path() -> Path:
    """The data file of the installed ``seglearn``, after the version and SHA-256 checks.

    Raises:
        ModuleNotFoundError: seglearn is not installed.
        WatchDataError: another version is installed, the file is missing, or its SHA-256 is
            not :data:`SHA256`. Every message names :data:`INSTALL_HINT`.
    """
    return _verified()[0]


@dataclass(frozen=True)
class WatchRecordings:
    """The 140 recordings as read from the file.

    Attributes:
        x: per recording a float32 tensor ``[T, 6]`` (columns ``ax ay az wx wy wz``).
        y: int64 ``[140]`` exercise, 0-6 (:data:`EXERCISES`).
        subject: int64 ``[140]`` subject id, 1-10.
    """

    x: list[Tensor]
    y: Tensor
    subject: Tensor


def _check(raw: dict[str, Any]) -> None:
    """The structure the rest of this module relies on (documented in the module docstring)."""
    expected = {"X", "y", "y_labels", "subject", "side", "X_labels"}
    if set(raw) != expected:
        raise WatchDataError(f"unexpected keys {sorted(raw)}; expected {sorted(expected)}")
    columns = [str(c) for c in raw["X_labels"]]
    labels = [str(c) for c in raw["y_labels"]]
    if columns != [*CHANNELS["acc"], *CHANNELS["gyro"]] or labels != list(EXERCISES):
        raise WatchDataError(f"unexpected column or label names: {columns}, {labels}")


@functools.cache
def load_watch() -> WatchRecordings:
    """Read the 140 recordings from the installed, pinned ``seglearn`` 1.2.5 (cached).

    seglearn is not imported; numpy unpickles the file, after :func:`data_path` checked the
    distribution's version and the file's SHA-256.
    """
    import numpy as np  # the file is a numpy pickle; numpy comes with the test/demo installs

    path, blob = _verified()  # the bytes that were hashed are the bytes unpickled
    raw = np.load(io.BytesIO(blob), allow_pickle=True).item()
    _check(raw)
    xs = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in raw["X"]]
    y = torch.from_numpy(np.asarray(raw["y"], dtype=np.int64))
    subject = torch.from_numpy(np.asarray(raw["subject"], dtype=np.int64))
    if len(xs) != y.numel() or y.shape != subject.shape or any(x.shape[1] != 6 for x in xs):
        raise WatchDataError(f"{path}: inconsistent recording, label and subject counts")
    if y.unique().tolist() != list(range(len(EXERCISES))) or subject.unique().numel() != SUBJECTS:
        raise WatchDataError(f"{path}: expected labels 0-6 and {SUBJECTS} subjects")
    return WatchRecordings(xs, y, subject)


@dataclass(frozen=True)
class WatchWindows:
    """Fixed-length windows of the recordings, one row per window.

    Attributes:
        x: modality (``acc``, ``gyro``) -> float32 ``[N, 3, LENGTH]`` (channels first, raw).
        y: int64 ``[N]`` the window's recording's exercise.
        subject: int64 ``[N]`` the recording's subject.
        recording: int64 ``[N]`` the recording's index in the file.
        start: int64 ``[N]`` the window's first sample in its recording.
    """

    x: dict[str, Tensor]
    y: Tensor
    subject: Tensor
    recording: Tensor
    start: Tensor


def watch_windows(
    recordings: WatchRecordings, length: int = LENGTH, step: int = STEP
) -> WatchWindows:
    """Cut each recording into windows ``[start, start + length)``, ``start = 0, step, ...``
    while the window fits (the tail shorter than a window is dropped); windows are never cut
    across two recordings."""
    parts: list[Tensor] = []
    meta: list[list[Tensor]] = [[], [], [], []]
    for i, x in enumerate(recordings.x):
        w = x.unfold(0, length, step)  # [n_windows, 6, length]; start k * step
        n = w.shape[0]
        parts.append(w)
        meta[0].append(recordings.y[i].expand(n))
        meta[1].append(recordings.subject[i].expand(n))
        meta[2].append(torch.full((n,), i, dtype=torch.int64))
        meta[3].append(torch.arange(n, dtype=torch.int64) * step)
    x = torch.cat(parts).contiguous()
    y, subject, recording, start = (torch.cat(m) for m in meta)
    return WatchWindows(
        {"acc": x[:, :3].contiguous(), "gyro": x[:, 3:].contiguous()}, y, subject, recording, start
    )


def subject_split(
    subjects: Tensor, seed: int, counts: tuple[int, int, int] = SPLIT_SUBJECTS
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]:
    """Subject-level train/validation/test split of the rows of ``subjects``, per seed.

    A rotation over the ``n`` distinct subject ids: they are put in an order drawn by a
    ``torch.Generator`` seeded with ``seed // n`` (one order per block of ``n`` seeds) and
    rotated left by ``(seed mod n) * counts[2]`` places; the first ``counts[2]`` subjects are
    then the test subjects, the next ``counts[1]`` the validation subjects and the last
    ``counts[0]`` the training subjects. With ``counts[2]`` prime to ``n`` (3 of 10 by default)
    the ``n`` seeds of a block give ``n`` different partitions in which every subject is tested
    equally often (3 times in seeds 0-9), and seeds 0, 1, 2 test 9 different subjects: the
    spread over seeds is the spread over splits.

    Returns:
        ``((train, val, test), (train_subjects, val_subjects, test_subjects))``: sorted int64
        row indices, and the sorted subject ids of each part.

    Raises:
        ValueError: ``counts`` does not add up to the number of distinct subjects.
    """
    ids = torch.unique(subjects)
    n = ids.numel()
    if sum(counts) != n or min(counts) < 1:
        raise ValueError(f"counts {counts} must be >= 1 and add up to {n} subjects")
    gen = torch.Generator().manual_seed(seed // n)
    order = ids[torch.randperm(n, generator=gen)].roll(-((seed % n) * counts[2] % n))
    test, val, train = (g.sort().values for g in order.split([counts[2], counts[1], counts[0]]))
    rows = [torch.nonzero(torch.isin(subjects, g)).flatten() for g in (train, val, test)]
    return (rows[0], rows[1], rows[2]), (train, val, test)
