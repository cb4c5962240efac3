"""Latency, throughput, FLOPs and INT8 quantization of exported models.

Latency: the same normalized test inputs go to ONNX Runtime and to PyTorch eager (``torch.
inference_mode``) at batch 1 and at a large batch (:data:`LARGE_BATCH`), with the same number
of threads for both engines (ORT ``intra_op_num_threads``, ``torch.set_num_threads``).  After
a warm-up, calls of the engines are interleaved in chunks of :data:`CHUNK`, so that both see
the same load on a shared machine; p50/p90/p99 are per call (one batch), throughput is
``batch / p50``.  ``speedup_vs_pytorch`` is PyTorch's p50 divided by the row's p50 at the same
batch, provider and threads.  The CUDA execution provider is measured too when onnxruntime-gpu
and a GPU are present (numpy in and out for ORT; PyTorch then includes the same copies).

FLOPs per image are counted at export time (:func:`bench.models.count_flops`).

INT8: ``onnxruntime.quantization.quantize_static`` in QDQ format, per-channel int8 weights
with ``reduce_range`` (7 bits: the u8 x s8 kernels of x86 CPUs without VNNI can overflow their
16-bit intermediate sums otherwise; on this AVX2 machine it raised MNIST's agreement with fp32
from 99.55 % to 99.94 %), uint8 activations calibrated (MinMax) on training images; its metric
is measured on the whole test set through ONNX Runtime like the float model's.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime import quantization as q
from torch import nn

from bench import files
from bench.models import count_flops
from bench.train import device_name
from exporters.export import Exported
from exporters.parity import EVAL_BATCH, agreement, score
from exporters.runtime import provider_session, run_batched, session, timed_providers

LARGE_BATCH = {"classification": 256, "segmentation": 16}
REPEATS = {"small": 200, "large": 30}
WARMUP = {"small": 20, "large": 3}
CHUNK = 10
MAX_SECONDS = 60.0  # per (batch, provider): stop early once every engine has at least a tenth of its repeats
CALIBRATION_IMAGES = {"classification": 512, "segmentation": 16}
ALL_CORES = torch.get_num_threads()  # torch's default: the physical cores

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- FLOPs


# --------------------------------------------------------------------------- timing


def time_calls(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, chunk: int = CHUNK, max_seconds: float = MAX_SECONDS
) -> dict[str, np.ndarray]:
    """Per-call wall times in ms of each function, interleaved in chunks of ``chunk`` calls after
    ``warmup`` untimed calls each; stops after ``repeats`` calls each, or after ``max_seconds``
    once every function has at least ``max(10, repeats // 10)``."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    t_start = time.perf_counter()
    while min(len(v) for v in times.values()) < repeats:
        for k, f in fns.items():
            for _ in range(min(chunk, repeats - len(times[k]))):
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        if time.perf_counter() - t_start > max_seconds and min(len(v) for v in times.values()) >= max(
            10, repeats // 10
        ):
            break
    return {k: np.asarray(v) * 1e3 for k, v in times.items()}


class _threads:
    """Context: ``torch.set_num_threads(n)``, restored afterwards."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.old)


def _torch_call(model: nn.Module, x: np.ndarray, device: str) -> Callable[[], Any]:
    if device == "cpu":
        t = torch.from_numpy(x)

        def call() -> Any:
            with torch.inference_mode():
                return model(t)

        return call
    gpu_model = model.to(device)

    def call_gpu() -> Any:  # numpy in, numpy out: the same copies the ORT call makes
        with torch.inference_mode():
            out = gpu_model(torch.from_numpy(x).to(device)).cpu().numpy()
        return out

    return call_gpu


def benchmark_export(
    ex: Exported, threads: int | None = None, repeats: int | None = None, providers: list[str] | None = None
) -> list[dict[str, Any]]:
    """Latency rows (see :data:`exporters.report.CSV_COLUMNS`) of an export (and its INT8 file, if :func:`add_int8`
    made one) beside PyTorch eager, at batch 1 and the large batch, on every available provider."""
    kind = ex.meta.kind
    big = min(LARGE_BATCH[kind], len(ex.inputs))
    plan = [("small", 1, threads or 1), ("large", big, threads or ALL_CORES)]
    model = ex.model.eval()
    flops = ex.record.get("flops_per_image") or count_flops(model, torch.from_numpy(ex.inputs[:1]))
    params = sum(p.numel() for p in model.parameters())
    rec = ex.record
    metrics = {("onnxruntime", "fp32"): rec["parity"]["metric_ort"], ("pytorch", "fp32"): rec["parity"]["metric_torch"]}
    onnx_files = {"fp32": ex.path}
    if rec.get("int8") and (ex.path.parent / rec["int8"]["onnx"]).exists():
        onnx_files["int8"] = ex.path.parent / rec["int8"]["onnx"]
        metrics["onnxruntime", "int8"] = rec["int8"]["metric_ort"]
    provs = providers or timed_providers()
    rows = []
    for prov in provs:
        try:
            rows += _benchmark_provider(ex, model, prov, plan, onnx_files, metrics, repeats, flops, params)
        except Exception as e:  # e.g. the CUDA provider cannot start: keep the CPU numbers
            if prov == "cpu":
                raise
            log.warning(f"{prov} benchmark of {ex.path} skipped: {type(e).__name__}: {e}")
            model.cpu()
    rec.update(flops_per_image=flops, params=params)
    files.write_json(ex.record_path, rec)
    return rows


def _benchmark_provider(
    ex: Exported,
    model: nn.Module,
    prov: str,
    plan: list[tuple[str, int, int]],
    onnx_files: dict[str, Path],
    metrics: dict[tuple[str, str], float],
    repeats: int | None,
    flops: int,
    params: int,
) -> list[dict[str, Any]]:
    """The rows of one execution provider (see :func:`benchmark_export`)."""
    rec = ex.record
    name = rec["metadata"]["input_name"]
    rows = []
    for size, batch, th in plan:
        x = np.ascontiguousarray(ex.inputs[:batch])
        fns: dict[tuple[str, str], Callable[[], Any]] = {}
        for prec, path in onnx_files.items():
            if prov != "cpu" and prec == "int8":
                continue  # QDQ int8 targets the CPU kernels
            sess = provider_session(path, prov, th)
            fns["onnxruntime", prec] = lambda s=sess, feed={name: x}: s.run(None, feed)
        with _threads(th):
            fns["pytorch", "fp32"] = _torch_call(model, x, "cuda" if prov == "cuda" else "cpu")
            load0 = os.getloadavg()[0]
            times = time_calls({f"{e}/{p}": f for (e, p), f in fns.items()}, WARMUP[size], repeats or REPEATS[size])
            load1 = os.getloadavg()[0]
        if prov == "cuda":
            model.cpu()
        ref = float(np.percentile(times["pytorch/fp32"], 50))
        for engine, prec in fns:
            t = times[f"{engine}/{prec}"]
            p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
            rows.append(
                {
                    "model": ex.meta.task,
                    "source_run": rec["source_run"],
                    "engine": engine,
                    "provider": prov,
                    "precision": prec,
                    "batch": batch,
                    "threads": th,
                    "spinning": "off" if engine == "onnxruntime" else "",
                    "warmup": WARMUP[size],
                    "repeats": len(t),
                    "p50_ms": p50,
                    "p90_ms": p90,
                    "p99_ms": p99,
                    "mean_ms": float(t.mean()),
                    "images_per_s": batch / (p50 / 1e3),
                    "speedup_vs_pytorch": ref / p50,
                    "metric": rec["parity"]["metric"],
                    "metric_value": metrics[engine, prec],
                    "params": params,
                    "flops_per_image": flops,
                    "cpu": device_name(torch.device("cpu" if prov == "cpu" else "cuda")),
                    "load_avg_1m": f"{load0:.2f}-{load1:.2f}",
                    "onnxruntime": ort.__version__,
                    "torch": torch.__version__,
                    "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }
            )
    return rows


def describe(rows: list[dict[str, Any]]) -> list[str]:
    """One line per row for the terminal."""
    return [
        f"{r['engine']:<11} {r['provider']:<4} {r['precision']:<4} batch {r['batch']:>3} x{r['threads']} threads: "
        f"p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms, {r['images_per_s']:.0f} images/s, "
        f"{r['speedup_vs_pytorch']:.2f}x PyTorch"
        for r in rows
    ]


# --------------------------------------------------------------------------- INT8


def quantize_int8(
    fp32_path: str | Path, out_path: str | Path, calibration: np.ndarray, input_name: str, batch: int = 16
) -> None:
    """Static INT8 quantization (QDQ, per-channel reduced-range int8 weights, uint8 activations, MinMax calibration on
    ``calibration`` (N, C, H, W) float32); written to ``out_path`` via a temporary file."""

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(0, len(calibration), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            i = next(self.it, None)
            return None if i is None else {input_name: np.ascontiguousarray(calibration[i : i + batch])}

    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".int8-") as tmp:
        src = Path(tmp) / "pre.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # shape inference + constant folding first, as onnxruntime recommends
                q.quant_pre_process(str(fp32_path), str(src), skip_symbolic_shape=True)
            except Exception:
                src = Path(fp32_path)
            level = logging.getLogger().level
            logging.getLogger().setLevel(logging.ERROR)  # quantize_static logs its pre-processing advice as warnings
            try:
                q.quantize_static(
                    str(src),
                    str(Path(tmp) / "int8.onnx"),
                    Reader(),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=True,
                    reduce_range=True,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
            finally:
                logging.getLogger().setLevel(level)
        model = onnx.load(str(Path(tmp) / "int8.onnx"))
        props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
        props["precision"] = "int8"
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, props)
        onnx.checker.check_model(model)
        files.atomic_write(out_path, lambda f: f.write(model.SerializeToString()), mode="wb")


def add_int8(ex: Exported) -> dict[str, Any] | None:
    """Quantize ``ex`` (``<name>.onnx``) to ``<name>.int8.onnx`` beside it and score it on the test set through ORT;
    records the result under ``int8`` in the export's JSON.  Returns that entry (None, with a warning, on failure)."""
    kind = ex.meta.kind
    train = ex.run.task.raw_images(ex.data_root, "train")
    calib = ex.meta.normalize(train.images[: CALIBRATION_IMAGES[kind]])
    path = ex.path.with_name(ex.path.stem + ".int8.onnx")
    try:
        quantize_int8(ex.path, path, calib, ex.meta.input_name)
    except Exception as e:
        log.warning(f"INT8 quantization of {ex.path} failed: {type(e).__name__}: {e}")
        return None
    out8 = run_batched(session(path), ex.inputs, EVAL_BATCH[kind])
    out32 = run_batched(session(ex.path), ex.inputs, EVAL_BATCH[kind])
    m8 = score(ex.run.task, ex.meta, out8, ex.test.targets)
    agree = agreement(ex.meta, out8, out32)
    label = "identical predictions" if kind == "classification" else "pixel agreement"
    entry = {
        "onnx": path.name,
        "bytes": path.stat().st_size,
        "metric_ort": m8,
        "metric_change": m8 - ex.record["parity"]["metric_ort"],
        "agreement": agree,
        "agreement_label": label,
        "max_abs_logit_diff_vs_fp32": float(np.abs(out8 - out32).max()),
        "calibration": f"{len(calib)} training images, MinMax, QDQ, per-channel 7-bit-range int8 weights, uint8 activations",
    }
    ex.record["int8"] = entry
    files.write_json(ex.record_path, ex.record)
    log.info(
        f"wrote {path}; {ex.meta.task} int8 {ex.record['parity']['metric']} {m8:.4f} "
        f"({entry['metric_change']:+.4f} vs fp32 ORT), {label} {100 * agree:.2f} %"
    )
    return entry
