"""Figures drawn from logged files (metrics.csv), never from live training state."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_run_curves(csv_path: str | Path, png_path: str | Path, metric_label: str) -> None:
    """Loss, metric and learning rate per epoch of one run (train and validation)."""
    from bench import files

    h = pd.read_csv(csv_path)
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
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
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[0].legend()
    fig.tight_layout()
    files.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90), mode="wb")
    plt.close(fig)


def plot_spec_curves(curves: dict[str, list[pd.DataFrame]], png_path: str | Path, metric_label: str) -> None:
    """Validation metric per epoch for every variant: mean over seeds, band = min..max."""
    from bench import files

    plt = _pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, frames in curves.items():
        df = pd.concat(frames).groupby("epoch")
        for a, col in zip(ax, ("val_loss", "val_metric"), strict=True):
            g = df[col]
            line = a.plot(g.mean().index, g.mean().values, label=name)[0]
            a.fill_between(g.min().index, g.min().values, g.max().values, alpha=0.15, color=line.get_color())
    ax[0].set_title("validation loss")
    ax[0].set_yscale("log")
    ax[1].set_title("validation " + metric_label.replace("test ", ""))
    for a in ax:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    files.atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=90), mode="wb")
    plt.close(fig)
