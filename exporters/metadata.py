"""The metadata an exported model carries, and the preprocessing it describes.

Every value is a string in the ONNX model's ``metadata_props`` (what ONNX Runtime returns
as ``session.get_modelmeta().custom_metadata_map``); lists and mappings are JSON.  The graph
holds the network only: normalization, channel selection and resizing are done by the
caller, exactly as :meth:`ModelMeta.normalize` does::

    x[n, k, h, w] = (image[n, h, w, channels[k]] / pixel_divisor - mean[k]) / std[k]   # float32, NCHW

where ``image`` is the file decoded in ``color_mode`` (PIL ``"L"`` or ``"RGB"``).

The generic keys are written here; how an image file becomes an input (colour mode, resizing
or tiling, inversion, classes, threshold) is the task's to say (``Task.preprocessing``).
This module needs numpy, SciPy (the post-processing, gland instances) and onnx only (no torch), so
``exporters.predict`` stays light.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bench.instances import CONTOUR_THRESHOLD, instances_from_logits, sigmoid
from bench.postprocess import PostProcess

if TYPE_CHECKING:  # for type hints only: importing the run store would load torch
    from bench.store import LoadedRun

FORMAT_VERSION = "1"

# key -> what it holds; an export writes no other key (a test checks it), and docs/deployment.md's table mirrors it
KEYS: dict[str, str] = {
    "bench_format": 'version of this metadata layout ("1")',
    "task": "`mnist` or `warwick`",
    "kind": "`classification` or `segmentation`",
    "input_name": "the graph's input (`input`)",
    "input_shape": 'JSON, e.g. `["batch", 1, 28, 28]` or `["batch", 2, "height", "width"]` (named axes are dynamic)',
    "color_mode": "decode image files in this PIL mode first: `L` (greyscale) or `RGB`",
    "channels": "JSON list: which channels of the decoded image feed the input channels, in order (WARWICK: `[0, 1]`, "
    "its blue channel is empty)",
    "pixel_divisor": "`255`: pixel values are divided by it before normalization",
    "mean": "JSON list, one per input channel (of pixel values in [0, 1]; training images only)",
    "std": "JSON list, one per input channel",
    "normalization": "`outside-graph`: the caller normalizes; the graph starts at the first convolution",
    "image_size": "JSON `[H, W]` of the training images",
    "resize_policy": "`mnist` (crop to the ink's bounding box, scale it into `ink_box` x `ink_box` keeping its aspect "
    "ratio, centre its centre of mass in `image_size`, as MNIST was made), `resize` (older exports: pad "
    "to a square with the background, resize to `image_size`) or `tile` (WARWICK: any size runs as is; "
    "images larger than `tile_size` are cut into overlapping tiles)",
    "ink_box": "`mnist` policy: side in pixels of the box the digit is scaled into (`20`)",
    "resample": "PIL filter that scales the image: `bilinear` (`resize`) or `lanczos` (`mnist`)",
    "invert": "`auto`: an image whose border is lighter than mid-grey is inverted (MNIST digits are light on dark); "
    "`never` otherwise",
    "tile_size": "JSON `[H, W]` of a tile (segmentation)",
    "tile_overlap": "pixels shared by neighbouring tiles; their logits are averaged there (segmentation)",
    "min_size": "smallest side the graph accepts (segmentation: `2**depth`, or `border + 1` when larger; smaller images are "
    "edge-padded first)",
    "output_name": "the graph's output (`logits`)",
    "output_shape": 'JSON, e.g. `["batch", 10]` or `["batch", 1, "height", "width"]`',
    "activation": "`softmax` (class probabilities) or `sigmoid` (foreground probability per pixel)",
    "classes": "JSON list of class names, index = logit position (classification)",
    "threshold": "foreground when the sigmoid probability is above this (segmentation)",
    "fill_holes": "`true`: holes inside the predicted objects are filled, after `threshold` (segmentation; chosen on "
    "validation with `eval.postprocess`, else `false`); with `instances`, each gland's own holes",
    "min_area": "predicted objects (8-connected) of fewer pixels are removed, after `fill_holes` (segmentation; chosen "
    "on validation with `eval.postprocess`, else `0`); with `instances`, glands of fewer pixels, and the "
    "mask is the union of the glands kept",
    "instances": "`contours` when the output has a second channel, the gland-contour logit: glands are then the "
    "cores (foreground above `threshold`, contour below `contour_threshold`) grown back into the "
    "foreground (`bench/instances.py`); absent for a foreground-only model",
    "contour_threshold": "with `instances`: a pixel whose contour probability is at or above this is no core (chosen "
    "on validation with `eval.postprocess`, else `0.5`)",
    "tta": "`true`: the graph averages the probabilities of the 8 flips/rotations of its input and returns them as "
    "logits (apply the activation as usual); `false`: one forward pass",
    "run_tta": "`true` when the source run's reported test metric averaged 8 flips/rotations",
    "border": "pixels the graph reflect-pads every side of its input by before the network, cropping the output back "
    "(segmentation; the run's `eval.border`, `0`: none)",
    "source_run": "the run folder, relative to the results folder (`runs/<spec>/<variant>/seed-<k>`)",
    "config_hash": "the run's key: hash of its resolved config",
    "variant": "the run's variant name",
    "seed": "the run's seed",
    "val_metric": "JSON `{name: value}`: the run's best validation metric (what chose it)",
    "test_metric": "JSON `{name: value}`: the run's own test metric (PyTorch, with TTA when `run_tta`)",
    "exporter": "torch version, exporter and opset that wrote the file",
    "precision": "`fp32`, or `int8` for the statically quantized copy (`<task>.int8.onnx`)",
}


def _j(x: Any) -> str:
    return json.dumps(x)


def min_side(model: Any, border: int) -> int:
    """The smallest image side a segmentation graph accepts (its dynamic H, W start there, and ``min_size`` says so):
    reflect-padding to a multiple of ``model.multiple`` (2**depth) and by ``border`` mirrors pixels that must exist."""
    return max(int(getattr(model, "multiple", 1)), border + 1)


def metadata_for(run: LoadedRun, source_run: str, exporter: str, tta: bool = False) -> dict[str, str]:
    """The ``metadata_props`` of an exported run (all values strings): the generic keys, then the
    task's preprocessing keys, then the run's provenance."""
    task, info, result = run.task, run.info, run.result
    seg = task.kind == "segmentation"
    contours = seg and bool(run.config.model.get("contours"))  # a second output channel: gland contours
    channels = [int(c) for c in info.channels]
    size = [int(s) for s in info.image_size]
    meta: dict[str, str] = {
        "bench_format": FORMAT_VERSION,
        "task": task.name,
        "kind": task.kind,
        "input_name": "input",
        "input_shape": _j(["batch", len(channels), "height", "width"] if seg else ["batch", len(channels), *size]),
        "channels": _j(channels),
        "pixel_divisor": "255",
        "mean": _j([float(m) for m in info.mean]),
        "std": _j([float(s) for s in info.std]),
        "normalization": "outside-graph",
        "image_size": _j(size),
        "output_name": "logits",
        "output_shape": _j(["batch", 1 + contours, "height", "width"] if seg else ["batch", len(info.classes or [])]),
        "activation": "sigmoid" if seg else "softmax",
        "tta": "true" if tta else "false",
        "run_tta": "true" if run.config.eval.tta else "false",
        "source_run": source_run,
        "config_hash": run.key,
        "exporter": exporter,
        "precision": "fp32",
        **task.preprocessing(info, run.config),
    }
    # the post-processing the run's test metrics were computed with (chosen on validation), else none
    post = (result.postprocess if result is not None else None) or {}
    if contours:
        meta.update(
            instances="contours", contour_threshold=repr(float(post.get("contour_threshold", CONTOUR_THRESHOLD)))
        )
    if seg:  # the graph pads to a multiple of 2**depth (and by eval.border) by reflection, which needs that many pixels
        border = int(run.config.eval.border)
        meta["border"] = str(border)
        meta["min_size"] = str(min_side(run.model, border))
        meta["fill_holes"] = "true" if post.get("fill_holes") else "false"
        meta["min_area"] = str(int(post.get("min_area", 0)))
    if result is not None:
        meta.update(
            variant=str(result.variant or ""),
            seed=str("" if result.seed is None else result.seed),
            val_metric=_j({task.metric: result.val_best}),
            test_metric=_j({task.metric: result.test.get(task.metric)}),
        )
    return meta


def _ink_box(raw: str, image_size: tuple[int, int]) -> int:
    """The ``ink_box`` key's value: a whole number of pixels that fits in the image; raises ValueError otherwise."""
    try:
        box = int(raw)
    except ValueError:
        box = 0
    if not 1 <= box <= min(image_size):
        raise ValueError(f"metadata ink_box {raw!r} is not a whole number of pixels in 1..{min(image_size)}")
    return box


@dataclass
class ModelMeta:
    """The parsed metadata of an exported model; see :data:`KEYS`."""

    task: str
    kind: str
    input_name: str
    output_name: str
    color_mode: str
    channels: list[int]
    pixel_divisor: float
    mean: np.ndarray  # (C,) float32
    std: np.ndarray  # (C,) float32
    image_size: tuple[int, int]
    resize_policy: str
    invert: str = "never"
    ink_box: int = 20  # ``mnist`` policy: side of the box the digit's ink is scaled into (read for that policy only)
    classes: list[str] | None = None
    threshold: float = 0.5
    tile_size: tuple[int, int] | None = None
    tile_overlap: int = 0
    min_size: int = 1
    postprocess: PostProcess = PostProcess()  # segmentation: applied to the thresholded masks
    contour_threshold: float | None = None  # set when the output's channel 1 is the gland-contour logit
    raw: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_props(cls, props: dict[str, str], where: str = "model") -> ModelMeta:
        """Parse ``metadata_props``; raises ValueError naming the missing or bad key."""

        def get(k: str, default: str | None = None) -> str:
            if k in props:
                return props[k]
            if default is None:
                raise ValueError(f"{where}: metadata key {k!r} missing (not exported by `python -m exporters.onnx`?)")
            return default

        try:
            tile = json.loads(get("tile_size", "null"))
            classes = json.loads(get("classes", "null"))
            meta = cls(
                task=get("task"),
                kind=get("kind"),
                input_name=get("input_name"),
                output_name=get("output_name"),
                color_mode=get("color_mode"),
                channels=[int(c) for c in json.loads(get("channels"))],
                pixel_divisor=float(get("pixel_divisor")),
                mean=np.asarray(json.loads(get("mean")), np.float32),
                std=np.asarray(json.loads(get("std")), np.float32),
                image_size=tuple(json.loads(get("image_size"))),
                resize_policy=get("resize_policy"),
                invert=get("invert", "never"),
                classes=classes,
                threshold=float(get("threshold", "0.5")),
                tile_size=tuple(tile) if tile else None,
                tile_overlap=int(get("tile_overlap", "0")),
                min_size=int(get("min_size", "1")),
                postprocess=PostProcess(int(get("min_area", "0")), json.loads(get("fill_holes", "false")) is True),
                contour_threshold=float(get("contour_threshold")) if get("instances", "none") == "contours" else None,
                raw=dict(props),
            )
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{where}: malformed metadata ({e})") from None
        if meta.kind == "classification" and meta.resize_policy == "mnist":
            meta.ink_box = _ink_box(get("ink_box", "20"), meta.image_size)
        return meta

    @classmethod
    def from_onnx(cls, path: str | Path) -> ModelMeta:
        """Read the metadata of an ONNX file (without loading its weights into a session)."""
        model = onnx.load(str(path), load_external_data=False)
        return cls.from_props({p.key: p.value for p in model.metadata_props}, where=str(path))

    def masks(self, logits: np.ndarray) -> np.ndarray:
        """Segmentation answers of a foreground-only graph's logits, (..., H, W) -> (..., H, W) bool: probability
        above ``threshold``, then the post-processing (``fill_holes``, ``min_area``) per (H, W) image.  A model with
        a contour output answers with its instances instead (:meth:`segment`)."""
        return self.postprocess(sigmoid(logits) > self.threshold)

    def instances(self, logits: np.ndarray) -> np.ndarray | None:
        """Gland instance labels (N, H, W) int32 of segmentation logits (N, 2, H, W) (``bench.instances``, with this
        model's thresholds), post-processed per gland (``fill_holes``, ``min_area``:
        :meth:`bench.postprocess.PostProcess.instances`); None for a model without a contour output."""
        if self.contour_threshold is None:
            return None
        return self.postprocess.instances(instances_from_logits(logits, self.threshold, self.contour_threshold))

    def segment(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(masks (N, H, W) bool, gland instances (N, H, W) int32 or None) of segmentation logits (N, K, H, W), as the
        run scored them: a contour model's mask is the union of its post-processed instances, a foreground-only
        model's is :meth:`masks` of channel 0."""
        labels = self.instances(logits)
        return (self.masks(logits[:, 0]), None) if labels is None else (labels > 0, labels)

    def normalize(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, C_src) or (N, H, W) uint8 decoded images -> (N, C, H, W) float32 network input."""
        if images.ndim == 3:
            images = images[..., None]
        x = images[..., self.channels].astype(np.float32) / np.float32(self.pixel_divisor)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
