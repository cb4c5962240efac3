"""Verify an exported model against PyTorch on the whole test set.

The test inputs are built from the raw image files with the model's own metadata
(:meth:`~exporters.metadata.ModelMeta.normalize`), the way a user's code would, so a wrong
normalization constant in the metadata fails here too (as a metric far from the run's).

Tolerances (an export outside them is an error; see :data:`TOLERANCE`):

* every task: ``max |logit_ort - logit_torch| <= 1e-3 * max(1, max |logit_torch|)``;
* classification: identical predicted classes on at least 99.9 % of the test images;
* segmentation: ``|Dice_ort - Dice_torch| <= 1e-3`` (mean per-image Dice of the masks
  thresholded at the metadata's ``threshold`` and post-processed by its ``fill_holes`` and ``min_area``, as
  ``bench predict`` does; the contest's pooled object F1 of those masks is reported beside it).
* a segmentation model with a contour output (metadata ``instances: contours``): its gland instances
  (``bench.instances``, from the outputs and the metadata's thresholds and post-processing alone) give the
  object metrics (``obj_f1``, ``obj_dice``, ``obj_hausdorff`` per image and pooled, and the pooled detection
  counts), their union the Dice, and ``|obj_f1_ort - obj_f1_torch| <= 1e-3``.

A TTA graph (``--tta``) is compared with the harness's own TTA evaluation (segmentation: the
function that scored the run) and checked on probabilities instead of logits,
``max |p_ort - p_torch| <= 1e-4``: its logits are ``log(p / (1 - p))`` of clamped probabilities,
whose last float32 bits near p = 0 or 1 swing the logit by a few hundredths without changing
any mask.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.metrics import dice_per_image, object_f1_counts, object_f1_pooled, segmentation_report
from bench.tasks.base import ImageSet, Task
from exporters.metadata import ModelMeta
from exporters.runtime import run_batched, session

TOLERANCE = {"logit_rtol": 1e-3, "tta_prob_atol": 1e-4, "min_agreement": 0.999, "max_dice_diff": 1e-3}
EVAL_BATCH = {"classification": 500, "segmentation": 8}


class ParityError(RuntimeError):
    """The exported model's outputs differ from PyTorch's beyond :data:`TOLERANCE`."""


@torch.inference_mode()
def torch_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, batch: int) -> np.ndarray:
    """PyTorch eager logits of ``x`` (N, C, H, W) float32 on the CPU (``forward``: a model in eval mode)."""
    t = torch.from_numpy(x)
    return torch.cat([forward(t[i : i + batch]).float() for i in range(0, len(t), batch)]).numpy()


def probabilities(meta: ModelMeta, logits: np.ndarray) -> np.ndarray:
    """The activation the metadata names: softmax over classes or per-pixel sigmoid."""
    t = torch.from_numpy(logits)
    return (torch.softmax(t, 1) if meta.kind == "classification" else torch.sigmoid(t)).numpy()


def agreement(meta: ModelMeta, a: np.ndarray, b: np.ndarray) -> float:
    """Share of identical answers of two sets of logits: predicted classes, or thresholded pixels."""
    if meta.kind == "classification":
        return float((a.argmax(1) == b.argmax(1)).mean())
    pa, pb = (torch.sigmoid(torch.from_numpy(x)) > meta.threshold for x in (a, b))
    return float((pa == pb).float().mean())


def score(task: Task, meta: ModelMeta, logits: np.ndarray, targets: np.ndarray) -> float:
    """The task's primary metric of an exported model's outputs, read as its metadata says (segmentation: the
    masks post-processed as the run chose on validation; a contour model's: the union of its instances)."""
    if meta.kind == "segmentation" and meta.contour_threshold is not None:
        masks, _ = meta.segment(logits)
        return float(dice_per_image(torch.from_numpy(masks), torch.from_numpy(targets)).mean())
    if meta.kind == "segmentation":
        return task.score_outputs(logits, targets, meta.threshold, post=meta.postprocess)
    return task.score_outputs(logits, targets, meta.threshold)


def object_report(meta: ModelMeta, logits: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """The object metrics of a contour model's outputs, from the logits (N, 2, H, W) and the metadata alone:
    per-image means (``obj_f1``, ``obj_dice``, ``obj_hausdorff``, as the run reports them) and the detection
    counts pooled over the images (``tp``, ``fp``, ``fn``) with the pooled metrics (``obj_f1_pooled``,
    ``obj_dice_pooled``, ``obj_hausdorff_pooled``), and the pixel ``dice`` of the instances' union; targets
    (N, H, W) bool."""
    mask, instances = meta.segment(logits)
    assert instances is not None, "a model without a contour output has no instances"
    report = segmentation_report(torch.from_numpy(mask), torch.from_numpy(targets), instances)
    tp, fp, fn = (int(v) for v in np.sum([object_f1_counts(i, t) for i, t in zip(instances, targets, strict=True)], 0))
    keys = ("dice", "obj_f1", "obj_dice", "obj_hausdorff", "obj_f1_pooled", "obj_dice_pooled", "obj_hausdorff_pooled")
    return {**{k: report[k] for k in keys}, "tp": tp, "fp": fp, "fn": fn}


def compare(
    task: Task, meta: ModelMeta, ort_logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray, tta: bool = False
) -> dict[str, Any]:
    """Parity numbers of two sets of logits of the same images (no checks)."""
    objects = None
    if meta.kind == "segmentation" and meta.contour_threshold is not None:  # the network's own gland instances
        objects = {side: object_report(meta, x, targets) for side, x in (("ort", ort_logits), ("torch", ref_logits))}
    # a contour model's metric is the Dice of its instances' union, which object_report has computed already
    v_ort, v_ref = (
        (objects["ort"]["dice"], objects["torch"]["dice"])
        if objects
        else (score(task, meta, ort_logits, targets), score(task, meta, ref_logits, targets))
    )
    out: dict[str, Any] = {
        "n": int(len(targets)),
        "max_abs_logit_diff": float(np.abs(ort_logits - ref_logits).max()),
        "logit_scale": float(np.abs(ref_logits).max()),
        "metric": task.metric,
        "metric_ort": v_ort,
        "metric_torch": v_ref,
        "metric_diff": v_ort - v_ref,
    }
    out["agreement" if meta.kind == "classification" else "pixel_agreement"] = agreement(meta, ort_logits, ref_logits)
    if objects:
        out["objects_ort"], out["objects_torch"] = objects["ort"], objects["torch"]
    elif meta.kind == "segmentation":  # the shipped pipeline's object F1 (GlaS, pooled), from the metadata alone
        out["obj_f1_pooled_ort"] = object_f1_pooled(meta.masks(ort_logits[:, 0]), targets)
        out["obj_f1_pooled_torch"] = object_f1_pooled(meta.masks(ref_logits[:, 0]), targets)
    if tta:
        out["tta"] = True
        out["max_abs_prob_diff"] = float(
            np.abs(probabilities(meta, ort_logits) - probabilities(meta, ref_logits)).max()
        )
    return out


def gap_text(report: dict[str, Any]) -> str:
    """The checked difference of a :func:`compare` report, for messages: ``max |Δlogit| 2.1e-05`` (``|Δp|`` for TTA)."""
    if report.get("tta"):
        return f"max |Δp| {report['max_abs_prob_diff']:.1e}"
    return f"max |Δlogit| {report['max_abs_logit_diff']:.1e}"


def check(meta: ModelMeta, report: dict[str, Any]) -> list[str]:
    """The tolerance violations of a :func:`compare` report (empty when it passes)."""
    bad = []
    if report.get("tta"):
        if not report["max_abs_prob_diff"] <= TOLERANCE["tta_prob_atol"]:  # also catches NaN
            bad.append(f"max |probability difference| {report['max_abs_prob_diff']:.3g} > {TOLERANCE['tta_prob_atol']}")
    else:
        atol = TOLERANCE["logit_rtol"] * max(1.0, report["logit_scale"])
        if not report["max_abs_logit_diff"] <= atol:  # also catches NaN
            bad.append(f"max |logit difference| {report['max_abs_logit_diff']:.3g} > {atol:.3g}")
    if meta.kind == "classification" and not report["agreement"] >= TOLERANCE["min_agreement"]:
        bad.append(
            f"identical predictions {100 * report['agreement']:.3f} % < {100 * TOLERANCE['min_agreement']:.1f} %"
        )
    if meta.kind == "segmentation" and not abs(report["metric_diff"]) <= TOLERANCE["max_dice_diff"]:
        bad.append(f"|Dice difference| {abs(report['metric_diff']):.3g} > {TOLERANCE['max_dice_diff']}")
    if "objects_ort" in report:
        diff = abs(report["objects_ort"]["obj_f1"] - report["objects_torch"]["obj_f1"])
        if not diff <= TOLERANCE["max_dice_diff"]:
            bad.append(f"|object F1 difference| {diff:.3g} > {TOLERANCE['max_dice_diff']}")
    return bad


def verify(
    onnx_path: str | Path,
    reference: Callable[[torch.Tensor], torch.Tensor],
    task: Task,
    meta: ModelMeta,
    data: ImageSet,
    tta: bool = False,
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the whole test set through ONNX Runtime (CPU) and ``reference`` (PyTorch: the network in eval mode,
    or with ``tta`` the TTA evaluation, see :func:`exporters.export.graph_module`); raise
    :class:`ParityError` outside :data:`TOLERANCE`.  Returns (parity report, the normalized inputs (N, C, H, W))."""
    x = meta.normalize(data.images)
    bs = EVAL_BATCH[meta.kind]
    report = compare(
        task, meta, run_batched(session(onnx_path), x, bs), torch_logits(reference, x, bs), data.targets, tta
    )
    report["tolerance"] = dict(TOLERANCE)
    bad = check(meta, report)
    if bad:
        raise ParityError(
            f"{onnx_path}: ONNX Runtime disagrees with PyTorch on the {len(x)} test images: " + "; ".join(bad)
        )
    return report, x
