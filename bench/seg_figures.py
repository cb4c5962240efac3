"""Segmentation figures: test images with ground-truth and predicted gland outlines.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state),
so it works headless and nothing happens on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

GT_COLOR = "white"  # the images are red/green only: white and blue stand out
PRED_COLOR = "#1f3fff"


def pick_best_median_worst(scores: np.ndarray, per_group: int = 1) -> list[tuple[str, int]]:
    """(label, index) of the ``per_group`` highest, middle and lowest scores, in that order."""
    order = np.argsort(-np.asarray(scores), kind="stable")  # best first
    n, k = len(order), min(per_group, len(order))
    mid = max(0, (n - k) // 2)
    picks = [("best", i) for i in order[:k]] + [("median", i) for i in order[mid : mid + k]]
    return picks + [("worst", i) for i in order[::-1][:k]]


def draw_outlines(
    images: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    names: Sequence[str],
    dice: np.ndarray,
    path: str | Path,
    per_group: int = 1,
) -> Path:
    """Save a PNG of the best, median and worst images by Dice with both outlines.

    images: (N, H, W, 3) uint8 RGB (un-normalized); gt, pred: (N, H, W) bool masks;
    names: N labels; dice: (N,) per-image Dice.  Ground truth is drawn in white, the
    prediction in blue.  Returns the written path.
    """
    picks = pick_best_median_worst(dice, per_group)
    fig = Figure(figsize=(3.2 * len(picks), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (label, i) in zip(fig.subplots(1, len(picks), squeeze=False)[0], picks, strict=True):
        ax.imshow(images[i], interpolation="nearest")
        for mask, color in ((gt[i], GT_COLOR), (pred[i], PRED_COLOR)):
            if mask.any() and not mask.all():  # contour needs both levels present
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"{label}: {Path(names[i]).name}\nDice {dice[i]:.3f}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle("ground truth (white) vs prediction (blue)", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
