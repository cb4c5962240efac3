"""How ``bench predict`` turns a decoded image into network input, and a mask into an overlay.

Classification (the model's ``resize_policy``, after :func:`light_on_dark`):

- ``mnist`` (current exports): the digit is prepared the way MNIST itself was made (:func:`center_digit`).  The
  background (median of the border) is brought to 0 and the strongest ink to 255; the ink's bounding box (pixels at
  least ``INK_THRESHOLD`` of the strongest ink, leaving out specks apart from the digit that hold under
  ``INK_SPECK`` of the ink) is scaled, aspect ratio kept, so that its longer side is ``ink_box`` pixels (default
  20; antialiased: LANCZOS after a box reduction for large downscales), and pasted into a black ``image_size``
  image (28x28) with its intensity-weighted center of mass at the center pixel (14, 14), clipped at the border.
  An image without ink (nothing ``MIN_INK`` grey levels above the background) falls back to ``resize``.
- ``resize`` (older exports, image_folder): padded to a square with its background and resized (bilinear) to
  ``image_size``; an image already of that size is used as is (:func:`pad_and_resize`).

Segmentation (``tile`` policy, :func:`tiled`): an image larger than ``tile_size`` is cut into tiles overlapping by
``tile_overlap`` pixels whose logits are averaged; a side shorter than ``min_size`` is edge-padded and cropped back.

Pure numpy and PIL: no session, no files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from exporters.metadata import ModelMeta

BACKGROUND_DIM = 0.45  # overlay: brightness kept outside the predicted glands
OUTLINE_COLOR = (0, 255, 255)  # cyan: WARWICK images have no blue, so it stands out

# ``mnist`` policy (see the module docstring).  Levels are grey levels above the background.
INK_THRESHOLD = 0.3  # ink for the bounding box: at least this share of the strongest ink (drops haze, noise)
INK_SPECK = 0.05  # ink detached from the rest at a side of the box, and less than this share of it: dust, left out
MIN_INK = 24  # strongest ink below this many levels: a blank page (JPEG noise and shading stay below)
INK_PEAK_PERCENTILE = 99  # "strongest ink" of the pixels above MIN_INK: one hot pixel must not set the contrast
INK_PAD = 2  # output pixels kept around the scaled box, for the resampling filter's spill


# --------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Digit:
    """A digit image as the network saw digits, and whether ink was found in it."""

    image: np.ndarray  # (H, W) uint8, ``image_size``
    blank: bool  # the ``mnist`` policy found no ink: the image was resized as is, and any answer means nothing


def _border(gray: np.ndarray) -> np.ndarray:
    """(2H + 2W,) the outermost row and column on each side of (H, W) ``gray`` ((2H + 2W, 3) for (H, W, 3) RGB)."""
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def light_on_dark(gray: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """(H, W) uint8, inverted when ``invert`` is ``auto`` and the border is lighter than mid-grey (MNIST digits are
    light on a dark background; a scan or drawing is usually the opposite)."""
    if meta.invert == "auto" and _border(gray).mean() > 127:
        return 255 - gray
    return gray


def pad_and_resize(gray: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``resize`` policy: (H, W) uint8 -> ``size`` uint8, padded to a square with the background, bilinear
    ((H, W, 3) RGB likewise, the background per channel: ``image_folder`` trains on images prepared so)."""
    h, w = gray.shape[:2]
    th, tw = size
    if (h, w) == (th, tw):
        return gray
    side = max(h, w)
    if h != w:  # pad to a square with the background (the border's median) so the digit keeps its shape
        bg = np.median(_border(gray), axis=0).astype(np.uint8)
        sq = np.empty((side, side, *gray.shape[2:]), np.uint8)
        sq[...] = bg
        sq[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
        gray = sq
    return np.asarray(Image.fromarray(gray).resize((tw, th), Image.Resampling.BILINEAR))


def _span(profile: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the non-zero part of ``profile`` (L,) >= 0 (ink per row or column).

    A run of non-zero entries at either end that is cut off from the rest by empty ones and holds
    less than ``INK_SPECK`` of the total is left out: a speck of dust, not part of the digit.  Ink
    joined to the digit is never trimmed, so the strokes' ends stay in the box.
    """
    idx = np.flatnonzero(profile > 0)
    gaps = np.flatnonzero(np.diff(idx) > 1)
    starts, stops = np.r_[idx[0], idx[gaps + 1]], np.r_[idx[gaps] + 1, idx[-1] + 1]  # runs [starts[k], stops[k])
    mass = np.array([profile[a:b].sum() for a, b in zip(starts, stops, strict=True)])
    kept = np.flatnonzero(mass >= INK_SPECK * mass.sum())
    if kept.size == 0:  # many small runs (dots, dashes): none stands out as dust, keep them all
        return int(starts[0]), int(stops[-1])
    return int(starts[kept[0]]), int(stops[kept[-1]])


def _level(gray: np.ndarray) -> np.ndarray | None:
    """(H, W) float32 ink: ``gray`` (H, W) uint8 light-on-dark with the background (border median) at
    0 and the strongest ink at 255; None when nothing stands ``MIN_INK`` levels above the background.

    MNIST backgrounds are exactly 0 and its strokes reach 255; grey paper or a soft pencil would
    otherwise put the whole input far from anything the network has seen.
    """
    ink = np.clip(gray.astype(np.float32) - np.float32(np.median(_border(gray))), 0, None)
    strong = ink[ink >= MIN_INK]
    if strong.size == 0:
        return None
    ink *= np.float32(255 / np.percentile(strong, INK_PEAK_PERCENTILE))
    return np.minimum(ink, 255, out=ink)


def _crop(img: np.ndarray, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """``img[top:bottom, left:right]`` of (H, W) ``img``, zero where the rectangle leaves the image."""
    out = np.zeros((bottom - top, right - left), img.dtype)
    part = img[max(top, 0) : max(bottom, 0), max(left, 0) : max(right, 0)]
    out[max(-top, 0) : max(-top, 0) + part.shape[0], max(-left, 0) : max(-left, 0) + part.shape[1]] = part
    return out


def _scale_box(ink: np.ndarray, rows: tuple[int, int], cols: tuple[int, int], box: int) -> np.ndarray:
    """(h, w) float32: the ink in rows x cols ([start, stop) each) of (H, W) ``ink``, scaled so that the longer
    side is ``box`` pixels, aspect ratio kept, centered in ``INK_PAD`` pixels of margin on each side.

    The margin keeps the resampling filter's spill around the strokes; LANCZOS is sharp and
    antialiased, and ``reducing_gap`` box-averages a large drawing first (faster, and a better
    low-pass than the filter alone at a 20x reduction).
    """
    scale = box / max(rows[1] - rows[0], cols[1] - cols[0])
    # output size: the scaled box rounded up (round() first: 20.000000001 must stay 20), plus the margin
    h, w = (math.ceil(round((b - a) * scale, 6)) + 2 * INK_PAD for a, b in (rows, cols))
    y0 = (rows[0] + rows[1]) / 2 - h / scale / 2  # source rectangle mapped onto the output, top left
    x0 = (cols[0] + cols[1]) / 2 - w / scale / 2
    # cut it out with a few more source pixels (zeros beyond the image), so the filter reads real background
    m = math.ceil(INK_PAD / scale) + 1
    top, left = math.floor(y0) - m, math.floor(x0) - m
    window = _crop(ink, top, left, math.ceil(y0 + h / scale) + m, math.ceil(x0 + w / scale) + m)
    src = (x0 - left, y0 - top, x0 - left + w / scale, y0 - top + h / scale)
    out = Image.fromarray(window, "F").resize((w, h), Image.Resampling.LANCZOS, box=src, reducing_gap=3.0)
    return np.asarray(out).clip(0, 255)  # clip: LANCZOS rings a little past 0 and 255


def _paste_centered(patch: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``size`` (H, W) float32 black image with (h, w) ``patch`` pasted so that its intensity-weighted center of
    mass lands on pixel (H // 2, W // 2), by a whole-pixel shift; what falls past the border is cut.

    MNIST did the same: its digits' centers of mass are at (14, 14) give or take the +-0.5 of a
    rounding (standard deviation 0.29 over the test set).
    """
    total = patch.sum()
    if total <= 0:
        return np.zeros(size, np.float32)
    h, w = patch.shape
    my = (patch.sum(axis=1) * np.arange(h)).sum() / total
    mx = (patch.sum(axis=0) * np.arange(w)).sum() / total
    dy, dx = round(size[0] // 2 - my), round(size[1] // 2 - mx)  # out[i + dy, j + dx] = patch[i, j]
    return _crop(patch, -dy, -dx, size[0] - dy, size[1] - dx)


def center_digit(gray: np.ndarray, size: tuple[int, int], box: int) -> np.ndarray | None:
    """``mnist`` policy: (H, W) uint8 light-on-dark -> ``size`` (28, 28) uint8 as MNIST digits were made.

    Levels (:func:`_level`), the ink's bounding box (pixels at least ``INK_THRESHOLD`` of the
    strongest ink, so that antialiasing haze and noise do not widen it; :func:`_span` drops
    specks), scaled into ``box`` pixels (:func:`_scale_box`), centered by its center of mass
    (:func:`_paste_centered`).  None when there is no ink (the caller falls back to ``resize``).
    """
    ink = _level(gray)
    if ink is None:
        return None
    mass = np.where(ink >= INK_THRESHOLD * 255, ink, 0)
    patch = _scale_box(ink, _span(mass.sum(axis=1)), _span(mass.sum(axis=0)), box)
    return _paste_centered(patch, size).round().astype(np.uint8)


def digit(gray: np.ndarray, meta: ModelMeta) -> Digit:
    """(H, W) uint8 greyscale -> the ``image_size`` digit the network expects: light on dark, following
    ``resize_policy``.  A blank page under the ``mnist`` policy is still resized (an answer was asked for) and
    marked ``blank``."""
    gray = light_on_dark(gray, meta)
    if meta.resize_policy == "mnist":
        centered = center_digit(gray, meta.image_size, meta.ink_box)
        if centered is not None:
            return Digit(centered, blank=False)
        return Digit(pad_and_resize(gray, meta.image_size), blank=True)
    return Digit(pad_and_resize(gray, meta.image_size), blank=False)


def prepare_digit(gray: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """(H, W) uint8 greyscale -> ``image_size`` uint8 as the network saw digits (:func:`digit`'s image)."""
    return digit(gray, meta).image


# --------------------------------------------------------------------------- segmentation


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``length`` with tiles of ``tile`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    s = list(range(0, length - tile, stride))
    return s + [length - tile]


def tiled(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    tile_size: tuple[int, int] | None,
    overlap: int,
    min_size: int,
    batch: int = 8,
) -> np.ndarray:
    """Logits (K, H, W) float32 of one normalized image ``x`` (1, C, H, W), following the ``tile`` policy.

    ``run`` maps a batch (B, C, h, w) to its logits (B, K, h, w).  A side under ``min_size`` is edge-padded and
    cropped back; an image larger than ``tile_size`` (None: any size) runs as tiles overlapping by ``overlap``
    pixels, ``batch`` at a time, whose logits are averaged where they overlap.
    """
    _, _, h, w = x.shape
    ph, pw = max(0, min_size - h), max(0, min_size - w)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    H, W = x.shape[-2:]
    th, tw = tile_size or (H, W)
    th, tw = min(th, H), min(tw, W)
    if (th, tw) == (H, W):
        return run(x)[0, :, :h, :w]
    boxes = [(r, c) for r in _starts(H, th, max(1, th - overlap)) for c in _starts(W, tw, max(1, tw - overlap))]
    total: np.ndarray | None = None
    count = np.zeros((H, W), np.float32)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        out = run(np.stack([x[0, :, r : r + th, c : c + tw] for r, c in part]))
        if total is None:
            total = np.zeros((out.shape[1], H, W), np.float32)
        for (r, c), o in zip(part, out, strict=True):
            total[:, r : r + th, c : c + tw] += o
            count[r : r + th, c : c + tw] += 1
    return (total / count)[:, :h, :w]


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` with everything outside ``mask`` (H, W) bool dimmed and the glands outlined."""
    out = rgb.astype(np.float32)
    out[~mask] *= BACKGROUND_DIM
    p = np.pad(mask, 1, mode="edge")  # the image border is no gland edge
    edge = mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    out[edge] = OUTLINE_COLOR
    return out.round().clip(0, 255).astype(np.uint8)
