"""Export one finished run to ONNX, check the graph and verify it against PyTorch on the test set.

Each export writes ``<out>/<name>.onnx``: the network alone, dynamic batch axis (and dynamic
height/width for segmentation), opset :data:`OPSET`, checked by ``onnx.checker``, with its
preprocessing and provenance in ``metadata_props`` (see :mod:`exporters.metadata`), and
``<name>.json`` beside it (provenance, parity; the benchmark adds its figures).  The file is
written under a temporary name and only renamed into place once :func:`exporters.parity.verify`
passed on the whole test set: a failed export leaves no file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import files
from bench.augment import dihedral, dihedral_tta
from bench.config import ConfigError
from bench.ensemble import Ensemble
from bench.inference import with_border
from bench.models import count_flops
from bench.runner import run_data_root
from bench.store import LoadedRun, load_run
from bench.tasks.base import ImageSet
from exporters.metadata import ModelMeta, metadata_for, min_side
from exporters.parity import verify

OPSET = 20  # torch.onnx's default in torch 2.14; onnxruntime >= 1.17 runs it


class ExportError(RuntimeError):
    """Export or graph check failed (no file written)."""


class PadAndCrop(nn.Module):
    """Export form of a segmentation net (``bench.models.segmentation``): its optional
    ``input_norm``, then reflect-pad H, W up to a multiple of ``net.multiple``, ``net.body`` and
    crop back, as the net's own ``forward`` does, except that it pads unconditionally (by 0 when
    nothing is needed): the graph has no shape-dependent branch and keeps H, W dynamic.
    (N, C, H, W) -> (N, K, H, W); needs H, W >= ``net.multiple`` (the net's own forward
    switches to replicate padding below that).  Parity against the net's forward guards it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.multiple = int(net.multiple)
        self.input_norm = getattr(net, "input_norm", None) or nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.input_norm(x)
        h, w = x.shape[-2], x.shape[-1]
        k = self.multiple
        ph, pw = (k - h % k) % k, (k - w % k) % k
        return self.net.body(F.pad(x, (0, pw, 0, ph), mode="reflect"))[..., :h, :w]


TTA_EPS = 1e-6  # probabilities are clamped to [eps, 1 - eps] before the TTA graph turns them back into logits


class DihedralTTA(nn.Module):
    """Export form of test-time augmentation: the mean over the 8 flips/rotations of the input.

    Segmentation: ``bench.augment.dihedral_tta`` (the harness's own TTA: sigmoid of each
    transform's output, mapped back, summed in the same order, / 8), then turned back into a logit
    (:func:`_logit`), so that the graph's output
    means what a plain export's does: ``sigmoid(output)`` is the (TTA) foreground probability and a
    user's code needs no change.  (N, C, H, W) -> (N, K, H, W): K = 2 with a contour output, whose
    channel is averaged the same way (each transform's output mapped back before the mean).
    Classification (square inputs only): the mean of the 8 softmaxes, returned as its log (again
    ``softmax(output)`` is the averaged probability).  (N, C, S, S) -> (N, K).
    """

    def __init__(self, net: nn.Module, segmentation: bool):
        super().__init__()
        self.net, self.segmentation = net, segmentation

    def forward(self, x: Tensor) -> Tensor:
        if self.segmentation:  # the very function that scored the run
            return _logit(dihedral_tta(self.net, x))
        total = None
        for e in range(8):
            p = torch.softmax(self.net(dihedral(x, e)).float(), 1)  # a class does not move with the image
            total = p if total is None else total + p
        return torch.log((total / 8).clamp_min(TTA_EPS))


def _logit(p: Tensor) -> Tensor:
    """``log(p / (1 - p))`` of ``p`` clamped to [:data:`TTA_EPS`, 1 - eps]: finite, and ``sigmoid`` gives ``p`` back."""
    p = p.clamp(TTA_EPS, 1 - TTA_EPS)
    return torch.log(p) - torch.log1p(-p)


class Border(nn.Module):
    """Export form of ``eval.border``: ``bench.inference.with_border`` around ``net`` (reflect-pad every side by
    ``border`` pixels, crop the output back).  (N, C, H, W) -> (N, K, H, W); needs H, W > ``border``."""

    def __init__(self, net: nn.Module, border: int):
        super().__init__()
        self.net, self.border = net, int(border)

    def forward(self, x: Tensor) -> Tensor:
        return with_border(self.net, x, self.border)


def graph_module(model: nn.Module, kind: str, tta: bool, border: int = 0) -> nn.Module:
    """What an export's graph computes, as a PyTorch module in eval mode: the network, or its :class:`DihedralTTA`
    (segmentation: the harness's own TTA evaluation, as a logit), inside :class:`Border` when the run scored its
    inputs padded (``eval.border``).  Parity compares the graph with it, the benchmark times it, and its FLOPs are
    the export's."""
    model.eval()
    net = DihedralTTA(model, kind == "segmentation").eval() if tta else model
    return Border(net, border).eval() if border else net


def tta_refusal(kind: str, input_size: tuple[int, int] | list[int]) -> str | None:
    """Why a TTA graph cannot be made for this model (None when it can): flips and rotations by 90 degrees
    of a fixed-size classification input must give an input of the same shape."""
    h, w = (int(v) for v in input_size)
    if kind == "classification" and h != w:
        return (
            f"--tta averages the 8 flips/rotations of the input, but this classification model takes {h}x{w} "
            f"images: a rotation by 90 degrees gives {w}x{h}, which it cannot take; export without --tta"
        )
    return None


def export_graph(model: nn.Module, example: Tensor, segmentation: bool, tta: bool = False, border: int = 0) -> Any:
    """``torch.onnx.export`` (the dynamo exporter) with a dynamic batch axis, plus dynamic H, W for
    segmentation; with ``tta`` the graph is :class:`DihedralTTA` of the network, with ``border`` (segmentation,
    ``eval.border``) inside :class:`Border`.  A seed ensemble
    (:class:`bench.ensemble.Ensemble`) is one graph holding every member (each in its export form), TTA around the
    whole.  Returns the ``onnx.ModelProto``."""
    if isinstance(model, Ensemble):
        net: nn.Module = Ensemble([PadAndCrop(m) if segmentation else m for m in model.members], segmentation)
    else:
        net = PadAndCrop(model) if segmentation else model
    if tta:
        net = DihedralTTA(net, segmentation)
    if border:
        net = Border(net, border)
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dims: dict[int, Any] = {0: batch}
    if segmentation:
        k = min_side(model, border)
        dims.update(
            {2: torch.export.Dim("height", min=k, max=1 << 15), 3: torch.export.Dim("width", min=k, max=1 << 15)}
        )
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=(dims,),
            opset_version=OPSET,
            external_data=False,
            verbose=False,
        )
    return prog.model_proto


@dataclass
class Exported:
    """An export that passed parity: paths, metadata, the PyTorch model and the test data."""

    path: Path
    record_path: Path
    record: dict[str, Any]
    meta: ModelMeta
    run: LoadedRun
    inputs: np.ndarray  # normalized test inputs (N, C, H, W) float32
    test: ImageSet
    data_root: str
    tta: bool = False  # the graph averages the 8 flips/rotations (DihedralTTA)

    @property
    def model(self) -> nn.Module:
        """What the graph computes, as a PyTorch module: see :func:`graph_module`."""
        return graph_module(self.run.model, self.meta.kind, self.tta, self.run.config.eval.border)


def source_of(run_dir: Path, results_dir: Path) -> str:
    """The run folder relative to the results folder (``runs/<group>/<variant>/seed-<k>``), else absolute."""
    try:
        return run_dir.resolve().relative_to(results_dir.resolve()).as_posix()
    except ValueError:
        return str(run_dir.resolve())


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    data_root: str | None = None,
    results_dir: str | Path | None = None,
    name: str | None = None,
    tta: bool | None = None,
) -> Exported:
    """Export, check and verify one run; returns the :class:`Exported` (raises ExportError/ParityError,
    leaving no file behind, when anything fails; ConfigError when ``tta`` cannot apply to the model).

    ``tta``: export the :class:`DihedralTTA` graph (None: when the run's own test metric used TTA,
    ``eval.tta``), so that the shipped file reproduces the metric the run reported."""
    run = load_run(run_dir)
    tta = bool(run.config.eval.tta) if tta is None else tta
    if tta and (why := tta_refusal(run.task.kind, run.info.image_size)):
        raise ConfigError(f"{run_dir}: {why}")
    source = source_of(run.run_dir, Path(results_dir) if results_dir else results_dir_of(run.run_dir))
    exporter = f"torch {torch.__version__} torch.onnx.export(dynamo=True), opset {OPSET}"
    props = metadata_for(run, source, exporter, tta)
    meta = ModelMeta.from_props(props, where=str(run_dir))
    root = test_data_root(run, data_root)
    test = run.task.raw_images(root, "test")
    proto, export_s = _graph(run, meta, test, props, source, tta)
    path = Path(out_dir) / f"{name or run.task.name}.onnx"
    parity, inputs = _write_verified(proto, path, run, meta, test, tta)
    record = {
        "onnx": path.name,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "task": run.task.name,
        "kind": run.task.kind,
        "source_run": source,
        "config_hash": run.key,
        "variant": run.result and run.result.variant,
        "seed": run.result and run.result.seed,
        "val_best": run.result and run.result.val_best,
        "run_test": run.result and run.result.test,
        "run_tta": bool(run.config.eval.tta),
        "tta": tta,
        "opset": OPSET,
        "exporter": exporter,
        "export_seconds": export_s,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_root": root,
        "params": sum(p.numel() for p in run.model.parameters()),
        "flops_per_image": count_flops(
            graph_module(run.model, run.task.kind, tta, run.config.eval.border), torch.from_numpy(inputs[:1])
        ),
        "metadata": props,
        "parity": parity,
        **({"members": run.result.extra["members"]} if run.result and "members" in run.result.extra else {}),
    }
    record_path = path.with_suffix(".json")
    files.write_json(record_path, record)
    return Exported(path, record_path, record, meta, run, inputs, test, root, tta)


def test_data_root(run: LoadedRun, data_root: str | None) -> str:
    """Where a run's test images are read for its export: :func:`bench.runner.run_data_root`."""
    return run_data_root(run, data_root)


def load_exported(record_path: Path, results_dir: Path, data_root: str | None = None) -> Exported | None:
    """An earlier export read back from its record (``<name>.json`` beside ``<name>.onnx``), with its run and test
    inputs; None when the record, the file (by its sha256) or the run folder is gone or unreadable."""
    try:
        rec = files.read_json(record_path)
        path = record_path.with_name(rec["onnx"])
        if hashlib.sha256(path.read_bytes()).hexdigest() != rec["sha256"]:
            return None
        run_dir = Path(rec["source_run"])
        run = load_run(run_dir if run_dir.is_absolute() else results_dir / run_dir)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    meta = ModelMeta.from_props(rec["metadata"], where=str(path))
    root = test_data_root(run, data_root)
    test = run.task.raw_images(root, "test")
    return Exported(path, record_path, rec, meta, run, meta.normalize(test.images), test, root, bool(rec.get("tta")))


def results_dir_of(run_dir: Path) -> Path:
    """The results folder holding ``run_dir`` (the parent of its ``runs`` ancestor), else ./results."""
    for p in run_dir.resolve().parents:
        if p.name == "runs":
            return p.parent
    return Path("results")


def _graph(
    run: LoadedRun, meta: ModelMeta, test: ImageSet, props: dict[str, str], source: str, tta: bool
) -> tuple[Any, float]:
    """(the checked ModelProto with its metadata, seconds the export took)."""
    example = torch.from_numpy(meta.normalize(test.images[:2]))  # batch 2: a batch of 1 would specialize the axis
    t0 = time.perf_counter()
    try:
        proto = export_graph(run.model, example, run.task.kind == "segmentation", tta, run.config.eval.border)
    except Exception as e:  # the exporter's own errors are many and long; keep the cause
        raise ExportError(f"{run.run_dir}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (
        f"bench {run.task.name} model from {source} (config {run.key}); preprocessing in "
        f"metadata_props (normalization is not part of the graph)"
        + ("; the graph averages the 8 flips/rotations of its input (TTA)" if tta else "")
        + (
            f"; it reflect-pads its input by {b} pixels and crops the output back"
            if (b := run.config.eval.border)
            else ""
        )
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{run.run_dir}: onnx.checker rejected the exported graph: {e}") from e
    return proto, seconds


def _write_verified(
    proto: Any, path: Path, run: LoadedRun, meta: ModelMeta, test: ImageSet, tta: bool
) -> tuple[dict[str, Any], np.ndarray]:
    """Write ``proto`` to a temp file, verify it on the whole test set, then rename it to ``path``;
    on any failure nothing is left (not even a folder this call created).  Returns (the parity report,
    the normalized test inputs (N, C, H, W))."""
    out_dir = path.parent
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        files.make_readable(tmp)
        t0 = time.perf_counter()
        # an ensemble's output is, like TTA's, the logit of a mean probability: compared as probabilities (near 0 and 1
        # a logit of clamped probabilities magnifies float rounding)
        on_probs = tta or isinstance(run.model, Ensemble)
        reference = graph_module(run.model, meta.kind, tta, run.config.eval.border)
        parity, inputs = verify(tmp, reference, run.task, meta, test, on_probs)
        parity["seconds"] = time.perf_counter() - t0
        os.replace(tmp, path)
        path.with_name(path.stem + ".int8.onnx").unlink(missing_ok=True)  # quantized from the previous export
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if made_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return parity, inputs
