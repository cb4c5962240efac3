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


def _save(fig: Figure, png_path: str | Path, dpi: int = 90) -> None:
    fig.tight_layout()
    files.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=dpi), mode="wb")


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
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    sizes = []
    for name, *_ in points:  # each label's box in pixels, measured as it will be drawn
        t = ax.text(0, 0, name, fontsize=8)
        bb = t.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        t.remove()
    pt = 72.0 / fig.dpi  # offsets in points scale with the saved dpi, as the text does
    for i, (dx, dy) in _place_labels(xy_px, sizes, (box.x0, box.y0, box.x1, box.y1)).items():
        ax.annotate(
            points[i][0],
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(dx * pt, dy * pt),
            fontsize=8,
            va="center",
            ha="left" if dx > 0 else "right",
            arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5} if abs(dy) > sizes[i][1] / 2 else None,
        )
    _save(fig, png_path, dpi=120)  # small labels: a finer image than the curves


def _place_labels(
    xy_px: Any, sizes: list[tuple[float, float]], box: tuple[float, float, float, float], pad: float = 9.0
) -> dict[int, tuple[float, float]]:
    """Where each point's label goes, as a pixel offset (dx, dy) of its anchor from the point: the label's box
    (``sizes``: width, height in pixels) starts ``pad`` right of its point (dx > 0; drawn left-aligned) or ends
    ``pad`` left of it (dx < 0; right-aligned), vertically centred at the point's height + dy.

    Points are taken from left to right; each label takes the first place, nearest its point first (the right side
    preferred: see ``left``), whose box overlaps neither a label placed before nor any point's marker and stays inside
    ``box`` (the axes: x0, y0, x1, y1); where no place is free, the one that overlaps least.  xy_px: (N, 2)."""
    marker, margin = 5.0, 4.0  # a point's half size; the least space between two labels side by side
    dots = [(x - marker, y - marker, x + marker, y + marker) for x, y in xy_px]

    def overlap(a: tuple[float, ...], b: tuple[float, ...], margin: float = 0.0) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0]) + margin
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    # Places in order of preference: beside the point on the right, then ever further up or down; the left side
    # counts as LEFT steps further away, so a label crosses to the left only where the right is crowded.
    left = 2.5
    prefs = sorted(
        [(abs(k), pad, k) for k in range(-12, 13)] + [(abs(k) + left, -pad, k) for k in range(-12, 13)],
        key=lambda c: (c[0], -c[1], -c[2]),
    )
    placed: list[tuple[float, float, float, float]] = []
    offsets: dict[int, tuple[float, float]] = {}
    for i in sorted(range(len(xy_px)), key=lambda k: (xy_px[k][0], xy_px[k][1])):
        (x, y), (w, h) = xy_px[i], sizes[i]
        best: tuple[float, tuple[float, float], tuple[float, float, float, float]] | None = None
        for _, dx, k in prefs:
            dy = k * h * 0.9
            x0 = x + dx if dx > 0 else x + dx - w
            rect = (x0, y + dy - h / 2, x0 + w, y + dy + h / 2)
            outside = max(box[0] - rect[0], 0) + max(rect[2] - box[2], 0)
            outside += max(box[1] - rect[1], 0) + max(rect[3] - box[3], 0)
            cost = (
                outside * h * 10 + sum(overlap(rect, o, margin) for o in placed) + sum(overlap(rect, o) for o in dots)
            )
            if best is None or cost < best[0]:
                best = (cost, (dx, dy), rect)
            if cost == 0:
                break
        assert best is not None
        offsets[i] = best[1]
        placed.append(best[2])
    return offsets
