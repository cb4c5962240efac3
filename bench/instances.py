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

import numpy as np
from scipy import ndimage

CONTOUR_THRESHOLD = 0.5  # a pixel whose contour probability is at or above this is never part of a core
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity, as the object metrics count objects


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x.astype(np.float64)))


def label_instances(foreground: np.ndarray, contour: np.ndarray, threshold: float = 0.5,
                    contour_threshold: float = CONTOUR_THRESHOLD) -> np.ndarray:
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


def instances_from_logits(logits: np.ndarray, threshold: float = 0.5,
                          contour_threshold: float = CONTOUR_THRESHOLD) -> np.ndarray:
    """Instance labels of a batch of two-channel outputs: logits (N, 2, H, W) (channel 0 foreground,
    1 contour; sigmoid gives the probabilities) -> (N, H, W) int32, see :func:`label_instances`."""
    p = _sigmoid(np.asarray(logits))
    return np.stack([label_instances(p[i, 0], p[i, 1], threshold, contour_threshold) for i in range(len(p))])
