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
    # the paired lines under the table: each hand-written pair, and OGM-GE's noise cost
    for full in bench.HANDWRITTEN:
        assert f"gradmod / hand-written, {full.split(' (')[0]}: " in out, out
    assert "OGM-GE noise cost: OGM-GE full / OGM-GE without noise " in out, out


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


#: The AGM pair's head is scaled up so that the responses are far apart and sharp: the default
#: rule's clamp of r_bar - r to [-1, 1] and its score floor p >= 1e-8 both bind (checked).
AGM_HEAD_GAIN = 60.0


@pytest.mark.parametrize("method", ["mlb", "ogm-ge", "cggm", "agm"])
def test_hand_written_rows_compute_gradmods_gradients(method: str) -> None:
    """Each hand-written row and gradmod's full step of the same method give every parameter
    (the model's and the heads') the same gradient, step after step: the timed comparison is
    between equal computations."""
    bench = _load()
    args = bench.parse_args(["--models", "mlp", "--mlp-hidden", "16", "--mlp-out", "8"])
    spec = bench.build_spec("mlp", args)
    torch.manual_seed(0)
    base = spec.build()
    if method == "agm":
        # a sharper head (AGM_HEAD_GAIN), so that the clamp and the floor are compared too
        with torch.no_grad():
            base.head.weight.mul_(AGM_HEAD_GAIN)
    models = [copy.deepcopy(base), copy.deepcopy(base)]
    opts: list[_Recorder] = []

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        opts.append(_Recorder(params))
        return opts[-1]

    named = [dict(models[0].named_parameters()), dict(models[1].named_parameters())]
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
        named = [{**named[0], **_head_params(heads)}, {**named[1], **_head_params(twins)}]
    elif method == "ogm-ge":
        ogm = gradmod.OGMGE(alpha=bench.OGM_ALPHA, seed=bench.OGM_SEED)
        steps = [
            bench.method_step(models[0], ogm, fusion="head", make_opt=make_opt),
            bench.ogm_hand_step(models[1], make_opt=make_opt),
        ]
    elif method == "cggm":
        heads = bench.cggm_classifiers(base.head.in_features, torch.device("cpu"))
        twins = copy.deepcopy(heads)
        cggm = gradmod.CGGM(rho=bench.CGGM_RHO, lam=bench.CGGM_LAM)
        steps = [
            bench.method_step(models[0], cggm, heads=heads, fusion="head", make_opt=make_opt),
            bench.cggm_hand_step(models[1], twins, make_opt=make_opt),
        ]
        named = [{**named[0], **_head_params(heads)}, {**named[1], **_head_params(twins)}]
    else:
        agm = gradmod.AGM(alpha=bench.AGM_ALPHA)
        steps = [
            bench.agm_step(models[0], inputs_masked=False, method=agm, make_opt=make_opt),
            bench.agm_hand_step(models[1], make_opt=make_opt),
        ]
    g = torch.Generator().manual_seed(3)
    batches = [
        (
            [torch.randn(16, *s, generator=g) for s in spec.input_shapes],
            torch.randint(0, bench.N_CLASSES, (16,), generator=g),
        )
        for _ in range(3)
    ]
    # the third step repeats the second batch: with the recorder nothing moves, so CGGM's
    # accuracies do not change (its no-improvement branch); the other steps improve on zero
    # or on the previous batch
    schedule = [batches[0], batches[1], batches[1], batches[2]]
    n_steps = len(schedule)
    seen: list[torch.Tensor] = []
    for batch in schedule:
        for step in steps:
            step(batch)
        if method == "cggm":
            seen.append(cggm.last_b.clone())
        elif method == "agm":
            seen.append(agm.last_coefficients.clone())
    assert len(opts[0].seen) == len(opts[1].seen) == n_steps
    for got, want in zip(opts[0].seen, opts[1].seen, strict=True):
        assert len(got) == len(want) == len(named[0])
        for name, p in named[0].items():
            torch.testing.assert_close(
                got[id(p)], want[id(named[1][name])], rtol=1e-5, atol=1e-6, msg=name
            )
    if method == "cggm":
        # both branches of the default were compared: improvements (unequal B) and none
        # (every B = (M-1)/M)
        flat = [torch.allclose(b, torch.full_like(b, 2 / 3)) for b in seen]
        assert flat[2] and not all(flat), seen
    elif method == "agm":
        # the clamp of r_bar - r to [-1, 1] bound (|log k| = alpha) and did not (|log k| < alpha)
        logk = torch.cat(seen).log().abs() / bench.AGM_ALPHA
        assert (logk > 1 - 1e-9).any() and (logk < 1 - 1e-3).any(), seen
        # and the score floor bound: some true-class probability of a response is below 1e-8
        xs, y = batches[0]
        _, feats = base(xs)
        phi = gradmod.functional.shapley_responses(
            lambda f: base.head(torch.cat([f[n] for n in bench.NAMES], 1)), feats
        )
        logp = torch.stack([torch.log_softmax(r, 1).gather(1, y[:, None]) for r in phi.values()])
        assert logp.min() < math.log(1e-8), logp.min()


def _head_params(heads: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    return {f"heads.{n}.{k}": p for n, h in heads.items() for k, p in h.named_parameters()}


@pytest.mark.parametrize("mode", ["parameter", "feature", "claims"])
def test_floor_rows_modulate_as_the_engine_rows(mode: str) -> None:
    """A floor row applies the engine row's coefficients to the same gradients (it only leaves
    out the engine's checks and bookkeeping): the same gradients step after step, and not the
    plain ones."""
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

    cpu = torch.device("cpu")
    steps = [
        bench.method_step(
            models[0],
            bench.FixedCoefficients(),
            mode="parameter" if mode == "claims" else mode,
            make_opt=make_opt,
        ),
        bench.floor_step(models[1], cpu, mode=mode, make_opt=make_opt),
    ]
    g = torch.Generator().manual_seed(5)
    for _ in range(bench.CYCLE + 1):
        batch = (
            [torch.randn(16, *s, generator=g) for s in spec.input_shapes],
            torch.randint(0, bench.N_CLASSES, (16,), generator=g),
        )
        for step in steps:
            step(batch)
    named = [dict(models[0].named_parameters()), dict(models[1].named_parameters())]
    encoder = [n for n in named[0] if n.startswith("encoders.")]
    assert len(opts[0].seen) == len(opts[1].seen) == bench.CYCLE + 1
    for got, want in zip(opts[0].seen, opts[1].seen, strict=True):
        for name, p in named[0].items():
            torch.testing.assert_close(
                got[id(p)], want[id(named[1][name])], rtol=1e-6, atol=1e-7, msg=name
            )
    # the coefficients are not all 1: some step scaled the encoders' gradients
    plain = copy.deepcopy(base)
    xs, y = batch
    torch.nn.functional.cross_entropy(plain(xs)[0], y).backward()
    last = opts[1].seen[-1]
    assert any(
        not torch.allclose(last[id(named[1][n])], dict(plain.named_parameters())[n].grad)
        for n in encoder
    )


def test_noise_floor_draws_one_number_per_encoder_element_and_modulates_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GE-noise floor row is a plain step (its gradients are a plain backward's) that also
    draws, per step, one standard normal number per encoder element, modality by modality."""
    bench = _load()
    args = bench.parse_args(["--models", "mlp", "--mlp-hidden", "16", "--mlp-out", "8"])
    spec = bench.build_spec("mlp", args)
    torch.manual_seed(0)
    base = spec.build()
    model = copy.deepcopy(base)
    opts: list[_Recorder] = []

    def make_opt(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        opts.append(_Recorder(params))
        return opts[-1]

    step = bench.floor_step(model, torch.device("cpu"), mode="noise", make_opt=make_opt)
    drawn: list[int] = []
    normal = torch.Tensor.normal_

    def spy(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        drawn.append(self.numel())
        return normal(self, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.Tensor, "normal_", spy)
    g = torch.Generator().manual_seed(5)
    sizes = [
        sum(p.numel() for p in base.get_submodule(bench.PATHS[n]).parameters()) for n in bench.NAMES
    ]
    for i in range(3):
        batch = (
            [torch.randn(16, *s, generator=g) for s in spec.input_shapes],
            torch.randint(0, bench.N_CLASSES, (16,), generator=g),
        )
        step(batch)
        assert drawn == sizes * (i + 1)
        plain = copy.deepcopy(base)
        xs, y = batch
        torch.nn.functional.cross_entropy(plain(xs)[0], y).backward()
        want = {n: p.grad for n, p in plain.named_parameters()}
        got = opts[0].seen[-1]
        for n, p in model.named_parameters():
            assert torch.equal(got[id(p)], want[n]), n
