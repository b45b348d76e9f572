"""Figures of a :class:`gradmod.Monitor`'s records (the ``plot`` extra: ``pip install
gradmod[plot]``, which brings matplotlib).

::

    from gradmod.plot import plot_traces

    plot_traces(monitor, "traces.png")

The figure is built with matplotlib's object-oriented API (``matplotlib.figure.Figure``), not
``pyplot``: no window, no backend switch, nothing global changes; a PNG is rendered by Agg.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .monitor import Monitor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_traces"]

_STYLES = ("-", "--", ":", "-.")


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            "gradmod.plot needs matplotlib: pip install gradmod[plot] (or pip install matplotlib)"
        ) from e
    return Figure


def _finite(values: Sequence[float]) -> bool:
    return any(math.isfinite(v) for v in values)


def plot_traces(
    monitor: Monitor,
    path: str | os.PathLike[str] | None = None,
    *,
    axes: Sequence[Axes] | None = None,
    title: str | None = None,
) -> Figure:
    """Draw, per modality and over the recorded blocks, the coefficient and the encoder gradient
    norms before and after modulation (and the method's scores, when it has any).

    Panels, stacked over a shared x axis (the block index ``step``): the coefficients (a
    dotted line at 1: no modulation); the gradient norms on a log scale, after modulation solid
    and before dashed (one line where they are equal, as on the update level), one colour per
    modality; the scores, one line style per score.

    Args:
        monitor: the monitor whose records are drawn (one host transfer).
        path: if given, the figure is saved there (format from the extension: ``.png``, ``.pdf``,
            ``.svg``, ...; PNG without one).
        axes: draw into these axes instead of a new figure: 2 of them (coefficients, gradient
            norms), or 3 when the records hold scores.
        title: the figure's title.

    Returns:
        The ``matplotlib.figure.Figure`` (not registered with ``pyplot``).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the monitor holds no record, or ``axes`` has the wrong length.
    """
    figure_class = _figure_class()
    table = monitor.to_dict()
    steps = [int(s) for s in table["step"]]
    if not steps:
        raise ValueError("the monitor holds no record yet: run a block with monitor= first")
    values = {k: [float(x) for x in v] for k, v in table.items() if "/" in k}
    names = [k.split("/", 1)[1] for k in values if k.startswith("coefficient/")]
    scores: dict[str, list[str]] = {}  # score key -> its columns
    for col in values:
        if col.startswith("score/"):
            rest = col[len("score/") :]
            key = next((rest[: -len(n) - 1] for n in names if rest.endswith("/" + n)), rest)
            scores.setdefault(key, []).append(col)
    panels = 3 if scores else 2
    if axes is None:
        fig = figure_class(figsize=(8.0, 2.6 * panels), layout="constrained")
        axs = list(fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    else:
        axs = list(axes)
        if len(axs) != panels:
            raise ValueError(f"axes: {panels} axes needed for these records; got {len(axs)}")
        parent = axs[0].figure.figure  # the root figure, also for axes of a subfigure
        assert parent is not None
        fig = parent
    colours = [f"C{i % 10}" for i in range(len(names))]

    ax = axs[0]
    ax.axhline(1.0, color="0.6", linestyle=":", linewidth=1.0)
    for n, c in zip(names, colours, strict=True):
        ax.plot(steps, values[f"coefficient/{n}"], color=c, label=n)
    ax.set_ylabel("coefficient k")
    ax.legend(loc="best", fontsize="small")

    ax = axs[1]
    positive = True
    for n, c in zip(names, colours, strict=True):
        after, before = values[f"grad_norm_after/{n}"], values[f"grad_norm_before/{n}"]
        positive = positive and all(v > 0 for v in after + before if math.isfinite(v))
        if before == after:  # nothing modulated the gradients (the update level)
            ax.plot(steps, after, color=c, label=f"{n} (before = after)")
            continue
        ax.plot(steps, after, color=c, label=f"{n} after")
        if _finite(before):
            ax.plot(steps, before, color=c, linestyle="--", label=f"{n} before")
    if positive:
        ax.set_yscale("log")
    ax.set_ylabel("encoder grad norm")
    ax.legend(loc="best", fontsize="small", ncol=2)

    if scores:
        ax = axs[2]
        for j, (key, cols) in enumerate(scores.items()):
            style = _STYLES[j % len(_STYLES)]
            for col in cols:
                n = col.rsplit("/", 1)[1]
                c = colours[names.index(n)] if n in names else "0.3"
                label = f"{key} ({n})" if n in names else key
                ax.plot(steps, values[col], color=c, linestyle=style, label=label)
        ax.set_ylabel("score")
        ax.legend(loc="best", fontsize="small", ncol=2)

    axs[-1].set_xlabel("block (step)")
    if title is not None:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
    return fig
