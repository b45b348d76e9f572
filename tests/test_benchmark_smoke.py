"""Smoke test of benchmarks/overhead.py: a tiny run prints a complete, sane table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gradmod_bench_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_tiny_run_prints_every_variant_with_finite_positive_ratios(
    capsys: pytest.CaptureFixture[str],
) -> None:
    bench = _load()
    argv = ["--models", "mlp", "--reps", "2", "--warmup", "1", "--inner", "1"]
    argv += ["--mlp-hidden", "16", "--mlp-out", "8", "--mlp-batch", "8"]
    results = bench.main(argv)
    out = capsys.readouterr().out

    assert "torch" in out and "threads 1" in out
    assert "| variant | median step (ms) | ratio vs plain (median [IQR]) | overhead % |" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for variant in bench.VARIANTS:
        assert variant in rows, f"missing row {variant!r} in:\n{out}"
        cells = [c.strip() for c in rows[variant].strip("|").split("|")]
        step_ms = float(cells[1])
        ratio = float(cells[2].split()[0])
        assert math.isfinite(step_ms) and step_ms > 0
        assert math.isfinite(ratio) and ratio > 0

    (rows_mlp,) = results.values()
    assert [r.variant for r in rows_mlp] == list(bench.VARIANTS)
    for r in rows_mlp:
        for x in (r.median_ms, r.ratio, r.q1, r.q3, *r.ci):
            assert math.isfinite(x) and x > 0
        assert r.q1 <= r.ratio <= r.q3
    assert rows_mlp[0].ratio == 1.0  # plain against itself
