"""Export finished runs to ONNX, verify them on the test set, benchmark them on ONNX Runtime.

    python -m exporters.onnx best [--results results] [--task mnist|warwick] [--int8] [--no-bench]
    python -m exporters.onnx RUN_DIR [--out DIR] ...

``best`` picks, per task, the finished run with the highest validation metric (``val_best``
in result.json; the test set never chooses); ties go to the run with fewer parameters,
then to one whose test metric used no TTA (the exported graph is a single forward pass),
then to the first run folder in alphabetical order.

Each export writes ``<out>/<task>.onnx`` (default ``<results>/onnx``): the network alone,
dynamic batch axis (and dynamic height/width for segmentation), opset :data:`OPSET`, checked
by ``onnx.checker``, with its preprocessing and provenance in ``metadata_props`` (see
:mod:`exporters.metadata`), and ``<task>.json`` beside it (provenance, parity, benchmark).
The file is written under a temporary name and only renamed into place once
:func:`exporters.parity.verify` passed on the whole test set: a failed export leaves no file.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import files
from exporters.metadata import ModelMeta, build_metadata
from exporters.parity import ImageSet, ParityError, load_images, verify

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


@dataclass
class Candidate:
    """A finished run folder and what ranks it."""

    run_dir: Path
    task: str
    val: float
    params: int
    tta: bool
    result: dict[str, Any]

    def rank(self) -> tuple[float, int, bool, str]:
        return (-self.val, self.params, self.tta, str(self.run_dir))


def finished_runs(results_dir: str | Path, groups: list[str] | None = None) -> list[Candidate]:
    """Every finished run under ``results_dir/runs/<group>/<variant>/seed-<k>``: result.json and
    best.pt present and the result's key equal to config.json's (superseded folders excluded)."""
    out = []
    for cfg_path in sorted(Path(results_dir, "runs").glob("*/*/seed-*/config.json")):
        d = cfg_path.parent
        if not re.fullmatch(r"seed-\d+", d.name) or (groups and d.parent.parent.name not in groups):
            continue
        if not ((d / "result.json").exists() and (d / "best.pt").exists()):
            continue
        res, cfg = files.read_json(d / "result.json"), files.read_json(cfg_path)
        val = res.get("val_best")
        if res.get("key") != cfg.get("key") or not isinstance(val, (int, float)) or not math.isfinite(val):
            continue
        c = cfg["config"]
        out.append(Candidate(d, c["task"], float(val), int(res.get("params", 0)), bool(c.get("eval", {}).get("tta")), res))
    return out


def pick_best(cands: list[Candidate], task: str) -> Candidate | None:
    """The ``task`` run with the highest validation metric (ties: see the module docstring)."""
    mine = [c for c in cands if c.task == task]
    return min(mine, key=Candidate.rank) if mine else None


def resolve_data_root(cli_root: str | None, run_root: str | None) -> str:
    """--data-root, else $BENCH_DATA, else the root the run was trained on, else ./data."""
    return str(Path(cli_root or os.environ.get("BENCH_DATA") or run_root or "data").expanduser())


def results_dir_of(run_dir: Path) -> Path:
    """The results folder holding ``run_dir`` (the parent of its ``runs`` ancestor), else ./results."""
    for p in run_dir.resolve().parents:
        if p.name == "runs":
            return p.parent
    return Path("results")


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
    model: nn.Module
    inputs: np.ndarray  # normalized test inputs (N, C, H, W) float32
    test: ImageSet
    data_root: str


def export_run(run_dir: str | Path, out_dir: str | Path, data_root: str | None = None,
               results_dir: str | Path | None = None, name: str | None = None) -> Exported:
    """Export, check and verify one run; returns the :class:`Exported` (raises ExportError/ParityError,
    leaving no file behind, when anything fails)."""
    import onnx

    from bench.checkpoint import load_run

    run_dir = Path(run_dir)
    lr = load_run(run_dir)
    task = lr.task
    seg = task.kind == "segmentation"
    results_dir = Path(results_dir) if results_dir else results_dir_of(run_dir)
    try:
        source = run_dir.resolve().relative_to(results_dir.resolve()).as_posix()
    except ValueError:
        source = str(run_dir.resolve())
    exporter = f"torch {torch.__version__} torch.onnx.export(dynamo=True), opset {OPSET}"
    props = build_metadata(task.name, task.kind, lr.data_info, lr.config.to_dict(), lr.result, lr.key, source, exporter,
                           min_size=int(getattr(lr.model, "multiple", 1)), classes=getattr(task, "classes", None))
    meta = ModelMeta.from_props(props, where=str(run_dir))
    root = resolve_data_root(data_root, lr.config.data.root)
    test = load_images(task.name, root, "test")

    example = torch.from_numpy(meta.normalize(test.images[:2]))  # batch 2: a batch of 1 would specialize the axis
    t0 = time.perf_counter()
    try:
        proto = export_graph(lr.model, example, seg)
    except Exception as e:  # the exporter's own errors are many and long; keep the cause
        raise ExportError(f"{run_dir}: torch.onnx.export failed: {type(e).__name__}: {e}") from e
    export_s = time.perf_counter() - t0
    onnx.helper.set_model_props(proto, props)
    proto.doc_string = (f"bench {task.name} model from {source} (config {lr.key}); preprocessing in metadata_props "
                        f"(normalization is not part of the graph)")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise ExportError(f"{run_dir}: onnx.checker rejected the exported graph: {e}") from e

    out_dir = Path(out_dir)
    made_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or task.name}.onnx"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
        files.make_readable(tmp)
        t0 = time.perf_counter()
        parity, inputs = verify(tmp, lr.model, meta, test)
        parity["seconds"] = time.perf_counter() - t0
        os.replace(tmp, path)
        path.with_name(path.stem + ".int8.onnx").unlink(missing_ok=True)  # quantized from the previous export
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if made_dir and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    record = {
        "onnx": path.name, "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "task": task.name, "kind": task.kind, "source_run": source, "config_hash": lr.key,
        "variant": (lr.result or {}).get("variant"), "seed": (lr.result or {}).get("seed"),
        "val_best": (lr.result or {}).get("val_best"), "run_test": (lr.result or {}).get("test"),
        "run_tta": bool(lr.config.eval.tta), "opset": OPSET, "exporter": exporter, "export_seconds": export_s,
        "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_root": root,
        "params": sum(p.numel() for p in lr.model.parameters()),
        "metadata": props, "parity": parity,
    }
    record_path = path.with_suffix(".json")
    files.write_json(record_path, record)
    return Exported(path, record_path, record, meta, lr.model, inputs, test, root)


def _parity_line(rec: dict[str, Any]) -> str:
    p = rec["parity"]
    agree = (f"identical predictions {100 * p['agreement']:.2f} %" if "agreement" in p
             else f"pixel agreement {100 * p['pixel_agreement']:.3f} %")
    return (f"parity on {p['n']} test images: max |Δlogit| {p['max_abs_logit_diff']:.2e}, {agree}, "
            f"{p['metric']} ORT {p['metric_ort']:.4f} vs PyTorch {p['metric_torch']:.4f} (run's own test: "
            f"{(rec.get('run_test') or {}).get(p['metric'], float('nan')):.4f}{', with TTA' if rec['run_tta'] else ''})")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m exporters.onnx", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="`best` (the best finished run of each task) or a run folder")
    p.add_argument("--results", help="results folder (default: results; for a RUN_DIR the folder holding its runs/)")
    p.add_argument("--task", choices=sorted(TASKS), help="with `best`: only this task")
    p.add_argument("--groups", nargs="+", help="with `best`: only runs of these spec groups (folders under runs/)")
    p.add_argument("--data-root", help="data folder (default: $BENCH_DATA, else the run's own data root, else ./data)")
    p.add_argument("--out", help="output folder (default: <results>/onnx)")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 (static, QDQ) and benchmark it")
    p.add_argument("--no-bench", action="store_true", help="export and verify only; no latency benchmark")
    p.add_argument("--threads", type=int, help="benchmark threads for both engines (default: 1 at batch 1, all cores at "
                                                  "the large batch)")
    p.add_argument("--repeats", type=int,
                   help="timed calls per engine and batch (default: 200 at batch 1, 30 at the large batch)")
    p.add_argument("--no-summary", action="store_true", help="do not rebuild <results>/summary.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an export failed its check or parity, 2 usage or data error (the others still run)."""
    from bench.config import ConfigError
    from bench.tasks.base import DataError

    args = _parse_args(argv)
    try:
        if args.target == "best":
            results = Path(args.results or "results")
            cands = finished_runs(results, args.groups)
            tasks = [args.task] if args.task else sorted({c.task for c in cands})
            chosen = [(t, pick_best(cands, t)) for t in tasks]
            missing = [t for t, c in chosen if c is None]
            if missing or not chosen:
                what = " or ".join(missing) + " " if missing else ""
                print(f"error: no finished {what}runs under {results / 'runs'}", file=sys.stderr)
                return 2
            run_dirs = [c.run_dir for _, c in chosen if c is not None]
            for c in (c for _, c in chosen if c is not None):
                print(f"{c.task}: best of {sum(x.task == c.task for x in cands)} finished runs by validation metric: "
                      f"{c.run_dir} (val {c.val:.4f})", file=sys.stderr)
        else:
            run_dir = Path(args.target)
            if not (run_dir / "best.pt").is_file():
                print(f"error: {run_dir}: not a run folder (no best.pt); give a run folder or `best`", file=sys.stderr)
                return 2
            results = Path(args.results) if args.results else results_dir_of(run_dir)
            run_dirs = [run_dir]
    except (ConfigError, OSError, ValueError) as e:  # unreadable result/config files
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else results / "onnx"
    done, status = [], 0
    for rd in run_dirs:  # a failed export does not stop the others; the exit status reports it
        try:
            ex = export_run(rd, out_dir, args.data_root, results)
        except (ParityError, ExportError) as e:
            print(f"error: {e}\nno file written for this export", file=sys.stderr)
            status = max(status, 1)
            continue
        except (DataError, ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
            continue
        print(f"wrote {ex.path}; {_parity_line(ex.record)}", file=sys.stderr)
        done.append(ex)
    if not done:
        return status

    from exporters import benchmark as bm
    from exporters import report

    for ex in done:
        if args.int8:
            bm.add_int8(ex)
        if not args.no_bench:
            rows = bm.benchmark_export(ex, threads=args.threads, repeats=args.repeats)
            report.update_latency_csv(results / "latency.csv", rows)
            for line in bm.describe(rows):
                print(f"{ex.meta.task}: {line}", file=sys.stderr)
    md = report.write_deployment_md(results, out_dir)
    print(f"wrote {md}", file=sys.stderr)
    if not args.no_summary and (results / "runs").is_dir():
        try:
            from bench.summary import write_summary

            command = "python -m exporters.onnx " + " ".join(sys.argv[1:] if argv is None else argv)
            print(f"wrote {write_summary(results, command=command)}", file=sys.stderr)
        except Exception as e:  # the deployment table is written; a summary problem is not an export failure
            print(f"warning: could not rebuild {results / 'summary.md'}: {type(e).__name__}: {e}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
