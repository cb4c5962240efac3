"""``python -m bench predict MODEL.onnx PATH... [--out DIR]``: run an exported model on new images.

Everything about preprocessing comes from the model's metadata (see ``exporters/metadata.py``):

* **classification** (MNIST): the image is decoded as greyscale; when ``invert`` is ``auto`` and
  its border (outermost row and column on each side) is lighter than mid-grey on average, it is
  inverted (MNIST digits are light on a dark background; a scan or drawing is usually the
  opposite).  Then, following ``resize_policy``:

  - ``mnist`` (current exports): the digit is prepared the way MNIST itself was made.  The
    background (median of the border) is brought to 0 and the strongest ink to 255; the ink's
    bounding box (pixels at least ``INK_THRESHOLD`` of the strongest ink, leaving out specks apart
    from the digit that hold under ``INK_SPECK`` of the ink) is scaled, aspect ratio kept,
    so that its longer side is ``ink_box`` pixels (default 20; antialiased: LANCZOS after a box
    reduction for large downscales), and pasted into a black ``image_size`` image (28x28) with its
    intensity-weighted center of mass at the center pixel (14, 14), clipped at the border.  An
    image without ink (nothing ``MIN_INK`` grey levels above the background) falls back to ``resize``.
  - ``resize`` (older exports): padded to a square with its background and resized (bilinear) to
    ``image_size``; an image already of that size is used as is.

  Output: ``<out>/predictions.csv`` with ``file,class,probability``.
* **segmentation** (WARWICK): the image is decoded in ``color_mode`` and keeps its size: the graph
  takes any height and width (``tile`` policy).  An image larger than ``tile_size`` is cut into
  tiles overlapping by ``tile_overlap`` pixels whose logits are averaged; a side shorter than
  ``min_size`` is edge-padded and cropped back.  The mask is the probability above ``threshold``, with holes
  filled when ``fill_holes`` and objects under ``min_area`` pixels removed (the post-processing the run chose on
  validation; none in older exports).  Output per image: a mask (0/255) and an overlay
  (the image dimmed outside the predicted glands, which are outlined), plus ``<out>/predictions.csv``
  with ``file,mask,overlay,foreground_fraction`` (mask and overlay relative to ``--out``).  A model with
  a gland-contour output (metadata ``instances: contours``) also writes ``<stem>_instances.png``, a
  16-bit PNG of gland labels (0 background, k the k-th gland: ``bench/instances.py``, at the metadata's
  ``contour_threshold``), and the CSV gains ``instances,glands`` (its file and the number of glands); the
  post-processing then works per gland (each gland's holes filled, glands under ``min_area`` removed) and the
  mask is the union of the glands kept.

  Output names (:func:`output_names`): the folders under ``--out`` mirror each image's path
  relative to the PATH argument it came from (``PATH/sub/x.png`` -> ``<out>/sub/x_mask.png``; a
  file argument writes to ``<out>`` itself).  An image is named by its stem, ``x_mask.png`` and
  ``x_overlay.png``, unless another image of the same output folder has the same stem (ignoring
  case, as some file systems do): then by its whole name, ``x.png_mask.png`` / ``x.jpg_mask.png``.
  Images that still clash (same name from different PATHs) are numbered, ``x.png-1_mask.png``,
  ``x.png-2_mask.png``, and a note on stderr says which input got which name.

PATH may be files or folders; a folder is searched recursively and every file in it is tried
(hidden files, names starting with ``.``, and files under ``--out`` are left out).  A file that
cannot be read as an image is reported with its path on stderr and the others are still
processed.  Exit status: 0 all images done; 1 some failed, or no files found at all; 2 usage
error (a PATH that does not exist, MODEL not an exported model), before any image is processed.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench import files
from exporters.metadata import ModelMeta
from exporters.runtime import available_providers, session

BACKGROUND_DIM = 0.45  # overlay: brightness kept outside the predicted glands
OUTLINE_COLOR = (0, 255, 255)  # cyan: WARWICK images have no blue, so it stands out

# ``mnist`` policy (see the module docstring).  Levels are grey levels above the background.
INK_THRESHOLD = 0.3  # ink for the bounding box: at least this share of the strongest ink (drops antialiasing haze, noise)
INK_SPECK = 0.05  # ink detached from the rest at a side of the box, and less than this share of it: dust, left out
MIN_INK = 24  # strongest ink below this many levels: a blank page (JPEG noise and shading stay below)
INK_PEAK_PERCENTILE = 99  # "strongest ink" of the pixels above MIN_INK: one hot pixel must not set the contrast
INK_PAD = 2  # output pixels kept around the scaled box, for the resampling filter's spill
POLICIES = {"classification": ("mnist", "resize"), "segmentation": ("tile",)}


class ImageError(ValueError):
    """A file could not be used as an input image."""


class UsageError(ValueError):
    """The command line names something that cannot be used (exit status 2)."""


def load_model(path: str | Path) -> tuple[Any, Any]:
    """(onnxruntime session, :class:`~exporters.metadata.ModelMeta`) of an exported model.

    Raises FileNotFoundError or ValueError (with the reason) for anything this module cannot run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        sess = session(path, "cuda" if "cuda" in available_providers() else "cpu")
    except Exception as e:
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({type(e).__name__}: {str(e)[:200]})") from None
    meta = ModelMeta.from_props(dict(sess.get_modelmeta().custom_metadata_map), where=str(path))
    known = POLICIES.get(meta.kind, ())
    if meta.resize_policy not in known:  # a newer export: guessing its preprocessing would give quietly wrong answers
        raise ValueError(f"{path}: resize_policy {meta.resize_policy!r} of a {meta.kind!r} model is unknown to this "
                         f"version (known: {', '.join(known) or 'none'})")
    if meta.resize_policy == "mnist":
        ink_box(meta)  # fail now, not on the first image
    return sess, meta


def ink_box(meta: Any) -> int:
    """Side of the box the digit's ink is scaled into (``ink_box``, default 20: MNIST's 20 in 28)."""
    raw = meta.raw.get("ink_box", "20")
    try:
        box = int(raw)
    except ValueError:
        box = 0
    if not 1 <= box <= min(meta.image_size):
        raise ValueError(f"metadata ink_box {raw!r} is not a whole number of pixels in 1..{min(meta.image_size)}")
    return box


# --------------------------------------------------------------------------- inputs and output names


@dataclass(frozen=True)
class Input:
    """One file to predict on."""

    path: Path  # as the user will recognize it: the PATH argument, joined with the file's place under it
    rel: PurePath  # relative to the PATH argument it came from (a file argument: its name); outputs mirror it


def collect_inputs(paths: list[str], out_dir: Path) -> list[Input]:
    """The files to try, in command-line order (a folder's sorted, recursively).

    Hidden files (any part of the path below the folder starting with ``.``) and files under
    ``out_dir`` (earlier outputs) are left out.  Raises :class:`UsageError` naming every PATH
    that does not exist, so that a typo stops the command before it does anything.
    """
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UsageError("no such file or directory: " + ", ".join(missing))
    out = out_dir.resolve()
    found: list[Input] = []
    seen: set[Path] = set()  # a file reached twice (a folder and its subfolder both given) is predicted once
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not any(s.startswith(".") for s in rel.parts) and out not in f.resolve().parents:
                    if f.resolve() not in seen:
                        seen.add(f.resolve())
                        found.append(Input(f, rel))
        elif p.resolve() not in seen:
            seen.add(p.resolve())
            found.append(Input(p, PurePath(p.name)))
    return found


def output_names(inputs: list[Input | None]) -> tuple[list[str | None], list[str]]:
    """(output name of each input, notes): see the module docstring for the rule.

    A name is a POSIX path relative to ``--out`` without the suffix (``sub/x`` for
    ``sub/x_mask.png`` and ``sub/x_overlay.png``); None inputs (files that are not images, which
    must not push an image off its plain name) get None.  Names are compared ignoring case.
    The notes, one per clash that had to be numbered, are for stderr.
    """
    by_folder: dict[PurePath, list[int]] = defaultdict(list)
    for i, inp in enumerate(inputs):
        if inp is not None:
            by_folder[inp.rel.parent].append(i)
    names: list[str | None] = [None] * len(inputs)
    notes: list[str] = []
    for folder, idx in by_folder.items():
        rels = {i: inputs[i].rel for i in idx}  # type: ignore[union-attr]
        stems = Counter(r.stem.casefold() for r in rels.values())
        key = {i: r.stem if stems[r.stem.casefold()] == 1 else r.name for i, r in rels.items()}
        uses = Counter(k.casefold() for k in key.values())
        taken = set(uses)
        clashes: dict[str, list[int]] = defaultdict(list)
        for i in idx:
            if uses[key[i].casefold()] == 1:
                names[i] = (folder / key[i]).as_posix()
            else:
                clashes[key[i].casefold()].append(i)
        for group in clashes.values():
            # every one of them numbered: none keeps the plain name, so none is mistaken for another
            k, moved = 0, []
            for i in group:
                k += 1
                while f"{key[i]}-{k}".casefold() in taken:
                    k += 1
                taken.add(f"{key[i]}-{k}".casefold())
                names[i] = (folder / f"{key[i]}-{k}").as_posix()
                moved.append(f"{inputs[i].path} -> {names[i]}_mask.png")  # type: ignore[union-attr]
            notes.append(f"note: {len(group)} inputs would write {(folder / key[group[0]]).as_posix()}_mask.png; "
                         f"numbered instead (and _overlay.png alike): " + ", ".join(moved))
    return names, notes


def opens_as_image(path: Path) -> bool:
    """Whether PIL recognizes the file's header (cheap: the pixels are not decoded)."""
    try:
        with Image.open(path):
            return True
    except files.IMAGE_ERRORS:
        return False


def read_image(path: Path, mode: str) -> np.ndarray:
    """(H, W) uint8 for mode ``L``, (H, W, 3) for ``RGB``; transparency is composited on white."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageError("not an image file (unrecognized format)") from None
    except files.IMAGE_ERRORS as e:  # truncated or corrupt file, decoder error
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise ImageError("empty image")
    return arr


# --------------------------------------------------------------------------- classification


def _border(gray: np.ndarray) -> np.ndarray:
    """(2H + 2W,) the outermost row and column on each side of (H, W) ``gray`` ((2H + 2W, 3) for (H, W, 3) RGB)."""
    return np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])


def light_on_dark(gray: np.ndarray, meta: Any) -> np.ndarray:
    """(H, W) uint8, inverted when ``invert`` is ``auto`` and the border is lighter than mid-grey."""
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


def prepare_digit(gray: np.ndarray, meta: Any) -> np.ndarray:
    """(H, W) uint8 greyscale -> ``image_size`` uint8 as the network saw digits: light on dark, following ``resize_policy``."""
    return _prepare(gray, meta)[0]


def _prepare(gray: np.ndarray, meta: Any) -> tuple[np.ndarray, bool]:
    """(:func:`prepare_digit`'s image, whether it had ink: False for a blank page under the ``mnist`` policy)."""
    gray = light_on_dark(gray, meta)
    if meta.resize_policy == "mnist":
        digit = center_digit(gray, meta.image_size, ink_box(meta))
        if digit is not None:
            return digit, True
        return pad_and_resize(gray, meta.image_size), False  # a blank page: still an answer, as one was asked for
    return pad_and_resize(gray, meta.image_size), True


def classify(sess: Any, meta: Any, gray: np.ndarray) -> tuple[str, float]:
    """(class name, softmax probability) of one (H, W) uint8 greyscale (or (H, W, 3) RGB) image; raises :class:`BlankImage`
    (carrying that answer) when the ``mnist`` policy found no ink, so the caller can say so."""
    image, inked = _prepare(gray, meta)
    x = meta.normalize(image[None])
    logits = sess.run([meta.output_name], {meta.input_name: x})[0][0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    answer = (meta.classes[k] if meta.classes else str(k)), float(p[k])
    if not inked:
        raise BlankImage(*answer)
    return answer


class BlankImage(Exception):
    """No ink was found; the network still answered (``label``, ``probability``), but that answer means nothing."""

    def __init__(self, label: str, probability: float):
        super().__init__(label, probability)
        self.label, self.probability = label, probability


# --------------------------------------------------------------------------- segmentation


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``length`` with tiles of ``tile`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    s = list(range(0, length - tile, stride))
    return s + [length - tile]


def segment_logits(sess: Any, meta: Any, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Logits (K, H, W) float32 of one normalized image ``x`` (1, C, H, W), following the ``tile`` policy
    (K = 1, the foreground; 2 with a contour output, see ``instances`` in the metadata)."""
    _, _, h, w = x.shape
    ph, pw = max(0, meta.min_size - h), max(0, meta.min_size - w)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    H, W = x.shape[-2:]
    th, tw = meta.tile_size or (H, W)
    th, tw = min(th, H), min(tw, W)
    if (th, tw) == (H, W):
        return sess.run([meta.output_name], {meta.input_name: x})[0][0, :, :h, :w]
    ov = meta.tile_overlap
    boxes = [(r, c) for r in _starts(H, th, max(1, th - ov)) for c in _starts(W, tw, max(1, tw - ov))]
    total: np.ndarray | None = None
    count = np.zeros((H, W), np.float32)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        tiles = np.stack([x[0, :, r : r + th, c : c + tw] for r, c in part])
        out = sess.run([meta.output_name], {meta.input_name: tiles})[0]
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


def segment(sess: Any, meta: Any, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mask (H, W) bool, overlay (H, W, 3) uint8, gland instance labels (H, W) int32 or None) of one decoded
    image (H, W[, C]); the instances come from a model with a contour output (``meta.instances``)."""
    x = meta.normalize(img[None])
    logits = segment_logits(sess, meta, x)  # (K, H, W): the foreground, then the contours when the model has them
    masks, labels = meta.segment(logits[None])  # threshold, then the post-processing chosen on validation
    mask = masks[0]
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return mask, overlay(rgb, mask), None if labels is None else labels[0]


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option with its help; ``--help`` also states outputs and exit statuses)."""
    p = argparse.ArgumentParser(
        prog="python -m bench predict", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify digit images or segment histology images with an exported model; "
                    "the preprocessing is read from the model's metadata.",
        epilog="outputs: --out/predictions.csv; segmentation also writes <stem>_mask.png and <stem>_overlay.png\n"
               "  in folders mirroring each image's path under its PATH (<name>_mask.png when several images\n"
               "  there share a stem; numbered, with a note on stderr, when even names clash); a model with a\n"
               "  gland-contour output also writes <stem>_instances.png (16-bit gland labels).\n"
               "exit status: 0 all images done; 1 some failed, or no files found; 2 usage error\n"
               "  (a PATH that does not exist, MODEL not an exported model).")
    p.add_argument("model", metavar="MODEL",
                   help="an ONNX file written by `python -m exporters.onnx` (e.g. results/onnx/mnist.onnx)")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively; hidden files skipped); all must exist")
    p.add_argument("--out", default="predictions", metavar="DIR",
                   help="output folder, created if needed (default: ./predictions)")
    return p


def _save_png(path: Path, arr: np.ndarray) -> None:
    """Write (H, W) or (H, W, 3) uint8 ``arr`` as a PNG, atomically (no half-written file if interrupted)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    files.atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all images done, 1 some failed or none found, 2 usage error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = Path(args.out)
    try:
        inputs = collect_inputs(args.paths, out)
        sess, meta = load_model(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not inputs:
        print(f"error: no images found in {', '.join(args.paths)}", file=sys.stderr)
        return 1
    seg = meta.kind == "segmentation"
    names: list[str | None] = []
    if seg:  # all names first: whether a stem is shared depends on the other images
        names, notes = output_names([i if opens_as_image(i.path) else None for i in inputs])
        for note in notes:
            print(note, file=sys.stderr)
    rows: list[list[Any]] = []
    failed: list[Path] = []
    for k, inp in enumerate(inputs):
        try:
            img = read_image(inp.path, meta.color_mode or "L")
            if seg:
                name = names[k]
                if name is None:  # its header did not open a moment ago: changed under us
                    raise ImageError("not an image file (unrecognized format)")
                mask, over, labels = segment(sess, meta, img)
                _save_png(out / f"{name}_mask.png", mask.astype(np.uint8) * 255)
                _save_png(out / f"{name}_overlay.png", over)
                rows.append([str(inp.path), f"{name}_mask.png", f"{name}_overlay.png", f"{mask.mean():.6f}"])
                if labels is not None:  # 16-bit PNG: gland k has value k, background 0
                    _save_png(out / f"{name}_instances.png", labels.astype(np.uint16))
                    rows[-1] += [f"{name}_instances.png", str(int(labels.max(initial=0)))]
            else:
                try:
                    label, prob = classify(sess, meta, img)
                except BlankImage as blank:  # still a row, as the user asked for one, but not a silent one
                    label, prob = blank.label, blank.probability
                    print(f"warning: {inp.path}: no ink found (a blank image?); its answer {label!r} means nothing",
                          file=sys.stderr)
                rows.append([str(inp.path), label, f"{prob:.6f}"])
        except ImageError as e:
            failed.append(inp.path)
            print(f"error: {inp.path}: {e}", file=sys.stderr)
    if rows:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        header = ["file", "mask", "overlay", "foreground_fraction"] if seg else ["file", "class", "probability"]
        w.writerow(header + (["instances", "glands"] if meta.contour_threshold is not None else []))
        w.writerows(rows)
        files.write_text(out / "predictions.csv", buf.getvalue())
        pngs = (2 + (meta.contour_threshold is not None)) * len(rows)
        print(f"wrote {out / 'predictions.csv'}" + (f" and {pngs} PNGs under {out}" if seg else ""), file=sys.stderr)
    print(f"{len(rows)} image(s) done, {len(failed)} failed" + (": " + ", ".join(map(str, failed)) if failed else ""),
          file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
