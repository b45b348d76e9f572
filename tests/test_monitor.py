"""gradmod.Monitor: what it records equals independent references; exports; the figure.

References are plain autograd on float64 CPU copies of the model (no gradmod), or the
gradients the engine actually left in ``.grad``; coefficients and scores are compared with what
the context itself reports after each block.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence

import pytest
import torch
import torch.nn.functional as F
from _models import hook_count
from hypothesis import given
from hypothesis import strategies as st
from settings import ATOL, DEVICE, DTYPE, RTOL
from torch import Tensor, nn

import gradmod
from gradmod.monitor import Monitor

F64 = torch.float64
NAMES = ("a", "b", "c")
DIMS = {"a": 5, "b": 4, "c": 3}
FEAT, CLASSES = 4, 3


class Net(nn.Module):
    """MLP encoders ``enc.<name>``, concatenation, one linear fusion head ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(DIMS[n], 6), nn.Tanh(), nn.Linear(6, FEAT)) for n in NAMES}
        )
        self.head = nn.Linear(FEAT * len(NAMES), CLASSES)

    def features(self, xs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: self.enc[n](xs[n]) for n in NAMES}

    def fuse(self, feats: Mapping[str, Tensor]) -> Tensor:
        return self.head(torch.cat([feats[n] for n in NAMES], dim=1))


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().to(DEVICE, DTYPE)


def data(seed: int = 3, n: int = 16) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = {k: torch.randn(n, DIMS[k], generator=g, dtype=F64) for k in NAMES}
    return xs, torch.randint(0, CLASSES, (n,), generator=g)


def on_device(xs: Mapping[str, Tensor], y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    return {k: v.to(DEVICE, DTYPE) for k, v in xs.items()}, y.to(DEVICE)


def ctx_for(model: Net, method: gradmod.Method, **kw: object) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        model,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=method,
        **kw,  # type: ignore[arg-type]
    )


def run_block(
    model: Net, ctx: gradmod.ModulationContext, seed: int = 3, **block: object
) -> dict[str, Tensor]:
    """One block on batch ``seed``; returns the features."""
    xs, y = on_device(*data(seed))
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y)
    with ctx(features=feats, targets=y, **block):  # type: ignore[arg-type]
        loss.backward()
    return feats


def plain_grads(model: Net, seed: int = 3) -> dict[str, list[Tensor]]:
    """Each modality's encoder gradients of the unmodulated loss, float64 CPU copy."""
    ref = copy.deepcopy(model).to("cpu", F64)
    xs, y = data(seed)
    F.cross_entropy(ref.fuse(ref.features(xs)), y).backward()
    return {n: [p.grad.clone() for p in ref.enc[n].parameters()] for n in NAMES}  # type: ignore[union-attr]


def norm(ts: Sequence[Tensor | None]) -> Tensor:
    """The L2 norm over a list of tensors (float64, CPU)."""
    return torch.linalg.vector_norm(
        torch.cat([t.detach().to("cpu", F64).reshape(-1) for t in ts if t is not None])
    )


def grad_norms(model: Net) -> Tensor:
    """Each encoder's actual ``.grad`` norm, ``[M]``."""
    return torch.stack([norm([p.grad for p in model.enc[n].parameters()]) for n in NAMES])


def column(table: Mapping[str, list[float]], what: str) -> Tensor:
    """``[R, M]``: ``what/<name>`` for every record and modality."""
    return torch.tensor([table[f"{what}/{n}"] for n in NAMES], dtype=F64).T


def close(actual: Tensor, expected: Tensor, msg: str = "") -> None:
    torch.testing.assert_close(
        actual.to("cpu", F64), expected.to(F64), rtol=RTOL, atol=ATOL, msg=msg or None
    )


def monitor_keys(tensors: Sequence[Tensor]) -> int:
    """Hook entries of the monitor (not gradmod's claim key) currently on ``tensors``."""
    return sum(
        1
        for t in tensors
        for key in (t._backward_hooks or {})
        if isinstance(key, tuple) and key[0] == "gradmod.monitor"
    )


# ====================================================================== what is recorded
K = [0.3, 1.7, 0.55]  # non-dyadic: a coefficient rounded on the way would show


def test_parameter_mode_records_the_coefficients_and_exact_norms() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    run_block(model, ctx)
    ref = plain_grads(model)

    (rec,) = [mon.to_dict()]
    assert rec["step"] == [0] and rec["boundary"] == [True]
    close(column(rec, "coefficient")[0], ctx.coefficients, "coefficients")
    before = torch.stack([norm(ref[n]) for n in NAMES])
    close(column(rec, "grad_norm_before")[0], before, "before = plain autograd norm")
    close(column(rec, "grad_norm_after")[0], torch.tensor(K, dtype=F64) * before, "after = k b")
    close(column(rec, "grad_norm_after")[0], grad_norms(model), "after = norm of .grad")
    # what the hooks applied: k times the plain gradients
    for m, n in enumerate(NAMES):
        for p, g in zip(model.enc[n].parameters(), ref[n], strict=True):
            assert p.grad is not None
            close(p.grad, K[m] * g, f"{n} gradient")


@given(k=st.lists(st.floats(0.01, 100.0), min_size=3, max_size=3), seed=st.integers(0, 50))
def test_after_is_k_times_before_for_any_positive_constants(k: list[float], seed: int) -> None:
    model = make(seed % 3)
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(k), monitor=mon)
    run_block(model, ctx, seed=seed)
    rec = mon.to_dict()
    before, after = column(rec, "grad_norm_before")[0], column(rec, "grad_norm_after")[0]
    close(after, torch.tensor(k, dtype=F64) * before)
    close(after, grad_norms(model))
    close(before, torch.stack([norm(g) for g in plain_grads(model, seed).values()]))


def test_ogm_ge_noise_is_observed_after_the_hook() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=1), fusion="head", monitor=mon)
    model.zero_grad(set_to_none=True)
    run_block(model, ctx)
    rec = mon.to_dict()
    k = column(rec, "coefficient")[0]
    close(k, ctx.coefficients)
    before, after = column(rec, "grad_norm_before")[0], column(rec, "grad_norm_after")[0]
    close(before, torch.stack([norm(g) for g in plain_grads(model).values()]), "before")
    close(after, grad_norms(model), "after = norm of the noisy .grad")
    assert ((after - k * before).abs() > 1e-3 * before).all(), "the noise is in 'after'"
    for key in ("true_class_probability_sum",):
        close(column(rec, f"score/{key}")[0], ctx.scores[key], key)


def test_ogm_ge_on_part_of_each_encoder_observes_the_rest_once_for_both() -> None:
    model = make()
    mon = gradmod.Monitor()
    method = gradmod.OGMGE(alpha=0.5, seed=1, params=lambda t: t.dim() == 2)
    ctx = ctx_for(model, method, fusion="head", monitor=mon)
    model.zero_grad(set_to_none=True)
    run_block(model, ctx)
    rec = mon.to_dict()
    close(
        column(rec, "grad_norm_before")[0],
        torch.stack([norm(g) for g in plain_grads(model).values()]),
        "before",
    )
    close(column(rec, "grad_norm_after")[0], grad_norms(model), "after = norm of .grad")


def test_feature_mode_derives_before_and_is_nan_where_k_is_zero() -> None:
    model = make()
    mon = gradmod.Monitor()
    k = [0.3, 0.0, 2.5]
    ctx = ctx_for(model, gradmod.Fixed(k), mode="feature", monitor=mon)
    run_block(model, ctx)
    rec = mon.to_dict()
    before, after = column(rec, "grad_norm_before")[0], column(rec, "grad_norm_after")[0]
    plain = torch.stack([norm(g) for g in plain_grads(model).values()])
    close(after, grad_norms(model), "after = norm of .grad")
    close(after, torch.tensor(k, dtype=F64) * plain, "after = k * plain")
    assert math.isnan(before[1]) and after[1] == 0
    close(before[[0, 2]], plain[[0, 2]], "before = after / k")


def test_update_level_records_unmodulated_norms_and_the_block_coefficients() -> None:
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), act="update", optimizer=opt, monitor=mon)
    run_block(model, ctx)
    rec = mon.to_dict()
    plain = torch.stack([norm(g) for g in plain_grads(model).values()])
    close(column(rec, "coefficient")[0], torch.tensor(K, dtype=F64))
    close(column(rec, "grad_norm_before")[0], plain)
    close(column(rec, "grad_norm_after")[0], plain)
    close(grad_norms(model), plain, "gradients are not modulated at the update level")
    opt.step()


def test_agm_after_is_observed_and_before_is_nan() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.AGM(alpha=1.0), monitor=mon)
    xs, y = on_device(*data())
    phi = gradmod.functional.shapley_responses(model.fuse, model.features(xs), module=model.head)
    loss = F.cross_entropy(sum(phi.values()), y)  # type: ignore[arg-type]
    with ctx(features=phi, targets=y):
        loss.backward()
    rec = mon.to_dict()
    close(column(rec, "grad_norm_after")[0], grad_norms(model))
    assert column(rec, "grad_norm_before").isnan().all()
    close(column(rec, "coefficient")[0], ctx.coefficients)
    for key in ("score", "running_score"):
        close(column(rec, f"score/{key}")[0], ctx.scores[key], key)


def test_mlb_scores_and_coefficients_equal_the_context_s_after_each_block() -> None:
    model = make()
    heads = {n: nn.Linear(FEAT, CLASSES).to(DEVICE, DTYPE) for n in NAMES}
    mon = gradmod.Monitor()
    ctx = gradmod.ModulationContext(
        model, heads, encoders={n: f"enc.{n}" for n in NAMES}, monitor=mon
    )
    expected = []
    for seed in (3, 4, 5):
        model.zero_grad(set_to_none=True)
        run_block(model, ctx, seed=seed)
        expected.append((ctx.coefficients, ctx.scores, grad_norms(model)))
    rec = mon.to_dict()
    assert rec["step"] == [0, 1, 2]
    for r, (k, scores, after) in enumerate(expected):
        close(column(rec, "coefficient")[r], k)
        close(column(rec, "grad_norm_after")[r], after)
        assert scores
        for key, value in scores.items():
            close(column(rec, f"score/{key}")[r], value, key)
    latest = mon.latest()
    close(torch.stack([latest[f"coefficient/{n}"] for n in NAMES]), expected[-1][0])


@pytest.mark.skipif(torch.bfloat16 == DTYPE, reason="GradScaler scales float16/32 losses")
def test_norms_are_unscaled_with_a_grad_scaler() -> None:
    model = make()
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10)
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), grad_scaler=scaler, monitor=mon)
    xs, y = on_device(*data())
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y)
    with ctx(features=feats, targets=y):
        scaler.scale(loss).backward()
    plain = torch.stack([norm(g) for g in plain_grads(model).values()])
    rec = mon.to_dict()
    close(column(rec, "grad_norm_before")[0], plain)
    close(column(rec, "grad_norm_after")[0], torch.tensor(K, dtype=plain.dtype) * plain)


def test_accumulation_gives_one_record_per_block_with_its_own_gradient() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    model.zero_grad(set_to_none=True)
    run_block(model, ctx, seed=3, boundary=False, weight=0.5)
    run_block(model, ctx, seed=4, boundary=True, weight=0.5)
    rec = mon.to_dict()
    assert rec["step"] == [0, 1] and rec["boundary"] == [False, True]
    for r, seed in enumerate((3, 4)):
        plain = torch.stack([norm(g) for g in plain_grads(model, seed).values()])
        close(column(rec, "grad_norm_before")[r], plain, f"block {r}")


def test_two_backwards_in_one_block_give_nan_not_a_wrong_norm() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    xs, y = on_device(*data())
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y)
    with ctx(features=feats, targets=y):
        loss.backward(retain_graph=True)
        loss.backward()
    assert column(mon.to_dict(), "grad_norm_after").isnan().all()


def test_a_block_that_raises_records_nothing_and_leaves_no_hook() -> None:
    model = make()
    mon = gradmod.Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    xs, y = on_device(*data())
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y)
    with pytest.raises(RuntimeError, match="boom"), ctx(features=feats, targets=y):
        loss.backward()
        raise RuntimeError("boom")
    assert len(mon) == 0 and mon.latest() == {}
    assert hook_count(list(model.parameters())) == 0
    # refused on entering: nothing registered either
    with pytest.raises(gradmod.StepError), ctx(features=feats, targets=None):
        pass
    assert len(mon) == 0 and hook_count(list(model.parameters())) == 0
    run_block(model, ctx)
    assert len(mon) == 1 and mon.to_dict()["step"] == [0]
    assert hook_count(list(model.parameters())) == 0


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_hooks_only_with_a_monitor_and_only_inside_the_block(mode: str) -> None:
    inside = {}
    for watched in (False, True):
        model = make()
        ctx = ctx_for(model, gradmod.Fixed(K), mode=mode, monitor=Monitor() if watched else None)
        enc = [p for n in NAMES for p in model.enc[n].parameters()]
        xs, y = on_device(*data())
        feats = model.features(xs)
        with ctx(features=feats, targets=y):
            inside[watched] = (hook_count(enc), monitor_keys(enc))
            if watched and mode == "parameter":  # the observer runs before the scaling hook
                order = [list(p._backward_hooks or {}) for p in enc]
                assert all(keys[0][0] == "gradmod.monitor" for keys in order)
                assert all(keys[1] == "gradmod.modulation" for keys in order)
            F.cross_entropy(model.fuse(feats), y).backward()
        assert hook_count(list(model.parameters())) == 0
    assert inside[False][1] == 0
    assert inside[True][1] == len(enc)  # one observer per encoder tensor
    assert inside[True][0] == inside[False][0] + len(enc)


def test_ogm_ge_observes_both_sides_of_its_transform() -> None:
    model = make()
    ctx = ctx_for(model, gradmod.OGMGE(alpha=0.5, seed=1), fusion="head", monitor=Monitor())
    enc = [p for n in NAMES for p in model.enc[n].parameters()]
    xs, y = on_device(*data())
    feats = model.features(xs)
    with ctx(features=feats, targets=y):
        keys = [list(p._backward_hooks or {}) for p in enc]
        F.cross_entropy(model.fuse(feats), y).backward()
    assert all(k[1] == "gradmod.modulation" and k[0] != k[2] for k in keys)
    assert monitor_keys(enc) == 0


class WeightsOnly(gradmod.Fixed):
    """Fixed coefficients on the encoders' weight matrices only (their biases unscaled)."""

    def targets(self, binding: gradmod.Binding) -> gradmod.Targets:
        return gradmod.Targets(
            {n: [p for p in ps if p.dim() == 2] for n, ps in binding.groups.items()}
        )


def test_parameter_mode_with_part_of_each_encoder_scaled() -> None:
    model = make()
    mon = Monitor()
    ctx = ctx_for(model, WeightsOnly(K), monitor=mon)
    model.zero_grad(set_to_none=True)
    run_block(model, ctx)
    rec = mon.to_dict()
    ref = plain_grads(model)
    close(column(rec, "grad_norm_before")[0], torch.stack([norm(ref[n]) for n in NAMES]))
    close(column(rec, "grad_norm_after")[0], grad_norms(model), "after = norm of .grad")
    weights = torch.stack([norm([g for g in ref[n] if g.dim() == 2]) for n in NAMES])
    biases = torch.stack([norm([g for g in ref[n] if g.dim() == 1]) for n in NAMES])
    expected = torch.hypot(torch.tensor(K, dtype=F64) * weights, biases)
    close(column(rec, "grad_norm_after")[0], expected)


def test_a_copied_context_records_into_its_copied_monitor() -> None:
    holder = nn.Module()
    holder.model = make()
    holder.ctx = ctx_for(holder.model, gradmod.Fixed(K), mode="feature", monitor=Monitor())  # type: ignore[assignment]
    run_block(holder.model, holder.ctx)  # type: ignore[arg-type]
    twin = copy.deepcopy(holder)
    twin.model.zero_grad(set_to_none=True)
    run_block(twin.model, twin.ctx, seed=4)  # type: ignore[arg-type]
    rec = twin.ctx.monitor.to_dict()  # type: ignore[union-attr]
    assert rec["step"] == [0, 1] and len(holder.ctx.monitor) == 1  # type: ignore[union-attr]
    close(column(rec, "grad_norm_after")[1], grad_norms(twin.model))  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_is_observed() -> None:
    model = make()
    mon = Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    xs, y = on_device(*data())
    feats = model.features(xs)
    loss = F.cross_entropy(model.fuse(feats), y)
    with ctx(features=feats, targets=y):
        loss.backward(create_graph=True)
    close(column(mon.to_dict(), "grad_norm_after")[0], grad_norms(model))
    model.zero_grad(set_to_none=True)  # break the parameter <-> gradient cycle


def test_a_monitor_must_be_a_monitor() -> None:
    with pytest.raises(gradmod.ConfigurationError, match=r"monitor must be a gradmod\.Monitor"):
        ctx_for(make(), gradmod.Fixed(K), monitor={})


# ========================================================================== storage, export
def records(mon: Monitor, n: int, *, scores: Mapping[str, Tensor] | None = None) -> None:
    for _ in range(n):
        i = float(mon._next)
        k = torch.tensor([i, i + 0.5], dtype=F64)
        mon._record(("x", "y"), bool(int(i) % 2), k, scores or {}, k * 2, k * 3)


def test_many_records_and_changing_layouts_keep_every_value_in_order() -> None:
    mon = Monitor()
    records(mon, 300)  # more than a stacked chunk
    records(mon, 5, scores={"s": torch.tensor([7.0, 8.0]), "t": torch.tensor(9.0)})
    records(mon, 2)
    table = mon.to_dict()
    assert len(mon) == 307 and table["step"] == list(range(307))
    assert table["coefficient/x"] == [float(i) for i in range(307)]
    assert table["grad_norm_after/y"] == [3 * (i + 0.5) for i in range(307)]
    assert table["boundary"] == [bool(i % 2) for i in range(307)]
    s = table["score/s/y"]
    assert all(math.isnan(v) for v in s[:300] + s[305:]) and s[300:305] == [8.0] * 5
    assert table["score/t"][300:305] == [9.0] * 5
    assert list(table)[:4] == ["step", "boundary", "coefficient/x", "coefficient/y"]


def test_latest_and_clear() -> None:
    mon = Monitor()
    assert mon.latest() == {}
    records(mon, 3)
    latest = mon.latest()
    assert set(latest) == {
        f"{c}/{n}" for c in ("coefficient", "grad_norm_before", "grad_norm_after") for n in "xy"
    }
    assert all(isinstance(v, Tensor) and v.dim() == 0 for v in latest.values())
    assert float(latest["grad_norm_before/y"]) == 2 * 2.5
    mon.clear()
    assert len(mon) == 0 and mon.latest() == {} and mon.to_dict()["step"] == []
    records(mon, 1)
    assert mon.to_dict()["step"] == [3]  # steps go on counting


def test_state_dict_round_trip() -> None:
    mon = Monitor()
    records(mon, 4)
    records(mon, 2, scores={"s": torch.tensor([1.0, 2.0])})
    state = mon.state_dict()
    again = Monitor()
    again.load_state_dict(state)
    a, b = mon.to_dict(), again.to_dict()
    assert list(a) == list(b)
    for col in a:
        assert [str(v) for v in a[col]] == [str(v) for v in b[col]], col  # NaN == NaN here
    records(again, 1)
    assert again.to_dict()["step"][-1] == 6
    with pytest.raises(ValueError):
        again.load_state_dict({**state, "step": torch.arange(3)})


def test_to_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    mon = Monitor()
    records(mon, 3)
    df = mon.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df) == 3
    assert list(df["coefficient/y"]) == [0.5, 1.5, 2.5]
    assert list(df.columns) == list(mon.to_dict())


def test_missing_pandas_or_matplotlib_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    mon = Monitor()
    records(mon, 1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        mon.to_dataframe()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    from gradmod.plot import plot_traces

    with pytest.raises(ImportError, match=r"gradmod\[plot\]"):
        plot_traces(mon)


class FakeWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.calls.append((tag, value, step))


def test_to_tensorboard_writes_each_record_once() -> None:
    mon = Monitor()
    records(mon, 2)
    writer = FakeWriter()
    assert mon.to_tensorboard(writer) == 2
    assert ("gradmod/coefficient/x", 1.0, 1) in writer.calls
    assert ("gradmod/grad_norm_after/y", 1.5, 0) in writer.calls
    assert len(writer.calls) == 2 * 6
    writer.calls.clear()
    assert mon.to_tensorboard(writer) == 0 and writer.calls == []
    records(mon, 1, scores={"s": torch.tensor([float("nan"), 4.0])})
    assert mon.to_tensorboard(writer, prefix="", global_step=100) == 1
    assert {step for _, _, step in writer.calls} == {100}
    tags = {tag for tag, _, _ in writer.calls}
    assert "score/s/y" in tags and "score/s/x" not in tags  # NaN left out
    assert "coefficient/x" in tags


def test_to_tensorboard_with_a_summary_writer(tmp_path: object) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model = make()
    mon = Monitor()
    ctx = ctx_for(model, gradmod.Fixed(K), monitor=mon)
    for seed in (3, 4):
        run_block(model, ctx, seed=seed)
    writer = SummaryWriter(log_dir=str(tmp_path))
    try:
        assert mon.to_tensorboard(writer) == 2
    finally:
        writer.close()
    events = list(tmp_path.glob("events.out.tfevents.*"))  # type: ignore[attr-defined]
    assert len(events) == 1 and events[0].stat().st_size > 200


# ================================================================================== plot
def test_plot_writes_a_png(tmp_path: object) -> None:
    pytest.importorskip("matplotlib")
    from gradmod.plot import plot_traces

    model = make()
    heads = {n: nn.Linear(FEAT, CLASSES).to(DEVICE, DTYPE) for n in NAMES}
    mon = Monitor()
    ctx = gradmod.ModulationContext(
        model, heads, encoders={n: f"enc.{n}" for n in NAMES}, monitor=mon
    )
    for seed in range(6):
        run_block(model, ctx, seed=seed)
    path = tmp_path / "traces.png"  # type: ignore[operator]
    fig = plot_traces(mon, path, title="MLB")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert len(fig.axes) == 3  # coefficients, gradient norms, scores
    lines = fig.axes[0].get_lines()
    assert [list(ln.get_ydata()) for ln in lines[1:]] == [
        mon.to_dict()[f"coefficient/{n}"] for n in NAMES
    ]
    with pytest.raises(ValueError, match="no record"):
        plot_traces(Monitor())
    with pytest.raises(ValueError, match="3 axes"):
        plot_traces(mon, axes=fig.axes[:2])
