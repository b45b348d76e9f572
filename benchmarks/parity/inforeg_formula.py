"""gradmod.functional's InfoReg functions against the OFFICIAL code, executed verbatim: the official
lines of GeWu-Lab/InfoReg_CVPR2025 ``main.py`` (file:line in the output) are read from
``$INFOREG_SRC`` and exec'd on seeded random inputs, then compared with gradmod's functions.

    INFOREG_SRC=<dir> PYTHONPATH=<gradmod checkout> python inforeg_formula.py [--vector]

Checks (float64 unless stated):

1. the acquisition rate ``k`` (main.py:237-243) on random per-epoch trace lists with the official
   ten-zero start (main.py:694), growing, flat, falling and all-zero histories;
2. the scores and the regulation strengths ``beta`` / ``beta2`` (main.py:460-485) on random
   logits, with exact score ties and rates on both sides of the 0.05 threshold;
3. the proximal gradient (main.py:259 snapshot, main.py:489-495 ``grad += beta * (w - w_t)``) on
   a small model wrapped in ``nn.DataParallel`` (the wrapper the official code expects);
4. the Fisher trace (main.py:291-319 init, 501-523 accumulation, 564-595 per-epoch traces);
5. a 14-epoch sequence (3 steps each) of all of the above on that model (official lines in one namespace, per
   step: the split-head logits 361-363, the three losses 378-380 and their backward 456-458, then
   the regulation and the trace; SGD step) against the same sequence driven by gradmod's
   functions, in float64 and float32.

Not exec'd: the logging (tensorboard, per-loss gradient snapshots at main.py:401-453, which end
with ``optimizer.zero_grad()`` and so leave no gradient behind) and the model's forward (the
published ``AVClassifier`` has modules that receive no gradient, which makes main.py:504 raise
``TypeError`` on the first step; the small model here has none).
``--vector`` prints the small test vector of docs/methods/inforeg.md.
"""

from __future__ import annotations

import argparse
import copy as cp
import math
import os
import textwrap
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from _judge import finish, judge

import gradmod.functional as GF

F64 = torch.float64
REL = "main.py"


def official_block(first: int, last: int, must_contain: str):
    path = os.path.join(os.environ["INFOREG_SRC"], REL)
    with open(path) as f:
        lines = f.read().splitlines()[first - 1 : last]
    src = textwrap.dedent("\n".join(lines))
    assert must_contain in src, f"{REL}:{first}-{last} does not hold {must_contain!r}"
    where = f"{REL}:{first}" if first == last else f"{REL}:{first}-{last}"
    return compile(src, where, "exec"), where


def report(name, where, diffs, tol=1e-6):
    a = max(d[0] for d in diffs)
    r = max(d[1] for d in diffs)
    print(f"{name:34s} vs {where:28s} cases {len(diffs):4d}  max|diff| {a:.2e}  max rel {r:.2e}")
    judge(name, a, tol)
    return a


def diff(x, y):
    x = torch.as_tensor(x, dtype=F64).detach().reshape(-1)
    y = torch.as_tensor(y, dtype=F64).detach().reshape(-1)
    d = (x - y).abs()
    if d.numel() == 0:
        return 0.0, 0.0
    return float(d.max()), float((d / y.abs().clamp_min(1e-300)).max())


def f(t):
    return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)


# ----------------------------------------------------------------------------- 1. rate
def rate(g):
    code, where = official_block(237, 243, "k = (tr1 - tr2)/tr1")
    cases, zero = [], []
    for case in range(300):
        e = case % 26  # epochs completed
        kind = case % 4
        if kind == 0:  # random positive traces
            t = (torch.rand(e, generator=g, dtype=F64) * 5).tolist()
        elif kind == 1:  # rising then flat
            t = [min(1.0 + j, 6.0) + 0.01 * float(torch.rand(1, generator=g)) for j in range(e)]
        elif kind == 2:  # falling (gradients shrink): negative rates
            t = [10.0 * 0.8**j for j in range(e)]
        else:  # a window of zeros after some information (division by zero once it slides out)
            t = [1.0, 2.0] + [0.0] * max(e - 2, 0)
            t = t[:e]
        history = [0] * 10 + t  # main.py:694
        ns = dict(epoch=e, audio_trace_list=history)
        try:
            exec(code, ns)
            k_off: float | None = f(ns["k"])
        except ZeroDivisionError:
            k_off = None
        h = torch.tensor(t, dtype=F64)
        off = GF.acquisition_rate(h, policy="official")
        safe = GF.acquisition_rate(h, policy="safe")
        if k_off is None:
            zero.append((e, float(off), float(safe)))
            continue
        cases.append(diff(off, k_off))
        cases.append(diff(safe, k_off))
    report("rate k (official and safe)", where, cases)
    ok = all(not math.isfinite(o) and s == 0.0 for _, o, s in zero)
    judge("rate k, zero denominator", 0.0 if ok else 1.0, 0.0)
    print(
        f"rate k, zero denominator: official code raises ZeroDivisionError in {len(zero)} cases; "
        f"gradmod official -> non-finite, safe -> 0: {'yes' if ok else 'NO'}"
    )


# ----------------------------------------------------------------------------- 2. beta
def exec_beta(code, za, zv, y, k):
    """Run the official scores-and-beta lines (main.py:460-485) on the logits ``za``, ``zv``;
    returns their namespace."""
    ns = dict(
        out_a=za,
        out_v=zv,
        label=y,
        k=k,
        softmax=nn.Softmax(dim=1),
        tanh=nn.Tanh(),
        torch=torch,
        model=types.SimpleNamespace(),
    )
    exec(code, ns)
    return ns


def beta(g):
    code, where = official_block(460, 485, "beta = 0.95 * torch.exp(gap)")
    d, kinds = [], {"audio": 0, "visual": 0, "none": 0}
    for case in range(240):
        b, c = [4, 16, 64][case % 3], 6
        y = torch.randint(0, c, (b,), generator=g)
        za = torch.randn(b, c, generator=g, dtype=F64) * [0.5, 2.0, 4.0][case % 3]
        zv = za.clone() if case % 12 == 0 else torch.randn(b, c, generator=g, dtype=F64) * 2
        k = [1.0, 0.05, 0.0500001, 0.3, -0.2, 0.04][case % 6]
        ns = exec_beta(code, za, zv, y, k)
        s = torch.stack([GF.true_class_probability(z, y).sum() for z in (za, zv)])
        got = GF.inforeg_beta(s, k, strength=torch.tensor([0.95, 0.1], dtype=F64))
        ref = [f(ns["beta"]), f(ns["beta2"])]
        kinds["audio" if ref[0] > 0 else "visual" if ref[1] > 0 else "none"] += 1
        d.append(diff(got, ref))
        d.append(diff(s, [f(ns["score_a"]), f(ns["score_v"])]))
    report("scores + beta, M=2", where, d)
    print(f"  regulated modality over the cases: {kinds}")


# ----------------------------------------------------------------------------- model
class Inner(nn.Module):
    """Names as the official code expects: audio_net / visual_net / head (512 + 512 -> 6)."""

    def __init__(self) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 512),
        )
        self.visual_net = nn.Sequential(
            nn.Flatten(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 512)
        )
        self.head = nn.Linear(1024, 6)

    def forward(self, xa, xv):
        a, v = self.audio_net(xa), self.visual_net(xv)
        return a, v, self.head(torch.cat([a, v], 1))


def make(dtype, seed=0):
    torch.manual_seed(seed)
    inner = Inner().to(dtype)
    return inner, nn.DataParallel(inner)  # CPU: a plain wrapper with .module


def data(g, dtype, steps, b=8):
    return [
        (
            torch.randn(b, 1, 6, 6, generator=g, dtype=F64).to(dtype) * (1 + s % 3),
            torch.randn(b, 10, generator=g, dtype=F64).to(dtype),
            torch.randint(0, 6, (b,), generator=g),
        )
        for s in range(steps)
    ]


def weights(mod):
    return [m.weight for m in mod.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


# ----------------------------------------------------------------------------- 3. proximal
def proximal(g):
    snap, w1 = official_block(259, 259, "cp.deepcopy(model)")
    code, w2 = official_block(
        489, 495, "model_param.grad += beta * (model_param - global_model_param)"
    )
    d = []
    for case in range(24):
        inner, model = make(F64, seed=case)
        ns = dict(model=model, cp=cp)
        exec(snap, ns)  # the epoch-start snapshot
        with torch.no_grad():  # the weights move during the epoch
            for p in inner.parameters():
                p.add_(torch.randn(p.shape, generator=g, dtype=F64) * 0.1)
                p.grad = torch.randn(p.shape, generator=g, dtype=F64)
        before = [p.grad.clone() for p in inner.parameters()]
        b_a, b_v = [(1.2, 0), (0, 0.17), (0, 0), (torch.tensor(2.5, dtype=F64), 0)][case % 4]
        ns.update(beta=b_a, beta2=b_v)
        exec(code, ns)
        anchors = dict(ns["global_model"].module.named_parameters())
        for name, enc, bm in (
            ("audio_net", inner.audio_net, b_a),
            ("visual_net", inner.visual_net, b_v),
        ):
            ps = list(enc.parameters())
            an = [anchors[f"{name}.{n}"] for n, _ in enc.named_parameters()]
            ours = GF.proximal_gradient(ps, an, torch.as_tensor(bm, dtype=F64))
            idx = [i for i, p in enumerate(inner.parameters()) if any(p is q for q in ps)]
            for j, i in enumerate(idx):
                added = list(inner.parameters())[i].grad - before[i]
                d.append(diff(ours[j], added))
        for p, b0 in zip(inner.head.parameters(), before[-2:], strict=True):
            d.append(diff(p.grad, b0))  # the fusion head is not regulated
    report("proximal gradient beta*(w - w_t)", f"{w1}, {w2[len(REL) + 1 :]}", d)


# ----------------------------------------------------------------------------- 4./5. sequence
def sequence(g, dtype, epochs=14, steps=3):
    """Official per-step lines vs gradmod's functions over ``epochs`` x ``steps`` steps."""
    blocks = dict(
        rate=official_block(237, 243, "k = (tr1 - tr2)/tr1"),
        snap=official_block(259, 259, "cp.deepcopy(model)"),
        fim_init=official_block(291, 319, "fim_audio[name] = torch.zeros_like(module.weight)"),
        logits=official_block(361, 363, "model.module.head.weight[:, :512]"),
        losses=official_block(378, 380, "loss_out_a = criterion(out_a, label)"),
        backward=official_block(456, 458, "loss.backward()"),
        beta=official_block(460, 485, "beta2 = 0.1 * torch.exp(gap)"),
        prox=official_block(
            489, 495, "model_param.grad += beta2 * (model_param - global_model_param)"
        ),
        fim=official_block(
            501, 523, "fim_audio[name] += (module.weight.grad * module.weight.grad)"
        ),
        trace=official_block(564, 595, "audio_trace_list.append(fim_trace_audio)"),
    )
    batches = data(g, dtype, steps)
    # ---- official
    inner, model = make(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ns = dict(
        model=model,
        cp=cp,
        torch=torch,
        nn=nn,
        criterion=nn.CrossEntropyLoss(),
        softmax=nn.Softmax(dim=1),
        tanh=nn.Tanh(),
        audio_trace_list=[0] * 10,
        visual_trace_list=[0] * 10,
    )
    off_k, off_beta = [], []
    for epoch in range(epochs):
        ns["epoch"] = epoch
        for key in ("rate", "snap", "fim_init"):
            exec(blocks[key][0], ns)
        off_k.append(f(ns["k"]))
        for xa, xv, y in batches:
            opt.zero_grad()
            a, v, out = inner(xa, xv)
            ns.update(a=a, v=v, out=out, label=y)
            for key in ("logits", "losses", "backward", "beta", "prox", "fim"):
                exec(blocks[key][0], ns)
            off_beta.append([f(ns["beta"]), f(ns["beta2"])])
            opt.step()
        exec(blocks["trace"][0], ns)
    off_final = {n: p.detach().clone() for n, p in inner.named_parameters()}
    off_hist = torch.tensor(
        [ns["audio_trace_list"][10:], ns["visual_trace_list"][10:]], dtype=F64
    ).T

    # ---- gradmod's functions
    inner, _ = make(dtype)
    opt = torch.optim.SGD(inner.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    encs = [inner.audio_net, inner.visual_net]
    strength = torch.tensor([0.95, 0.1], dtype=F64)
    history = torch.zeros(0, 2, dtype=F64)
    gm_k, gm_beta = [], []
    for _epoch in range(epochs):
        k = GF.acquisition_rate(history, policy="official")[0]  # the official gate: audio's rate
        gm_k.append(float(k))
        anchors = [[p.detach().clone() for p in e.parameters()] for e in encs]
        epoch_trace = torch.zeros(2, dtype=F64)
        for xa, xv, y in batches:
            opt.zero_grad()
            a, v, out = inner(xa, xv)
            w, bias = inner.head.weight, inner.head.bias
            za = a @ w[:, :512].T + bias / 2
            zv = v @ w[:, 512:].T + bias / 2
            # the same three backward passes, in the official order
            F.cross_entropy(zv, y).backward(retain_graph=True)
            F.cross_entropy(za, y).backward(retain_graph=True)
            F.cross_entropy(out, y).backward()
            s = torch.stack([GF.true_class_probability(z.detach(), y).sum() for z in (za, zv)])
            b = GF.inforeg_beta(s.double(), k, strength=strength)
            gm_beta.append(b.tolist())
            for e, an, bm in zip(encs, anchors, b, strict=True):
                ps = list(e.parameters())
                for p, gp in zip(ps, GF.proximal_gradient(ps, an, bm), strict=True):
                    p.grad += gp
            epoch_trace += GF.fisher_trace([[t.grad for t in weights(e)] for e in encs])
            opt.step()
        history = torch.cat([history, epoch_trace[None]])
    gm_final = {n: p.detach() for n, p in inner.named_parameters()}

    tag = "float64" if dtype == F64 else "float32"
    where = "main.py:237-595 (10 blocks)"
    tol = 1e-6 if dtype == F64 else 1e-4  # float32: ten times the measured 1.1e-5
    report(f"sequence {tag}: rate k per epoch", where, [diff(gm_k, off_k)], tol)
    report(f"sequence {tag}: beta per step", where, [diff(gm_beta, off_beta)], tol)
    report(f"sequence {tag}: per-epoch traces", where, [diff(history, off_hist)], tol)
    moved = max(
        float((off_final[n] - p0.detach()).abs().max())
        for n, p0 in make(dtype)[0].named_parameters()
    )
    d = [diff(gm_final[n], off_final[n]) for n in off_final]
    report(f"sequence {tag}: final parameters", where, d, tol)
    print(
        f"  largest official parameter move: {moved:.3e}; regulated (audio, visual) steps: "
        f"{sum(x[0] > 0 for x in off_beta)}, {sum(x[1] > 0 for x in off_beta)} of "
        f"{len(off_beta)}; official k per epoch: {' '.join(f'{x:.3f}' for x in off_k)}"
    )


def fisher(g):
    init, w1 = official_block(291, 319, "fim_visual[name] = torch.zeros_like(module.weight)")
    acc, w2 = official_block(
        501, 523, "fim_visual[name] += (module.weight.grad * module.weight.grad)"
    )
    fin, w3 = official_block(564, 577, "fim_trace_visual += fim_visual[name]")
    d = []
    for dtype in (F64, torch.float32):
        dd = []
        for case in range(12):
            inner, model = make(dtype, seed=case)
            ns = dict(model=model, torch=torch, nn=nn)
            exec(init, ns)
            ours = torch.zeros(2, dtype=F64)
            for xa, xv, y in data(g, dtype, 1 + case % 4):
                model.zero_grad()
                *_, out = inner(xa, xv)
                F.cross_entropy(out, y).backward()
                exec(acc, ns)
                ours += GF.fisher_trace(
                    [[t.grad for t in weights(e)] for e in (inner.audio_net, inner.visual_net)]
                )
            exec(fin, ns)
            dd.append(diff(ours, [ns["fim_trace_audio"], ns["fim_trace_visual"]]))
        report(
            f"Fisher trace ({'float64' if dtype == F64 else 'float32'} grads)",
            f"{w1}, {w2[8:]}, {w3[8:]}",
            dd,
        )
        d += dd
    return d


def vector():
    """The test vector of docs/methods/inforeg.md, from the official lines."""
    rate_c, _ = official_block(237, 243, "k = (tr1 - tr2)/tr1")
    beta_c, _ = official_block(460, 485, "beta = 0.95 * torch.exp(gap)")
    prox_c, _ = official_block(
        489, 495, "model_param.grad += beta * (model_param - global_model_param)"
    )
    fim_i, _ = official_block(291, 319, "fim_audio[name] = torch.zeros_like(module.weight)")
    fim_a, _ = official_block(
        501, 523, "fim_audio[name] += (module.weight.grad * module.weight.grad)"
    )
    fim_f, _ = official_block(564, 577, "fim_trace_visual += fim_visual[name]")
    print("== test vector (official lines, float64)")
    traces = [4.0, 6.0, 6.5]
    for e in range(len(traces) + 1):
        ns = dict(epoch=e, audio_trace_list=[0] * 10 + traces[:e])
        exec(rate_c, ns)
        gm = GF.acquisition_rate(torch.tensor(traces[:e], dtype=F64))
        print(f"  traces {traces[:e]} -> k = {f(ns['k']):.6f} (gradmod {float(gm):.6f})")
    flat = [4.0, 6.0, 6.5] + [6.5] * 9
    ns = dict(epoch=len(flat), audio_trace_list=[0] * 10 + flat)
    exec(rate_c, ns)
    gm = GF.acquisition_rate(torch.tensor(flat, dtype=F64))
    print(f"  traces {flat} -> k = {f(ns['k']):.6f} (gradmod {float(gm):.6f})")
    y = torch.tensor([0, 1, 2, 1])
    za = torch.tensor(
        [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 1.2, 0.0]], dtype=F64
    )
    zv = torch.tensor(
        [[0.3, 0.2, 0.1], [0.0, 0.4, 0.5], [0.6, 0.1, 0.2], [0.2, 0.3, 0.1]], dtype=F64
    )
    for k, a, v in ((0.393939, za, zv), (0.393939, zv, za), (0.04, za, zv)):
        ns = exec_beta(beta_c, a, v, y, k)
        s = torch.stack([GF.true_class_probability(z, y).sum() for z in (a, v)])
        gm = GF.inforeg_beta(s, k, strength=torch.tensor([0.95, 0.1], dtype=F64))
        print(
            f"  k={k}: s_a={f(ns['score_a']):.6f} s_v={f(ns['score_v']):.6f} -> beta={f(ns['beta']):.6f} "
            f"beta2={f(ns['beta2']):.6f} (gradmod {[round(x, 6) for x in gm.tolist()]})"
        )

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.audio_net = nn.Linear(2, 2, bias=False)
            self.visual_net = nn.Linear(3, 1, bias=False)
            self.head = nn.Linear(3, 3, bias=False)

    inner = Tiny().double()
    model = nn.DataParallel(inner)
    with torch.no_grad():
        inner.audio_net.weight.copy_(torch.tensor([[0.4, -1.2], [2.0, 0.5]], dtype=F64))
        inner.visual_net.weight.copy_(torch.tensor([[0.1, 0.2, 0.3]], dtype=F64))
        inner.head.weight.zero_()
    global_model = cp.deepcopy(model)
    with torch.no_grad():
        inner.audio_net.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=F64))
        inner.visual_net.weight.copy_(torch.tensor([[0.0, 0.2, 0.5]], dtype=F64))
    ga = torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=F64)
    gv = torch.tensor([[0.5, 0.5, -1.0]], dtype=F64)
    inner.audio_net.weight.grad, inner.visual_net.weight.grad = ga.clone(), gv.clone()
    inner.head.weight.grad = torch.zeros(3, 3, dtype=F64)
    ns = dict(model=model, global_model=global_model, beta=torch.tensor(2.0, dtype=F64), beta2=0)
    exec(prox_c, ns)
    anchor = global_model.module.audio_net.weight
    gm_prox = GF.proximal_gradient([inner.audio_net.weight], [anchor], torch.tensor(2.0, dtype=F64))
    print(
        f"  proximal, beta=2: audio grad {inner.audio_net.weight.grad.tolist()}, "
        f"visual grad {inner.visual_net.weight.grad.tolist()} (gradmod audio addition "
        f"{gm_prox[0].tolist()})"
    )
    ns = dict(model=model, torch=torch, nn=nn)
    exec(fim_i, ns)
    inner.audio_net.weight.grad, inner.visual_net.weight.grad = ga.clone(), gv.clone()
    exec(fim_a, ns)  # step 1
    inner.audio_net.weight.grad, inner.visual_net.weight.grad = 2 * ga, 0 * gv
    exec(fim_a, ns)  # step 2
    exec(fim_f, ns)
    gm = GF.fisher_trace([[ga], [gv]]) + GF.fisher_trace([[2 * ga], [0 * gv]])
    print(
        f"  Fisher traces over 2 steps: audio {ns['fim_trace_audio']:.6f} visual "
        f"{ns['fim_trace_visual']:.6f} (gradmod {[round(x, 6) for x in gm.tolist()]})"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--vector", action="store_true", help="print the spec's test vector only")
    opts = p.parse_args()
    torch.set_num_threads(1)
    if opts.vector:
        vector()
        raise SystemExit(0)
    g = torch.Generator().manual_seed(0)
    rate(g)
    beta(g)
    proximal(g)
    fisher(g)
    sequence(g, F64)
    sequence(g, torch.float32)
    finish()
