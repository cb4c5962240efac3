"""Verify an exported model against PyTorch on the whole test set.

The test inputs are built from the raw image files with the model's own metadata
(:meth:`~exporters.metadata.ModelMeta.normalize`), the way a user's code would, so a wrong
normalization constant in the metadata fails here too (as a metric far from the run's).

Tolerances (an export outside them is an error; see :data:`TOLERANCE`):

* every task: ``max |logit_ort - logit_torch| <= 1e-3 * max(1, max |logit_torch|)``;
* classification: identical predicted classes on at least 99.9 % of the test images;
* segmentation: ``|Dice_ort - Dice_torch| <= 1e-3`` (mean per-image Dice of the masks
  thresholded at the metadata's ``threshold``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporters.metadata import ModelMeta
from exporters.runtime import run_batched, session

TOLERANCE = {"logit_rtol": 1e-3, "min_agreement": 0.999, "max_dice_diff": 1e-3}
EVAL_BATCH = {"classification": 500, "segmentation": 8}


class ParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond :data:`TOLERANCE`."""


@dataclass
class ImageSet:
    """Decoded images of one split: ``images`` uint8 (N, H, W, C_src); ``targets`` (N,) int64
    class labels or (N, H, W) bool masks."""

    images: np.ndarray
    targets: np.ndarray
    names: list[str]


def load_images(task: str, root: str | Path, split: str = "test") -> ImageSet:
    """The raw ``split`` (``test`` or ``train``) images of ``task`` under the data ``root``."""
    if task == "mnist":
        from bench.tasks.mnist import load_mnist_arrays

        tx, ty, sx, sy = load_mnist_arrays(root)
        x, y = (sx, sy) if split == "test" else (tx, ty)
        return ImageSet(x.numpy()[..., None], y.numpy(), [f"{split}/{i}" for i in range(len(x))])
    if task == "warwick":
        from bench.tasks.warwick import find_folder, read_pairs

        names, images, masks = read_pairs(find_folder(root) / ("Test" if split == "test" else "Train"))
        return ImageSet(images, masks, names)
    raise ValueError(f"no test data loader for task {task!r}")


@torch.inference_mode()
def torch_logits(model: nn.Module, x: np.ndarray, batch: int) -> np.ndarray:
    """PyTorch eager logits of ``x`` (N, C, H, W) float32, in eval mode on the CPU."""
    model.eval()
    t = torch.from_numpy(x)
    return torch.cat([model(t[i : i + batch]).float() for i in range(0, len(t), batch)]).numpy()


def score(meta: ModelMeta, logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """The task's metric of ``logits``: ``acc`` (classification) or ``dice`` (mean per-image pixel Dice)."""
    from bench.metrics import dice_per_image

    if meta.kind == "classification":
        return {"acc": float((logits.argmax(1) == targets).mean())}
    masks = torch.sigmoid(torch.from_numpy(logits[:, 0])) > meta.threshold
    return {"dice": float(dice_per_image(masks, torch.from_numpy(targets)).mean())}


def compare(meta: ModelMeta, ort_logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Parity numbers of two sets of logits of the same images (no checks)."""
    diff = float(np.abs(ort_logits - ref_logits).max())
    m_ort, m_ref = score(meta, ort_logits, targets), score(meta, ref_logits, targets)
    (name, v_ort), v_ref = next(iter(m_ort.items())), next(iter(m_ref.values()))
    out: dict[str, Any] = {"n": int(len(targets)), "max_abs_logit_diff": diff,
                           "logit_scale": float(np.abs(ref_logits).max()),
                           "metric": name, "metric_ort": v_ort, "metric_torch": v_ref, "metric_diff": v_ort - v_ref}
    if meta.kind == "classification":
        out["agreement"] = float((ort_logits.argmax(1) == ref_logits.argmax(1)).mean())
    else:
        thr = meta.threshold
        p_ort = torch.sigmoid(torch.from_numpy(ort_logits)) > thr
        p_ref = torch.sigmoid(torch.from_numpy(ref_logits)) > thr
        out["pixel_agreement"] = float((p_ort == p_ref).float().mean())
    return out


def check(meta: ModelMeta, report: dict[str, Any]) -> list[str]:
    """The tolerance violations of a :func:`compare` report (empty when it passes)."""
    bad = []
    atol = TOLERANCE["logit_rtol"] * max(1.0, report["logit_scale"])
    if not report["max_abs_logit_diff"] <= atol:  # also catches NaN
        bad.append(f"max |logit difference| {report['max_abs_logit_diff']:.3g} > {atol:.3g}")
    if meta.kind == "classification" and not report["agreement"] >= TOLERANCE["min_agreement"]:
        bad.append(f"identical predictions {100 * report['agreement']:.3f} % < {100 * TOLERANCE['min_agreement']:.1f} %")
    if meta.kind == "segmentation" and not abs(report["metric_diff"]) <= TOLERANCE["max_dice_diff"]:
        bad.append(f"|Dice difference| {abs(report['metric_diff']):.3g} > {TOLERANCE['max_dice_diff']}")
    return bad


def verify(onnx_path: str | Path, model: nn.Module, meta: ModelMeta, data: ImageSet) -> tuple[dict[str, Any], np.ndarray]:
    """Run the whole test set through ONNX Runtime (CPU) and PyTorch; raise :class:`ParityError`
    outside :data:`TOLERANCE`.  Returns (parity report, the normalized inputs (N, C, H, W))."""
    x = meta.normalize(data.images)
    bs = EVAL_BATCH[meta.kind]
    ort_out = run_batched(session(onnx_path), x, bs)
    ref = torch_logits(model, x, bs)
    report = compare(meta, ort_out, ref, data.targets)
    report["tolerance"] = dict(TOLERANCE)
    bad = check(meta, report)
    report["passed"] = not bad
    if bad:
        raise ParityError(f"{onnx_path}: ONNX Runtime disagrees with PyTorch on the {len(x)} test images: " + "; ".join(bad))
    return report, x
