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
from torch.utils.flop_counter import FlopCounterMode

from bench import files
from bench.runner import resolve_data_root
from bench.store import LoadedRun, load_run
from bench.tasks.base import ImageSet
from exporters.metadata import ModelMeta, metadata_for
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


def export_graph(model: nn.Module, example: Tensor, segmentation: bool) -> Any:
    """``torch.onnx.export`` (the dynamo exporter) with a dynamic batch axis, plus dynamic H, W for
    segmentation; returns the ``onnx.ModelProto``."""
    net: nn.Module = PadAndCrop(model) if segmentation else model
    net.eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dims: dict[int, Any] = {0: batch}
    if segmentation:
        k = int(model.multiple)
        dims.update({2: torch.export.Dim("height", min=k, max=1 << 15), 3: torch.export.Dim("width", min=k, max=1 << 15)})
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(net, (example,), dynamo=True, input_names=["input"], output_names=["logits"],
                                 dynamic_shapes=(dims,), opset_version=OPSET, external_data=False, verbose=False)
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

    @property
    def model(self) -> nn.Module:
        return self.run.model


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of one image of shape ``x`` (1, C, H, W), as ``FlopCounterMode`` counts them:
    2 x the multiply-accumulates of the convolutions (transposed too) and matrix products; batch norm
    (folded into the convolutions in the export), activations and pooling are not counted."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(x[:1])
    return int(counter.get_total_flops())


def source_of(run_dir: Path, results_dir: Path) -> str:
    """The run folder relative to the results folder (``runs/<group>/<variant>/seed-<k>``), else absolute."""
    try:
        return run_dir.resolve().relative_to(results_dir.resolve()).as_posix()
    except ValueError:
        return str(run_dir.resolve())


def export_run(run_dir: str | Path, out_dir: str | Path, data_root: str | None = None,
               results_dir: str | Path | None = None, name: str | None = None) -> Exported:
    """Export, check and verify one run; returns the :class:`Exported` (raises ExportError/ParityError,
    leaving no file behind, when anything fails)."""
    run = load_run(run_dir)
    source = source_of(run.run_dir, Path(results_dir) if results_dir else results_dir_of(run.run_dir))
    exporter = f"torch {torch.__version__} torch.onnx.export(dynamo=True), opset {OPSET}"
    props = metadata_for(run, source, exporter)
    meta = ModelMeta.from_props(props, where=str(run_dir))
    own = run.config.data.root if run.task.data_keys else None  # a folder task's root is its data set, not $BENCH_DATA
    root = resolve_data_root(data_root or own, default=run.config.data.root or "data")[0]  # else the run's own root
    test = run.task.raw_images(root, "test")
    proto, export_s = _graph(run, meta, test, props, source)
    path = Path(out_dir) / f"{name or run.task.name}.onnx"
    parity, inputs = _write_verified(proto, path, run, meta, test)
    record = {
        "onnx": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "task": run.task.name, "kind": run.task.kind, "source_run": source, "config_hash": run.key,
        "variant": (run.result or {}).get("variant"), "seed": (run.result or {}).get("seed"),
        "val_best": (run.result or {}).get("val_best"), "run_test": (run.result or {}).get("test"),
        "run_tta": bool(run.config.eval.tta), "opset": OPSET, "exporter": exporter, "export_seconds": export_s,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_root": root,
        "params": sum(p.numel() for p in run.model.parameters()),
        "flops_per_image": count_flops(run.model, torch.from_numpy(inputs[:1])),
        "metadata": props, "parity": parity,
    }
    record_path = path.with_suffix(".json")
    files.write_json(record_path, record)
    return Exported(path, record_path, record, meta, run, inputs, test, root)


def results_dir_of(run_dir: Path) -> Path:
    """The results folder holding ``run_dir`` (the parent of its ``runs`` ancestor), else ./results."""
    for p in run_dir.resolve().parents:
        if p.name == "runs":
            return p.parent
    return Path("results")


def _graph(run: LoadedRun, meta: ModelMeta, test: ImageSet, props: dict[str, str], source: str) -> tuple[Any, float]:
    """(the checked ModelProto with its metadata, seconds the export took)."""
    example = torch.from_numpy(meta.normalize(test.images[:2]))  # batch 2: a batch of 1 would specialize the axis
    t0 = time.perf_counter()
    try:
        proto = export_graph(run.model, example, run.task.kind == "segmentation")
    except Exception as e:  # the exporter's own errors are many and long; keep the cause
        raise ExportError(f"{run.run_dir}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    seconds = time.perf_counter() - t0
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"bench {run.task.name} model from {source} (config {run.key}); preprocessing in "
                        f"metadata_props (normalization is not part of the graph)")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{run.run_dir}: onnx.checker rejected the exported graph: {e}") from e
    return proto, seconds


def _write_verified(proto: Any, path: Path, run: LoadedRun, meta: ModelMeta,
                    test: ImageSet) -> tuple[dict[str, Any], np.ndarray]:
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
        parity, inputs = verify(tmp, run.model, run.task, meta, test)
        parity["seconds"] = time.perf_counter() - t0
        os.replace(tmp, path)
        path.with_name(path.stem + ".int8.onnx").unlink(missing_ok=True)  # quantized from the previous export
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if made_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return parity, inputs
