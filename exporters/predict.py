"""``python -m bench predict MODEL.onnx PATH... [--out DIR]``: run an exported model on new images.

Everything about preprocessing comes from the model's metadata (see ``exporters/metadata.py``):

* **classification** (MNIST): the image is decoded as greyscale; when ``invert`` is ``auto`` and
  its border (outermost row and column on each side) is lighter than mid-grey on average, it is
  inverted (MNIST digits are light on a dark background; a scan or drawing is usually the
  opposite); it is padded to a square with its background and resized (bilinear) to
  ``image_size``.  Output: ``<out>/predictions.csv`` with ``file,digit,probability``.
* **segmentation** (WARWICK): the image is decoded in ``color_mode`` and keeps its size: the graph
  takes any height and width (``tile`` policy).  An image larger than ``tile_size`` is cut into
  tiles overlapping by ``tile_overlap`` pixels whose logits are averaged; a side shorter than
  ``min_size`` is edge-padded and cropped back.  Output per image: ``<stem>_mask.png`` (0/255)
  and ``<stem>_overlay.png`` (the image dimmed outside the predicted glands, which are outlined), plus
  ``<out>/predictions.csv`` with ``file,mask,overlay,foreground_fraction``.

PATH may be files or folders; a folder is searched recursively and every file in it is tried
(hidden files, names starting with ``.``, and files under ``--out`` are left out).  A file that
cannot be read as an image is reported with its path on stderr and the others are still
processed.  Exit status: 0 all images done, 1 some failed (or none found), 2 usage error
(e.g. MODEL is not an exported model).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

BACKGROUND_DIM = 0.45  # overlay: brightness kept outside the predicted glands
OUTLINE_COLOR = (0, 255, 255)  # cyan: WARWICK images have no blue, so it stands out


class ImageError(ValueError):
    """A file could not be used as an input image."""


def load_model(path: str | Path) -> tuple[Any, Any]:
    """(onnxruntime session, :class:`~exporters.metadata.ModelMeta`) of an exported model."""
    from exporters.metadata import ModelMeta
    from exporters.runtime import available_providers, session

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        sess = session(path, "cuda" if "cuda" in available_providers() else "cpu")
    except Exception as e:
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({type(e).__name__}: {str(e)[:200]})") from None
    return sess, ModelMeta.from_props(dict(sess.get_modelmeta().custom_metadata_map), where=str(path))


def iter_inputs(paths: list[str], out_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, None) for each file to try, (path, reason) for a command-line path that does not exist."""
    out = out_dir.resolve()
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(s.startswith(".") for s in rel) and out not in f.resolve().parents:
                    yield f, None
        elif p.is_file():
            yield p, None
        else:
            yield p, "no such file or directory"


def read_image(path: Path, mode: str) -> np.ndarray:
    """(H, W) uint8 for mode ``L``, (H, W, 3) for ``RGB``; transparency is composited on white."""
    from PIL import Image, UnidentifiedImageError

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
    except Exception as e:  # truncated or corrupt file, decoder error
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise ImageError("empty image")
    return arr


# --------------------------------------------------------------------------- classification


def prepare_digit(gray: np.ndarray, meta: Any) -> np.ndarray:
    """(H, W) uint8 greyscale -> (H', W') uint8 as the network saw digits: light on dark, ``image_size``."""
    from PIL import Image

    if meta.invert == "auto":
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        if border.mean() > 127:
            gray = 255 - gray
    h, w = gray.shape
    th, tw = meta.image_size
    if (h, w) == (th, tw):
        return gray
    side = max(h, w)
    if h != w:  # pad to a square with the background (the border's median) so the digit keeps its shape
        bg = int(np.median(np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])))
        sq = np.full((side, side), bg, np.uint8)
        sq[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = gray
        gray = sq
    return np.asarray(Image.fromarray(gray).resize((tw, th), Image.Resampling.BILINEAR))


def classify(sess: Any, meta: Any, gray: np.ndarray) -> tuple[str, float]:
    """(class name, softmax probability) of one (H, W) uint8 greyscale image."""
    x = meta.normalize(prepare_digit(gray, meta)[None])
    logits = sess.run([meta.output_name], {meta.input_name: x})[0][0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    return (meta.classes[k] if meta.classes else str(k)), float(p[k])


# --------------------------------------------------------------------------- segmentation


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering ``length`` with tiles of ``tile`` (the last one flush with the end)."""
    if length <= tile:
        return [0]
    s = list(range(0, length - tile, stride))
    return s + [length - tile]


def segment_logits(sess: Any, meta: Any, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Logits (H, W) float32 of one normalized image ``x`` (1, C, H, W), following the ``tile`` policy."""
    _, _, h, w = x.shape
    ph, pw = max(0, meta.min_size - h), max(0, meta.min_size - w)
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge")
    H, W = x.shape[-2:]
    th, tw = meta.tile_size or (H, W)
    th, tw = min(th, H), min(tw, W)
    if (th, tw) == (H, W):
        return sess.run([meta.output_name], {meta.input_name: x})[0][0, 0, :h, :w]
    ov = meta.tile_overlap
    boxes = [(r, c) for r in _starts(H, th, max(1, th - ov)) for c in _starts(W, tw, max(1, tw - ov))]
    total = np.zeros((H, W), np.float32)
    count = np.zeros((H, W), np.float32)
    for i in range(0, len(boxes), batch):
        part = boxes[i : i + batch]
        tiles = np.stack([x[0, :, r : r + th, c : c + tw] for r, c in part])
        out = sess.run([meta.output_name], {meta.input_name: tiles})[0][:, 0]
        for (r, c), o in zip(part, out, strict=True):
            total[r : r + th, c : c + tw] += o
            count[r : r + th, c : c + tw] += 1
    return (total / count)[:h, :w]


def overlay(rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` with everything outside ``mask`` (H, W) bool dimmed and the glands outlined."""
    out = rgb.astype(np.float32)
    out[~mask] *= BACKGROUND_DIM
    p = np.pad(mask, 1, mode="edge")  # the image border is no gland edge
    edge = mask & ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    out[edge] = OUTLINE_COLOR
    return out.round().clip(0, 255).astype(np.uint8)


def segment(sess: Any, meta: Any, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask (H, W) bool, overlay (H, W, 3) uint8) of one decoded image (H, W[, C])."""
    x = meta.normalize(img[None])
    logits = segment_logits(sess, meta, x)
    with np.errstate(over="ignore"):  # exp of a very negative logit: inf -> probability 0, as it should be
        mask = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) > meta.threshold
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return mask, overlay(rgb, mask)


# --------------------------------------------------------------------------- command line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench predict",
                                description="Classify digit images or segment histology images with an exported model; "
                                            "the preprocessing is read from the model's metadata.")
    p.add_argument("model", help="an ONNX file written by `python -m exporters.onnx` (e.g. results/onnx/mnist.onnx)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    return p.parse_args(argv)


def _unique(stem: str, used: set[str]) -> str:
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all images done, 1 some failed or none found, 2 usage error."""
    from PIL import Image

    from bench import files

    try:
        args = _parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    out = Path(args.out)
    try:
        sess, meta = load_model(args.model)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seg = meta.kind == "segmentation"
    rows: list[list[Any]] = []
    failed: list[Path] = []
    used: set[str] = set()
    for path, problem in iter_inputs(args.paths, out):
        try:
            if problem:
                raise ImageError(problem)
            img = read_image(path, "L" if not seg else meta.color_mode)
            if seg:
                mask, over = segment(sess, meta, img)
                stem = _unique(path.stem, used)
                for suffix, arr in (("mask", mask.astype(np.uint8) * 255), ("overlay", over)):
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="PNG")
                    files.atomic_write(out / f"{stem}_{suffix}.png", lambda f, b=buf: f.write(b.getvalue()), mode="wb")
                rows.append([str(path), f"{stem}_mask.png", f"{stem}_overlay.png", f"{mask.mean():.6f}"])
            else:
                label, prob = classify(sess, meta, img)
                rows.append([str(path), label, f"{prob:.6f}"])
        except ImageError as e:
            failed.append(path)
            print(f"error: {path}: {e}", file=sys.stderr)
    if rows:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file", "mask", "overlay", "foreground_fraction"] if seg else ["file", "digit", "probability"])
        w.writerows(rows)
        files.write_text(out / "predictions.csv", buf.getvalue())
        print(f"wrote {out / 'predictions.csv'}" + (f" and {2 * len(rows)} PNGs to {out}" if seg else ""), file=sys.stderr)
    print(f"{len(rows)} image(s) done, {len(failed)} failed" + (": " + ", ".join(map(str, failed)) if failed else ""),
          file=sys.stderr)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
