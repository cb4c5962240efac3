"""Figures drawn from logged files (metrics.csv), never from live training state.

Matplotlib's object API on the Agg canvas: no pyplot, no global backend state, no display needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from bench import files
from bench.metrics import Metric

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 0.9 and 2, not 9x10^-1 and 2x10^0 on log axes


def _figure(ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, png_path: str | Path) -> None:
    fig.tight_layout()
    files.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90), mode="wb")


def _epoch_axes(axes: Iterable[Axes]) -> None:
    """Epochs are whole numbers: integer ticks only (2 epochs would otherwise show 1.25, 1.5, ...)."""
    for a in axes:
        a.set_xlabel("epoch")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)


def _log_y(a: Axes) -> None:
    a.set_yscale("log")
    a.yaxis.set_major_formatter(_PLAIN)
    a.yaxis.set_minor_formatter(_PLAIN)


def _metric_title(metric: Metric, prefix: str = "") -> str:
    label = metric.label.removeprefix("test ")
    return f"{prefix}{label}" + (f" ({metric.unit})" if metric.unit else "")


def plot_run_curves(csv_path: str | Path, png_path: str | Path, metric: Metric) -> None:
    """Loss, metric and learning rate per epoch of one run (train and validation)."""
    h = pd.read_csv(csv_path)
    fig, ax = _figure(3, (12, 3.2))
    ax[0].plot(h.epoch, h.train_loss, label="train")
    ax[0].plot(h.epoch, h.val_loss, label="validation")
    ax[0].set_title("loss")
    ax[1].plot(h.epoch, h.train_metric * metric.scale, label="train")  # in the tables' units (% for accuracy)
    ax[1].plot(h.epoch, h.val_metric * metric.scale, label="validation")
    ax[1].set_title(_metric_title(metric))
    ax[2].plot(h.epoch, h.lr)
    ax[2].set_title("learning rate")
    if (h.lr > 0).all():
        ax[2].set_yscale("log")
    _epoch_axes(ax)
    ax[0].legend()
    _save(fig, png_path)


def plot_spec_curves(curves: dict[str, list[pd.DataFrame]], png_path: str | Path, metric: Metric) -> None:
    """Validation metric per epoch for every variant: mean over seeds, band = min..max."""
    fig, ax = _figure(2, (12, 3.8))
    for name, frames in curves.items():
        df = pd.concat(frames).groupby("epoch")
        for a, col, scale in zip(ax, ("val_loss", "val_metric"), (1.0, metric.scale), strict=True):
            mean, lo, hi = (stat * scale for stat in (df[col].mean(), df[col].min(), df[col].max()))
            line = a.plot(mean.index, mean.values, label=name)[0]
            a.fill_between(lo.index, lo.values, hi.values, alpha=0.15, color=line.get_color())
    ax[0].set_title("validation loss")
    _log_y(ax[0])
    ax[1].set_title(_metric_title(metric, "validation "))
    _epoch_axes(ax)
    ax[1].legend(fontsize=7, loc="lower right")
    _save(fig, png_path)


def plot_tradeoff(
    points: list[tuple[str, float, float, float]],
    front: list[int],
    png_path: str | Path,
    metric: Metric,
    xlabel: str,
    title: str,
) -> None:
    """Test metric against latency, one labelled point per rung.

    points: (rung, latency ms, mean metric, std over seeds); error bars are the std (none for one seed);
    ``front``: the indices of the Pareto-optimal points, joined by a step line.  Log-scale latency.
    Labels of points that sit close together are stacked so that they do not overlap."""
    fig, (ax,) = _figure(1, (7.5, 4.8))
    xs = [p[1] for p in points]
    ys = [p[2] * metric.scale for p in points]
    for i, (_, x, _, sd) in enumerate(points):
        on = i in front
        ax.errorbar(
            [x],
            [ys[i]],
            yerr=None if sd != sd else [sd * metric.scale],
            fmt="o",
            color="tab:red" if on else "tab:blue",
            ms=6 if on else 5,
            capsize=3,
            zorder=3 if on else 2,
        )
    if len(front) > 1:
        ax.step(
            [xs[i] for i in front],
            [ys[i] for i in front],
            where="post",
            color="tab:red",
            alpha=0.5,
            lw=1.2,
            label="Pareto front",
        )
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    lo, hi = min(xs), max(xs)
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 0.1, 0.2, 0.5, 1, 2, 5, ...: a few labels a decade
    ax.xaxis.set_major_formatter(_PLAIN)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 1.25, hi * 1.6)  # room for the labels on the right
    ax.margins(y=0.08)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric.column + " (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    box = ax.get_window_extent()
    xy_px = ax.transData.transform(list(zip(xs, ys, strict=True)))
    for i, dy in _label_offsets(xy_px, bounds=(box.y0, box.y1)).items():
        ax.annotate(
            points[i][0],
            (xs[i], ys[i]),
            textcoords="offset pixels",
            xytext=(7, dy),
            fontsize=8,
            va="center",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5} if abs(dy) > 6 else None,
        )
    _save(fig, png_path)


def _label_offsets(
    xy_px: Any, near: float = 40.0, gap: float = 11.0, bounds: tuple[float, float] | None = None
) -> dict[int, float]:
    """Vertical pixel offsets of the labels of points at pixel positions ``xy_px`` (N, 2): points within ``near``
    pixels horizontally form a column whose labels are pushed apart to ``gap`` pixels, in the points' order, and the
    stack is centred on its points (so a tall column spreads both ways) and kept inside ``bounds`` (the axes' lowest
    and highest pixel: a label above them would run into the title)."""
    order = sorted(range(len(xy_px)), key=lambda i: (xy_px[i][0], xy_px[i][1]))
    offsets: dict[int, float] = {}
    column: list[int] = []
    for i in order + [None]:  # type: ignore[list-item]
        if i is not None and column and xy_px[i][0] - xy_px[column[0]][0] <= near:
            column.append(i)
            continue
        ids = sorted(column, key=lambda k: xy_px[k][1])
        placed: list[float] = []
        for j in ids:
            placed.append(xy_px[j][1] if not placed else max(xy_px[j][1], placed[-1] + gap))
        if len(placed) > 1:
            ys = [xy_px[j][1] for j in ids]
            shift = (placed[0] + placed[-1]) / 2 - (ys[0] + ys[-1]) / 2
            if bounds is not None:
                lo, hi = bounds[0] + gap / 2, bounds[1] - gap / 2
                shift = max(min(shift, placed[0] - lo), placed[-1] - hi)  # within the axes where the stack fits
            placed = [y - shift for y in placed]
        offsets |= {j: y - xy_px[j][1] for j, y in zip(ids, placed, strict=True)}
        column = [i] if i is not None else []
    return offsets
