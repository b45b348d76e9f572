"""DistributedDataParallel (gloo, 2 CPU processes on 127.0.0.1) against a single-process reference.

Each rank gets its own slice of a global batch, of unequal sizes. The ranks record parameters,
coefficients and gradients; the test process then rebuilds every step in float64 on the
concatenated batch: coefficients from the global accuracy, encoder gradients = coefficient x
the gradient of the global mean loss, the fusion head's gradient plus CGGM's direction loss, and
the classifier gradients averaged over ranks.
"""

from __future__ import annotations

import copy
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


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


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
    opt = torch.optim.SGD([*model.parameters(), *ctx.classifier_parameters()], lr=LR)
    out = []
    n_total = sum(SIZES)
    for step in range(STEPS):
        rec: dict = {"model": snapshot(model), "clfs": {n: snapshot(c) for n, c in clfs.items()}}
        xs, y = global_batch(step)
        sl = rank_slice(rank)
        xs, y = {k: v[sl] for k, v in xs.items()}, y[sl]
        logits, feats = ddp(xs)
        # DDP averages over ranks: this makes the result the gradient of the global mean loss
        loss = F.cross_entropy(logits, y, reduction="sum") * (WORLD / n_total)
        with ctx(features=feats, targets=y):
            loss.backward()
        rec["coefficients"] = ctx.coefficients
        rec["grads"] = grads_of(model)
        rec["clf_grads"] = {n: grads_of(c) for n, c in clfs.items()}
        out.append(rec)
        opt.step()
        opt.zero_grad()
    return out


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
    clfs = {n: clf64(rec["clfs"][n]) for n in NAMES}
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
    return {"acc": acc, "coefficients": coeffs, "grads": grads, "clf_grads": clf_grads}


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
            for n in a["clf_grads"][c]:
                assert torch.equal(a["clf_grads"][c][n], b["clf_grads"][c][n]), (step, c, n)
        ref = reference_step(a, step, prev)
        close(a["coefficients"], torch.tensor(ref["coefficients"], dtype=F64), f"step {step} k")
        for n, g in ref["grads"].items():
            close(a["grads"][n], g, f"step {step} {n}")
        for c in NAMES:
            for n, g in ref["clf_grads"][c].items():
                close(a["clf_grads"][c][n], g, f"step {step} classifiers[{c}].{n}")
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
