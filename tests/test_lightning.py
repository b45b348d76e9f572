"""The Lightning integration, driven through a real ``lightning.Trainer`` on the CPU, against the
hand-written plain-loop gradmod run (tests/_lightning_common.py) on the same data and
initialisation, parameter by parameter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from _lightning_common import (
    METHODS,
    Net,
    Setting,
    callback,
    dataset,
    loader,
    max_diff,
    plain_run,
    trainer,
)

import gradmod
from gradmod.integrations.lightning import Modulation

TOL = 1e-6


# Lightning's advice (workers, small datasets, log interval) and its use of torch APIs that
# this torch deprecates: not gradmod's warnings.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*number of training batches:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*log_every_n_steps:UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


SETTINGS = {
    "plain": Setting(),
    "bf16-mixed": Setting(precision="bf16"),
    "fp16-gradscaler": Setting(precision="fp16"),
    "accumulate-2": Setting(accumulate=2),
    "clip": Setting(clip=0.05),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_trainer_equals_the_plain_loop(method: str, setting: str) -> None:
    s = SETTINGS[setting]
    net = Net(method)
    ref = plain_run(method, s, model=Net(method))
    cb = callback(method)
    trainer(cb, s).fit(net, loader(dataset()))
    assert cb.ctx is not None and int(cb.ctx.method.steps) > 0
    diff = max_diff(net, ref)
    assert diff <= TOL, f"{method}/{setting}: max parameter difference {diff:.3g}"
    assert diff < max_diff(net, Net(method)), "training moved nothing"


class _Unsized(torch.utils.data.IterableDataset[tuple[torch.Tensor, ...]]):
    """The same samples, in the same order, without a length (a streamed dataset)."""

    def __init__(self, ds: torch.utils.data.TensorDataset) -> None:
        self.ds = ds

    def __iter__(self):  # type: ignore[no-untyped-def]
        return (self.ds[i] for i in range(len(self.ds)))


@pytest.mark.parametrize("method", METHODS)
def test_an_unsized_loader_closes_the_epochs_last_window(method: str) -> None:
    """An IterableDataset (num_training_batches is inf) with accumulate_grad_batches=2 over 5
    batches: Lightning steps after the last, short window, and gradmod is told it is a boundary
    (OGM-GE's noise is added there), as with the sized loader of the plain loop."""
    s = Setting(accumulate=2)
    net = Net(method)
    ref = plain_run(method, s, model=Net(method))
    cb = callback(method)
    unsized = torch.utils.data.DataLoader(_Unsized(dataset()), batch_size=8)
    trainer(cb, s).fit(net, unsized)
    diff = max_diff(net, ref)
    assert diff <= TOL, f"{method}: max parameter difference {diff:.3g}"


def test_accumulation_without_the_callback_weight_would_differ() -> None:
    """The accumulation comparison can fail: a plain loop that forgets weight=1/n (1.0, which
    gradmod would refuse unless given explicitly) ends elsewhere."""
    s = Setting(accumulate=2)
    net = Net("balanced")
    trainer(callback("balanced"), s).fit(net, loader(dataset()))
    wrong = Net("balanced")
    ctx = gradmod.ModulationContext(
        wrong,
        dict(wrong.heads.items()),
        encoders={"a": "enc.a", "b": "enc.b"},
        optimizer=(opt := torch.optim.Adam(wrong.parameters(), lr=1e-2)),
    )
    for _ in range(2):
        for i, (xa, xb, y) in enumerate(loader(dataset())):
            feats = wrong.features(xa, xb)
            loss = torch.nn.functional.cross_entropy(wrong.fuse(feats), y) / 2
            boundary = i % 2 == 1 or i == 4
            with ctx(feats, y, boundary=boundary, weight=1.0):
                loss.backward()
            if boundary:
                opt.step()
                opt.zero_grad()
    assert max_diff(net, wrong) > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(method: str, tmp_path: Path) -> None:
    first = Net(method)
    t1 = trainer(callback(method), epochs=1)
    t1.fit(first, loader(dataset()))
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["gradmod.Modulation"]["context"]
    assert int(saved["steps"]) == 5  # the method's state after one epoch of 5 batches
    resumed = Net(method, seed=123)  # other weights: the checkpoint must restore everything
    cb = callback(method)
    trainer(cb, epochs=2).fit(resumed, loader(dataset()), ckpt_path=ckpt)
    ref = plain_run(method, Setting(), epochs=2, model=Net(method))
    diff = max_diff(resumed, ref)
    assert diff <= TOL, f"{method}: resumed run differs by {diff:.3g}"


def test_resume_without_the_method_state_would_differ(tmp_path: Path) -> None:
    """CGGM's state (the previous metric) matters: a resume that drops it ends elsewhere."""
    t1 = trainer(callback("cggm"), epochs=1)
    t1.fit(net := Net("cggm"), loader(dataset()))
    ckpt = tmp_path / "e1.ckpt"
    t1.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)
    state["callbacks"] = {}
    torch.save(state, ckpt)
    resumed = Net("cggm", seed=5)
    trainer(callback("cggm"), epochs=2).fit(resumed, loader(dataset()), ckpt_path=ckpt)
    ref = plain_run("cggm", Setting(), epochs=2, model=Net("cggm"))
    assert max_diff(resumed, ref) > 1e-5
    del net


def _logging_trainer(tmp_path: Path, cb: Modulation) -> pl.Trainer:
    """One epoch, every step logged to a CSV file under ``tmp_path``, with the callback."""
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )


def test_coefficients_and_scores_are_logged(tmp_path: Path) -> None:
    cb = callback("balanced", log=True)
    cb.monitor = gradmod.Monitor()
    net = Net("balanced")
    t = _logging_trainer(tmp_path, cb)
    t.fit(net, loader(dataset()))
    assert cb.ctx is not None
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    for name in ("a", "b"):
        assert f"gradmod/coefficient/{name}" in header
        assert f"gradmod/true_class_probability/{name}" in header
    last = dict(zip(header, metrics[-1].split(","), strict=True))
    k = cb.ctx.coefficients
    assert float(last["gradmod/coefficient/a"]) == pytest.approx(float(k[0]), rel=1e-6)
    assert float(last["gradmod/coefficient/b"]) == pytest.approx(float(k[1]), rel=1e-6)
    # with a monitor, its gradient norms too: the last logged row is the monitor's last record
    record = cb.monitor.to_dict()
    for name in ("a", "b"):
        for col in (f"grad_norm_before/{name}", f"grad_norm_after/{name}"):
            assert float(last[f"gradmod/{col}"]) == pytest.approx(record[col][-1], rel=1e-6)


class _OddScores(gradmod.Method):
    """Coefficients 1, and scores that are not one per modality: a single number, and five."""

    def plan(self, binding: gradmod.Binding, step: gradmod.Step) -> gradmod.StepPlan:
        k = torch.ones(len(binding.names), dtype=torch.float64, device=binding.device)
        total = torch.stack([f.detach().double().norm() for f in step.features.values()]).sum()
        five = torch.arange(5, dtype=torch.float64) + total
        return gradmod.StepPlan(k, scores={"total": total, "five": five})


def test_scores_that_are_not_one_per_modality_are_logged_as_the_monitor_lays_them_out(
    tmp_path: Path,
) -> None:
    """A 0-d score is logged under its key, one of another length by index (was an IndexError
    that ended fit, or values under the wrong modality names)."""
    cb = Modulation(
        None,
        method=_OddScores(),
        encoders={n: f"enc.{n}" for n in ("a", "b")},
        log=True,
        act="gradient",
    )
    t = _logging_trainer(tmp_path, cb)
    t.fit(Net("ogm-ge"), loader(dataset()))
    assert cb.ctx is not None
    metrics = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()
    header = metrics[0].split(",")
    assert "gradmod/total" in header
    assert [f"gradmod/five/{i}" in header for i in range(5)] == [True] * 5
    assert not any(h.startswith("gradmod/total/") or h == "gradmod/five/a" for h in header)
    last = dict(zip(header, metrics[-1].split(","), strict=True))
    scores = cb.ctx.scores
    assert float(last["gradmod/total"]) == pytest.approx(float(scores["total"]), rel=1e-6)
    assert float(last["gradmod/five/4"]) == pytest.approx(float(scores["five"][4]), rel=1e-6)


def test_an_exception_in_backward_leaves_no_hook_and_no_state(tmp_path: Path) -> None:
    class Boom(Net):
        def on_after_backward(self) -> None:
            pass

        def backward(self, loss: torch.Tensor, *args: object, **kwargs: object) -> None:
            if self.global_step == 1:
                raise RuntimeError("boom")
            super().backward(loss, *args, **kwargs)

    net = Boom("cggm")
    cb = callback("cggm")
    with pytest.raises(RuntimeError, match="boom"):
        trainer(cb).fit(net, loader(dataset()))
    assert cb.ctx is not None and int(cb.ctx.method.steps) == 1
    assert all(not (p._backward_hooks or {}) for p in net.parameters())


def test_missing_step_inputs_is_a_clear_error() -> None:
    class Forgets(Net):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            xa, xb, y = batch
            return torch.nn.functional.cross_entropy(self.fuse(self.features(xa, xb)), y)

    with pytest.raises(gradmod.StepError, match="step_inputs"):
        trainer(callback("balanced")).fit(Forgets("balanced"), loader(dataset()))


@pytest.mark.slow
def test_ddp_strategy_two_processes_equals_the_plain_loop(tmp_path: Path) -> None:
    """``strategy="ddp"`` on 2 CPU processes (heads inside the LightningModule), each method
    against a plain-loop gradmod run under torch DDP in the same processes, and the ranks
    bit-identical."""
    script = Path(__file__).with_name("lightning_ddp_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for method in METHODS:
        for r in ranks:
            assert r[method]["diff"] <= TOL, (method, r[method])
            assert r[method]["moved"] > 1e-3, (method, r[method])
        assert ranks[0][method]["digest"] == ranks[1][method]["digest"], method
