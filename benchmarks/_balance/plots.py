"""PNG figures (matplotlib, Agg backend): accuracies, training dynamics, coefficient traces."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .report import group, method_order
from .stats import mean_sd

__all__ = ["plot_accuracy", "plot_coefficients", "plot_dynamics", "write_plots"]

Record = dict[str, Any]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _colours(methods: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per method (``alone:*`` grey), the same in every panel."""
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    fused = [m for m in methods if not m.startswith("alone:")]
    out: dict[str, Any] = {m: "0.4" for m in methods if m.startswith("alone:")}
    out.update({m: cmap(i % cmap.N) for i, m in enumerate(fused)})
    return out


def _bars(ax: Axes, labels: list[str], by_opt: dict[str, list[list[float]]]) -> None:
    """Grouped bars: one group per label, one bar per optimizer (mean, sd error bar)."""
    width = 0.8 / max(len(by_opt), 1)
    low = 100.0
    for k, (opt, columns) in enumerate(by_opt.items()):
        xs, means, sds = [], [], []
        for i, values in enumerate(columns):
            if values:
                mean, sd = mean_sd(values)
                xs.append(i + (k - (len(by_opt) - 1) / 2) * width)
                means.append(100 * mean)
                sds.append(0.0 if math.isnan(sd) else 100 * sd)
        ax.bar(xs, means, width, yerr=sds, label=opt, capsize=2)
        low = min([low, *(m - s for m, s in zip(means, sds, strict=True))])
    ax.set_ylim(bottom=max(0.0, low - 5.0))
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=7)
    ax.grid(axis="y", alpha=0.3)


def plot_accuracy(records: Sequence[Record], setting: str, path: Path) -> Path:
    """Fused test accuracy, and each modality's probe accuracy, per method and optimizer."""
    groups = {opt: g for (s, opt), g in group(records).items() if s == setting}
    first = next(iter(groups.values()))
    names: list[str] = next(iter(first.values()))[0]["modalities"]
    methods = method_order(first)
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(4.5 * (1 + len(names)), 4), squeeze=False)
    fused = {
        opt: [[r["fused_acc"] for r in g.get(m, [])] for m in methods] for opt, g in groups.items()
    }
    _bars(axes[0][0], methods, fused)
    axes[0][0].set_title(f"{setting}: fused test accuracy (%)", fontsize=9)
    axes[0][0].legend(fontsize=7)
    trained = [m for m in methods if m != "ensemble" and not m.startswith("alone:")]
    for j, name in enumerate(names, start=1):
        labels = [f"alone:{name}", *trained]
        probes = {
            opt: [[r["probe_acc"][name] for r in g.get(m, [])] for m in labels]
            for opt, g in groups.items()
        }
        _bars(axes[0][j], labels, probes)
        axes[0][j].set_title(f"linear probe on frozen encoder {name} (%)", fontsize=9)
    return _save(fig, path)


def _lines(
    ax: Axes, traces: Sequence[Record], key: str, name: str, colours: dict[str, Any]
) -> None:
    for tr in traces:
        series = tr.get(key, {}).get(name)
        if not series or all(math.isnan(v) for v in series):
            continue
        method = tr["method"]
        style = "--" if method.startswith("alone:") else "-"
        ax.plot(tr["steps"], series, style, color=colours[method], label=method, linewidth=1)
    ax.grid(alpha=0.3)


def plot_dynamics(traces: Sequence[Record], setting: str, optimizer: str, path: Path) -> Path:
    """Per modality: validation accuracy (share of the fused head; alone: own head), encoder
    gradient norm, cos(fused-loss, unimodal-share-loss) encoder gradients, over steps."""
    names = list(traces[0]["val_acc"]) if traces else []
    for tr in traces:
        names += [m for m in tr["val_acc"] if m not in names]
    rows = (
        ("val_acc", "val accuracy of {m}'s share"),
        ("grad_norm", "|grad| of encoder {m}"),
        ("cos_fused_unimodal", "cos(fused, unimodal) grad, {m}"),
    )
    colours = _colours([t["method"] for t in traces])
    fig, axes = plt.subplots(3, len(names), figsize=(4.5 * len(names), 9), squeeze=False)
    for i, (key, title) in enumerate(rows):
        for j, m in enumerate(names):
            ax = axes[i][j]
            _lines(ax, [t for t in traces if m in t.get(key, {})], key, m, colours)
            ax.set_title(title.format(m=m), fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if key == "grad_norm":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"training dynamics: {setting}, {optimizer}, seed {_seed(traces)}")
    return _save(fig, path)


def plot_coefficients(traces: Sequence[Record], setting: str, optimizer: str, path: Path) -> Path:
    """Each modulating method's per-step factors (one panel per method)."""
    with_coeffs = [t for t in traces if t.get("coefficients")]
    cols = min(4, max(len(with_coeffs), 1))
    rows = max(1, math.ceil(len(with_coeffs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for k, tr in enumerate(with_coeffs):
        ax = axes[k // cols][k % cols]
        for i, (name, series) in enumerate(tr["coefficients"].items()):
            colour = f"C{i}"
            ax.plot(range(len(series)), series, color=colour, alpha=0.25, linewidth=0.5)
            ax.plot(*_moving_average(series, 25), color=colour, label=f"{name} (mean of 25)")
        ax.set_title(tr["method"], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for k in range(len(with_coeffs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    if not with_coeffs:
        axes[0][0].text(0.5, 0.5, "no modulating method run", ha="center", va="center")
    fig.suptitle(f"encoder gradient factors: {setting}, {optimizer}, seed {_seed(traces)}")
    return _save(fig, path)


def _moving_average(series: Sequence[float], window: int) -> tuple[list[float], list[float]]:
    """Centred means of ``window`` consecutive values, at the windows' centre steps."""
    if len(series) < window:
        return [], []
    sums = [0.0]
    for v in series:
        sums.append(sums[-1] + v)
    means = [(sums[i + window] - sums[i]) / window for i in range(len(series) - window + 1)]
    return [i + (window - 1) / 2 for i in range(len(means))], means


def _seed(traces: Sequence[Record]) -> str:
    return str(traces[0]["seed"]) if traces else "-"


def write_plots(records: Sequence[Record], traces: Sequence[Record], out: Path) -> list[Path]:
    """All figures into ``out``; returns their paths."""
    paths = []
    for setting in dict.fromkeys(r["setting"] for r in records):
        paths.append(plot_accuracy(records, setting, out / f"accuracy_{setting}.png"))
    keys = dict.fromkeys((t["setting"], t["optimizer"]) for t in traces)
    for setting, optimizer in keys:
        sel = [t for t in traces if (t["setting"], t["optimizer"]) == (setting, optimizer)]
        stem = f"{setting}_{optimizer}"
        paths.append(plot_dynamics(sel, setting, optimizer, out / f"dynamics_{stem}.png"))
        paths.append(plot_coefficients(sel, setting, optimizer, out / f"coefficients_{stem}.png"))
    return paths
