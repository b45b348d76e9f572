"""DistributedDataParallel (gloo, 2 CPU processes on 127.0.0.1) against a single-process reference.

Each rank gets its own slice of a global batch, of unequal sizes. The ranks record parameters,
coefficients and gradients; the test process then rebuilds every step in float64 on the
concatenated batch: coefficients from the global accuracy, encoder gradients = coefficient x
the gradient of the global mean loss, the fusion head's gradient plus CGGM's direction loss, and
the classifier gradients averaged over ranks.
"""

from __future__ import annotations

import copy
import math
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _models import F64, NAMES, FixedMethod, MultiModal, classifier, modality_of
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradmod

pytestmark = pytest.mark.slow

WORLD = 2
SIZES = (7, 4)  # unequal per-rank batch sizes
STEPS = 2
RHO, LAM, LR = 1.3, 0.2, 0.5
ACCUM = ((0.3, 1.7, -0.55), (1.25, 0.0, 0.6))  # fixed coefficients of the no_sync test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def global_batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES)
    xs = {
        k: torch.randn(n, d, generator=g, dtype=F64) for k, d in zip(NAMES, (5, 4, 3), strict=True)
    }
    y = torch.randint(0, 3, (n,), generator=g)
    return {k: v.to(dtype) for k, v in xs.items()}, y


def rank_slice(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def build() -> tuple[MultiModal, dict[str, nn.Module]]:
    torch.manual_seed(0)
    return MultiModal(), {n: classifier() for n in NAMES}


class LinearFusion(MultiModal):
    """MultiModal with one linear fusion head over the concatenated features."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(4 * len(NAMES), 3))


def build_linear() -> tuple[LinearFusion, dict[str, nn.Module]]:
    torch.manual_seed(0)
    return LinearFusion(), {n: nn.Linear(4, 3) for n in NAMES}


class WideLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.ModuleDict(
            {n: nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 4)) for n in "ab"}
        )
        self.head = nn.Linear(8, 3)

    def forward(self, xs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        feats = {n: self.enc[n](xs[n]) for n in "ab"}
        return self.head(torch.cat([feats["a"], feats["b"]], 1)), feats


def wide_batch(rank: int, dtype: torch.dtype = torch.float32) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(50 + rank)
    xs = {n: torch.randn(16, 64, generator=g, dtype=F64) for n in "ab"}
    xs["a"] = xs["a"] * 3.0
    return {k: v.to(dtype) for k, v in xs.items()}, torch.randint(0, 3, (16,), generator=g)


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


def _train_steps(
    rank: int, ddp: DDP, heads: dict[str, nn.Module], ctx: gradmod.ModulationContext
) -> list[dict]:
    """STEPS steps of SGD on this rank's slice; records state, coefficients and gradients.

    The loss is the rank's summed loss times WORLD / n: DDP's average then makes the result the
    gradient of the global mean loss, also with unequal per-rank batch sizes.
    """
    model = ddp.module
    opt = torch.optim.SGD([*model.parameters(), *ctx.classifier_parameters()], lr=LR)
    out = []
    n_total = sum(SIZES)
    for step in range(STEPS):
        rec: dict = {"model": snapshot(model), "heads": {n: snapshot(h) for n, h in heads.items()}}
        xs, y = global_batch(step)
        sl = rank_slice(rank)
        xs, y = {k: v[sl] for k, v in xs.items()}, y[sl]
        logits, feats = ddp(xs)
        loss = F.cross_entropy(logits, y, reduction="sum") * (WORLD / n_total)
        with ctx(features=feats, targets=y):
            loss.backward()
        rec["coefficients"] = ctx.coefficients
        rec["grads"] = grads_of(model)
        rec["head_grads"] = {n: grads_of(h) for n, h in heads.items()}
        out.append(rec)
        opt.step()
        opt.zero_grad()
    return out


def _run_cggm(rank: int, mode: str) -> list[dict]:
    model, clfs = build()
    ddp = DDP(model)
    ctx = gradmod.ModulationContext(
        ddp,
        clfs,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=gradmod.CGGM(rho=RHO, lam=LAM),
        fusion="head",
        mode=mode,  # type: ignore[arg-type]
    )
    return _train_steps(rank, ddp, clfs, ctx)


def _run_no_sync(rank: int) -> dict:
    model, _ = build()
    ddp = DDP(model)
    ctx = gradmod.ModulationContext(
        ddp, encoders={n: f"enc.{n}" for n in NAMES}, method=FixedMethod(ACCUM)
    )
    rec: dict = {"model": snapshot(model)}
    for step in range(2):
        xs, y = global_batch(10 + step)
        sl = rank_slice(rank)
        xs, y = {k: v[sl] for k, v in xs.items()}, y[sl]
        with ddp.no_sync() if step == 0 else _nullcontext():
            logits, feats = ddp(xs)
            loss = F.cross_entropy(logits, y)
            with ctx(features=feats, targets=y):
                loss.backward()
    rec["grads"] = grads_of(model)
    return rec


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def _refuses_classifiers_inside_ddp() -> list[str]:
    class WithHeads(MultiModal):
        def __init__(self) -> None:
            super().__init__()
            self.clfs = nn.ModuleDict({n: classifier() for n in NAMES})

    model = WithHeads()
    ddp = DDP(model)
    try:
        gradmod.ModulationContext(
            ddp, dict(model.clfs), encoders={n: f"enc.{n}" for n in NAMES}, fusion="head"
        )
    except gradmod.ConfigurationError as e:
        return e.problems
    return []


def _run_mlb(rank: int) -> list[dict]:
    """MLB(scale='official') with linear heads on a linear-fusion model, 2 steps of SGD."""
    model, heads = build_linear()
    ddp = DDP(model)
    ctx = gradmod.ModulationContext(
        ddp,
        heads,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=gradmod.MLB(alpha=0.8, scale="official"),
        fusion="head.0",
    )
    return _train_steps(rank, ddp, heads, ctx)


def _run_ogm(rank: int) -> dict:
    """OGM-GE on a wide two-modality model: noise statistics after DDP's average."""
    torch.manual_seed(0)
    model = WideLinear()
    rec: dict = {"model": snapshot(model)}
    ddp = DDP(model)
    ctx = gradmod.ModulationContext(
        ddp,
        encoders={"a": "enc.a", "b": "enc.b"},
        method=gradmod.OGMGE(alpha=0.5, seed=9),
        fusion="head",
    )
    xs, y = wide_batch(rank)
    logits, feats = ddp(xs)
    with ctx(features=feats, targets=y):
        F.cross_entropy(logits, y).backward()
    rec["coefficients"] = ctx.coefficients
    rec["grads"] = grads_of(model)
    return rec


def _run_update(rank: int) -> list[dict]:
    """MLB at the update level (heads outside DDP), Adam over one mixed param group."""
    model, heads = build_linear()
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    head_opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=1e-2)
    ctx = gradmod.ModulationContext(
        ddp,
        heads,
        encoders={n: f"enc.{n}" for n in NAMES},
        method=gradmod.MLB(alpha=0.8),
        act="update",
        optimizer=opt,
    )
    out = []
    n_total = sum(SIZES)
    for step in range(STEPS):
        xs, y = global_batch(step)
        sl = rank_slice(rank)
        xs, y = {k: v[sl] for k, v in xs.items()}, y[sl]
        logits, feats = ddp(xs)
        loss = F.cross_entropy(logits, y, reduction="sum") * (WORLD / n_total)
        with ctx(features=feats, targets=y):
            loss.backward()
        out.append({"coefficients": ctx.coefficients, "grads": grads_of(model)})
        opt.step()
        head_opt.step()
        opt.zero_grad()
        head_opt.zero_grad()
        out[-1]["after"] = snapshot(model)
    out.append({"init": snapshot(build_linear()[0])})
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    warnings.simplefilter("error")  # as pyproject's filterwarnings for the test process
    torch.set_num_threads(1)
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        result = {
            "parameter": _run_cggm(rank, "parameter"),
            "feature": _run_cggm(rank, "feature"),
            "no_sync": _run_no_sync(rank),
            "refused": _refuses_classifiers_inside_ddp(),
            "mlb": _run_mlb(rank),
            "ogm": _run_ogm(rank),
            "update": _run_update(rank),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ----------------------------------------------------------------------------- reference
def model64(state: dict[str, Tensor]) -> MultiModal:
    m = MultiModal().to(F64)
    m.load_state_dict(state)
    return m


def clf64(state: dict[str, Tensor]) -> nn.Module:
    c = classifier().to(F64)
    c.load_state_dict(state)
    return c


def reference_step(rec: dict, step: int, prev: list[float]) -> dict:
    xs, y = global_batch(step, F64)
    model = model64(rec["model"])
    clfs = {n: clf64(rec["heads"][n]) for n in NAMES}
    logits, feats = model(xs)
    F.cross_entropy(logits, y).backward()  # the global mean loss
    plain = {n: p.grad for n, p in model.named_parameters()}
    acc = []
    for n in NAMES:
        pred = clfs[n](feats[n].detach()).argmax(1)
        acc.append(
            sum(int(a == b) for a, b in zip(pred.tolist(), y.tolist(), strict=True)) / len(y)
        )
    pos = [max(a - p, 0.0) for a, p in zip(acc, prev, strict=True)]
    s = sum(pos)
    b = [(s - d) / s for d in pos] if s > 1e-6 else [2 / 3] * 3
    coeffs = [RHO * x for x in b]
    # classifier gradients: each rank's own mean loss, then the average over ranks
    clf_grads = {n: {k: torch.zeros_like(p) for k, p in clfs[n].named_parameters()} for n in NAMES}
    for r in range(WORLD):
        sl = rank_slice(r)
        total = sum(F.cross_entropy(clfs[n](feats[n].detach()[sl]), y[sl]) for n in NAMES)
        gs = torch.autograd.grad(total, [p for n in NAMES for p in clfs[n].parameters()])
        it = iter(gs)
        for n in NAMES:
            for k in clf_grads[n]:
                clf_grads[n][k] += next(it) / WORLD
    u = model.head[-1].weight.detach().clone().requires_grad_(True)
    terms = []
    for bm, n in zip(b, NAMES, strict=True):
        v = clfs[n][-1].weight.detach()
        terms.append(abs(bm) - bm * (u * v).sum() / (u.norm() * v.norm()))
    (g_u,) = torch.autograd.grad(LAM * torch.stack(terms).mean(), u)
    k = dict(zip(NAMES, coeffs, strict=True))
    grads = {}
    for name, g in plain.items():
        m = modality_of(name)
        grads[name] = g * k[m] if m is not None else g
    grads["head.2.weight"] = grads["head.2.weight"] + g_u
    return {"acc": acc, "coefficients": coeffs, "grads": grads, "head_grads": clf_grads}


def close(actual: Tensor, expected: Tensor, what: str) -> None:
    torch.testing.assert_close(actual.to(F64), expected, rtol=2e-5, atol=2e-6, msg=what)


@pytest.mark.parametrize("mode", ["parameter", "feature"])
def test_ddp_cggm_matches_single_process_reference(ranks: list[dict], mode: str) -> None:
    r0, r1 = ranks[0][mode], ranks[1][mode]
    prev = [0.0, 0.0, 0.0]
    for step in range(STEPS):
        a, b = r0[step], r1[step]
        # the ranks agree bit for bit: same parameters, coefficients and gradients
        for key in ("model",):
            assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
        assert torch.equal(a["coefficients"], b["coefficients"])
        for n in a["grads"]:
            assert torch.equal(a["grads"][n], b["grads"][n]), (step, n)
        for c in NAMES:
            for n in a["head_grads"][c]:
                assert torch.equal(a["head_grads"][c][n], b["head_grads"][c][n]), (step, c, n)
        ref = reference_step(a, step, prev)
        close(a["coefficients"], torch.tensor(ref["coefficients"], dtype=F64), f"step {step} k")
        for n, g in ref["grads"].items():
            close(a["grads"][n], g, f"step {step} {n}")
        for c in NAMES:
            for n, g in ref["head_grads"][c].items():
                close(a["head_grads"][c][n], g, f"step {step} classifiers[{c}].{n}")
        prev = ref["acc"]
    # the data is not degenerate: the coefficients differ between modalities
    assert len({round(x, 6) for x in r0[0]["coefficients"].tolist()}) > 1


def test_ddp_no_sync_accumulation(ranks: list[dict]) -> None:
    """Micro-batch 1 under no_sync (c1), micro-batch 2 synced (c2): mean over ranks of
    c1*g1_r + c2*g2_r, with g_i,r each rank's own mean-loss gradient."""
    a, b = ranks[0]["no_sync"], ranks[1]["no_sync"]
    for n in a["grads"]:
        assert torch.equal(a["grads"][n], b["grads"][n]), n
    model = model64(a["model"])
    expected: dict[str, Tensor] = {}
    for step, coeffs in enumerate(ACCUM):
        xs, y = global_batch(10 + step, F64)
        k = dict(zip(NAMES, coeffs, strict=True))
        for r in range(WORLD):
            sl = rank_slice(r)
            m = copy.deepcopy(model)
            logits, _ = m({n: v[sl] for n, v in xs.items()})
            F.cross_entropy(logits, y[sl]).backward()
            for name, p in m.named_parameters():
                mod = modality_of(name)
                g = p.grad * (k[mod] if mod is not None else 1.0) / WORLD
                expected[name] = expected[name] + g if name in expected else g
    for name, g in expected.items():
        close(a["grads"][name], g, name)


def test_classifiers_inside_the_ddp_module_are_refused(ranks: list[dict]) -> None:
    for r in ranks:
        assert len(r["refused"]) == 1 and "inside the DDP-wrapped model" in r["refused"][0]


# ------------------------------------------------------------------------ other methods
def mlb_reference(rec: dict, step: int) -> dict:
    """Global k from all-reduced probability sums; each rank's unimodal losses are its own
    mean, averaged over ranks like any DDP loss; official scaling of heads and fusion slices."""
    xs, y = global_batch(step, F64)
    model = LinearFusion().to(F64)
    model.load_state_dict(rec["model"])
    heads = {n: nn.Linear(4, 3).to(F64) for n in NAMES}
    for n in NAMES:
        heads[n].load_state_dict(rec["heads"][n])
    logits, feats = model(xs)
    probs = {n: F.softmax(heads[n](feats[n].detach()), 1).gather(1, y[:, None]) for n in NAMES}
    s = [float(probs[n].mean().detach()) for n in NAMES]
    k = [1 + math.tanh(0.8 * ((sum(s) - x) / (len(s) - 1) / x - 1)) for x in s]
    uni = sum(
        F.cross_entropy(heads[n](feats[n])[rank_slice(r)], y[rank_slice(r)]) / WORLD
        for n in NAMES
        for r in range(WORLD)
    )
    (F.cross_entropy(logits, y) + uni).backward()
    kk = dict(zip(NAMES, k, strict=True))
    grads = {}
    for name, p in model.named_parameters():
        m = modality_of(name)
        grads[name] = p.grad * kk[m] if m is not None else p.grad
    w = grads["head.0.weight"]
    grads["head.0.weight"] = torch.cat(
        [b * kk[n] for b, n in zip(w.split(4, dim=1), NAMES, strict=True)], 1
    )
    head_grads = {n: {pn: p.grad * kk[n] for pn, p in heads[n].named_parameters()} for n in NAMES}
    return {"k": k, "grads": grads, "head_grads": head_grads}


def test_ddp_mlb_matches_single_process_reference(ranks: list[dict]) -> None:
    r0, r1 = ranks[0]["mlb"], ranks[1]["mlb"]
    for step in range(STEPS):
        a, b = r0[step], r1[step]
        assert torch.equal(a["coefficients"], b["coefficients"])
        for n in a["grads"]:
            assert torch.equal(a["grads"][n], b["grads"][n]), (step, n)
        for c in NAMES:
            for n in a["head_grads"][c]:
                assert torch.equal(a["head_grads"][c][n], b["head_grads"][c][n]), (step, c, n)
        ref = mlb_reference(a, step)
        close(a["coefficients"], torch.tensor(ref["k"], dtype=F64), f"step {step} k")
        for n, g in ref["grads"].items():
            close(a["grads"][n], g, f"step {step} {n}")
        for c in NAMES:
            for n, g in ref["head_grads"][c].items():
                close(a["head_grads"][c][n], g, f"step {step} heads[{c}].{n}")
    assert len({round(x, 6) for x in r0[0]["coefficients"].tolist()}) > 1


def test_ddp_ogm_ge_noise_is_identical_across_ranks(ranks: list[dict]) -> None:
    """Identical noise on every rank survives DDP's average at full strength: the noise in the
    averaged gradient has the mean of the ranks' local stds (independent noise per rank would
    shrink it by sqrt(2))."""
    a, b = ranks[0]["ogm"], ranks[1]["ogm"]
    assert torch.equal(a["coefficients"], b["coefficients"])
    model = WideLinear().to(F64)
    model.load_state_dict(a["model"])
    batches = [wide_batch(r, F64) for r in range(WORLD)]
    # global scores: true-class probabilities of the fusion head's column blocks, summed
    scores = [0.0, 0.0]
    local: list[dict[str, Tensor]] = []
    for xs, y in batches:
        m = copy.deepcopy(model)
        logits, feats = m(xs)
        w, bias = m.head.weight, m.head.bias
        for i, n in enumerate("ab"):
            z = feats[n] @ w[:, 4 * i : 4 * i + 4].T + bias / 2
            scores[i] += float(F.softmax(z, 1).gather(1, y[:, None]).sum().detach())
        F.cross_entropy(logits, y).backward()
        local.append({pn: p.grad for pn, p in m.named_parameters()})
    ratio = scores[0] / scores[1]
    k_ref = [1 - math.tanh(0.5 * ratio), 1.0] if ratio > 1 else [1.0, 1 - math.tanh(0.5 / ratio)]
    close(a["coefficients"], torch.tensor(k_ref, dtype=F64), "k")
    k = dict(zip("ab", k_ref, strict=True))
    checked = 0
    for pn, g in a["grads"].items():
        assert torch.equal(g, b["grads"][pn])
        mean_g = sum(loc[pn] for loc in local) / WORLD
        m = modality_of(pn)
        if m is None:
            close(g, mean_g, pn)
            continue
        noise = g.double() - k[m] * mean_g
        sigma = sum(float(loc[pn].std()) + 1e-8 for loc in local) / WORLD
        if noise.numel() >= 1000:
            assert float(noise.std()) == pytest.approx(sigma, rel=0.06), pn
            checked += 1
    assert checked == 4


def test_ddp_update_level_ranks_identical_and_steps_scaled(ranks: list[dict]) -> None:
    """Same coefficients on every rank, so the same scaled update: ranks stay bit-identical.
    Each step equals Adam on the (DDP-averaged) gradients with modality m's lr times k_m."""
    r0, r1 = ranks[0]["update"], ranks[1]["update"]
    model = LinearFusion()
    model.load_state_dict(r0[-1]["init"])
    groups = [{"params": list(model.enc[n].parameters())} for n in NAMES]
    ref = torch.optim.Adam([*groups, {"params": list(model.head.parameters())}], lr=1e-2)
    for step in range(STEPS):
        a, b = r0[step], r1[step]
        assert torch.equal(a["coefficients"], b["coefficients"])
        for k in a["after"]:
            assert torch.equal(a["after"][k], b["after"][k]), (step, k)
        for name, p in model.named_parameters():
            p.grad = a["grads"][name].clone()
        for m, k in enumerate(a["coefficients"].tolist()):
            ref.param_groups[m]["lr"] = 1e-2 * k
        ref.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), a["after"][name], rtol=1e-5, atol=1e-7)
    assert len({round(x, 6) for x in r0[0]["coefficients"].tolist()}) > 1
