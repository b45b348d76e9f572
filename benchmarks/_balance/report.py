"""The Markdown summary of the run records (``summary.md``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .methods import gradient_form
from .stats import CONFIDENCE, GAP_MIN, Paired, gap_closed, mean_sd, paired

__all__ = [
    "compact_tables",
    "format_test",
    "group",
    "method_order",
    "summary_markdown",
    "table",
]

Record = dict[str, Any]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with padded columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(row, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(header), sep, *(fmt(r) for r in rows)])


def group(records: Sequence[Record]) -> dict[tuple[str, str], dict[str, list[Record]]]:
    """``(setting, optimizer) -> method -> records sorted by seed``, in first-seen order."""
    out: dict[tuple[str, str], dict[str, list[Record]]] = {}
    for r in records:
        out.setdefault((r["setting"], r["optimizer"]), {}).setdefault(r["method"], []).append(r)
    for methods in out.values():
        for rs in methods.values():
            rs.sort(key=lambda r: r["seed"])
    return out


def method_order(methods: dict[str, list[Record]]) -> list[str]:
    """``alone:*`` first, then ``ensemble``, then the variants in the order they were run."""
    alone = [m for m in methods if m.startswith("alone:")]
    rest = [m for m in methods if m not in alone and m != "ensemble"]
    return [*alone, *(["ensemble"] if "ensemble" in methods else []), *rest]


def _pct(xs: Sequence[float]) -> str:
    m, sd = mean_sd(xs)
    return f"{100 * m:.2f}" if math.isnan(sd) else f"{100 * m:.2f} ± {100 * sd:.2f}"


def _p_value(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def format_test(p: Paired, decimals: int) -> str:
    """``t=+8.2, p<0.001, CI +2.93..+5.17``: the t statistic, its two-sided p-value and the
    confidence interval of the mean difference (``decimals`` places, as its mean); "" for a
    single pair (no test)."""
    if p.n < 2:
        return ""
    low, high = p.ci
    return f"t={p.t:+.1f}, {_p_value(p.p)}, CI {low:+.{decimals}f}..{high:+.{decimals}f}"


def _pairs(base: Sequence[Record], other: Sequence[Record]) -> list[tuple[Record, Record]]:
    """``(base, other)`` records of the seeds both have, in ``other``'s order."""
    by_seed = {r["seed"]: r for r in base}
    return [(by_seed[r["seed"]], r) for r in other if r["seed"] in by_seed]


def _diff(base: Sequence[Record], other: Sequence[Record], key: str, sub: str | None) -> str:
    """Paired difference ``other - base`` in points over the seeds both have: mean ± sd and
    its paired t test (:func:`format_test`)."""

    def value(r: Record) -> float:
        return float(r[key] if sub is None else r[key][sub])

    pairs = _pairs(base, other)
    if not pairs:
        return "-"
    p = paired([100 * value(a) for a, _ in pairs], [100 * value(b) for _, b in pairs])
    if p.n < 2:
        return f"{p.mean:+.2f} (n=1)"
    return f"{p.mean:+.2f} ± {p.sd:.2f} ({format_test(p, 2)})"


def _mean(rs: Sequence[Record], key: str = "fused_acc") -> float:
    return mean_sd([float(r[key]) for r in rs])[0]


def _fused_table(methods: dict[str, list[Record]], names: Sequence[str]) -> str:
    joint, multi = methods.get("joint", []), methods.get("multiloss", [])
    ens = methods.get("ensemble", [])
    header = ["method", "fused test acc %"]
    header += [f"vs {base} (pts, t, p, CI)" for base in ("joint", "multiloss", "gradient form")]
    header += ["gap closed", *(f"share {m} %" for m in names)]
    header += ["train s"]
    rows = []
    for method in method_order(methods):
        rs = methods[method]
        closed = math.nan
        if joint and ens and not method.startswith("alone:"):
            closed = gap_closed(_mean(rs), _mean(joint), _mean(ens))
        shares = [
            _pct([r["share_acc"][m] for r in rs]) if rs[0]["share_acc"] else "-" for m in names
        ]
        rows.append(
            [
                method,
                _pct([r["fused_acc"] for r in rs]),
                _diff(joint, rs, "fused_acc", None) if joint and method != "joint" else "-",
                _diff(multi, rs, "fused_acc", None) if multi and method != "multiloss" else "-",
                _diff(methods[base], rs, "fused_acc", None)
                if (base := gradient_form(method)) is not None and base in methods
                else "-",
                "n/a" if math.isnan(closed) else f"{closed:+.2f}",
                *shares,
                f"{_mean(rs, 'wall_s'):.2f}",
            ]
        )
    return table(header, rows)


def _probe_table(methods: dict[str, list[Record]], names: Sequence[str]) -> str:
    header = ["method"]
    for m in names:
        header += [f"probe {m} %", f"{m} vs alone (pts, t, p, CI)"]
    alone = {m: methods.get(f"alone:{m}", []) for m in names}
    rows = [["alone", *(c for m in names for c in (_probe(alone[m], m), "-"))]]
    for method in method_order(methods):
        rs = methods[method]
        if method == "ensemble" or method.startswith("alone:"):
            continue
        cells = [method]
        for m in names:
            vs = _diff(alone[m], rs, "probe_acc", m) if alone[m] else "-"
            cells += [_probe(rs, m), vs]
        rows.append(cells)
    return table(header, rows)


def _probe(rs: Sequence[Record], m: str) -> str:
    return _pct([r["probe_acc"][m] for r in rs]) if rs else "-"


def _coefficient_table(methods: dict[str, list[Record]], names: Sequence[str]) -> str | None:
    rows = []
    for method in method_order(methods):
        rs = [r for r in methods[method] if r["coefficients"]]
        if not rs:
            continue
        cells = [method]
        for m in names:
            stats = [r["coefficients"][m] for r in rs]
            mean = mean_sd([s["mean"] for s in stats])[0]
            sd = mean_sd([s["sd"] for s in stats])[0]
            lo, hi = min(s["min"] for s in stats), max(s["max"] for s in stats)
            cells.append(f"{mean:.3f} ± {sd:.3f} [{lo:.3f}, {hi:.3f}]")
        rows.append(cells)
    if not rows:
        return None
    return table(["method", *(f"k {m}: mean ± sd [min, max]" for m in names)], rows)


def _section(setting: str, optimizer: str, methods: dict[str, list[Record]]) -> str:
    first = next(iter(methods.values()))[0]
    names: list[str] = first["modalities"]
    seeds = max(len(rs) for rs in methods.values())
    lr = first["optimizer_config"]
    opt = f"{optimizer} (lr {lr['lr']:g}" + (
        f", momentum {lr['momentum']:g})" if lr["momentum"] else ")"
    )
    parts = [
        f"### {setting} ({first['dataset']}), {opt}, {seeds} seed(s)",
        "",
        _fused_table(methods, names),
        "",
        "Frozen-encoder linear probes (test accuracy; `vs alone`: paired with the same encoder "
        "trained alone):",
        "",
        _probe_table(methods, names),
    ]
    coeffs = _coefficient_table(methods, names)
    if coeffs is not None:
        parts += ["", "Encoder gradient factors over training steps (mean over seeds):", "", coeffs]
    return "\n".join(parts)


def _overview(groups: dict[tuple[str, str], dict[str, list[Record]]]) -> str:
    variants: list[str] = []
    for methods in groups.values():
        for m in method_order(methods):
            if not m.startswith("alone:") and m not in variants:
                variants.append(m)
    rows = []
    for (setting, optimizer), methods in groups.items():
        cells = [setting, optimizer]
        cells += [
            _pct([r["fused_acc"] for r in methods[v]]) if v in methods else "-" for v in variants
        ]
        rows.append(cells)
    return table(["setting", "optimizer", *variants], rows)


LEGEND = f"""\
Accuracies in %, mean ± sd over seeds. Differences (`vs joint`, `vs multiloss`, `vs alone`, and
`vs gradient form`: an `@update` variant against the same method on the gradients) are paired by
seed (same split, initialisation and batch order): mean ± sd in points, then the paired t test
(`scipy.stats.ttest_rel`): t = mean / (sd / sqrt(n)) (df = n - 1), its two-sided p-value and the
{100 * CONFIDENCE:g} % confidence interval of the mean difference (`CI low..high`, points).
Identical differences over all seeds: sd 0, CI a point, t = ±inf with p = 0 (t = 0 with p = 1
if they are all 0); one seed: no test.
`gap closed` = (acc - joint) / (ensemble - joint) on the seed means, reported only where the
ensemble beats joint training by at least {100 * GAP_MIN:g} point(s), else n/a. `share m`: test
accuracy of the argmax of modality m's share of the linear fused head's logits
(h_m W_m^T + b / M). `train s`: mean wall time of one training run."""


def compact_tables(records: Sequence[Record]) -> str:
    """Per optimizer: methods x settings, each cell the fused test accuracy (mean over seeds)
    with its paired difference to joint training and its t test (:func:`format_test`; the
    README's tables)."""
    groups = group(records)
    settings = list(dict.fromkeys(s for s, _ in groups))
    optimizers = list(dict.fromkeys(o for _, o in groups))
    parts = []
    for opt in optimizers:
        methods: list[str] = []
        for s in settings:
            for m in method_order(groups.get((s, opt), {})):
                if not m.startswith("alone:") and m not in methods:
                    methods.append(m)
        rows = []
        for m in methods:
            cells = [m]
            for s in settings:
                ms = groups.get((s, opt), {})
                rs, joint = ms.get(m, []), ms.get("joint", [])
                if not rs:
                    cells.append("-")
                    continue
                acc = f"{100 * _mean(rs):.1f}"
                if m == "joint" or not joint:
                    cells.append(acc)
                    continue
                pairs = _pairs(joint, rs)
                p = paired(
                    [100 * float(a["fused_acc"]) for a, _ in pairs],
                    [100 * float(b["fused_acc"]) for _, b in pairs],
                )
                test = format_test(p, 1)
                cells.append(f"{acc} ({p.mean:+.1f}{', ' + test if test else ''})")
            rows.append(cells)
        parts += [
            f"**{opt.upper()}**: fused test accuracy %, mean over seeds (paired difference to "
            f"joint, t, p, {100 * CONFIDENCE:g} % CI)",
            "",
            table(["method", *settings], rows),
            "",
        ]
    return "\n".join(parts)


def summary_markdown(records: Sequence[Record], preamble: str = "") -> str:
    """The whole ``summary.md``: overview of fused accuracies, then one section per setting."""
    groups = group(records)
    parts = ["# Does balancing help?", ""]
    if preamble:
        parts += [preamble, ""]
    parts += [LEGEND, "", "## Fused test accuracy (%), overview", "", _overview(groups), ""]
    parts += ["## Paired with joint training, per optimizer", "", compact_tables(records)]
    parts += ["## Per setting and optimizer", ""]
    for (setting, optimizer), methods in groups.items():
        parts += [_section(setting, optimizer, methods), ""]
    return "\n".join(parts)
