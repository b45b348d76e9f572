"""Smoke test of benchmarks/overhead.py: a tiny run prints a complete, sane table."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import gradmod

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


class _Recorder(torch.optim.Optimizer):
    """An optimizer that only records the gradients it is asked to step on (and moves
    nothing, so both sides of a pair stay on the same parameters)."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        super().__init__(params, {})
        self.seen: list[dict[int, torch.Tensor]] = []

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        self.seen.append(
            {
                id(p): p.grad.detach().clone()
                for group in self.param_groups
                for p in group["params"]
                if p.grad is not None
            }
        )


@pytest.mark.parametrize("method", ["mlb", "ogm-ge"])
def test_hand_written_rows_compute_gradmods_gradients(method: str) -> None:
    """Each hand-written row and gradmod's full step of the same method give every parameter
    (the model's and the heads') the same gradient, step after step: the timed comparison is
    between equal computations."""
    bench = _load()
    args = bench.parse_args(["--models", "mlp", "--mlp-hidden", "16", "--mlp-out", "8"])
    spec = bench.build_spec("mlp", args)
    torch.manual_seed(0)
    base = spec.build()
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts: list[_Recorder] = []

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        opts.append(_Recorder(params))
        return opts[-1]

    if method == "mlb":
        torch.manual_seed(1)
        heads = {n: torch.nn.Linear(8, bench.N_CLASSES) for n in bench.NAMES}
        twins = copy.deepcopy(heads)
        steps = [
            bench.method_step(
                models[0],
                gradmod.MLB(alpha=bench.MLB_ALPHA),
                heads=heads,
                mode="feature",
                make_opt=make_opt,
            ),
            bench.mlb_hand_step(models[1], twins, make_opt=make_opt),
        ]
        named = [
            {**dict(models[0].named_parameters()), **_head_params(heads)},
            {**dict(models[1].named_parameters()), **_head_params(twins)},
        ]
    else:
        ogm = gradmod.OGMGE(alpha=bench.OGM_ALPHA, seed=bench.OGM_SEED)
        steps = [
            bench.method_step(models[0], ogm, fusion="head", make_opt=make_opt),
            bench.ogm_hand_step(models[1], make_opt=make_opt),
        ]
        named = [dict(models[0].named_parameters()), dict(models[1].named_parameters())]
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        xs = [torch.randn(16, *s, generator=g) for s in spec.input_shapes]
        y = torch.randint(0, bench.N_CLASSES, (16,), generator=g)
        for step in steps:
            step((xs, y))
    assert len(opts[0].seen) == len(opts[1].seen) == 3
    for got, want in zip(opts[0].seen, opts[1].seen, strict=True):
        assert len(got) == len(want) == len(named[0])
        for name, p in named[0].items():
            torch.testing.assert_close(
                got[id(p)], want[id(named[1][name])], rtol=1e-5, atol=1e-6, msg=name
            )


def _head_params(heads: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"heads.{n}.{k}": p for n, h in heads.items() for k, p in h.named_parameters()}
