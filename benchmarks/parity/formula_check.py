"""gradmod.functional coefficient rules against the OFFICIAL code, executed verbatim: the official
lines (file:line below) are read from the fetched sources and exec'd on the same random inputs
(float64 logits / scores), then compared with gradmod's function. Sources from env vars:
AGM_SRC (lihong2303/AGM_ICCV2023), MLB_SRC (kkontras/MLB), OGM_SRC (GeWu-Lab/OGM-GE_CVPR2022),
CGGM_SRC (zrguo/CGGM).

    PYTHONPATH=<gradmod checkout> python formula_check.py
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import textwrap
import types

import torch
import torch.nn as nn

import gradmod.functional as GF

F64 = torch.float64


def official_block(env: str, rel: str, first: int, last: int, must_contain: str):
    path = os.path.join(os.environ[env], rel)
    with open(path) as f:
        lines = f.read().splitlines()[first - 1 : last]
    src = textwrap.dedent("\n".join(lines))
    assert must_contain in src, f"{rel}:{first}-{last} does not hold {must_contain!r}"
    return compile(src, f"{rel}:{first}-{last}", "exec"), f"{rel}:{first}-{last}"


def logits(g, b, c, scale=2.0):
    return torch.randn(b, c, generator=g, dtype=F64) * scale


def report(name, where, diffs):
    a = max(d[0] for d in diffs)
    r = max(d[1] for d in diffs)
    print(f"{name:28s} vs {where:55s} cases {len(diffs):3d}  max|diff| {a:.2e}  max rel {r:.2e}")
    return a


def diff(x, y):
    x = torch.as_tensor(x, dtype=F64).reshape(-1)
    y = torch.as_tensor(y, dtype=F64).reshape(-1)
    d = (x - y).abs()
    return float(d.max()), float((d / y.abs().clamp_min(1e-300)).max())


def f(t):
    return float(t) if not isinstance(t, float) else t


def agm(g):
    c2, w2 = official_block("AGM_SRC", "run/CREMAD_main.py", 130, 152, "coeff_v = math.exp")
    c3, w3 = official_block("AGM_SRC", "run/URFunny_main.py", 109, 130, "coeff_t = math.exp")
    softmax = nn.Softmax(dim=1)
    d2, d3 = [], []
    for case in range(40):
        alpha = [1.0, 1.5, 2.5][case % 3]
        b, c = 16, 6
        y = torch.randint(0, c, (b,), generator=g)
        scale = 30.0 if case % 5 == 4 else 2.0  # every 5th case: probabilities below the 1e-8 floor
        za, zv = logits(g, b, c, scale), logits(g, b, c, scale)
        run = [0.0, 0.0] if case % 4 == 0 else (torch.rand(2, generator=g, dtype=F64) * 3).tolist()
        ns = dict(
            out_a=za,
            out_v=zv,
            label=y,
            softmax=softmax,
            torch=torch,
            math=math,
            train_score_a=run[0],
            train_score_v=run[1],
            cfgs=argparse.Namespace(alpha=alpha),
        )
        exec(c2, ns)
        s = torch.stack([GF.clipped_nll(z, y).mean() for z in (za, zv)])
        k = GF.agm_coefficients(s, torch.tensor(run, dtype=F64), alpha=alpha, cap=10.0)
        d2.append(diff(k, [ns["coeff_a"], ns["coeff_v"]]))
        # M = 3 (no floor in the official 3-modality script: keep probabilities moderate)
        za, zv, zt = (logits(g, b, c) for _ in range(3))
        run = [0.0] * 3 if case % 4 == 0 else (torch.rand(3, generator=g, dtype=F64) * 3).tolist()
        ns = dict(
            out=za,
            m_a_out=za,
            m_v_out=zv,
            m_t_out=zt,
            label=y,
            softmax=softmax,
            math=math,
            torch=torch,
            train_score_a=run[0],
            train_score_v=run[1],
            train_score_t=run[2],
            cfgs=argparse.Namespace(alpha=alpha),
        )
        exec(c3, ns)
        s = torch.stack([GF.clipped_nll(z, y).mean() for z in (za, zv, zt)])
        k = GF.agm_coefficients(s, torch.tensor(run, dtype=F64), alpha=alpha, cap=7.0)
        d3.append(diff(k, [ns["coeff_a"], ns["coeff_v"], ns["coeff_t"]]))
    report("AGM M=2 (cap 10)", w2, d2)
    report("AGM M=3 (cap 7)", w3, d3)


def agm_sequence(g):
    """Running mean across steps: gradmod.AGM in a ModulationContext (8 steps, float64 responses)
    against the official block including its running-mean update (CREMAD_main.py:130-155,
    URFunny_main.py:109-134) exec'd in one persistent namespace with the global iteration count."""
    import gradmod

    blocks = {
        2: official_block(
            "AGM_SRC", "run/CREMAD_main.py", 130, 155, "train_score_v = train_score_v"
        ),
        3: official_block(
            "AGM_SRC", "run/URFunny_main.py", 109, 134, "train_score_t = train_score_t"
        ),
    }
    for m, (code, where) in blocks.items():
        names = ["a", "v", "t"][:m]
        model = nn.ModuleDict({n: nn.Linear(5, 6) for n in names}).double()
        # gradmod.AGM's default is a bounded (safe) rule; the official rule is official=True
        # where the constructor has it (older gradmod: the default was the official rule)
        kw = {"official": True} if "official" in inspect.signature(gradmod.AGM).parameters else {}
        ctx = gradmod.ModulationContext(
            model, encoders={n: n for n in names}, method=gradmod.AGM(alpha=1.5, **kw)
        )
        ns = dict(
            softmax=nn.Softmax(dim=1),
            torch=torch,
            math=math,
            cfgs=argparse.Namespace(alpha=1.5),
            train_score_a=0.0,
            train_score_v=0.0,
            train_score_t=0.0,
        )
        d = []
        for it in range(1, 9):
            y = torch.randint(0, 6, (16,), generator=g)
            phi = {n: model[n](torch.randn(16, 5, generator=g, dtype=F64) * it) for n in names}
            loss = nn.functional.cross_entropy(sum(phi.values()), y)
            with ctx(features=phi, targets=y):
                loss.backward()
            z = {n: phi[n].detach() for n in names}
            ns.update(
                out_a=z["a"],
                out_v=z["v"],
                out=z["a"],
                m_a_out=z["a"],
                m_v_out=z["v"],
                m_t_out=z.get("t"),
                label=y,
                iteration=it,
            )
            exec(code, ns)
            d.append(diff(ctx.coefficients, [ns[f"coeff_{n}"] for n in names]))
        report(f"AGM M={m}, 8 steps, running mean", where, d)


def mlb(g):
    rel = "agents/general_agent/helpers/Bias_Infusion.py"
    c2, w2 = official_block("MLB_SRC", rel, 336, 353, "coeff_1 = 1 + self.tanh")
    c3, w3 = official_block("MLB_SRC", rel, 452, 478, "coeff_2 = 1 + self.tanh")
    out = {}
    for mode in (False, 2):
        d2, d3 = [], []
        for case in range(40):
            alpha = [0.8, 1.0, 0.5][case % 3]
            beta = 1.5 if mode == 2 else False
            me = types.SimpleNamespace(
                softmax=nn.Softmax(dim=1),
                tanh=nn.Tanh(),
                alpha=alpha,
                tanh_mode=mode,
                tanh_mode_beta=beta,
            )
            b, c = 16, 6
            y = torch.randint(0, c, (b,), generator=g)
            z = [logits(g, b, c, [0.5, 2.0, 4.0][case % 3]) for _ in range(3)]
            ns = dict(self=me, label=y, out_color=z[0], out_gray=z[1], torch=torch)
            exec(c2, ns)
            s = torch.stack([GF.true_class_probability(t, y).mean() for t in z[:2]])
            k = GF.mlb_coefficients(s, alpha=alpha, beta=beta if mode == 2 else None)
            d2.append(diff(k, [f(ns["coeff_0"]), f(ns["coeff_1"])]))
            ns = dict(self=me, label=y, out_color=z[0], out_gray=z[1], out_f=z[2], torch=torch)
            exec(c3, ns)
            s = torch.stack([GF.true_class_probability(t, y).mean() for t in z])
            k = GF.mlb_coefficients(s, alpha=alpha, beta=beta if mode == 2 else None)
            d3.append(diff(k, [f(ns["coeff_0"]), f(ns["coeff_1"]), f(ns["coeff_2"])]))
        tag = "" if mode is False else ", tanh_mode 2 / beta 1.5"
        report(f"MLB M=2{tag}", w2, d2)
        report(f"MLB M=3{tag}", w3, d3)
    return out


def ogm(g):
    c, w = official_block("OGM_SRC", "main.py", 105, 124, "coeff_a = 1 - tanh")
    d = []
    for case in range(60):
        alpha = [0.8, 0.1, 0.5][case % 3]
        b, cl = 16, 6
        y = torch.randint(0, cl, (b,), generator=g)
        za = logits(g, b, cl)
        zv = za.clone() if case % 10 == 0 else logits(g, b, cl)  # exact ties too
        ns = dict(
            out_a=za,
            out_v=zv,
            label=y,
            softmax=nn.Softmax(dim=1),
            relu=nn.ReLU(inplace=True),
            tanh=nn.Tanh(),
            args=argparse.Namespace(alpha=alpha),
        )
        exec(c, ns)
        s = torch.stack([GF.true_class_probability(z, y).sum() for z in (za, zv)])
        k = GF.ogm_ge_coefficients(s, alpha=alpha)
        d.append(diff(k, [f(ns["coeff_a"]), f(ns["coeff_v"])]))
    report("OGM-GE M=2 (form official)", w, d)


def cggm(g):
    c, w = official_block("CGGM_SRC", "src/msatrain.py", 107, 113, "diff_sum = sum(diff) + 1e-8")
    grid, cont, zero_sum, all_zero = [], [], [], []
    for case in range(200):
        m = 3
        if case % 2 == 0:  # batch accuracies of an 8-sample batch: multiples of 1/8
            prev = (torch.randint(0, 9, (m,), generator=g).double() / 8).tolist()
            cur = (torch.randint(0, 9, (m,), generator=g).double() / 8).tolist()
        else:
            prev = torch.rand(m, generator=g, dtype=F64).tolist()
            cur = torch.rand(m, generator=g, dtype=F64).tolist()
        ns = dict(acc1=prev, acc2=cur, hyp_params=argparse.Namespace(num_mod=m))
        exec(c, ns)
        b = GF.improvement_rate_scale(
            torch.tensor(prev, dtype=F64), torch.tensor(cur, dtype=F64), rho=1.0, policy="official"
        )
        dd = diff(b, [float(x) for x in ns["coeff"]])
        delta_sum = sum(x - y for x, y in zip(cur, prev, strict=True))
        if all(x == y for x, y in zip(cur, prev, strict=True)):
            all_zero.append(dd)
        elif delta_sum == 0:
            zero_sum.append(dd)
        elif case % 2 == 0:
            grid.append(dd)
        else:
            cont.append(dd)
    # the all-repeat step explicitly
    prev = cur = [0.625, 0.5, 0.375]
    ns = dict(acc1=prev, acc2=cur, hyp_params=argparse.Namespace(num_mod=3))
    exec(c, ns)
    b = GF.improvement_rate_scale(
        torch.tensor(prev, dtype=F64), torch.tensor(cur, dtype=F64), rho=1.0, policy="official"
    )
    print(
        f"CGGM all metrics repeat: official B = {[float(x) for x in ns['coeff']]}, "
        f"gradmod official B = {b.tolist()}"
    )
    report("CGGM B, sum(delta) != 0, 1/8 grid", w, grid)
    report("CGGM B, sum(delta) != 0, continuous", w, cont)
    if zero_sum:
        report("CGGM B, sum(delta) == 0, delta != 0", w, zero_sum)
    if all_zero:
        report("CGGM B, every delta == 0", w, all_zero)


if __name__ == "__main__":
    torch.set_num_threads(1)
    torch.manual_seed(0)  # agm_sequence's nn.Linear init draws from the global RNG
    g = torch.Generator().manual_seed(0)
    agm(g)
    agm_sequence(g)
    mlb(g)
    ogm(g)
    cggm(g)
