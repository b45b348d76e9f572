"""gradmod.functional.mmpareto_combine against the OFFICIAL MMPareto code, executed verbatim.

The official lines are read from the fetched sources (GeWu-Lab/MMPareto_ICML2024, env var
MMPARETO_SRC pointing at the extracted repository root) and exec'd; the official
``MinNormSolver`` is imported from ``code/min_norm_solvers.py``. Nothing of the official code is
copied here.

Two checks:

1. **Formula** — ``code/MMPareto.py:149-207`` (cosine per encoder, equal weights or
   ``MinNormSolver.find_min_norm_element``, ``gamma=1.5``, the per-tensor magnitude rescaling)
   exec'd on seeded random gradient lists for two encoders ("audio", "visual"), with the
   per-name gradient dicts built as ``code/MMPareto.py:117-145`` builds them (including the
   ``"concat"`` entry) and ``param.grad`` set to the summed gradient g + u where the official
   step runs ``loss.backward()`` (line 181). Compared with
   ``mmpareto_combine(g, u, gamma=1.5, rescale="tensor", policy="official")``.
2. **One training step** — ``code/MMPareto.py:74-84`` and ``93-207`` (the parameter selection and
   the body of the training loop up to, not including, ``optimizer.step()``) exec'd on a small
   audio-visual model with the official parameter naming (``audio_net``, ``visual_net``,
   ``head``, ``head_audio``, ``head_video``) and real autograd gradients; gradmod's side takes
   g and u with ``torch.autograd.grad`` on an identical copy and combines them. Half of the
   cases flip the fusion head's audio (or visual) block against the unimodal head so that the
   two gradients conflict.

Edge cases (zero, identical, opposite gradients) are printed one by one.

    MMPARETO_SRC=~/official/mmpareto PYTHONPATH=<gradmod checkout> python mmpareto_formula.py
"""

from __future__ import annotations

import copy
import os
import re
import sys
import textwrap

import torch
import torch.nn.functional as F
from _judge import finish, judge
from torch import nn

import gradmod.functional as GF

REL = "code/MMPareto.py"


def official_block(first: int, last: int, must_contain: str):
    path = os.path.join(os.environ["MMPARETO_SRC"], REL)
    with open(path) as f:
        lines = f.read().splitlines()[first - 1 : last]
    src = textwrap.dedent("\n".join(lines))
    assert must_contain in src, f"{REL}:{first}-{last} does not hold {must_contain!r}"
    return compile(src, f"{REL}:{first}-{last}", "exec"), f"{REL}:{first}-{last}"


sys.path.insert(0, os.path.join(os.environ["MMPARETO_SRC"], "code"))
from min_norm_solvers import MinNormSolver  # noqa: E402  (the official solver)

COMBINE, COMBINE_AT = official_block(149, 207, "gamma=1.5")
SELECT, SELECT_AT = official_block(74, 84, "record_names_visual.append")
STEP, STEP_AT = official_block(93, 207, "loss.backward(retain_graph=True)")


# ---------------------------------------------------------------- 1. the formula block
class Encoders(nn.Module):
    """Parameters named like the official model's (``audio_net.*``, ``visual_net.*``, ``head.*``)."""

    def __init__(self, shapes: dict[str, list[tuple[int, ...]]]) -> None:
        super().__init__()
        self.audio_net = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes["audio"]])
        self.visual_net = nn.ParameterList([nn.Parameter(torch.zeros(s)) for s in shapes["visual"]])
        self.head = nn.Linear(2, 2)


class SummedLoss:
    """Stands for ``loss_mm + loss_a + loss_v``: ``backward()`` leaves g + u in ``param.grad``."""

    def __init__(self, model: Encoders, g: dict, u: dict) -> None:
        self.model, self.g, self.u = model, g, u

    def __add__(self, other: object) -> SummedLoss:
        return self

    def backward(self) -> None:
        for mod, net in (("audio", self.model.audio_net), ("visual", self.model.visual_net)):
            for p, gi, ui in zip(net, self.g[mod], self.u[mod], strict=True):
                p.grad = gi + ui
        self.model.head.weight.grad = torch.zeros_like(self.model.head.weight)


def official_combine(g: dict, u: dict) -> tuple[dict, dict]:
    """The official lines 149-207 on the gradients g[mod], u[mod] (lists of float32 tensors)."""
    model = Encoders({m: [tuple(t.shape) for t in g[m]] for m in ("audio", "visual")})
    names = {m: [n for n, _ in model.named_parameters() if n.startswith(f"{m}_net.")] for m in g}
    grads = {}
    for mod, task in (("audio", "audio"), ("visual", "visual")):
        d = {"both": {}, task: {}}
        for key, src in (("both", g[mod]), (task, u[mod])):
            for n, t in zip(names[mod], src, strict=True):
                d[key][n] = t.clone()
            d[key]["concat"] = torch.cat([d[key][n].flatten() for n in names[mod]])
        grads[mod] = d
    loss = SummedLoss(model, g, u)
    ns = dict(
        grads_audio=grads["audio"],
        grads_visual=grads["visual"],
        F=F,
        torch=torch,
        re=re,
        MinNormSolver=MinNormSolver,
        model=model,
        loss_mm=loss,
        loss_a=loss,
        loss_v=loss,
    )
    exec(COMBINE, ns)
    out = {
        "audio": [p.grad for p in model.audio_net],
        "visual": [p.grad for p in model.visual_net],
    }
    k = {"audio": [float(x) for x in ns["audio_k"]], "visual": [float(x) for x in ns["visual_k"]]}
    return out, k


def gradmod_combine(g: list, u: list, policy: str = "official") -> GF.ParetoCombination:
    return GF.mmpareto_combine(g, u, gamma=1.5, rescale="tensor", policy=policy)  # type: ignore[arg-type]


SHAPES = [(6, 4), (6,), (3, 6), (3,), ()]


def random_case(gen: torch.Generator, kind: str) -> tuple[list, list]:
    g = [torch.randn(s, generator=gen) * float(torch.rand((), generator=gen) * 3) for s in SHAPES]
    noise = [torch.randn(s, generator=gen) for s in SHAPES]
    scale = float(torch.rand((), generator=gen) * 4 + 0.1)
    if kind == "conflict":  # u mostly against g: <g, u> < 0
        u = [-scale * x + 0.3 * n for x, n in zip(g, noise, strict=True)]
    elif kind == "agree":
        u = [scale * x + 0.3 * n for x, n in zip(g, noise, strict=True)]
    else:  # independent (either branch)
        u = [scale * n for n in noise]
    return g, u


def rel_diff(a: list, b: list) -> tuple[float, float]:
    ad = max(
        float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        for x, y in zip(a, b, strict=True)
    )
    ref = max(float(y.double().abs().max()) for y in b)
    return ad, ad / ref if ref > 0 else ad


def formula(gen: torch.Generator) -> None:
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for case in range(120):
        kind = ("conflict", "agree", "independent")[case % 3]
        if case % 12 == 11:  # large magnitudes (a loss scale); see edge_cases for 65536
            kind += " x16"
        g, u = {}, {}
        for mod in ("audio", "visual"):
            g[mod], u[mod] = random_case(gen, kind.split()[0])
            if "x16" in kind:
                g[mod] = [x * 16 for x in g[mod]]
                u[mod] = [x * 16 for x in u[mod]]
        off, k = official_combine(g, u)
        for mod in ("audio", "visual"):
            res = gradmod_combine(g[mod], u[mod])
            exact = gradmod_combine([x.double() for x in g[mod]], [x.double() for x in u[mod]])
            branch = "conflict" if bool(res.conflict) else "no conflict"
            wd = max(abs(float(res.weights[j]) - k[mod][j]) for j in range(2))
            ad, rd = rel_diff(res.grads, off[mod])
            rows.setdefault(f"{branch}{' x16' if 'x16' in kind else ''}", []).append(
                (
                    ad,
                    rd,
                    wd,
                    rel_diff(off[mod], exact.grads)[1],
                    rel_diff(res.grads, exact.grads)[1],
                )
            )
    for name, r in sorted(rows.items()):
        judge(f"formula {name}", max(x[1] for x in r), 1e-3)  # relative: float32 rounding
        print(
            f"formula {name:22s} vs {COMBINE_AT:26s} encoders {len(r):3d}  "
            f"max|diff| {max(x[0] for x in r):.2e}  max rel {max(x[1] for x in r):.2e}  "
            f"max|weight diff| {max(x[2] for x in r):.2e}"
        )
        print(
            f"        {'':22s}    rounding, max rel vs the same inputs in float64: "
            f"official {max(x[3] for x in r):.2e}, gradmod {max(x[4] for x in r):.2e}"
        )


def edge_cases() -> None:
    t = torch.tensor
    g0 = [t([1.0, 2.0]), t([0.5])]
    cases = {
        "conflict (test vector)": (g0, [t([-2.0, -1.0]), t([3.0])]),
        "agree (test vector)": ([t([1.0, 0.0]), t([1.0])], [t([1.0, 1.0]), t([-0.5])]),
        "zero multimodal": ([torch.zeros(2), torch.zeros(1)], [t([-2.0, -1.0]), t([3.0])]),
        "zero unimodal": (g0, [torch.zeros(2), torch.zeros(1)]),
        "both zero": ([torch.zeros(2), torch.zeros(1)], [torch.zeros(2), torch.zeros(1)]),
        "identical": (g0, [x.clone() for x in g0]),
        "opposite, u = -g": (g0, [-x for x in g0]),
        "opposite, u = -2g": (g0, [-2 * x for x in g0]),
        "opposite, u = -3g": (g0, [-3 * x for x in g0]),
    }
    # the official solver keeps its solution only when its cost is below 1e8 (min_norm_solvers.py:38,
    # 55-57): a conflict whose min-norm element has a squared norm >= 5e7 (the cost counts it twice:
    # the per-name dict values include the "concat" entry) raises UnboundLocalError
    g, u = (
        [x * 65536 for x in cases["conflict (test vector)"][0]],
        [x * 65536 for x in cases["conflict (test vector)"][1]],
    )
    try:
        official_combine({"audio": g, "visual": g}, {"audio": u, "visual": u})
        print("edge conflict x 65536: the official code ran")
    except UnboundLocalError as e:
        res = gradmod_combine(g, u)
        print(
            f"edge conflict (test vector) x 65536 (a GradScaler scale): official raises "
            f"UnboundLocalError ({e}); gradmod weights {[round(float(x), 6) for x in res.weights]} "
            f"(unchanged), grads / 65536 {[[round(v / 65536, 6) for v in x.reshape(-1).tolist()] for x in res.grads]}"
        )
    # per-tensor rescaling can turn the common descent direction into one that conflicts
    g, u = [t([-1.0, -1.0]), t([0.0])], [t([3.0, 3.0]), t([-1.0])]
    off, _ = official_combine({"audio": g, "visual": g}, {"audio": u, "visual": u})
    enc = GF.mmpareto_combine(g, u, rescale="encoder")
    dot = lambda a, b: sum(float((x * y).sum()) for x, y in zip(a, b, strict=True))  # noqa: E731
    print(
        f"edge per-tensor rescale, g = [[-1, -1], [0]], u = [[3, 3], [-1]]: official grads "
        f"{[x.tolist() for x in off['audio']]}, <out, g> {dot(off['audio'], g):.4g}, "
        f"<out, u> {dot(off['audio'], u):.4g} | gradmod rescale='encoder' <out, g> "
        f"{dot(enc.grads, g):.4g}, <out, u> {dot(enc.grads, u):.4g}"
    )
    fmt = lambda xs: [[round(v, 6) for v in x.double().reshape(-1).tolist()] for x in xs]  # noqa: E731
    for name, (g, u) in cases.items():
        # the official block handles two encoders at once: the same pair on both
        off, k = official_combine({"audio": g, "visual": g}, {"audio": u, "visual": u})
        mine = gradmod_combine(g, u)
        safe = gradmod_combine(g, u, policy="safe")
        print(
            f"edge {name}: official weights {[round(x, 6) for x in k['audio']]} grads "
            f"{fmt(off['audio'])} | gradmod official {[round(float(x), 6) for x in mine.weights]} "
            f"{fmt(mine.grads)} | gradmod safe {fmt(safe.grads)}"
        )


# ---------------------------------------------------------------- 2. one training step
class AV(nn.Module):
    """The official AVClassifier's layout (models/models.py), with small MLP encoders."""

    def __init__(self, da: int, dv: int, h: int, c: int) -> None:
        super().__init__()
        self.audio_net = nn.Sequential(nn.Linear(da, 16), nn.Tanh(), nn.Linear(16, h))
        self.visual_net = nn.Sequential(nn.Linear(dv, 16), nn.Tanh(), nn.Linear(16, h))
        self.head = nn.Linear(2 * h, c)
        self.head_audio = nn.Linear(h, c)
        self.head_video = nn.Linear(h, c)

    def forward(self, audio: torch.Tensor, visual: torch.Tensor):
        a, v = self.audio_net(audio), self.visual_net(visual)
        return self.head(torch.cat((a, v), 1)), self.head_audio(a), self.head_video(v)


class ZeroGrad:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)


def training_step(gen: torch.Generator) -> None:
    stats = {"conflict": [], "no conflict": []}
    for case in range(40):
        torch.manual_seed(case)
        model = AV(7, 5, 6, 4)
        with torch.no_grad():  # conflicting objectives: the fused head reads a block backwards
            if case % 2 == 1:
                h = 6
                mod = (case // 2) % 3  # 0: audio, 1: visual, 2: both
                if mod in (0, 2):
                    model.head.weight[:, :h] = -model.head_audio.weight
                if mod in (1, 2):
                    model.head.weight[:, h:] = -model.head_video.weight
        ref = copy.deepcopy(model)
        spec = torch.randn(16, 7, generator=gen)
        images = torch.randn(16, 5, generator=gen)
        label = torch.randint(0, 4, (16,), generator=gen)

        ns = dict(model=model)
        exec(SELECT, ns)
        ns.update(
            optimizer=ZeroGrad(model),
            spec=spec,
            images=images,
            label=label,
            device=torch.device("cpu"),
            criterion=nn.CrossEntropyLoss(),
            loss_value_mm=[],
            loss_value_a=[],
            loss_value_v=[],
            F=F,
            torch=torch,
            re=re,
            MinNormSolver=MinNormSolver,
        )
        exec(STEP, ns)

        out, out_a, out_v = ref(spec.float(), images.float())
        ce = nn.CrossEntropyLoss()
        l_mm, l_a, l_v = ce(out, label), ce(out_a, label), ce(out_v, label)
        for mod, l_u in (("audio", l_a), ("visual", l_v)):
            ps = list(getattr(ref, f"{mod}_net").parameters())
            g = torch.autograd.grad(l_mm, ps, retain_graph=True)
            u = torch.autograd.grad(l_u, ps, retain_graph=True)
            res = gradmod_combine(list(g), list(u))
            off = [p.grad for p in getattr(model, f"{mod}_net").parameters()]
            ad, rd = rel_diff(res.grads, off)
            k = [float(x) for x in ns[f"{mod}_k"]]
            wd = max(abs(float(res.weights[j]) - k[j]) for j in range(2))
            stats["conflict" if bool(res.conflict) else "no conflict"].append((ad, rd, wd))
        # the heads keep the plain gradient of the summed loss (no modulation)
        for n, p in model.named_parameters():
            if n.startswith("head"):
                loss = {"head": l_mm, "head_audio": l_a, "head_video": l_v}[n.split(".")[0]]
                (gp,) = torch.autograd.grad(
                    loss, [dict(ref.named_parameters())[n]], retain_graph=True
                )
                hd = float((p.grad - gp).abs().max())
                stats.setdefault("heads (unmodulated)", []).append((hd, hd, 0.0))
    where = f"{SELECT_AT} + {STEP_AT}"
    for name, r in stats.items():
        judge(f"step {name}", max(x[1] for x in r), 1e-4)
        print(
            f"step    {name:22s} vs {where:26s} encoders {len(r):3d}  "
            f"max|diff| {max(x[0] for x in r):.2e}  max rel {max(x[1] for x in r):.2e}  "
            f"max|weight diff| {max(x[2] for x in r):.2e}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    formula(gen)
    training_step(gen)
    edge_cases()
    finish()
    print(f"official MinNormSolver from {os.environ['MMPARETO_SRC']}/code/min_norm_solvers.py")
