"""OPM and the revised OGM (TPAMI 2024) in gradmod.functional against the OFFICIAL code, executed
verbatim: the official lines (file:line below) are read from the fetched sources of
GeWu-Lab/BML_TPAMI2024 (env var BML_SRC, the repository root) and exec'd on the same seeded random
inputs, then compared with gradmod's functions.

    BML_SRC=<extracted BML_TPAMI2024> PYTHONPATH=<gradmod checkout> python opm_formula.py

One run-time fix, asserted against the exact line: code/models/Classifier.py:53 ends in a stray
``]`` (a SyntaxError as committed, so the official OPM cannot run as published); it is removed
before the lines are compiled. Nothing else is changed. The stages:

1. scores: Classifier.py:112-143 (unimodal logits off the concat head with b/2 each, summed
   true-class probabilities) vs gradmod.OGMGE.unimodal_logits + true_class_probability.
2. dropping probability: Classifier.py:58-72 (calcu_q) vs opm_drop_probability.
3. feature dropping: Classifier.py:9-55 (custom_autograd, Modality_drop.execute_drop) with
   torch.manual_seed(s) vs opm_drop with a CPU generator seeded s: masks, features, and the
   gradient reaching the features (scores detached on both sides).
4. the official gradient leak: the whole official forward (scores -> calcu_q -> execute_drop ->
   fusion -> loss) with scores in the graph; custom_autograd.backward returns theta itself as
   theta's gradient, which flows through calcu_q into the scores and the features. Measured as
   the difference to the same forward with detached scores (= gradmod), and compared with the
   gradient of theta^2 / 2 (what it amounts to).
5. OGM coefficients: main.py:118-152 (both use_OGM_plus settings) vs ogm_tpami_coefficients,
   and how often gradmod's CVPR ogm_ge_coefficients differs (only at exact ties).
6. the test vector of docs/methods/opm.md, from the official lines alone (``--vector``: only
   this stage).
"""

from __future__ import annotations

import argparse
import os
import textwrap
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from _judge import finish, judge

import gradmod
import gradmod.functional as GF
from gradmod.methods import Binding

F64 = torch.float64
CLASSIFIER = "code/models/Classifier.py"
MAIN = "code/main.py"
STRAY = (53, "cleaned_fea=torch.chunk(cleaned_fea,num_mod,dim=0) ]")


def official_lines(rel: str, first: int, last: int, must_contain: str, fix=None) -> str:
    path = os.path.join(os.environ["BML_SRC"], rel)
    with open(path) as f:
        lines = f.read().splitlines()
    if fix is not None:
        no, text = fix
        assert lines[no - 1].strip() == text, f"{rel}:{no} is not {text!r}"
        lines[no - 1] = lines[no - 1].rstrip()[:-1].rstrip()  # drop the stray ']'
    src = textwrap.dedent("\n".join(lines[first - 1 : last]))
    assert must_contain in src, f"{rel}:{first}-{last} does not hold {must_contain!r}"
    return src


def official_module() -> dict:
    """custom_autograd, Modality_drop and calcu_q (Classifier.py:9-72) in one namespace."""
    src = official_lines(CLASSIFIER, 9, 72, "def calcu_q", fix=STRAY)
    ns: dict = {"torch": torch, "nn": nn, "F": F, "np": np}
    exec(compile(src, f"{CLASSIFIER}:9-72", "exec"), ns)
    return ns


def report(name: str, where: str, diffs: list[tuple[float, float]], tol: float = 1e-6) -> None:
    a = max(d[0] for d in diffs)
    r = max(d[1] for d in diffs)
    print(f"{name:34s} vs {where:28s} cases {len(diffs):4d}  max|diff| {a:.2e}  max rel {r:.2e}")
    judge(name, a, tol)


def diff(x, y) -> tuple[float, float]:
    x = torch.as_tensor(x, dtype=F64).reshape(-1)
    y = torch.as_tensor(y, dtype=F64).reshape(-1)
    d = (x - y).abs()
    # relative differences where the official value is not ~0 (1e-9 of the largest entry)
    nz = y.abs() > 1e-9 * y.abs().max()
    rel = float((d[nz] / y[nz].abs()).max()) if bool(nz.any()) else 0.0
    return float(d.max()), rel


def head_and_feats(g: torch.Generator, b: int, c: int, skew: float, dtype=F64):
    head = nn.Linear(1024, c).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(c, 1024, generator=g, dtype=dtype) * 0.05)
        head.bias.copy_(torch.randn(c, generator=g, dtype=dtype) * 0.1)
    y = torch.randint(0, c, (b,), generator=g)
    f1 = torch.randn(b, 512, generator=g, dtype=dtype) * skew
    f2 = torch.randn(b, 512, generator=g, dtype=dtype)
    return head, f1, f2, y


def official_scores(head: nn.Linear, f1, f2, y):
    src = official_lines(CLASSIFIER, 112, 143, "performance_2=sum(")
    me = types.SimpleNamespace(
        fusion_model=types.SimpleNamespace(fxy=head), softmax=nn.Softmax(dim=1)
    )
    ns = {"self": me, "out_1": f1, "out_2": f2, "label": y, "torch": torch}
    exec(compile(src, f"{CLASSIFIER}:112-143", "exec"), ns)
    return ns["performance_1"], ns["performance_2"]


def gradmod_scores(head: nn.Linear, f1, f2, y) -> torch.Tensor:
    binding = Binding(
        names=("audio", "visual"),
        groups={"audio": [], "visual": []},
        classifiers=None,
        fusion_module=head,
        fusion=None,
        mode="parameter",
        device=torch.device("cpu"),
    )
    z = gradmod.OGMGE().unimodal_logits(binding, [f1, f2])
    return torch.stack([GF.true_class_probability(t.to(F64), y).sum() for t in z])


def scores_stage(g: torch.Generator) -> None:
    d = []
    for case in range(40):
        head, f1, f2, y = head_and_feats(g, 16, 31, [0.5, 1.0, 3.0, 10.0][case % 4])
        p1, p2 = official_scores(head, f1, f2, y)
        d.append(diff(gradmod_scores(head, f1, f2, y), [float(p1), float(p2)]))
    report("scores s_m (float64 features)", f"{CLASSIFIER.split('/')[-1]}:112-143", d)


def q_stage(g: torch.Generator, ns: dict) -> None:
    calcu_q = ns["calcu_q"]
    cases: dict[str, list] = {"random": [], "tie": [], "zero": [], "float32 scores": []}
    as_f32 = []  # the official q is a float32 tensor: gradmod's q rounded to float32
    for case in range(400):
        q_base = [0.5, 0.4, 0.3, 0.8][case % 4]
        lam = [0.5, 1.0, 0.0, 2.0][case % 4]
        s = (torch.rand(2, generator=g, dtype=F64) * 16).tolist()
        kind = "random"
        if case % 25 == 0:
            s, kind = [s[0], s[0]], "tie"
        elif case % 25 == 1:
            s, kind = [s[0], 0.0] if case % 2 else [0.0, 0.0], "zero"
        dtype = F64
        if case % 10 == 7:
            dtype, kind = torch.float32, "float32 scores"
        p = [torch.tensor(v, dtype=dtype) for v in s]
        q_off = calcu_q(p[0], p[1], q_base, fix_lambda=lam)
        q_gm = GF.opm_drop_probability(torch.stack(p).to(F64), q_base=q_base, lam=lam)
        cases[kind].append(diff(q_gm, q_off))
        as_f32.append(diff(q_gm.float(), q_off))
    for kind, d in cases.items():
        report(f"q ({kind})", f"{CLASSIFIER.split('/')[-1]}:58-72", d)
    report("q, gradmod's rounded to float32", f"{CLASSIFIER.split('/')[-1]}:58-72", as_f32)


def drop_stage(g: torch.Generator, ns: dict) -> None:
    """Masks (bit for bit), dropped features and their gradient, scores detached both sides."""
    modality_drop = ns["Modality_drop"]
    calcu_q = ns["calcu_q"]
    mask_equal = total = 0
    dfeat, dgrad = [], []
    for case in range(60):
        b = [4, 16, 32][case % 3]
        s = (torch.rand(2, generator=g, dtype=F64) * 16).tolist()
        q_off = calcu_q(torch.tensor(s[0]), torch.tensor(s[1]), 0.5, fix_lambda=0.5)
        q_gm = GF.opm_drop_probability(torch.tensor(s, dtype=F64), q_base=0.5, lam=0.5)
        f = [torch.randn(b, 512, generator=g, dtype=F64) for _ in range(2)]
        upstream = [torch.randn(b, 512, generator=g, dtype=F64) for _ in range(2)]
        seed = 1000 + case
        # official (p_exe = 1: its NumPy draw u >= 0 always executes)
        fo = [t.clone().requires_grad_() for t in f]
        md = modality_drop(dim_list=torch.tensor([512, 512]), p_exe=1.0, device="cpu")
        np.random.seed(seed)
        torch.manual_seed(seed)
        cleaned, flag = md.execute_drop(fo, q_off)
        assert bool(flag.all()), "the official rule never drops a sample's every modality"
        sum((c * u).sum() for c, u in zip(cleaned, upstream, strict=True)).backward()
        # gradmod
        fg = [t.clone().requires_grad_() for t in f]
        out = GF.opm_drop(fg, q_gm, generator=torch.Generator().manual_seed(seed), p_exe=1.0)
        sum((c * u).sum() for c, u in zip(out.features, upstream, strict=True)).backward()
        # the official mask, recovered from which samples it zeroed
        off_keep = torch.stack([(c != 0).any(dim=1) for c in cleaned])
        total += 1
        mask_equal += int(torch.equal(off_keep, out.keep))
        dfeat.append(diff(torch.stack(out.features).detach(), torch.stack(cleaned).detach()))
        dgrad.append(diff(torch.stack([t.grad for t in fg]), torch.stack([t.grad for t in fo])))
    print(
        f"{'masks (seed s both sides)':34s} vs {'Classifier.py:31-55':28s} cases {total:4d}  "
        f"bit-identical {mask_equal}/{total}"
    )
    report("dropped features", "Classifier.py:9-55", dfeat)
    report("gradient to the features", "Classifier.py:9-55", dgrad)


def leak_stage(g: torch.Generator, ns: dict) -> None:
    """The official whole forward with scores in the graph, against detached scores."""
    modality_drop = ns["Modality_drop"]
    calcu_q = ns["calcu_q"]
    rel_leak: list[list[float]] = [[], []]
    d_clean, as_reg = [], []
    for case in range(20):
        b = 32
        head, f1, f2, y = head_and_feats(g, b, 31, [2.0, 4.0, 8.0, 16.0][case % 4])
        seed = 2000 + case

        def official(detach_scores: bool, head=head, f1=f1, f2=f2, y=y, seed=seed):
            fo = [f1.clone().requires_grad_(), f2.clone().requires_grad_()]
            p1, p2 = official_scores(head, fo[0], fo[1], y)
            if detach_scores:
                p1, p2 = p1.detach(), p2.detach()
            q = calcu_q(p1, p2, 0.5, fix_lambda=0.5)
            md = modality_drop(dim_list=torch.tensor([512, 512]), p_exe=1.0, device="cpu")
            np.random.seed(seed)
            torch.manual_seed(seed)
            cleaned, _ = md.execute_drop(fo, q)
            out = head(torch.cat(cleaned, dim=1))
            F.cross_entropy(out, y).backward()
            return [t.grad.clone() for t in fo]

        full, clean = official(False), official(True)
        # the leak is the gradient of theta^2 / 2 (theta = width-weighted mean q, scores in the
        # graph): custom_autograd hands theta back as d loss / d theta
        fr = [f1.clone().requires_grad_(), f2.clone().requires_grad_()]
        q_graph = calcu_q(*official_scores(head, fr[0], fr[1], y), 0.5, fix_lambda=0.5)
        (((q_graph[0] + q_graph[1]) / 2) ** 2 / 2).backward()
        as_reg.append(
            diff(torch.stack(full) - torch.stack(clean), torch.stack([t.grad for t in fr]))
        )
        fg = [f1.clone().requires_grad_(), f2.clone().requires_grad_()]
        s = gradmod_scores(head, fg[0], fg[1], y)
        q = GF.opm_drop_probability(s, q_base=0.5, lam=0.5)
        out = GF.opm_drop(fg, q, generator=torch.Generator().manual_seed(seed), p_exe=1.0)
        F.cross_entropy(head(torch.cat(out.features, dim=1)), y).backward()
        d_clean.append(diff(torch.stack([t.grad for t in fg]), torch.stack(clean)))
        for m in range(2):
            rel_leak[m].append(float((full[m] - clean[m]).norm() / clean[m].norm()))
    report("grad, official w/ detached scores", "Classifier.py:9-143", d_clean)
    report("official leak vs grad of theta^2/2", "Classifier.py:9-143", as_reg)
    for m, name in enumerate(("out_1", "out_2")):
        print(
            f"official leak on {name}: |g_full - g_detached| / |g_detached| over "
            f"{len(rel_leak[m])} cases: median {np.median(rel_leak[m]):.3f}, max "
            f"{max(rel_leak[m]):.3f}"
        )


def ogm_stage(g: torch.Generator) -> None:
    src = official_lines(MAIN, 118, 152, "coeff_2=1-tanh(cfg.alpha*relu(radio_2))")
    code = compile(src, f"{MAIN}:118-152", "exec")
    for plus in (False, True):
        d, differs_cvpr, ties, off_zero = [], 0, 0, 0
        for case in range(200):
            alpha = [0.8, 1.0, 0.1, 2.0][case % 4]
            s = (torch.rand(2, generator=g, dtype=F64) * 16).tolist()
            if case % 20 == 0:
                s = [s[0], s[0]]
                ties += 1
            p = torch.tensor(s, dtype=F64)
            ns = dict(
                performance_1=p[0].clone(),
                performance_2=p[1].clone(),
                cfg=argparse.Namespace(use_OGM_plus=plus, alpha=alpha),
                tanh=nn.Tanh(),
                relu=nn.ReLU(inplace=True),
            )
            exec(code, ns)
            off = [float(ns["coeff_1"]), float(ns["coeff_2"])]
            k = GF.ogm_tpami_coefficients(p, alpha=alpha, variant="boost" if plus else "slow")
            d.append(diff(k, off))
            off_zero += int(0.0 in off and bool((k > 0).all()))
            if not plus:
                cvpr = GF.ogm_ge_coefficients(p, alpha=alpha)
                differs_cvpr += int(diff(cvpr, off)[0] > 1e-12)
        name = "OGM plus (variant boost)" if plus else "OGM (variant slow)"
        report(name, f"{MAIN.split('/')[-1]}:118-152", d)
        if not plus:
            print(
                f"  official k rounds to exactly 0 (gradmod 2*sigmoid(-2x) > 0) in {off_zero} "
                f"cases; gradmod's CVPR ogm_ge_coefficients differs from the TPAMI code in "
                f"{differs_cvpr} of {len(d)} cases, all exact ties ({ties})"
            )


def vector(ns: dict) -> None:
    """docs/methods/opm.md's test vector, computed by the official lines only."""
    y = torch.tensor([0, 1, 2, 1])
    za = torch.tensor(
        [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 1.2, 0.0]], dtype=F64
    )
    zv = torch.tensor(
        [[0.3, 0.2, 0.1], [0.0, 0.4, 0.5], [0.6, 0.1, 0.2], [0.2, 0.3, 0.1]], dtype=F64
    )
    src = official_lines(CLASSIFIER, 142, 143, "performance_2=sum(")
    sc = {"self": types.SimpleNamespace(softmax=nn.Softmax(dim=1)), "t1": za, "t2": zv}
    sc["label"] = y
    exec(compile(src, f"{CLASSIFIER}:142-143", "exec"), sc)
    p1, p2 = sc["performance_1"], sc["performance_2"]
    print(f"vector: s = [{float(p1):.9f}, {float(p2):.9f}]  (Classifier.py:142-143)")
    q = ns["calcu_q"](p1, p2, 0.5, fix_lambda=0.5)
    print(f"vector: q_base 0.5, lam 0.5: q = {[f'{float(v):.9f}' for v in q]}  (float32, :58-72)")
    f1 = torch.arange(1.0, 13.0, dtype=F64).reshape(4, 3) / 10
    f2 = torch.ones(4, 3, dtype=F64)
    md = ns["Modality_drop"](dim_list=torch.tensor([512, 512]), p_exe=1.0, device="cpu")
    np.random.seed(0)
    torch.manual_seed(0)
    cleaned, flag = md.execute_drop([f1, f2], q)
    theta = float((512 * q[0] + 512 * q[1]) / 1024)
    print(f"vector: theta = {theta:.9f}, 1/(1-theta) = {1 / (1 - theta):.9f}")
    print(f"vector: seed 0, p_exe 1: features[0] = {cleaned[0].tolist()}")
    print(f"vector: features[1] = {cleaned[1].tolist()}, update_flag = {flag.tolist()}")
    src = official_lines(MAIN, 118, 152, "coeff_2=1-tanh(cfg.alpha*relu(radio_2))")
    for plus, alpha in ((False, 0.8), (False, 1.0), (True, 0.8)):
        o = dict(
            performance_1=p1.clone(),
            performance_2=p2.clone(),
            cfg=argparse.Namespace(use_OGM_plus=plus, alpha=alpha),
            tanh=nn.Tanh(),
            relu=nn.ReLU(inplace=True),
        )
        exec(compile(src, f"{MAIN}:118-152", "exec"), o)
        print(
            f"vector: OGM plus={plus} alpha={alpha}: k = [{float(o['coeff_1']):.9f}, "
            f"{float(o['coeff_2']):.9f}]  (main.py:118-152)"
        )


if __name__ == "__main__":
    import sys

    torch.set_num_threads(1)
    if "--vector" in sys.argv[1:]:
        vector(official_module())
        sys.exit(0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    ns = official_module()
    scores_stage(g)
    q_stage(g, ns)
    drop_stage(g, ns)
    leak_stage(g, ns)
    ogm_stage(g)
    vector(ns)
    finish()
