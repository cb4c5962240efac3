"""``python -m bench predict MODEL.onnx PATH... [--out DIR]``: run an exported model on new images.

Everything about preprocessing comes from the model's metadata (see ``exporters/metadata.py``):

* **classification** (MNIST): the image is decoded as greyscale; when ``invert`` is ``auto`` and
  its border (outermost row and column on each side) is lighter than mid-grey on average, it is
  inverted.  Then it is prepared following ``resize_policy`` (``mnist``: the digit centred as MNIST's
  were; ``resize``: padded and resized; ``exporters/images.py``).  Output: ``<out>/predictions.csv`` with
  ``file,class,probability``; an image without ink under the ``mnist`` policy still gets its row, and a warning.
* **segmentation** (WARWICK): the image is decoded in ``color_mode`` and keeps its size: the graph takes any
  height and width (``tile`` policy; large images are tiled, ``exporters/images.py``).  The mask is the probability
  above ``threshold``, with holes filled when ``fill_holes`` and objects under ``min_area`` pixels removed (the
  post-processing the run chose on validation; none in older exports).  Output per image: a mask (0/255) and an
  overlay (the image dimmed outside the predicted glands, which are outlined), plus ``<out>/predictions.csv`` with
  ``file,mask,overlay,foreground_fraction`` (mask and overlay relative to ``--out``; how they are named:
  ``exporters/inputs.py``).  A model with a gland-contour output (metadata ``instances: contours``) also writes
  ``<stem>_instances.png``, a 16-bit PNG of gland labels (0 background, k the k-th gland: ``bench/instances.py``, at
  the metadata's ``contour_threshold``), and the CSV gains ``instances,glands`` (its file and the number of glands);
  the post-processing then works per gland (each gland's holes filled, glands under ``min_area`` removed) and the
  mask is the union of the glands kept.

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
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench import files
from bench.log import ArgumentParser, add_options, count, note, setup
from exporters.images import digit, overlay, tiled
from exporters.inputs import ImageError, Input, collect_inputs, is_colour, opens_as_image, output_names, read_image
from exporters.metadata import ModelMeta
from exporters.runtime import available_providers, session

log = logging.getLogger("exporters.predict")  # not __name__, which is "__main__" under `python -m`

POLICIES = {"classification": ("mnist", "resize"), "segmentation": ("tile",)}


def load_model(path: str | Path) -> tuple[Any, ModelMeta]:
    """(onnxruntime session, :class:`~exporters.metadata.ModelMeta`) of an exported model.

    Raises FileNotFoundError or ValueError (with the reason) for anything this module cannot run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        sess = session(path, "cuda" if "cuda" in available_providers() else "cpu")
    except Exception as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise ValueError(f"{path}: not an ONNX model onnxruntime can load ({why})") from None
    meta = ModelMeta.from_props(dict(sess.get_modelmeta().custom_metadata_map), where=str(path))
    known = POLICIES.get(meta.kind, ())
    if meta.resize_policy not in known:  # a newer export: guessing its preprocessing would give quietly wrong answers
        raise ValueError(
            f"{path}: resize_policy {meta.resize_policy!r} of a {meta.kind!r} model is unknown to this "
            f"version (known: {', '.join(known) or 'none'})"
        )
    return sess, meta


# --------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class Answer:
    """A classification answer: the class and its softmax probability."""

    label: str
    probability: float
    blank: bool = False  # no ink was found: the network still answered, but the answer means nothing


def classify(sess: Any, meta: ModelMeta, gray: np.ndarray) -> Answer:
    """The answer for one (H, W) uint8 greyscale (or (H, W, 3) RGB) image, ``blank`` when the ``mnist`` policy found
    no ink in it (so the caller can say so)."""
    prepared = digit(gray, meta)
    x = meta.normalize(prepared.image[None])
    logits = sess.run([meta.output_name], {meta.input_name: x})[0][0].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    k = int(p.argmax())
    return Answer(meta.classes[k] if meta.classes else str(k), float(p[k]), blank=prepared.blank)


def segment_logits(sess: Any, meta: ModelMeta, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Logits (K, H, W) float32 of one normalized image ``x`` (1, C, H, W), following the ``tile`` policy
    (:func:`exporters.images.tiled`; K = 1, the foreground; 2 with a contour output, see ``instances``)."""

    def run(tiles: np.ndarray) -> np.ndarray:  # (B, C, h, w) -> (B, K, h, w)
        return sess.run([meta.output_name], {meta.input_name: tiles})[0]

    return tiled(run, x, meta.tile_size, meta.tile_overlap, meta.min_size, batch)


def segment(sess: Any, meta: ModelMeta, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(mask (H, W) bool, overlay (H, W, 3) uint8, gland instance labels (H, W) int32 or None) of one decoded
    image (H, W[, C]); the instances come from a model with a contour output (``meta.instances``)."""
    x = meta.normalize(img[None])
    logits = segment_logits(sess, meta, x)  # (K, H, W): the foreground, then the contours when the model has them
    masks, labels = meta.segment(logits[None])  # threshold, then the post-processing chosen on validation
    mask = masks[0]
    rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]
    return mask, overlay(rgb, mask), None if labels is None else labels[0]


def _save_png(path: Path, arr: np.ndarray) -> None:
    """Write (H, W) or (H, W, 3) uint8 ``arr`` as a PNG, atomically (no half-written file if interrupted)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    files.atomic_write(path, lambda f: f.write(buf.getvalue()), mode="wb")


def _classification_row(sess: Any, meta: ModelMeta, inp: Input, img: np.ndarray) -> list[str]:
    """``file,class,probability`` of one decoded image; a blank one still gets its row, as one was asked for, but
    not a silent one."""
    answer = classify(sess, meta, img)
    if meta.color_mode in (None, "L") and is_colour(read_image(inp.path, "RGB")):
        log.warning(
            f"{inp.path}: a colour image, and this model reads greyscale digits; its answer {answer.label!r} "
            "may mean nothing"
        )
    if answer.blank:
        log.warning(f"{inp.path}: no ink found (a blank image?); its answer {answer.label!r} means nothing")
    return [str(inp.path), answer.label, f"{answer.probability:.6f}"]


def _segmentation_row(
    sess: Any, meta: ModelMeta, inp: Input, img: np.ndarray, name: str | None, out: Path
) -> list[str]:
    """Write the mask, overlay (and instances) PNGs of one decoded image as ``out/name_*.png``; its CSV row
    (``file,mask,overlay,foreground_fraction[,instances,glands]``)."""
    if name is None:  # its header did not open a moment ago: changed under us
        raise ImageError("not an image file (unrecognized format)")
    mask, over, labels = segment(sess, meta, img)
    _save_png(out / f"{name}_mask.png", mask.astype(np.uint8) * 255)
    _save_png(out / f"{name}_overlay.png", over)
    row = [str(inp.path), f"{name}_mask.png", f"{name}_overlay.png", f"{mask.mean():.6f}"]
    if labels is not None:  # 16-bit PNG: gland k has value k, background 0
        _save_png(out / f"{name}_instances.png", labels.astype(np.uint16))
        row += [f"{name}_instances.png", str(int(labels.max(initial=0)))]
    return row


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every option with its help; ``--help`` also states outputs and exit statuses)."""
    p = ArgumentParser(
        prog="python -m bench predict",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Classify digit images or segment histology images with an exported model; "
        "the preprocessing is read from the model's metadata.",
        epilog="outputs: --out/predictions.csv; segmentation also writes <stem>_mask.png and <stem>_overlay.png\n"
        "  in folders mirroring each image's path under its PATH (<name>_mask.png when several images\n"
        "  there share a stem; numbered, with a note on stderr, when even names clash); a model with a\n"
        "  gland-contour output also writes <stem>_instances.png (16-bit gland labels).\n"
        "exit status: 0 all images done; 1 some failed, or no files found; 2 usage error\n"
        "  (a PATH that does not exist, MODEL not an exported model).",
    )
    p.add_argument(
        "model",
        metavar="MODEL",
        help="an ONNX file written by `python -m exporters.onnx` (e.g. results/onnx/mnist.onnx)",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files or folders (searched recursively; hidden files skipped); all must exist",
    )
    p.add_argument(
        "--out",
        default="predictions",
        metavar="DIR",
        type=files.output_folder,
        help="output folder, created if needed (default: ./predictions)",
    )
    add_options(p)
    return p


def _names(inputs: list[Input]) -> list[str | None]:
    """Every segmentation input's output name, at once: whether a stem is shared depends on the other images."""
    names, notes = output_names([i if opens_as_image(i.path) else None for i in inputs])
    for line in notes:
        note(log, line)
    return names


def _predict_all(sess: Any, meta: ModelMeta, inputs: list[Input], out: Path) -> tuple[list[list[str]], list[Path]]:
    """(CSV rows of the images done, paths of those that failed, each reported as it fails)."""
    seg = meta.kind == "segmentation"
    names = _names(inputs) if seg else [None] * len(inputs)
    rows: list[list[str]] = []
    failed: list[Path] = []
    for inp, name in zip(inputs, names, strict=True):
        try:
            img = read_image(inp.path, meta.color_mode or "L")
            rows.append(
                _segmentation_row(sess, meta, inp, img, name, out) if seg else _classification_row(sess, meta, inp, img)
            )
        except ImageError as e:
            failed.append(inp.path)
            log.error(f"{inp.path}: {e}")
    return rows, failed


def _write_csv(meta: ModelMeta, rows: list[list[str]], out: Path) -> None:
    """``out/predictions.csv`` of the rows (a header per kind of model), and a line saying what was written."""
    seg = meta.kind == "segmentation"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    header = ["file", "mask", "overlay", "foreground_fraction"] if seg else ["file", "class", "probability"]
    w.writerow(header + (["instances", "glands"] if meta.contour_threshold is not None else []))
    w.writerows(rows)
    files.write_text(out / "predictions.csv", buf.getvalue())
    pngs = (2 + (meta.contour_threshold is not None)) * len(rows)
    log.info(f"wrote {out / 'predictions.csv'}" + (f" and {pngs} PNGs under {out}" if seg else ""))


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all images done, 1 some failed or none found, 2 usage error."""
    setup()  # before the arguments: their errors are printed by its handler
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    setup(args.verbosity)
    out = Path(args.out)
    try:
        inputs = collect_inputs(args.paths, out)
        sess, meta = load_model(args.model)
    except (OSError, ValueError) as e:
        log.error(str(e))
        return 2
    if not inputs:
        log.error(f"no images found in {', '.join(args.paths)}")
        return 1
    rows, failed = _predict_all(sess, meta, inputs, out)
    if rows:
        _write_csv(meta, rows, out)
    listed = ": " + ", ".join(map(str, failed)) if failed else ""
    log.info(f"{count(len(rows), 'image')} done, {len(failed)} failed{listed}")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
