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
from matplotlib.ticker import MaxNLocator

from bench import files


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


def plot_run_curves(csv_path: str | Path, png_path: str | Path, metric_label: str) -> None:
    """Loss, metric and learning rate per epoch of one run (train and validation)."""
    h = pd.read_csv(csv_path)
    fig, ax = _figure(3, (12, 3.2))
    ax[0].plot(h.epoch, h.train_loss, label="train")
    ax[0].plot(h.epoch, h.val_loss, label="validation")
    ax[0].set_title("loss")
    ax[1].plot(h.epoch, h.train_metric, label="train")
    ax[1].plot(h.epoch, h.val_metric, label="validation")
    ax[1].set_title(metric_label.replace("test ", ""))
    ax[2].plot(h.epoch, h.lr)
    ax[2].set_title("learning rate")
    if (h.lr > 0).all():
        ax[2].set_yscale("log")
    _epoch_axes(ax)
    ax[0].legend()
    _save(fig, png_path)


def plot_spec_curves(curves: dict[str, list[pd.DataFrame]], png_path: str | Path, metric_label: str) -> None:
    """Validation metric per epoch for every variant: mean over seeds, band = min..max."""
    fig, ax = _figure(2, (12, 3.8))
    for name, frames in curves.items():
        df = pd.concat(frames).groupby("epoch")
        for a, col in zip(ax, ("val_loss", "val_metric"), strict=True):
            g = df[col]
            line = a.plot(g.mean().index, g.mean().values, label=name)[0]
            a.fill_between(g.min().index, g.min().values, g.max().values, alpha=0.15, color=line.get_color())
    ax[0].set_title("validation loss")
    ax[0].set_yscale("log")
    ax[1].set_title("validation " + metric_label.replace("test ", ""))
    _epoch_axes(ax)
    ax[1].legend(fontsize=7, loc="lower right")
    _save(fig, png_path)
