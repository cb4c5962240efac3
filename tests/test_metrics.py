"""Every metric against small hand-made cases whose answers are worked out in the comments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench import metrics as M
from tests.helpers import masks

# ----------------------------------------------------------------------------- classification


def test_accuracy_from_logits_and_from_predictions():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])  # argmax -> 0, 1, 0
    target = torch.tensor([0, 0, 0])
    assert int(M.correct(logits, target)) == 2
    assert M.accuracy(logits, target).item() == pytest.approx(2 / 3)
    assert M.accuracy(torch.tensor([0, 1, 0]), target).item() == pytest.approx(2 / 3)
    assert M.accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0


# ----------------------------------------------------------------------------- pixel level


def test_pixel_dice_iou_per_image_and_pooled():
    # image 0: G = 4 pixels, P = 2 of them -> TP 2, FP 0, FN 2: Dice 2*2/(2+4) = 2/3, IoU 2/4
    # image 1: both empty -> 1 and 1 by convention
    g = torch.zeros(2, 4, 4, dtype=torch.bool)
    p = torch.zeros_like(g)
    g[0, 0, :4] = True
    p[0, 0, :2] = True
    assert M.dice_per_image(p, g).tolist() == pytest.approx([2 / 3, 1.0])
    assert M.iou_per_image(p, g).tolist() == pytest.approx([0.5, 1.0])
    # pooled: the empty image adds nothing -> 2*2/(2+4), 2/4
    assert M.dice_pooled(p, g) == pytest.approx(2 / 3)
    assert M.iou_pooled(p, g) == pytest.approx(0.5)
    # (N, 1, H, W) works too, and an all-empty split is perfect
    assert M.dice_per_image(p[:, None], g[:, None]).tolist() == pytest.approx([2 / 3, 1.0])
    assert M.dice_pooled(p[1:], g[1:]) == 1.0
    with pytest.raises(ValueError):
        M.dice_per_image(p, g[:, :2])


def test_pixel_dice_one_side_empty_is_zero():
    g = torch.zeros(1, 3, 3, dtype=torch.bool)
    p = torch.ones_like(g)
    assert M.dice_per_image(p, g).item() == 0.0 and M.iou_per_image(g, p).item() == 0.0


# ----------------------------------------------------------------------------- object level


def test_connected_components_use_8_connectivity():
    # two pixels touching only at a corner are one object; a separate pixel is another
    m = np.zeros((4, 4), bool)
    m[0, 0] = m[1, 1] = m[3, 3] = True
    _, n = M.label_objects(m)
    assert n == 2


def _two_glands_case() -> tuple[np.ndarray, np.ndarray]:
    """G: gland A = 10x10 (100 px) at rows 0-9, cols 0-9; gland B = 4x4 (16 px) at rows 0-3, cols 20-23.
    S: P1 = rows 0-5 of A (6x10 = 60 px, 60 % of A); P2 = 2x2 false positive at rows 15-16, cols 15-16.
    B is missed."""
    g = masks(20, 30, (0, 9, 0, 9), (0, 3, 20, 23))
    s = masks(20, 30, (0, 5, 0, 9), (15, 16, 15, 16))
    return s, g


def test_object_f1_detected_missed_and_false_positive():
    s, g = _two_glands_case()
    # P1 covers 60 % >= 50 % of A -> TP; P2 overlaps nothing -> FP; B not hit -> FN
    assert M.object_f1_counts(s, g) == (1, 1, 1)
    # F1 = 2TP / (2TP + FP + FN) = 2 / (2 + 1 + 1)
    assert M.object_f1(s, g) == pytest.approx(0.5)


def test_object_f1_needs_more_than_half_overlap():
    g = masks(4, 10, (0, 0, 0, 9))  # one 10-pixel gland
    assert M.object_f1_counts(masks(4, 10, (0, 0, 0, 5)), g) == (1, 0, 0)  # 60 % -> TP
    # exactly 50 % is not enough: the contest's F1score.m asks for > 0.5 (FP and FN)
    assert M.object_f1_counts(masks(4, 10, (0, 0, 0, 4)), g) == (0, 1, 1)
    assert M.object_f1_counts(masks(4, 10, (0, 0, 0, 3)), g) == (0, 1, 1)  # 40 % -> FP and FN
    # one gland split between two predictions (cols 0-2: 30 %, cols 4-9: 60 %) plus a stray pixel
    # at (2, 0): only the 6-pixel part is a TP; the other part and the stray pixel are FPs
    split = masks(4, 10, (0, 0, 0, 2), (0, 0, 4, 9), (2, 2, 0, 0))
    assert M.object_f1_counts(split, g) == (1, 2, 0)


def test_object_dice_area_weighted():
    s, g = _two_glands_case()
    # G side: A (w = 100/116) pairs with P1: Dice 2*60/(100+60) = 0.75; B overlaps nothing: 0
    #   -> 100/116 * 0.75 = 75/116
    # S side: P1 (w = 60/64) pairs with A: 0.75; P2 (w = 4/64) overlaps nothing: 0 -> 60/64 * 0.75
    expected = 0.5 * (75 / 116 + 60 / 64 * 0.75)
    assert M.object_dice(s, g) == pytest.approx(expected)


def test_object_hausdorff_overlapping_pair():
    # G = a 5-pixel bar (0,0)-(0,4); S = its first 3 pixels: the farthest G pixel (0,4) is 2 from S
    g = masks(3, 6, (0, 0, 0, 4))
    s = masks(3, 6, (0, 0, 0, 2))
    assert M.object_hausdorff(s, g) == pytest.approx(2.0)


def test_object_hausdorff_unmatched_object_uses_nearest_partner():
    # G: 2x2 block A at rows 0-1, cols 0-1.  S: the same block A' and a stray pixel C at (5, 5).
    # G side: A pairs with A' -> H 0.  S side: A' -> 0 (weight 4/5); C overlaps nothing, so its
    # partner is the nearest G object, A: H(A, C) = max(farthest A pixel (0,0) from C = sqrt(50),
    # C to nearest A pixel (1,1) = sqrt(32)) = sqrt(50), weight 1/5.
    g = masks(8, 8, (0, 1, 0, 1))
    s = masks(8, 8, (0, 1, 0, 1), (5, 5, 5, 5))
    assert M.object_hausdorff(s, g) == pytest.approx(0.5 * (0 + math.sqrt(50) / 5))
    assert M.object_f1(s, g) == pytest.approx(2 / 3)  # TP 1, FP 1, FN 0
    assert M.object_dice(s, g) == pytest.approx(0.5 * (1.0 + 4 / 5))


def test_object_hausdorff_disjoint_single_pixels():
    g = masks(1, 5, (0, 0, 0, 0))
    s = masks(1, 5, (0, 0, 3, 3))
    # no overlap: each side's partner is the other pixel, 3 apart
    assert M.object_hausdorff(s, g) == pytest.approx(3.0)
    assert M.object_f1(s, g) == 0.0 and M.object_dice(s, g) == 0.0


def test_object_metrics_empty_conventions():
    empty, full = np.zeros((5, 9), bool), masks(5, 9, (1, 2, 1, 2))
    assert M.object_scores(empty, empty) == (1.0, 1.0, 0.0)
    diag = math.hypot(4, 8)  # largest distance between two pixels of a 5x9 image
    assert M.object_scores(empty, full) == pytest.approx((0.0, 0.0, diag))
    assert M.object_scores(full, empty) == pytest.approx((0.0, 0.0, diag))


def test_perfect_prediction():
    g = masks(16, 16, (0, 3, 0, 3), (8, 12, 6, 14))
    assert M.object_scores(g, g) == (1.0, 1.0, 0.0)


# ----------------------------------------------------------------------------- split report


def test_segmentation_report_keys_and_per_image_means():
    s, g = _two_glands_case()
    pred = torch.from_numpy(np.stack([s, g]))
    target = torch.from_numpy(np.stack([g, g]))
    r = M.segmentation_report(pred, target)
    assert set(r) == {
        "dice",
        "dice_pooled",
        "iou",
        "iou_pooled",
        "obj_f1",
        "obj_dice",
        "obj_hausdorff",
        "obj_f1_pooled",
        "obj_dice_pooled",
        "obj_hausdorff_pooled",
    }
    # image 0: pixel TP 60, |P| 64, |G| 116 -> Dice 120/180; image 1 perfect
    assert r["dice"] == pytest.approx((120 / 180 + 1) / 2)
    assert r["dice_pooled"] == pytest.approx(2 * 176 / (180 + 232))
    assert r["obj_f1"] == pytest.approx((0.5 + 1) / 2)
    assert r["obj_hausdorff"] == pytest.approx(M.object_hausdorff(s, g) / 2)


def _three_images() -> tuple[np.ndarray, np.ndarray]:
    """(S, G), each (3, 3, 12) bool: three 3x12 images whose objects are worked out by hand.

    image 0: G g1 = row 0, cols 0-9 (10 px); S s1 = row 0, cols 0-5 (6 px), inside g1.
      6 > 5 of g1's pixels -> TP.  Dice(g1, s1) = 2*6/(10+6) = 0.75.  H(g1, s1) = 4 (g1's pixel
      (0, 9) to s1's nearest (0, 5); s1 lies in g1).  Scores: F1 1, Dice 0.75, H 4.
      Sums: G area 10, Dice 10*0.75 = 7.5, H 10*4 = 40; S area 6, Dice 4.5, H 24.
    image 1: G g2 = pixel (0, 0); S s2 = pixel (0, 3).  No overlap: FP 1, FN 1; Dice 0; each
      one's nearest partner is the other, 3 apart.  Scores: F1 0, Dice 0, H 3.
      Sums: G area 1, Dice 0, H 3; S area 1, Dice 0, H 3.
    image 2: S = G = three 2x2 blocks (cols 0-1, 5-6, 10-11 of rows 0-1): TP 3; Dice 1; H 0.
      Sums: G area 12, Dice 12, H 0; S the same.
    """
    g = np.stack(
        [
            masks(3, 12, (0, 0, 0, 9)),
            masks(3, 12, (0, 0, 0, 0)),
            masks(3, 12, (0, 1, 0, 1), (0, 1, 5, 6), (0, 1, 10, 11)),
        ]
    )
    s = np.stack([masks(3, 12, (0, 0, 0, 5)), masks(3, 12, (0, 0, 3, 3)), g[2]])
    return s, g


def test_object_metrics_pooled_over_the_split_differ_from_per_image_means():
    s, g = _three_images()
    scores = [M.object_scores(p, t) for p, t in zip(s, g, strict=True)]
    assert np.allclose(scores, [(1, 0.75, 4), (0, 0, 3), (1, 1, 0)])
    r = M.segmentation_report(torch.from_numpy(s), torch.from_numpy(g))
    # per image: the mean of the three images' scores
    assert (r["obj_f1"], r["obj_dice"], r["obj_hausdorff"]) == pytest.approx((2 / 3, 1.75 / 3, 7 / 3))
    # pooled: TP 1+0+3 = 4, FP 0+1+0 = 1, FN 0+1+0 = 1 -> F1 = 2*4 / (2*4 + 1 + 1) = 0.8
    assert r["obj_f1_pooled"] == pytest.approx(0.8)
    # Dice: G side (7.5 + 0 + 12) / (10 + 1 + 12) = 19.5/23, S side (4.5 + 0 + 12) / (6 + 1 + 12) = 16.5/19
    assert r["obj_dice_pooled"] == pytest.approx(0.5 * (19.5 / 23 + 16.5 / 19))  # 0.858
    # Hausdorff: G side (40 + 3 + 0) / 23, S side (24 + 3 + 0) / 19
    assert r["obj_hausdorff_pooled"] == pytest.approx(0.5 * (43 / 23 + 27 / 19))  # 1.645
    # the tallies add up to the same pooled numbers, and F1 alone from the counts
    total = sum((M.object_tally(p, t) for p, t in zip(s, g, strict=True)), M.ObjectTally())
    assert (total.tp, total.fp, total.fn, total.g_area, total.s_area) == (4, 1, 1, 23, 19)
    assert total.scores() == pytest.approx((r["obj_f1_pooled"], r["obj_dice_pooled"], r["obj_hausdorff_pooled"]))
    assert M.object_f1_pooled(s, g) == pytest.approx(0.8)


def test_object_metrics_pooled_with_empty_images():
    # image 0: nothing anywhere (adds no object); image 1: one 4-pixel gland, nothing predicted (5x9 image)
    g = np.stack([np.zeros((5, 9), bool), masks(5, 9, (1, 2, 1, 2))])
    s = np.zeros_like(g)
    r = M.segmentation_report(torch.from_numpy(s), torch.from_numpy(g))
    diag = math.hypot(4, 8)
    # per image: (1, 1, 0) and (0, 0, diag); mean (0.5, 0.5, diag/2)
    assert (r["obj_f1"], r["obj_dice"], r["obj_hausdorff"]) == pytest.approx((0.5, 0.5, diag / 2))
    # pooled: TP 0, FP 0, FN 1 -> F1 0; the gland's Dice 0 and Hausdorff the diagonal, and the S side,
    # with no object at all, takes the G side's terms
    assert (r["obj_f1_pooled"], r["obj_dice_pooled"], r["obj_hausdorff_pooled"]) == pytest.approx((0, 0, diag))
    assert M.object_f1_pooled(s, g) == 0.0 and M.object_f1_pooled(s, s) == 1.0


def _reference_object_hausdorff(pred: np.ndarray, target: np.ndarray) -> float:
    """The GlaS object Hausdorff distance written plainly with SciPy (slow, obviously right): objects are
    8-connected components; each object is paired with the other side's object it overlaps most, else
    with the one nearest in Hausdorff distance; the two sides' area-weighted means are averaged."""
    from scipy import ndimage
    from scipy.spatial.distance import directed_hausdorff

    def objects(m: np.ndarray) -> list[np.ndarray]:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        return [np.argwhere(lab == k) for k in range(1, n + 1)]

    def hausdorff(a: np.ndarray, b: np.ndarray) -> float:
        return max(directed_hausdorff(a, b)[0], directed_hausdorff(b, a)[0])

    def side(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
        total = 0.0
        for x in xs:
            overlap = [len({tuple(p) for p in x} & {tuple(p) for p in y}) for y in ys]
            if max(overlap) > 0:
                h = hausdorff(x, ys[int(np.argmax(overlap))])
            else:
                h = min(hausdorff(x, y) for y in ys)
            total += len(x) * h
        return total / sum(len(x) for x in xs)

    g, s = objects(target), objects(pred)
    return 0.5 * (side(g, s) + side(s, g))


def test_object_hausdorff_matches_scipy_on_realistic_masks():
    # blobs of many sizes, shifted and shrunk predictions, stray false-positive pixels: exercises both of the
    # implementation's shortcuts (small pairs by edge distances, large pairs by distance transforms) and the
    # nearest-partner search with its lower bounds
    rng = np.random.default_rng(0)
    rr, cc = np.mgrid[:96, :96]
    for _ in range(8):
        g = np.zeros((96, 96), bool)
        p = np.zeros((96, 96), bool)
        for _ in range(8):
            r0, c0, rad = *rng.integers(0, 96, 2), rng.integers(2, 16)
            g |= (rr - r0) ** 2 + (cc - c0) ** 2 <= rad**2
            dr, dc = rng.integers(-4, 5, 2)
            p |= (rr - r0 - dr) ** 2 + (cc - c0 - dc) ** 2 <= (rad - 1) ** 2
        p[rng.random((96, 96)) < 0.002] = True
        assert M.object_hausdorff(p, g) == pytest.approx(_reference_object_hausdorff(p, g), rel=1e-9)


def test_metric_text_scales_rounds_and_adds_its_unit_on_request():
    from bench.metrics import Metric

    pct = Metric("acc", "test accuracy", unit="%", scale=100.0, digits=2)
    assert (pct.text(0.992), pct.text(float("nan")), pct.text(None)) == ("99.20", "–", "–")
    assert (pct.text(0.992, unit=True), pct.text(None, unit=True)) == ("99.20 %", "– %")
    assert Metric("dice", "pixel Dice", digits=4).text(0.88, unit=True) == "0.8800"
