"""gradmod.integrations.accelerate with the real ``accelerate.Accelerator`` (CPU).

Every run is compared parameter by parameter (the model's and the heads' parameters after the
last optimizer step, and the coefficients of every block) with a hand-written plain gradmod loop
on the same data and initialisation: ``with ctx(features, y, boundary=..., weight=1/n):
(loss / n).backward()``, the optimizer stepping at each window's last micro-batch. Under
``mixed_precision="bf16"`` the plain loop runs the same forward under
``torch.autocast("cpu", torch.bfloat16)`` and hands gradmod the bf16 features directly.
"""

from __future__ import annotations

import ast
import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gradmod

accelerate = pytest.importorskip("accelerate")
from _models import hook_count  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

from gradmod.integrations.accelerate import Modulator  # noqa: E402

NAMES = ("audio", "video")
MICRO = 4  # micro-batches per run
BATCH = 16
CLASSES = 3
TOL = 1e-6  # fp32: the same float operations in the same order on both sides
DDP_TOL = 1e-6  # 2 processes: the same sums in another order (measured 3e-8)


class Net(nn.Module):
    """Two encoders and a linear fusion head; the forward returns (logits, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.video = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(16, CLASSES)

    def forward(self, xa: Tensor, xv: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {"audio": self.audio(xa), "video": self.video(xv)}
        return self.head(torch.cat([feats["audio"], feats["video"]], 1)), feats


def batches(n: int = MICRO, size: int = BATCH, seed: int = 3) -> list[tuple[Tensor, ...]]:
    """Audio carries the label clearly, video faintly (so the coefficients differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, CLASSES, (size,), generator=g)
        hot = F.one_hot(y, CLASSES).float()
        xa = torch.randn(size, 6, generator=g) + F.pad(2.0 * hot, (0, 3))
        xv = torch.randn(size, 5, generator=g) + F.pad(0.5 * hot, (0, 2))
        out.append((xa, xv, y))
    return out


class Setup:
    """A model, the method's heads and optimizer, and the context, from one seed."""

    def __init__(self, method: str) -> None:
        torch.manual_seed(0)
        self.model = Net()
        self.heads: dict[str, nn.Module] = {}
        kwargs: dict[str, Any] = {}
        if method in ("mlb", "balanced", "balanced@update"):
            self.heads = {n: nn.Linear(8, CLASSES) for n in NAMES}
            m: gradmod.Method = gradmod.MLB() if method == "mlb" else gradmod.balanced()
        elif method == "cggm":
            self.heads = {
                n: nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, CLASSES)) for n in NAMES
            }
            m, kwargs = gradmod.CGGM(rho=1.3), {"fusion": "head"}
        elif method == "ogm":
            m = gradmod.OGMGE(alpha=0.8, seed=5)
            kwargs = {"fusion": "head", "encoders": {n: n for n in NAMES}}
        else:  # pragma: no cover
            raise ValueError(method)
        params = [
            *self.model.parameters(),
            *(p for h in self.heads.values() for p in h.parameters()),
        ]
        if method == "balanced@update":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=1e-2)
            kwargs["optimizer"] = self.opt
        else:
            self.opt = torch.optim.SGD(params, lr=0.5)
        self.ctx = gradmod.ModulationContext(self.model, self.heads or None, method=m, **kwargs)

    def result(self, coefficients: list[Tensor]) -> dict[str, Tensor]:
        out = {f"model.{k}": v.detach().clone() for k, v in self.model.named_parameters()}
        for n, h in self.heads.items():
            out.update({f"heads.{n}.{k}": v.detach().clone() for k, v in h.named_parameters()})
        out["coefficients"] = torch.stack(coefficients)
        return out


def plain_loop(
    method: str, *, accumulation: int = 1, bf16: bool = False, micro: int = MICRO
) -> dict[str, Tensor]:
    """The reference: gradmod in a hand-written loop, without Accelerate (the last micro-batch
    closes a window, and every loss is divided by ``accumulation``, as Accelerate does)."""
    s = Setup(method)
    coefficients = []
    for i, (xa, xv, y) in enumerate(batches(micro)):
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits, feats = s.model(xa, xv)
        loss = F.cross_entropy(logits.float(), y) / accumulation
        boundary = (i + 1) % accumulation == 0 or i == micro - 1
        with s.ctx(features=feats, targets=y, boundary=boundary, weight=1 / accumulation):
            loss.backward()
        coefficients.append(s.ctx.coefficients)
        if boundary:
            s.opt.step()
            s.opt.zero_grad()
    return s.result(coefficients)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    """Accelerate keeps its state in process-wide singletons: each test starts afresh."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def accelerate_loop(
    method: str,
    *,
    accumulation: int = 1,
    mixed_precision: str = "no",
    micro: int = MICRO,
    loader: bool = False,
) -> dict[str, Tensor]:
    """The documented usage: context before prepare(), Modulator.backward inside accumulate()
    (``loader=True``: the batches come from a prepared DataLoader, whose end closes a window)."""
    s = Setup(method)
    accelerator = accelerate.Accelerator(
        cpu=True, gradient_accumulation_steps=accumulation, mixed_precision=mixed_precision
    )
    model, opt = accelerator.prepare(s.model, s.opt)
    modulator = Modulator(accelerator, s.ctx)
    data: Any = batches(micro)
    if loader:
        dataset = TensorDataset(*(torch.cat(parts) for parts in zip(*data, strict=True)))
        data = accelerator.prepare(DataLoader(dataset, batch_size=BATCH))
    coefficients = []
    for xa, xv, y in data:
        with accelerator.accumulate(model):
            logits, feats = model(xa, xv)
            modulator.backward(F.cross_entropy(logits, y), features=feats, targets=y)
            coefficients.append(modulator.ctx.coefficients)
            opt.step()
            opt.zero_grad()
    return s.result(coefficients)


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor], tol: float) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=0, atol=tol, msg=k)


METHODS = ["mlb", "balanced", "balanced@update", "cggm", "ogm"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("accumulation", [1, 2], ids=["plain", "accumulation2"])
def test_accelerate_matches_the_plain_loop(method: str, accumulation: int) -> None:
    got = accelerate_loop(method, accumulation=accumulation)
    want = plain_loop(method, accumulation=accumulation)
    assert_same(got, want, TOL)
    k = want["coefficients"]
    assert not torch.allclose(k, torch.ones_like(k)), "the method modulated nothing"


@pytest.mark.parametrize("method", ["mlb", "balanced@update", "ogm"])
def test_the_end_of_a_prepared_data_loader_closes_a_window(method: str) -> None:
    """3 batches from a prepared DataLoader, accumulation over 2: the third closes a window of
    one (``accelerator.sync_gradients``), its loss still divided by 2 by Accelerate."""
    got = accelerate_loop(method, accumulation=2, micro=3, loader=True)
    assert_same(got, plain_loop(method, accumulation=2, micro=3), TOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("accumulation", [1, 2], ids=["plain", "accumulation2"])
def test_accelerate_bf16_matches_the_plain_autocast_loop(method: str, accumulation: int) -> None:
    """``mixed_precision="bf16"``: the prepared model returns fp32 copies of its bf16 outputs,
    and the loss reaches the encoders through the bf16 tensors, not the copies. The plain loop
    runs the same forward under ``torch.autocast`` and hands gradmod the bf16 features. Both
    sides run the same bf16 kernels in the same order and the method's extra gradient lands on
    the same bf16 tensor, so they agree bit for bit (TOL is the fp32 one; measured: 0)."""
    got = accelerate_loop(method, accumulation=accumulation, mixed_precision="bf16")
    want = plain_loop(method, accumulation=accumulation, bf16=True)
    assert_same(got, want, TOL)
    # autocast did run: the result is not the fp32 one (measured ~3e-4 to 8e-4 apart)
    assert max_diff(got, plain_loop(method, accumulation=accumulation)) > 1e-5


def scaler_run(method: str, *, with_accelerate: bool) -> dict[str, Tensor]:
    """A ``GradScaler`` on the accelerator: what ``mixed_precision="fp16"`` sets up on a GPU,
    here a CPU scaler on fp32 losses (fp16 needs a GPU in accelerate). Accelerate scales the
    loss in ``accelerator.backward`` and steps through the scaler in ``optimizer.step()``; the
    plain loop does both by hand with the scaler given to the context."""
    s = Setup(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    coefficients = []
    if with_accelerate:
        accelerator = accelerate.Accelerator(cpu=True)
        accelerator.scaler = scaler  # before prepare(): the prepared optimizer steps with it
        model, opt = accelerator.prepare(s.model, s.opt)
        modulator = Modulator(accelerator, s.ctx)
        assert s.ctx.grad_scaler is scaler
        for xa, xv, y in batches():
            logits, feats = model(xa, xv)
            modulator.backward(F.cross_entropy(logits, y), features=feats, targets=y)
            coefficients.append(s.ctx.coefficients)
            opt.step()
            opt.zero_grad()
    else:
        s.ctx.grad_scaler = scaler
        for xa, xv, y in batches():
            logits, feats = s.model(xa, xv)
            with s.ctx(features=feats, targets=y):
                scaler.scale(F.cross_entropy(logits, y)).backward()
            coefficients.append(s.ctx.coefficients)
            scaler.step(s.opt)
            scaler.update()
            s.opt.zero_grad()
    return s.result(coefficients)


@pytest.mark.parametrize("method", ["mlb", "balanced@update"])
def test_the_accelerators_grad_scaler_is_handed_to_the_context(method: str) -> None:
    got = scaler_run(method, with_accelerate=True)
    want = scaler_run(method, with_accelerate=False)
    assert_same(got, want, TOL)


# ------------------------------------------------------------------------------ misuse
def test_a_backward_that_raises_leaves_no_hook_and_no_state() -> None:
    """The block is left with the exception: hooks removed, no head gradient, the method's
    state unchanged; the run then continues exactly as the plain loop."""
    s = Setup("mlb")
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(s.model, s.opt)
    modulator = Modulator(accelerator, s.ctx)
    xa, xv, y = batches()[0]
    logits, feats = model(xa, xv)
    with pytest.raises(RuntimeError, match="does not require grad"):
        modulator.backward(F.cross_entropy(logits, y).detach(), features=feats, targets=y)
    assert hook_count([*s.model.parameters()]) == 0
    assert all(p.grad is None for p in [*s.model.parameters(), *s.ctx.classifier_parameters()])
    assert int(s.ctx.method.steps) == 0
    coefficients = []
    for xa, xv, y in batches():
        logits, feats = model(xa, xv)
        modulator.backward(F.cross_entropy(logits, y), features=feats, targets=y)
        coefficients.append(s.ctx.coefficients)
        opt.step()
        opt.zero_grad()
    assert_same(s.result(coefficients), plain_loop("mlb"), TOL)


def test_a_context_scaler_the_accelerator_does_not_use_is_refused() -> None:
    s = Setup("mlb")
    s.ctx.grad_scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(gradmod.ConfigurationError, match="not the accelerator's"):
        Modulator(accelerate.Accelerator(cpu=True), s.ctx)


def test_the_prepared_optimizer_is_refused_by_the_update_level() -> None:
    s = Setup("mlb")
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(s.model, s.opt)
    with pytest.raises(gradmod.ConfigurationError, match=r"wrapper.*prepared\.optimizer"):
        gradmod.ModulationContext(model, s.heads, optimizer=opt)
    gradmod.ModulationContext(model, s.heads, optimizer=opt.optimizer).close()  # the fix


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA"])
def test_distributed_types_without_ddp_semantics_are_refused(kind: str) -> None:
    accelerator = types.SimpleNamespace(
        distributed_type=DistributedType[kind], scaler=None, num_processes=1
    )
    with pytest.raises(gradmod.ConfigurationError, match=kind):
        Modulator(accelerator, Setup("mlb").ctx)


# ---------------------------------------------------------------------------- 2 processes
WORLD = 2
DDP_RUNS = (("mlb", 1), ("balanced@update", 2))


def _ddp_worker(out_dir: str) -> None:
    """One of the 2 processes of ``accelerate.debug_launcher`` (forked, gloo on CPU)."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for method, accumulation in DDP_RUNS:
        AcceleratorState._reset_state()
        GradientState._reset_state()
        s = Setup(method)
        accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        assert accelerator.num_processes == WORLD
        rows = slice(
            accelerator.process_index * BATCH // WORLD,
            (accelerator.process_index + 1) * BATCH // WORLD,
        )
        model, opt = accelerator.prepare(s.model, s.opt)
        assert isinstance(model, nn.parallel.DistributedDataParallel)
        modulator = Modulator(accelerator, s.ctx)
        coefficients = []
        for xa, xv, y in batches():
            with accelerator.accumulate(model):
                logits, feats = model(xa[rows], xv[rows])
                modulator.backward(
                    F.cross_entropy(logits, y[rows]), features=feats, targets=y[rows]
                )
                coefficients.append(modulator.ctx.coefficients)
                opt.step()
                opt.zero_grad()
        out[f"{method}/{accumulation}"] = s.result(coefficients)
    out["refused"] = _refusals_under_ddp()
    torch.save(out, Path(out_dir) / f"rank{accelerator.process_index}.pt")


class _WithHeads(Net):
    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({n: nn.Linear(8, CLASSES) for n in NAMES})


def _refusals_under_ddp() -> list[str]:
    """Heads inside the prepared model, and heads prepared themselves, on 2 processes."""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    problems = []
    model = _WithHeads()
    ctx = gradmod.ModulationContext(model, dict(model.heads))
    accelerator.prepare(model)
    with pytest.raises(gradmod.ConfigurationError) as inside:
        Modulator(accelerator, ctx)
    problems += inside.value.problems
    net = Net()
    heads = {n: accelerator.prepare(nn.Linear(8, CLASSES)) for n in NAMES}
    with pytest.raises(gradmod.ConfigurationError) as wrapped:
        Modulator(accelerator, gradmod.ModulationContext(net, heads))
    problems += wrapped.value.problems
    return problems


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("accelerate_ddp")
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # else accelerate warns (an error under pytest)
        accelerate.debug_launcher(_ddp_worker, args=(str(out),), num_processes=WORLD)
    yield [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "accumulation"), DDP_RUNS)
def test_two_processes_match_the_single_process_full_batch(
    ranks: list[dict[str, Any]], method: str, accumulation: int
) -> None:
    """2 gloo processes (accelerate's MULTI_CPU, DDP), each on half of every batch, against the
    plain loop on the full batches in this process: global coefficients, DDP-averaged encoder
    gradients and gradmod-averaged head gradients give the full-batch run."""
    key = f"{method}/{accumulation}"
    a, b = ranks[0][key], ranks[1][key]
    for k in a:  # the ranks agree bit for bit
        assert torch.equal(a[k], b[k]), k
    want = plain_loop(method, accumulation=accumulation)
    assert_same(a, want, DDP_TOL)


@pytest.mark.slow
def test_heads_inside_the_prepared_model_are_refused_on_two_processes(
    ranks: list[dict[str, Any]],
) -> None:
    for r in ranks:
        assert len(r["refused"]) == 2
        assert "inside the model that accelerator.prepare wraps" in r["refused"][0]
        assert "were prepared by the accelerator" in r["refused"][1]


def test_import_gradmod_does_not_import_accelerate() -> None:
    """Only gradmod.integrations.accelerate imports accelerate (read off the sources)."""
    root = Path(gradmod.__file__).parent
    for path in root.rglob("*.py"):
        if path == root / "integrations" / "accelerate.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] == "accelerate" for n in names), path
