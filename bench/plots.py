"""Figures drawn from logged files (metrics.csv), never from live training state.

Matplotlib's object API on the Agg canvas: no pyplot, no global backend state, no display needed.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from bench import files
from bench.metrics import Metric

_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")  # 0.9 and 2, not 9x10^-1 and 2x10^0 on log axes


def _figure(ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols))


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
