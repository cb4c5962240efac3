"""Every metric the benchmark reports, as pure functions (the one place they are defined).

Classification
    ``correct(logits_or_pred, target)`` and ``accuracy(...)``.

Pixel-level segmentation (binary masks)
    ``dice_per_image`` / ``iou_per_image`` give one value per image; the split's score is
    their mean (what the report's "Dice 0.88" most likely is).  ``dice_pooled`` /
    ``iou_pooled`` count TP, FP, FN over every pixel of the split first:
    ``2 * sum(TP) / (sum|P| + sum|G|)``, which weights large glands/images more.
    Convention: an image whose prediction and ground truth are both empty scores 1.0
    (a perfect answer); pooled scores of an all-empty split are 1.0 too.

Object-level segmentation (GlaS contest, Sirinukunwattana et al. 2017; definitions as on
glas.grand-challenge.org, "Evaluation")
    Objects are the connected components of a binary mask with **8-connectivity** (as
    MATLAB's ``bwlabel`` in the contest's evaluation code).  Glands that touch in a binary
    label are therefore one object; this data set has no instance labels.

    * ``object_f1``: a predicted object S is matched to the ground-truth object G with
      which it has the largest overlap; S is a true positive when ``|S & G| > 0.5 |G|``
      (it covers strictly more than half of G), else a false positive.  A G hit by no true
      positive is a false negative.  ``F1 = 2TP / (2TP + FP + FN)``.
    * ``object_dice``: ``0.5 * [sum_i w_i Dice(G_i, S*(G_i)) + sum_j v_j Dice(G*(S_j), S_j)]``
      with ``w_i = |G_i| / sum|G|``, ``v_j = |S_j| / sum|S|`` and ``X*(Y)`` the object of X
      overlapping Y the most (Dice 0 when none overlaps).
    * ``object_hausdorff``: the same two-sided weighting of the Hausdorff distance (in
      pixels, Euclidean, over all pixels of the two objects); an object with no overlapping
      partner is paired with the partner nearest to it in Hausdorff distance (as GlaS does).

    One pass per image (:func:`object_tally`) gives an :class:`ObjectTally`: the counts TP, FP,
    FN and, per side, the total object area and the area-weighted sums of Dice and Hausdorff.
    Two aggregations come from it (``segmentation_report``):

    * per image (``obj_f1``, ``obj_dice``, ``obj_hausdorff``): the three scores of each image,
      then their **mean over images**, all images weighted equally (what most re-implementations
      report);
    * pooled (``obj_f1_pooled``, ``obj_dice_pooled``, ``obj_hausdorff_pooled``), the contest's
      own: the tallies are **summed over the split** first, so F1 counts TP/FP/FN over all
      objects of the split and the weights ``w_i``, ``v_j`` are areas over the total area of all
      objects of the split (a large gland weighs more than a small one, whatever its image).

    Empty sides: an object whose image has no object on the other side has Dice 0 and
    Hausdorff the image diagonal ``sqrt((H-1)^2 + (W-1)^2)`` (the largest distance two pixels
    can have: a finite worst case, so that means stay defined); a side with no object at all
    takes the other side's term.  So per image: both empty -> F1 1, Dice 1, Hausdorff 0;
    exactly one empty -> F1 0, Dice 0, Hausdorff the diagonal; pooled likewise over the split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.distance import cdist
from torch import Tensor

# 8-connectivity: diagonal neighbours belong to the same object.
_STRUCTURE = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Metric:
    """A reported number: its key in result.json, how tables and figures name and print it, and its range."""

    key: str
    label: str  # e.g. "test accuracy"
    unit: str = ""  # of the shown value, e.g. "%"
    scale: float = 1.0  # shown as value * scale (100 for a percentage)
    digits: int = 3
    higher_is_better: bool = True
    low: float = 0.0  # the values it can take (confidence intervals are clipped to them)
    high: float = 1.0
    short: str = ""  # a shorter label for narrow table headers (default: label)

    @property
    def column(self) -> str:
        """The summary's column name, e.g. ``test accuracy (%)``."""
        return f"{self.label} ({self.unit})" if self.unit else self.label

    @property
    def header(self) -> str:
        """The main table's narrower column name, e.g. ``test acc. (%)``."""
        label = self.short or self.label
        return f"{label} ({self.unit})" if self.unit else label

    def text(self, value: float | None, unit: bool = False) -> str:
        """``value`` scaled and rounded as tables show it (``99.20``), with ``unit`` its unit as text says it
        (``99.20 %``; ``0.8800`` for a metric without one); an en dash when missing."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            number = "–"
        else:
            number = f"{value * self.scale:.{self.digits}f}"
        return f"{number} {self.unit}" if unit and self.unit else number

    # The direction, for everything that picks a best (epoch, seed, rung, shipped run, trial) or meets a target.

    @property
    def direction(self) -> str:
        """Optuna's word for it: ``maximize`` or ``minimize``."""
        return "maximize" if self.higher_is_better else "minimize"

    @property
    def worst(self) -> float:
        """A value that any real one beats: where a search for the best starts."""
        return -math.inf if self.higher_is_better else math.inf

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def reaches(self, value: float, target: float) -> bool:
        """Whether ``value`` is at least as good as ``target``."""
        return value >= target if self.higher_is_better else value <= target

    def best(self, values: Iterable[float]) -> float:
        """The best of ``values``."""
        return max(values) if self.higher_is_better else min(values)

    def rank(self, value: float) -> float:
        """A sort key that puts the best value first (ascending)."""
        return -value if self.higher_is_better else value


# --------------------------------------------------------------------------- classification


def correct(logits_or_pred: Tensor, target: Tensor) -> Tensor:
    """Number of correct predictions, a 0-dim int64 tensor (on the inputs' device: no sync).

    logits_or_pred: (N, K) scores (argmax taken) or (N,) predicted class indices.
    target: (N,) int64 class indices.
    """
    pred = logits_or_pred.argmax(dim=1) if logits_or_pred.dim() == target.dim() + 1 else logits_or_pred
    return (pred == target).sum()


def accuracy(logits_or_pred: Tensor, target: Tensor) -> Tensor:
    """Fraction correct in [0, 1], a 0-dim float64 tensor (``.item()`` for a float); shapes as
    :func:`correct`.  An empty batch gives 0.  float64, so that 3129 of 10,000 reads 0.3129, as any
    other code that counts the same images gets it (float32 would give 0.31290000677)."""
    return correct(logits_or_pred, target).to(torch.float64) / max(1, int(target.numel()))


# --------------------------------------------------------------------------- pixel level


def _flat_bool(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return pred.reshape(pred.shape[0], -1).bool(), target.reshape(target.shape[0], -1).bool()


def confusion_per_image(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (TP, FP, FN) pixel counts, each (N,) int64.

    pred, target: (N, H, W) or (N, 1, H, W) bool (or {0, 1}) masks of the same shape.
    """
    p, g = _flat_bool(pred, target)
    tp = torch.count_nonzero(p & g, dim=1)
    return tp, torch.count_nonzero(p, dim=1) - tp, torch.count_nonzero(g, dim=1) - tp


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0/0 -> 1.0 (both masks empty is a perfect answer)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.ones_like(den))


def _dice(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    return _ratio(2 * tp, 2 * tp + fp + fn)


def _iou(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    return _ratio(tp, tp + fp + fn)


def dice_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """Dice ``2|P&G| / (|P|+|G|)`` of each image: (N, H, W) masks -> (N,) float64; empty-empty = 1."""
    return _dice(*confusion_per_image(pred, target))


def iou_per_image(pred: Tensor, target: Tensor) -> Tensor:
    """IoU ``|P&G| / |P|G|`` of each image: (N, H, W) masks -> (N,) float64; empty-empty = 1."""
    return _iou(*confusion_per_image(pred, target))


def dice_pooled(pred: Tensor, target: Tensor) -> float:
    """Dice over all pixels of the split: ``2 sum(TP) / (sum|P| + sum|G|)``; (N, H, W) masks."""
    return float(_dice(*(t.sum() for t in confusion_per_image(pred, target))))


def iou_pooled(pred: Tensor, target: Tensor) -> float:
    """IoU over all pixels of the split: ``sum(TP) / sum(TP + FP + FN)``; (N, H, W) masks."""
    return float(_iou(*(t.sum() for t in confusion_per_image(pred, target))))


# --------------------------------------------------------------------------- object level


def label_objects(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of a (H, W) bool mask -> (labels int32 (H, W), count)."""
    lab, n = ndimage.label(mask, structure=_STRUCTURE)
    return lab.astype(np.int32, copy=False), int(n)


def objects_of(image: np.ndarray) -> tuple[np.ndarray, int]:
    """The objects of a (H, W) image -> (labels int32 (H, W) numbered 1..count, count): a bool mask's
    connected components (:func:`label_objects`), or an integer instance label image's labels as given
    (0 = background; a network's separated glands, ``bench.instances``), renumbered without gaps."""
    image = np.asarray(image)
    if image.dtype == bool:
        return label_objects(image)
    _, inverse = np.unique(np.concatenate([[0], image.ravel()]), return_inverse=True)  # 0 stays 0
    lab = inverse[1:].reshape(image.shape).astype(np.int32)
    return lab, int(lab.max(initial=0))


def _group(lab_values: np.ndarray, coords: np.ndarray, n: int) -> list[np.ndarray]:
    """Split (M, 2) ``coords`` by their labels 1..n -> n arrays (vectorized, no per-pixel loop)."""
    order = np.argsort(lab_values, kind="stable")
    bounds = np.searchsorted(lab_values[order], np.arange(1, n + 2))
    coords = coords[order]
    return [coords[bounds[k] : bounds[k + 1]] for k in range(n)]


class _Objects:
    """The objects of one (H, W) mask or label image (:func:`objects_of`): labels, areas, boxes, pixels and
    edge pixels.

    ``edges[k]`` are the pixels of object k with a 4-neighbour outside it: the pixel of k
    nearest to any outside point is always one of them, so distances *to* an object only
    need its edge.
    """

    def __init__(self, mask: np.ndarray):
        self.lab, self.n = objects_of(mask)
        self.area = np.bincount(self.lab.ravel(), minlength=self.n + 1)[1:].astype(np.float64)
        # boxes[k] = (row0, row1, col0, col1), inclusive pixel bounds
        self.boxes = np.array(
            [(s[0].start, s[0].stop - 1, s[1].start, s[1].stop - 1) for s in ndimage.find_objects(self.lab)],
            dtype=np.int64,
        ).reshape(-1, 4)
        pix = np.argwhere(self.lab > 0)
        self.pixels = _group(self.lab[pix[:, 0], pix[:, 1]], pix, self.n)
        padded = np.pad(self.lab, 1)
        inner = padded[1:-1, 1:-1]
        edge = (inner > 0) & (
            (padded[:-2, 1:-1] != inner)
            | (padded[2:, 1:-1] != inner)
            | (padded[1:-1, :-2] != inner)
            | (padded[1:-1, 2:] != inner)
        )
        epix = np.argwhere(edge)
        elab = self.lab[epix[:, 0], epix[:, 1]]
        self.edges = _group(elab, epix, self.n)
        # (n, 8, 2): each object's extreme pixels along +-4 directions (for cheap distance bounds)
        first = np.searchsorted(np.sort(elab), np.arange(1, self.n + 1))
        last = np.append(first[1:], len(elab))[: self.n] - 1
        ext = [np.zeros((0, 2), dtype=epix.dtype)] * 8 if self.n == 0 else []
        for d in ([1, 0], [0, 1], [1, 1], [1, -1]) if self.n else ():
            order = np.lexsort((epix @ np.array(d), elab))  # by label, then by projection
            ext += [epix[order[first]], epix[order[last]]]
        self.extremes = np.stack(ext, 1).reshape(self.n, 8, 2)
        self._hausdorff: dict[tuple[int, int], float] = {}  # cache shared by both directions


def _box_distance(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(P, 2) pixel coords x (K, 4) inclusive boxes -> (P, K) Euclidean distance to each box."""
    r, c = points[:, :1], points[:, 1:]
    dr = np.maximum(np.maximum(boxes[:, 0] - r, r - boxes[:, 1]), 0)
    dc = np.maximum(np.maximum(boxes[:, 2] - c, c - boxes[:, 3]), 0)
    return np.hypot(dr, dc)


def _directed(a: _Objects, i: int, b: _Objects, j: int) -> float:
    """max over pixels p of a_i of dist(p, b_j), by brute force against b_j's edge pixels."""
    pts = a.pixels[i]
    pts = pts[b.lab[pts[:, 0], pts[:, 1]] != j + 1]  # pixels inside b_j are at distance 0
    if len(pts) == 0:
        return 0.0
    e = b.edges[j].astype(np.float64)
    step = max(1, (1 << 22) // len(e))  # rows per chunk: bounds the distance matrix to ~32 MB
    worst = max(
        cdist(pts[k : k + step].astype(np.float64), e, "sqeuclidean").min(1).max() for k in range(0, len(pts), step)
    )
    return float(np.sqrt(worst))


def _pair_hausdorff(a: _Objects, i: int, b: _Objects, j: int) -> float:
    """Symmetric Hausdorff distance between object i of ``a`` and object j of ``b`` (pixels)."""
    cache = a._hausdorff if a is not b else {}
    if (i, j) in cache:
        return cache[i, j]
    brute = a.area[i] * len(b.edges[j]) + b.area[j] * len(a.edges[i])
    r0, c0 = np.minimum(a.boxes[i, [0, 2]], b.boxes[j, [0, 2]])
    r1, c1 = np.maximum(a.boxes[i, [1, 3]], b.boxes[j, [1, 3]]) + 1
    if brute <= 4 * (r1 - r0) * (c1 - c0) + 4096:  # small objects: distance matrix is cheapest
        h = max(_directed(a, i, b, j), _directed(b, j, a, i))
    else:  # large objects: exact Euclidean distance transforms inside the pair's joint bounding box
        ma = a.lab[r0:r1, c0:c1] == i + 1
        mb = b.lab[r0:r1, c0:c1] == j + 1
        if (ma == mb).all():
            h = 0.0
        else:
            h = float(max(ndimage.distance_transform_edt(~mb)[ma].max(), ndimage.distance_transform_edt(~ma)[mb].max()))
    cache[i, j] = h
    b._hausdorff[j, i] = h
    return h


def _nearest_hausdorff(a: _Objects, i: int, b: _Objects) -> float:
    """min over objects of ``b`` of the Hausdorff distance to a_i (for an a_i that overlaps none).

    Candidates are tried in order of a lower bound (H >= the distance of any pixel of one
    object to the other's bounding box) and the search stops once the bound passes the best.
    """
    lb_a = _box_distance(a.edges[i], b.boxes).max(0)  # (K,): a_i's edge pixels to each b_k's box
    lb_b = _box_distance(b.extremes.reshape(-1, 2), a.boxes[i : i + 1]).reshape(b.n, 8).max(1)
    lower = np.maximum(lb_a, lb_b)
    best = np.inf
    for k in np.argsort(lower, kind="stable"):
        if lower[k] >= best:
            break
        best = min(best, _pair_hausdorff(a, i, b, int(k)))
    return float(best)


def _overlap(g: _Objects, s: _Objects) -> np.ndarray:
    """(ng+1, ns+1) pixel counts of every (G label, S label) pair; row/col 0 is background."""
    idx = g.lab.ravel().astype(np.int64) * (s.n + 1) + s.lab.ravel()
    return np.bincount(idx, minlength=(g.n + 1) * (s.n + 1)).reshape(g.n + 1, s.n + 1)


def _best_partner(ov: np.ndarray) -> np.ndarray:
    """For each row object (rows 1..), the column object (1..) it overlaps most, or 0 if none."""
    inner = ov[1:, 1:]
    if inner.shape[1] == 0:
        return np.zeros(inner.shape[0], dtype=np.int64)
    return np.where(inner.max(1) > 0, inner.argmax(1) + 1, 0)


def _f1_counts(ov: np.ndarray) -> tuple[int, int, int]:
    """GlaS detection counts (TP, FP, FN) from an overlap table (rows G, columns S)."""
    g_area = ov[1:, :].sum(1)
    best = _best_partner(ov.T)  # each S: its most-overlapped G (0: none)
    hit = ov[best, np.arange(1, ov.shape[1])]
    need = np.concatenate([[np.inf], g_area])[best]  # an S overlapping no G (best 0) can never pass
    # Strictly more than half of G, as the contest's F1score.m (``> 0.5``; this code had ``>=`` before the
    # pooled metrics).  Two disjoint S cannot both cover more than half of one G, so each G is hit at most once.
    tp = int((2 * hit > need).sum())
    return tp, ov.shape[1] - 1 - tp, ov.shape[0] - 1 - tp


def _dice_sum(ov: np.ndarray) -> float:
    """sum_i |row_i| Dice(row_i, its most-overlapping column) (0 for a row overlapping no column)."""
    r_area, c_area = ov[1:, :].sum(1), ov[:, 1:].sum(0)
    total = 0.0
    for i, j in enumerate(_best_partner(ov), start=1):
        if j:
            total += r_area[i - 1] * 2 * ov[i, j] / (r_area[i - 1] + c_area[j - 1])
    return total


def _hausdorff_sum(a: _Objects, b: _Objects, ov: np.ndarray) -> float:
    """sum_i |a_i| H(a_i, partner): partner = most overlapping b object, else the nearest by H."""
    total = 0.0
    for i, j in enumerate(_best_partner(ov)):
        h = _pair_hausdorff(a, i, b, int(j) - 1) if j else _nearest_hausdorff(a, i, b)
        total += a.area[i] * h
    return total


@dataclass(frozen=True)
class ObjectTally:
    """What the GlaS object scores of one image need, in sums that add up over a split
    (``sum(tallies, ObjectTally())``).

    ``g_*`` sum over the ground-truth objects G_i, ``s_*`` over the segmented objects S_j: ``*_area`` the
    total object area (pixels), ``*_dice`` the area-weighted sum ``sum_i |G_i| Dice(G_i, S*(G_i))``,
    ``*_haus`` the same for the Hausdorff distance (pixels x pixels of area)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    g_area: float = 0.0
    s_area: float = 0.0
    g_dice: float = 0.0
    s_dice: float = 0.0
    g_haus: float = 0.0
    s_haus: float = 0.0

    def __add__(self, other: ObjectTally) -> ObjectTally:
        return ObjectTally(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def scores(self) -> tuple[float, float, float]:
        """(object F1, object Dice, object Hausdorff) of these sums; no object on either side -> (1, 1, 0),
        a side without objects takes the other side's Dice and Hausdorff."""
        if self.g_area == 0 and self.s_area == 0:
            return 1.0, 1.0, 0.0
        sides = [
            (d / a, h / a)
            for a, d, h in ((self.g_area, self.g_dice, self.g_haus), (self.s_area, self.s_dice, self.s_haus))
            if a > 0
        ]
        (dg, hg), (ds, hs) = sides[0], sides[-1]
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn), 0.5 * (dg + ds), 0.5 * (hg + hs)


def object_tally(pred: np.ndarray, target: np.ndarray) -> ObjectTally:
    """The GlaS object sums of one image, (H, W) bool masks or integer instance label images
    (:func:`objects_of`); an object whose image has no object on the other side counts Dice 0 and
    Hausdorff the image diagonal."""
    g, s = _Objects(target), _Objects(pred)
    g_area, s_area = float(g.area.sum()), float(s.area.sum())
    if g.n == 0 or s.n == 0:
        diag = math.hypot(target.shape[0] - 1, target.shape[1] - 1)
        return ObjectTally(0, s.n, g.n, g_area, s_area, 0.0, 0.0, g_area * diag, s_area * diag)
    ov = _overlap(g, s)
    return ObjectTally(
        *_f1_counts(ov),
        g_area,
        s_area,
        _dice_sum(ov),
        _dice_sum(ov.T),
        _hausdorff_sum(g, s, ov),
        _hausdorff_sum(s, g, ov.T),
    )


def object_scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """GlaS (object F1, object Dice, object Hausdorff) of one image; (H, W) bool masks, or integer instance
    label images (see :func:`objects_of`).

    Empty sides: both empty -> (1, 1, 0); one empty -> (0, 0, image diagonal).
    """
    return object_tally(pred, target).scores()


def object_f1_counts(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int]:
    """GlaS object detection counts (TP, FP, FN) of one image; (H, W) bool masks or instance label images."""
    return _f1_counts(_overlap(_Objects(target), _Objects(pred)))


def object_f1_pooled(pred: np.ndarray, target: np.ndarray) -> float:
    """GlaS object F1 with TP/FP/FN counted over all objects of a split: (N, H, W) bool masks -> [0, 1]
    (no object anywhere -> 1).  Counts only: much cheaper than :func:`segmentation_report`."""
    tp, fp, fn = np.sum([object_f1_counts(p, g) for p, g in zip(pred, target, strict=True)], axis=0, dtype=np.int64)
    return 1.0 if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def object_f1(pred: np.ndarray, target: np.ndarray) -> float:
    """GlaS object F1 of one image: (H, W) bool masks -> float in [0, 1] (both empty -> 1)."""
    return object_scores(pred, target)[0]


def object_dice(pred: np.ndarray, target: np.ndarray) -> float:
    """GlaS object-level Dice of one image: (H, W) bool masks -> float in [0, 1]."""
    return object_scores(pred, target)[1]


def object_hausdorff(pred: np.ndarray, target: np.ndarray) -> float:
    """GlaS object-level Hausdorff distance of one image in pixels: (H, W) bool masks -> float >= 0."""
    return object_scores(pred, target)[2]


# --------------------------------------------------------------------------- split report


def segmentation_report(pred: Tensor, target: Tensor, instances: np.ndarray | None = None) -> dict[str, float]:
    """All segmentation metrics of a split.

    pred, target: (N, H, W) bool masks (any device).  Returns ``dice``, ``iou``,
    ``obj_f1``, ``obj_dice``, ``obj_hausdorff`` (means of per-image values),
    ``dice_pooled``, ``iou_pooled`` (over all pixels of the split) and ``obj_f1_pooled``,
    ``obj_dice_pooled``, ``obj_hausdorff_pooled`` (over all objects of the split, the GlaS contest's way).
    ``instances``: (N, H, W) int instance labels of the prediction (a network that separates touching glands):
    the object metrics count its labels instead of the connected components of ``pred``; pixel scores stay
    on ``pred``.
    """
    pred, target = pred.bool().cpu(), target.bool().cpu()
    counts = confusion_per_image(pred, target)  # counted once, shared by the four pixel scores
    pooled = [t.sum() for t in counts]
    out = {
        "dice": float(_dice(*counts).mean()),
        "dice_pooled": float(_dice(*pooled)),
        "iou": float(_iou(*counts).mean()),
        "iou_pooled": float(_iou(*pooled)),
    }
    objects = pred.numpy() if instances is None else instances
    tallies = [object_tally(p, g) for p, g in zip(objects, target.numpy(), strict=True)]
    per_image = np.array([t.scores() for t in tallies]).reshape(-1, 3).mean(0)
    pooled_scores = sum(tallies, ObjectTally()).scores()
    for name, mean, total in zip(("obj_f1", "obj_dice", "obj_hausdorff"), per_image, pooled_scores, strict=True):
        out[name], out[f"{name}_pooled"] = float(mean), float(total)
    return out
