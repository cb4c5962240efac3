"""Gland instances from a foreground and a contour probability map (DCAN, Chen et al. 2016), numpy in and out.

A network with a contour output (``model.contours``) predicts, per pixel, the probability of gland
foreground and the probability of lying on a gland's boundary band (the band the ``contour_bce``
loss trains it on).  Touching glands merge in the foreground but are cut apart by the band between
them, so :func:`label_instances`:

1. takes the *cores*: pixels with foreground ``> threshold`` and contour ``< contour_threshold``;
2. labels their connected components (8-connectivity, as the object metrics' ``bench.metrics.label_objects``);
3. grows each core back into the foreground (:data:`GROW_STEP`: one 3x3 step at a time, never leaving the
   foreground mask), so every foreground pixel reached from a core joins the nearest core;
4. gives every foreground component no core reaches a label of its own.

The instance labels' support is therefore exactly the foreground mask, so pixel Dice on the binary
foreground and object metrics on the instances describe the same segmentation.  This module needs
only numpy and scipy: the harness scores a run with it and ``exporters.predict`` and the parity check
use it on ONNX Runtime outputs, with the parameters the exported model's metadata carries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

from bench.postprocess import PostProcess, candidates

CONTOUR_THRESHOLD = 0.5  # a pixel whose contour probability is at or above this is never part of a core
# The contour thresholds tried by eval.postprocess (the default first: a tie keeps it).  Lower cuts touching glands
# apart at fainter contours but erodes more cores away; which is better is the validation split's to say.  On the
# quick +contours runs (seeds 0, 1) validation's pooled object F1 rises from 0.6 down to 0.2 and falls below it
# (0.15, 0.1), so the grid reaches 0.2.
CONTOUR_THRESHOLDS = (CONTOUR_THRESHOLD, 0.4, 0.6, 0.3, 0.2)
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity, as the object metrics count objects


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Probabilities (float64) of logits, any shape; a very negative logit gives 0, as it should (no warning)."""
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x below about -709
        return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def label_instances(
    foreground: np.ndarray, contour: np.ndarray, threshold: float = 0.5, contour_threshold: float = CONTOUR_THRESHOLD
) -> np.ndarray:
    """Instance labels of one image.

    foreground, contour: (H, W) probabilities in [0, 1].  Returns (H, W) int32 labels, 0 = background,
    1..n the glands (numbered in raster order of their cores, then of the core-less components);
    ``labels > 0`` equals ``foreground > threshold``.
    """
    fg = np.asarray(foreground) > threshold
    cores, n = ndimage.label(fg & (np.asarray(contour) < contour_threshold), structure=_STRUCTURE)
    labels = cores.astype(np.int32)
    free = fg & (labels == 0)
    while free.any():
        grown = ndimage.grey_dilation(labels, footprint=_STRUCTURE)  # the largest neighbouring label
        take = free & (grown > 0)
        if not take.any():
            break
        labels[take] = grown[take]
        free &= ~take
    rest, _ = ndimage.label(free, structure=_STRUCTURE)
    labels[free] = rest[free] + n
    return labels


def instances_from_logits(
    logits: np.ndarray, threshold: float = 0.5, contour_threshold: float = CONTOUR_THRESHOLD
) -> np.ndarray:
    """Instance labels of a batch of two-channel outputs: logits (N, 2, H, W) (channel 0 foreground,
    1 contour; sigmoid gives the probabilities) -> (N, H, W) int32, see :func:`label_instances`."""
    p = sigmoid(logits)
    return np.stack([label_instances(p[i, 0], p[i, 1], threshold, contour_threshold) for i in range(len(p))])


def choose(
    probs: np.ndarray, score: Callable[[np.ndarray], float], threshold: float = 0.5
) -> tuple[float, PostProcess, float, float]:
    """(the best contour threshold, the best post-processing, its score, the score of neither) of a validation
    split's probabilities (N, 2, H, W) (foreground, contour), by ``score`` of the post-processed (N, H, W) int
    instance labels (:meth:`PostProcess.instances`).  Every threshold of :data:`CONTOUR_THRESHOLDS` is tried with
    every setting of :func:`bench.postprocess.candidates`; a tie keeps the earlier (lesser) one."""
    best: tuple[float, PostProcess, float] | None = None
    raw = None
    for t in CONTOUR_THRESHOLDS:
        labels = np.stack([label_instances(p[0], p[1], threshold, t) for p in probs])
        for post in candidates():
            s = float(score(post.instances(labels)))
            raw = s if raw is None else raw
            if best is None or s > best[2]:
                best = (t, post, s)
    assert best is not None and raw is not None
    return best[0], best[1], best[2], raw
