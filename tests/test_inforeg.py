"""gradmod.InfoReg through the engine (ModulationContext) against a float64 reference of the
official training loop, and its semantics under DDP, gradient accumulation, a GradScaler and
resumption.

The reference (``reference_loop``) follows the authors' ``main.py`` (GeWu-Lab/InfoReg_CVPR2025 at
939b2ed, see ``docs/methods/inforeg.md`` and ``tests/test_inforeg_reference.py`` for file:line), in
its step order, with plain Python for the rules: at each epoch start the rate from the per-epoch
trace lists (ten zeros first) and a deep copy of the model (the anchor); per step the split-head
logits ``z_m = h_m W_m^T + b/2``, the loss ``CE(fused) + CE(z_a) + CE(z_v)`` and its backward,
``beta`` from the scores and the rate, ``grad += beta * (w - w_t)`` on every encoder parameter,
then ``fim += grad * grad`` on every Linear weight of each encoder, then the SGD step; at the
epoch end the trace ``sum(fim.mean())``. Parametrised by what gradmod lets one choose (score sum
or mean, which rate gates, the strengths), the official values being the official preset's.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _refs import softmax_true
from test_inforeg_reference import Net, make_data, naive_rate
from torch import nn

import gradmod

F64 = torch.float64
NAMES = ("audio", "visual")


def make_net(dtype: torch.dtype = F64) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def sgd(net: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


# ---------------------------------------------------------------------------- reference
def naive_beta(
    s: list[float], k: list[float], lam: tuple[float, float], thr: float = 0.05
) -> list[float]:
    """main.py:465-485 with the rate and the scores of each branch as given."""
    if s[0] > s[1] and k[0] > thr:
        return [lam[0] * math.exp(math.tanh(s[0] - s[1])), 0.0]
    if s[0] < s[1] and k[1] > thr:
        return [0.0, lam[1] * math.exp(math.tanh(s[1] - s[0]))]
    return [0.0, 0.0]


def reference_loop(
    net: Net,
    data: list[tuple[torch.Tensor, ...]],
    epochs: int,
    *,
    score: str,
    gate: str,
    lam: tuple[float, float],
) -> dict[str, Any]:
    opt = sgd(net)
    encs = [net.audio_net, net.visual_net]
    traces: list[list[float]] = [[], []]
    rates, betas = [], []
    for _ in range(epochs):
        own = [naive_rate(traces[0]), naive_rate(traces[1])]
        k = own if gate == "own" else [own[0], own[0]]  # official: audio's list gates both
        rates.append(k)
        anchor = copy.deepcopy(net)  # main.py:259
        anchors = [list(anchor.audio_net.parameters()), list(anchor.visual_net.parameters())]
        fim: list[list[torch.Tensor]] = [
            [torch.zeros_like(mod.weight) for mod in enc if isinstance(mod, nn.Linear)]
            for enc in encs
        ]
        for xa, xv, y in data:
            opt.zero_grad()
            a, v, out = net(xa, xv)
            w, b = net.head.weight, net.head.bias
            za, zv = a @ w[:, :4].T + b / 2, v @ w[:, 4:].T + b / 2  # main.py:361-363
            (F.cross_entropy(out, y) + F.cross_entropy(za, y) + F.cross_entropy(zv, y)).backward()
            s = [sum(softmax_true(z, y)) for z in (za, zv)]
            if score == "mean":
                s = [x / len(y) for x in s]
            beta = naive_beta(s, k, lam)
            betas.append(beta)
            with torch.no_grad():
                for enc, anc, bm in zip(encs, anchors, beta, strict=True):
                    for p, p_t in zip(enc.parameters(), anc, strict=True):
                        assert p.grad is not None
                        p.grad += bm * (p - p_t)  # main.py:492
                for f, enc in zip(fim, encs, strict=True):
                    mods = [mod for mod in enc if isinstance(mod, nn.Linear)]
                    for acc, mod in zip(f, mods, strict=True):
                        assert mod.weight.grad is not None
                        acc += mod.weight.grad * mod.weight.grad  # main.py:504
            opt.step()
        for m in range(2):
            traces[m].append(sum(float(x.mean()) for x in fim[m]))  # main.py:569-577
    return {"rates": rates, "betas": betas, "traces": traces, "state": net.state_dict()}


def context(net: nn.Module, method: gradmod.Method, **kw: Any) -> gradmod.ModulationContext:
    return gradmod.ModulationContext(
        net,
        encoders={"audio": "audio_net", "visual": "visual_net"},
        method=method,
        fusion="head",
        **kw,
    )


def engine_loop(
    net: Net, data: list[tuple[torch.Tensor, ...]], epochs: int, method: gradmod.InfoReg
) -> dict[str, Any]:
    """The same training through ModulationContext: the user's loss is CE(fused) only."""
    opt = sgd(net)
    ctx = context(net, method)
    rates, betas = [], []
    for epoch in range(epochs):
        ctx.set_epoch(epoch)
        for i, (xa, xv, y) in enumerate(data):
            opt.zero_grad()
            a, v, out = net(xa, xv)
            with ctx(features={"audio": a, "visual": v}, targets=y):
                F.cross_entropy(out, y).backward()
            if i == 0:
                rates.append(ctx.scores["rate"].tolist())
            betas.append(ctx.scores["beta"].tolist())
            opt.step()
    traces = torch.cat([method.traces, method.epoch_trace[:, None]], 1)
    return {"rates": rates, "betas": betas, "traces": traces.tolist(), "state": net.state_dict()}


CONFIGS = {
    "official-preset": (
        lambda: gradmod.methods.REGISTRY["inforeg-official"].make(2),
        {"score": "sum", "gate": "first", "lam": (0.95, 0.1)},
    ),
    "default": (gradmod.InfoReg, {"score": "mean", "gate": "own", "lam": (0.95, 0.95)}),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_engine_matches_the_official_loop(config: str) -> None:
    """13 epochs x 2 steps, float64: rates, betas, per-epoch traces and the trained weights
    equal the reference; the window opens, regulates and closes in the run."""
    make, kw = CONFIGS[config]
    data = make_data(2)
    ref = reference_loop(make_net(), data, 13, **kw)
    method = make()
    assert isinstance(method, gradmod.InfoReg)
    got = engine_loop(make_net(), data, 13, method)
    rates = [r[0] for r in ref["rates"]]
    assert rates[0] == 1.0 and min(rates) <= 0.05 < max(rates)  # the window closes
    assert any(max(b) > 0 for b in ref["betas"])  # and regulated before
    assert any(max(b) == 0 for b in ref["betas"][2:])
    for key in ("rates", "betas", "traces"):
        torch.testing.assert_close(
            torch.tensor(got[key], dtype=F64),
            torch.tensor(ref[key], dtype=F64),
            rtol=1e-9,
            atol=1e-12,
            msg=key,
        )
    for name, p in ref["state"].items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-9, atol=1e-12, msg=name)


def test_the_pull_is_zero_at_the_first_step_of_each_epoch_and_the_anchor_follows() -> None:
    net = make_net()
    method = gradmod.InfoReg(strength=5.0)
    ctx = context(net, method)
    opt = sgd(net)
    data = make_data(3)
    for epoch in range(2):
        ctx.set_epoch(epoch)
        start = torch.cat([p.detach().reshape(-1) for p in net.audio_net.parameters()])
        for i, (xa, xv, y) in enumerate(data):
            opt.zero_grad()
            a, v, out = net(xa, xv)
            plain = copy.deepcopy(net)
            with ctx(features={"audio": a, "visual": v}, targets=y):
                F.cross_entropy(out, y).backward()
            anchor = method.anchor[: start.numel()]
            assert torch.equal(anchor, start) and int(method.anchor_epoch) == epoch
            # the audio gradient minus the unimodal-loss-only run is the pull
            pa, pv, pout = plain(xa, xv)
            w, b = plain.head.weight, plain.head.bias
            za, zv = pa @ w[:, :4].T + b / 2, pv @ w[:, 4:].T + b / 2
            (F.cross_entropy(pout, y) + F.cross_entropy(za, y) + F.cross_entropy(zv, y)).backward()
            beta = float(ctx.scores["beta"][0]) if i > 0 else 0.0
            for p, q, s in zip(
                net.audio_net.parameters(),
                plain.audio_net.parameters(),
                anchor.split([p.numel() for p in net.audio_net.parameters()]),
                strict=True,
            ):
                assert p.grad is not None and q.grad is not None
                want = q.grad + beta * (p.detach() - s.view_as(p))
                torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
            opt.step()
        ctx.set_epoch(epoch)  # announcing the current epoch again changes nothing
        assert int(method.anchor_epoch) == epoch


# ----------------------------------------------------------------------------- semantics
def test_accumulation_reads_the_trace_once_on_the_accumulated_gradient() -> None:
    net = make_net()
    method = gradmod.InfoReg()
    ctx = context(net, method)
    opt = sgd(net)
    ctx.set_epoch(0)
    data = make_data(3, batch=8)
    for xa, xv, y in data[:2]:  # a first step: the anchor, then a pull
        opt.zero_grad()
        a, v, out = net(xa, xv)
        with ctx(features={"audio": a, "visual": v}, targets=y):
            F.cross_entropy(out, y).backward()
        opt.step()
    opt.zero_grad()
    before = method.epoch_trace.clone()
    xa, xv, y = data[2]
    for i, half in enumerate((slice(0, 4), slice(4, 8))):
        a, v, out = net(xa[half], xv[half])
        with ctx(features={"audio": a, "visual": v}, targets=y[half], boundary=i == 1, weight=0.5):
            (F.cross_entropy(out, y[half]) / 2).backward()
        if i == 0:  # an earlier micro-batch adds nothing to the trace
            assert torch.equal(method.epoch_trace, before)
    weights = [
        [m.weight.grad for m in enc if isinstance(m, nn.Linear)]
        for enc in (net.audio_net, net.visual_net)
    ]
    # main.py:569-577: per encoder, the sum over its Linear weights of mean(grad ** 2)
    want = torch.tensor(
        [sum(float((g * g).mean()) for g in enc) for enc in weights],  # type: ignore[operator]
        dtype=method.epoch_trace.dtype,
    )
    torch.testing.assert_close(method.epoch_trace - before, want, rtol=1e-12, atol=0)


def test_a_grad_scaler_leaves_the_trace_unscaled_and_an_overflow_step_uncounted() -> None:
    results = []
    for use_scaler in (False, True):
        net = make_net(torch.float32)
        method = gradmod.InfoReg()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10**6)
        ctx = context(net, method, grad_scaler=scaler if use_scaler else None)
        opt = sgd(net)
        ctx.set_epoch(0)
        for xa, xv, y in make_data(3):
            opt.zero_grad()
            a, v, out = net(xa.float(), xv.float())
            loss = F.cross_entropy(out, y)
            with ctx(features={"audio": a, "visual": v}, targets=y):
                (scaler.scale(loss) if use_scaler else loss).backward()
            if use_scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        results.append((method.epoch_trace.clone(), [p.detach().clone() for p in net.parameters()]))
        if use_scaler:  # an overflowing step: skipped by the scaler, not counted by InfoReg
            before = method.epoch_trace.clone()
            xa, xv, y = make_data(1, seed=9)[0]
            opt.zero_grad()
            a, v, out = net(xa.float(), xv.float())
            with ctx(features={"audio": a, "visual": v}, targets=y):
                scaler.scale(F.cross_entropy(out, y) * math.inf).backward()
            scaler.step(opt)
            scaler.update()
            assert scaler.get_scale() < 2.0**12  # the step was skipped
            assert torch.equal(method.epoch_trace, before)
    (t0, p0), (t1, p1) = results
    assert torch.equal(t0, t1)
    for a_, b_ in zip(p0, p1, strict=True):
        assert torch.equal(a_, b_)


def run_epochs(
    net: Net,
    ctx: gradmod.ModulationContext,
    opt: torch.optim.Optimizer,
    data: list[tuple[torch.Tensor, ...]],
    start: tuple[int, int],
    epochs: int,
    stop: tuple[int, int] | None = None,
) -> None:
    """Train from (epoch, step) ``start`` to the end of ``epochs`` (or up to ``stop``)."""
    for epoch in range(start[0], epochs):
        ctx.set_epoch(epoch)
        for i, (xa, xv, y) in enumerate(data):
            if (epoch, i) < start:
                continue
            if stop is not None and (epoch, i) == stop:
                return
            opt.zero_grad()
            a, v, out = net(xa, xv)
            with ctx(features={"audio": a, "visual": v}, targets=y):
                F.cross_entropy(out, y).backward()
            opt.step()


def test_resume_mid_epoch_is_exact() -> None:
    data = make_data(4)
    net = make_net()
    ctx, opt = context(net, gradmod.InfoReg(window=2)), sgd(net)
    run_epochs(net, ctx, opt, data, (0, 0), 4, stop=(2, 2))
    saved = copy.deepcopy((ctx.state_dict(), net.state_dict(), opt.state_dict()))
    run_epochs(net, ctx, opt, data, (2, 2), 4)
    other = make_net()
    other.load_state_dict(saved[1])
    ctx2, opt2 = context(other, gradmod.InfoReg(window=2)), sgd(other)
    opt2.load_state_dict(saved[2])
    ctx2.load_state_dict(saved[0])
    run_epochs(other, ctx2, opt2, data, (2, 2), 4)  # announces epoch 2 again: no change
    for a_, b_ in zip(net.parameters(), other.parameters(), strict=True):
        assert torch.equal(a_, b_)
    for key, v in ctx.state_dict().items():
        assert torch.equal(v, ctx2.state_dict()[key]), key
    assert ctx.method.traces.shape == (2, 3)  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, path: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        net = make_net()
        model = nn.parallel.DistributedDataParallel(net)
        method = gradmod.InfoReg()
        ctx = context(model, method)
        opt = sgd(net)
        half = slice(rank * 4, rank * 4 + 4)
        betas = []
        for epoch in range(3):
            ctx.set_epoch(epoch)
            for xa, xv, y in make_data(2, batch=8):
                opt.zero_grad()
                a, v, fused = model(xa[half], xv[half])
                with ctx(features={"audio": a, "visual": v}, targets=y[half]):
                    F.cross_entropy(fused, y[half]).backward()
                betas.append(ctx.scores["beta"])
                opt.step()
        torch.save(
            {"state": net.state_dict(), "method": method.state_dict(), "beta": betas},
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_the_full_batch() -> None:
    """Scores are global and the trace is read from DDP's averaged gradient: every rank holds
    the single-process state (betas, traces, anchor) and weights."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.spawn(_ddp_worker, args=(2, os.path.join(d, "rdv"), out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1)]
    net = make_net()
    method = gradmod.InfoReg()
    ctx, opt = context(net, method), sgd(net)
    betas = []
    for epoch in range(3):
        ctx.set_epoch(epoch)
        for xa, xv, y in make_data(2, batch=8):
            opt.zero_grad()
            a, v, out = net(xa, xv)
            with ctx(features={"audio": a, "visual": v}, targets=y):
                F.cross_entropy(out, y).backward()
            betas.append(ctx.scores["beta"])
            opt.step()
    assert any(float(b.max()) > 0 for b in betas)
    for r in ranks:
        for key, v in method.state_dict().items():
            torch.testing.assert_close(r["method"][key], v, rtol=1e-9, atol=1e-12, msg=key)
        for key, v in net.state_dict().items():
            torch.testing.assert_close(r["state"][key], v, rtol=1e-9, atol=1e-12, msg=key)
        torch.testing.assert_close(torch.stack(r["beta"]), torch.stack(betas), rtol=1e-9, atol=0)
    for key, v in ranks[0]["method"].items():
        assert torch.equal(v, ranks[1]["method"][key]), key


# ------------------------------------------------------------------------------ refusals
def test_refusals() -> None:
    net = make_net()
    with pytest.raises(gradmod.ConfigurationError, match="act='gradient'"):
        context(net, gradmod.InfoReg(), optimizer=sgd(net))
    with pytest.raises(gradmod.ConfigurationError, match="strength has 3 values"):
        context(net, gradmod.InfoReg(strength=(1.0, 2.0, 3.0)))
    with pytest.raises(gradmod.ConfigurationError, match=r"one nn\.Linear"):
        gradmod.ModulationContext(
            net, encoders={"audio": "audio_net", "visual": "visual_net"}, method=gradmod.InfoReg()
        )
    with pytest.raises(gradmod.ConfigurationError) as e:
        gradmod.InfoReg(strength=-1.0, threshold=math.nan, window=0, gate="mine", score="max")  # type: ignore[arg-type]
    assert len(e.value.problems) == 5
    ctx = context(net, gradmod.InfoReg())
    xa, xv, y = make_data(1)[0]
    a, v, out = net(xa, xv)
    with (
        pytest.raises(gradmod.StepError, match="set_epoch"),
        ctx(features={"audio": a, "visual": v}, targets=y),
    ):
        pass
    with pytest.raises(ValueError, match="epoch"):
        ctx.set_epoch(-1)
    ctx.set_epoch(0)
    with ctx(features={"audio": a, "visual": v}, targets=y):
        F.cross_entropy(out, y).backward()
    ctx.method.reset()
    assert int(ctx.method.epoch) == -1  # type: ignore[union-attr, arg-type]
