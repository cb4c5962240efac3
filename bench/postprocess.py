"""Post-processing of predicted binary masks, chosen per run on the validation split (nnU-Net's habit).

Two operations, in this order: fill the holes of every predicted object (``fill_holes``), then remove the
objects smaller than ``min_area`` pixels (components with 8-connectivity, as the object metrics count them:
``bench.metrics``).  A run whose spec sets ``eval.postprocess`` tries every setting of :func:`candidates` on its
validation masks after training, keeps the best by the spec's criterion (ties go to the least change, so no
post-processing unless it helps), and reports the test metrics with it (``bench.tasks.warwick``).  The export
writes the choice into the model's metadata, and ``bench predict`` applies it.

A model with a contour output has gland instances instead (``bench.instances``): :meth:`PostProcess.instances`
does the same per instance.  Each instance's own holes are filled (background it alone encloses joins it; a gap
enclosed by several touching glands stays background, so filling never merges glands), then the instances under
``min_area`` pixels are removed; the pixel mask is the union of the instances kept.

numpy and SciPy only: ``bench predict`` imports this module without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# The thresholds tried (pixels).  This WARWICK copy's images are 128 x 128; its training glands cover 11 to 14,507
# pixels (5 % under 77, median 492), so the larger thresholds also remove real glands: validation decides.
MIN_AREAS = (0, 16, 32, 64, 128, 256, 512)
_STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity, as bench.metrics.label_objects


@dataclass(frozen=True)
class PostProcess:
    """What is done to a binary mask after thresholding; the default does nothing."""

    min_area: int = 0  # objects with fewer pixels are removed (0: none)
    fill_holes: bool = False  # background enclosed by an object becomes part of it

    def __call__(self, masks: np.ndarray) -> np.ndarray:
        """(..., H, W) bool masks -> the same shape, each (H, W) image processed on its own."""
        masks = np.asarray(masks, dtype=bool)
        if self == PostProcess():
            return masks
        flat = masks.reshape(-1, *masks.shape[-2:])
        return np.stack([self.one(m) for m in flat]).reshape(masks.shape)

    def one(self, mask: np.ndarray) -> np.ndarray:
        """One (H, W) bool mask -> (H, W) bool."""
        if self.fill_holes:
            mask = ndimage.binary_fill_holes(mask)
        return remove_small(mask, self.min_area)

    def instances(self, labels: np.ndarray) -> np.ndarray:
        """(..., H, W) int instance labels (0 background) -> the same shape, int32, each (H, W) image processed on
        its own: holes filled per instance, instances under ``min_area`` pixels removed, the kept ones renumbered
        1..n in the order of their labels.  Its mask (``> 0``) is the post-processed segmentation."""
        labels = np.asarray(labels)
        flat = labels.reshape(-1, *labels.shape[-2:])
        return np.stack([self.one_instances(lab) for lab in flat]).reshape(labels.shape)

    def one_instances(self, labels: np.ndarray) -> np.ndarray:
        """One (H, W) int label image -> (H, W) int32; see :meth:`instances`."""
        lab = np.array(labels, dtype=np.int32)
        if self.fill_holes:
            for k, box in enumerate(ndimage.find_objects(lab), start=1):
                if box is not None:  # the instance's bounding box holds every hole it encloses
                    part = lab[box]
                    part[ndimage.binary_fill_holes(part == k) & (part == 0)] = k
        if self.min_area > 0:
            keep = np.bincount(lab.ravel()) >= self.min_area
            keep[0] = False
            lab = np.where(keep[lab], lab, 0)
        _, inverse = np.unique(np.concatenate([[0], lab.ravel()]), return_inverse=True)  # 0 stays 0, no gaps
        return inverse[1:].reshape(lab.shape).astype(np.int32)

    def to_dict(self) -> dict[str, int | bool]:
        return {"min_area": self.min_area, "fill_holes": self.fill_holes}


def remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """(H, W) bool mask without its 8-connected objects of fewer than ``min_area`` pixels."""
    if min_area <= 0:
        return mask
    lab, n = ndimage.label(mask, structure=_STRUCTURE)
    keep = np.bincount(lab.ravel(), minlength=n + 1) >= min_area
    keep[0] = False
    return keep[lab]


def candidates() -> list[PostProcess]:
    """Every setting tried, the least change first (none at all, then larger thresholds, holes filled last)."""
    return [PostProcess(a, f) for a in MIN_AREAS for f in (False, True)]


def choose(
    masks: np.ndarray, score: Callable[[np.ndarray], float], higher_is_better: bool = True
) -> tuple[PostProcess, float, float]:
    """(the best setting, its score, the score without post-processing) of the (N, H, W) bool ``masks`` (a
    validation split's), by ``score`` of the post-processed (N, H, W) masks; a tie keeps the earlier (lesser)
    setting of :func:`candidates`."""
    best, best_score, raw = PostProcess(), None, None
    for post in candidates():
        s = float(score(post(masks)))
        raw = s if raw is None else raw
        if best_score is None or (s > best_score if higher_is_better else s < best_score):
            best, best_score = post, s
    return best, best_score, raw
