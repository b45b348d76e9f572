"""One training run, its measurements, and one (setting, optimizer, seed) job of runs.

Protocol, identical for every method of a job (so every comparison is paired):

* the seed's split and the seed's initialisation (:func:`~.models.build_parts`, then
  ``copy.deepcopy`` per run), the same mini-batch order (a ``torch.Generator`` seeded with the
  seed), and the global RNG re-seeded before each run (for methods that draw noise);
* the optimizer of the job (:data:`OPTIMIZERS`) over the trained network's parameters; the
  parameters a method's context adds (CGGM's classifiers) join it at ``classifier_lr_ratio``
  times the learning rate (official CGGM: 5e-4 vs 1e-3);
* ``clip_grad_norm_(clip)`` on the trained network's gradients (encoders, fused head, and the
  unimodal heads when trained), after the backward (so after modulation) and before the step,
  for EVERY method: CGGM needs it, the others get the same treatment for fairness; CGGM's
  classifiers are not clipped (as in the official code);
* model selection: the epoch of best validation accuracy (first best) of the run's predictor
  (fused head; an ``alone`` model's own head), whose weights are then tested.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gradmod
from gradmod.datasets import standardize

from .data import SETTINGS, Split, load_split
from .methods import VARIANTS, Variant
from .models import AloneNet, FusedNet, Parts, build_parts
from .stats import coefficient_stats

__all__ = [
    "OPTIMIZERS",
    "Job",
    "JobResult",
    "OptimizerSpec",
    "TrainConfig",
    "accuracy",
    "linear_probe",
    "run_job",
]

Net = AloneNet | FusedNet


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    lr: float
    momentum: float = 0.0

    def build(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.name == "adam":
            return torch.optim.Adam(groups, lr=self.lr)
        return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)


#: The two optimizers, each with one learning rate chosen once (see the benchmark docstring).
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec("adam", lr=1e-3),
    "sgd": OptimizerSpec("sgd", lr=0.02, momentum=0.9),
}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    hidden: int = 64
    feature: int = 32
    clip: float = 0.8  # clip_grad_norm_ of the trained network, every method (official CGGM)
    classifier_lr_ratio: float = 0.5  # CGGM classifiers' lr / model lr (official 5e-4 / 1e-3)
    probe_steps: int = 150
    trace_every: int = 5  # steps between two diagnostics of the traced seed


@dataclass(frozen=True)
class Job:
    setting: str
    optimizer: str
    seed: int
    variants: tuple[str, ...]
    config: TrainConfig
    trace: bool = False


@dataclass
class JobResult:
    records: list[dict[str, Any]]
    traces: list[dict[str, Any]] = field(default_factory=list)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Fraction of rows whose argmax is the label (exact: a count divided by n)."""
    return int((logits.argmax(1) == y).sum()) / y.numel()


def linear_probe(
    h_train: Tensor, y_train: Tensor, h_test: Tensor, y_test: Tensor, classes: int, steps: int
) -> float:
    """Logistic regression on frozen features (fitted on train, full batch Adam): test accuracy."""
    tr, te = standardize(h_train, h_test)
    w = torch.zeros(tr.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(tr @ w + b, y_train) + 1e-4 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return accuracy(te @ w + b, y_test)


def _flat_cos(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    x = torch.cat([t.reshape(-1) for t in a])
    y = torch.cat([t.reshape(-1) for t in b])
    den = float(x.norm() * y.norm())
    return float(x @ y) / den if den > 0 else math.nan


class Tracer:
    """Cheap diagnostics every few steps of one seed (what the CGGM paper plots)."""

    def __init__(self, net: Net, split: Split, every: int) -> None:
        self.net, self.split, self.every = net, split, every
        self.steps: list[int] = []
        self.acc: dict[str, list[float]] = {m: [] for m in net.names}
        self.grad_norm: dict[str, list[float]] = {m: [] for m in net.names}
        self.cos: dict[str, list[float]] = {m: [] for m in net.names}
        self.seconds = 0.0  # time spent in diagnostics (not counted as training time)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def before_step(self, step: int, xb: dict[str, Tensor], yb: Tensor) -> None:
        """Validation accuracy per modality and cos(fused-loss, unimodal-loss) encoder grads."""
        start = time.perf_counter()
        self.steps.append(step)
        self._val_accuracy()
        self._cosines(xb, yb)
        self.seconds += time.perf_counter() - start

    def _val_accuracy(self) -> None:
        """Each modality's share of the fused head (an ``alone`` model: its own head)."""
        net = self.net
        with torch.no_grad():
            feats = net.features(self.split.x["val"])
            shares = net.shares(feats) or {m: net.predict(feats) for m in net.names}
        for m in net.names:
            self.acc[m].append(accuracy(shares[m], self.split.y["val"]))

    def _cosines(self, xb: dict[str, Tensor], yb: Tensor) -> None:
        """cos between encoder m's gradients of the fused loss and of m's share loss."""
        net = self.net
        feats = net.features(xb)
        shares = net.shares(feats)
        if shares is None:
            for m in net.names:
                self.cos[m].append(math.nan)
            return
        fused = F.cross_entropy(net.predict(feats), yb)
        for m in net.names:
            params = list(net.encoder(m).parameters())
            g_fused = torch.autograd.grad(fused, params, retain_graph=True)
            g_uni = torch.autograd.grad(F.cross_entropy(shares[m], yb), params, retain_graph=True)
            self.cos[m].append(_flat_cos(g_fused, g_uni))

    def after_backward(self) -> None:
        """Norm of each encoder's applied gradient (after modulation, before clipping)."""
        for m in self.net.names:
            grads = [p.grad for p in self.net.encoder(m).parameters() if p.grad is not None]
            norm = float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0
            self.grad_norm[m].append(norm)

    def as_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "val_acc": self.acc,
            "grad_norm": self.grad_norm,
            "cos_fused_unimodal": self.cos,
        }


@dataclass
class Trained:
    best_epoch: int
    seconds: float
    coefficients: Tensor | None  # [steps, M]
    trace: dict[str, Any] | None


def _batches(
    split: Split, names: Sequence[str], batch: int, order: torch.Generator
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """One epoch of training mini-batches, in the order drawn from ``order``."""
    n = split.y["train"].numel()
    perm = torch.randperm(n, generator=order)
    for i in range(0, n, batch):
        idx = perm[i : i + batch]
        yield {m: split.x["train"][m][idx] for m in names}, split.y["train"][idx]


def _backward(
    net: Net,
    ctx: gradmod.ModulationContext | None,
    xb: dict[str, Tensor],
    yb: Tensor,
    responses: bool = False,
) -> Tensor | None:
    """Forward and backward of one batch (modulated inside ``ctx``); returns the factors.

    With ``responses`` (AGM), the loss is taken on the sum of the fused head's Shapley
    responses (equal to the fused logits) and the context scales the responses' gradients.
    """
    feats = net.features(xb)
    if responses:
        assert isinstance(net, FusedNet)
        model = net.model
        phi = gradmod.functional.shapley_responses(model.fuse, feats, module=model.head)
        loss = F.cross_entropy(torch.stack(list(phi.values())).sum(0), yb)
        feats = phi
    else:  # a method that acts in the forward (OPM) hands back the features to fuse
        loss = net.loss(ctx.prepare(feats, yb) if ctx is not None else feats, yb)
    if ctx is None:
        loss.backward()
        return None
    with ctx(features=feats, targets=yb):
        loss.backward()
    return ctx.coefficients.to(torch.float64)


def _val_accuracy(net: Net, split: Split) -> float:
    net.eval()
    with torch.no_grad():
        acc = accuracy(net.predict(net.features(split.x["val"])), split.y["val"])
    net.train()
    return acc


def _optimizer(net: Net, spec: OptimizerSpec) -> torch.optim.Optimizer:
    """The run's optimizer over the trained network, one param group."""
    return spec.build([{"params": list(net.parameters()), "lr": spec.lr}])


def _add_classifiers(
    opt: torch.optim.Optimizer, ctx: gradmod.ModulationContext | None, lr: float
) -> None:
    """The heads a context trains itself (CGGM's classifiers) join the optimizer at ``lr``."""
    if ctx is None:
        return
    seen = {id(p) for g in opt.param_groups for p in g["params"]}
    extra = [p for p in ctx.classifier_parameters() if id(p) not in seen]
    if extra:
        opt.add_param_group({"params": extra, "lr": lr})


def train(
    net: Net,
    ctx: gradmod.ModulationContext | None,
    opt: torch.optim.Optimizer,
    split: Split,
    cfg: TrainConfig,
    seed: int,
    trace: bool,
    responses: bool = False,
) -> Trained:
    """Train ``net`` (in place, best-validation weights loaded at the end) with ``opt``, whose
    first param group holds ``net``'s parameters."""
    start = time.perf_counter()
    torch.manual_seed(seed)  # same global RNG stream for every run (stochastic methods)
    order = torch.Generator().manual_seed(seed)  # same mini-batch order for every run
    trained = list(net.parameters())
    tracer = Tracer(net, split, cfg.trace_every) if trace else None
    coeffs: list[Tensor] = []
    best_val, best_epoch, best_state = -1.0, 0, copy.deepcopy(net.state_dict())
    step = 0
    net.train()
    for epoch in range(1, cfg.epochs + 1):
        if ctx is not None:
            ctx.set_epoch(epoch - 1)  # epochs count from 0 for the methods (OGM-GE's window)
        for xb, yb in _batches(split, net.names, cfg.batch_size, order):
            due = tracer is not None and tracer.due(step)
            if due and tracer is not None:
                tracer.before_step(step, xb, yb)
            k = _backward(net, ctx, xb, yb, responses)
            if k is not None:
                coeffs.append(k)
            if due and tracer is not None:
                tracer.after_backward()
            nn.utils.clip_grad_norm_(trained, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        val = _val_accuracy(net, split)
        if val > best_val:  # first best
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    net.eval()
    if ctx is not None:
        ctx.close()  # detach an update-level context from the optimizer
    return Trained(
        best_epoch,
        time.perf_counter() - start - (tracer.seconds if tracer is not None else 0.0),
        torch.stack(coeffs) if coeffs else None,
        tracer.as_dict() if tracer is not None else None,
    )


@dataclass
class Evaluation:
    test_acc: float
    test_probs: Tensor
    probes: dict[str, float]
    shares: dict[str, float] | None


def evaluate(net: Net, split: Split, probe_steps: int) -> Evaluation:
    with torch.no_grad():
        feats = {p: net.features(split.x[p]) for p in ("train", "test")}
        logits = net.predict(feats["test"])
        shares = net.shares(feats["test"])
    y_tr, y_te = split.y["train"], split.y["test"]
    probes = {
        m: linear_probe(feats["train"][m], y_tr, feats["test"][m], y_te, split.classes, probe_steps)
        for m in net.names
    }
    share_acc = {m: accuracy(z, y_te) for m, z in shares.items()} if shares is not None else None
    return Evaluation(accuracy(logits, y_te), logits.softmax(1), probes, share_acc)


def _record(
    job: Job, method: str, config: dict[str, Any], ev: Evaluation, tr: Trained | None
) -> dict[str, Any]:
    setting = SETTINGS[job.setting]
    coeffs = None
    if tr is not None and tr.coefficients is not None:
        coeffs = coefficient_stats(tr.coefficients, setting.modalities)
    return {
        "dataset": setting.dataset,
        "setting": setting.name,
        "modalities": list(setting.modalities),
        "method": method,
        "config": config,
        "optimizer": job.optimizer,
        "optimizer_config": {
            "lr": OPTIMIZERS[job.optimizer].lr,
            "momentum": OPTIMIZERS[job.optimizer].momentum,
        },
        "seed": job.seed,
        "fused_acc": ev.test_acc,
        "probe_acc": ev.probes,
        "share_acc": ev.shares,
        "coefficients": coeffs,
        "best_epoch": tr.best_epoch if tr is not None else None,
        "epochs": job.config.epochs,
        "wall_s": tr.seconds if tr is not None else 0.0,
    }


def _trace(job: Job, method: str, tr: Trained, names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "setting": job.setting,
        "optimizer": job.optimizer,
        "seed": job.seed,
        "method": method,
        **(tr.trace or {}),
    }
    if tr.coefficients is not None:
        out["coefficients"] = {m: tr.coefficients[:, i].tolist() for i, m in enumerate(names)}
    return out


def _run_variant(
    job: Job, variant: Variant, parts: Parts, split: Split
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    parts = copy.deepcopy(parts)
    net = FusedNet(parts, variant.aux_loss, variant.heads)
    spec = OPTIMIZERS[job.optimizer]
    opt = _optimizer(net, spec)
    ctx = variant.context(parts, variant.config, opt) if variant.context is not None else None
    _add_classifiers(opt, ctx, spec.lr * job.config.classifier_lr_ratio)
    tr = train(net, ctx, opt, split, job.config, job.seed, job.trace, variant.responses)
    ev = evaluate(net, split, job.config.probe_steps)
    config = {"aux_loss": variant.aux_loss, "heads": variant.heads, **variant.config}
    trace = _trace(job, variant.name, tr, parts.names) if job.trace else None
    return _record(job, variant.name, config, ev, tr), trace


@functools.cache
def warm_up() -> None:
    """Pay torch's one-time costs (the first Adam step takes ~0.5 s) before any timed run."""
    layer = nn.Linear(2, 2)
    for opt in (torch.optim.Adam(layer.parameters()), torch.optim.SGD(layer.parameters(), lr=0)):
        layer(torch.zeros(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()


def run_job(job: Job) -> JobResult:
    """Every method of one (setting, optimizer, seed), from one initialisation."""
    warm_up()
    setting = SETTINGS[job.setting]
    split = load_split(setting, job.seed)
    cfg = job.config
    parts = build_parts(split.dims(), cfg.hidden, cfg.feature, split.classes, job.seed)
    result = JobResult([])
    probs: list[Tensor] = []
    for m in setting.modalities:
        net = AloneNet(parts, m)
        opt = _optimizer(net, OPTIMIZERS[job.optimizer])
        tr = train(net, None, opt, split, cfg, job.seed, job.trace)
        ev = evaluate(net, split, cfg.probe_steps)
        probs.append(ev.test_probs)
        result.records.append(_record(job, f"alone:{m}", {}, ev, tr))
        if job.trace:
            result.traces.append(_trace(job, f"alone:{m}", tr, [m]))
    ensemble = torch.stack(probs).mean(0)
    ens = Evaluation(accuracy(ensemble, split.y["test"]), ensemble, {}, None)
    result.records.append(_record(job, "ensemble", {}, ens, None) | {"probe_acc": None})
    for name in job.variants:
        record, trace = _run_variant(job, VARIANTS[name], parts, split)
        result.records.append(record)
        if trace is not None:
            result.traces.append(trace)
    return result


def init_worker() -> None:
    """Pool initializer: one thread per worker process (results do not depend on the pool)."""
    torch.set_num_threads(1)
