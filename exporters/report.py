"""The benchmark's files: ``<results>/latency.csv`` (one row per model, engine, provider, precision
and batch) and ``<results>/deployment.md``, the deployment table that ``bench summary`` embeds in
``results/summary.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import files, usable_cores
from exporters.parity import gap_text

CSV_COLUMNS = [
    "model",
    "source_run",
    "engine",
    "provider",
    "precision",
    "batch",
    "threads",
    "spinning",
    "warmup",
    "repeats",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "images_per_s",
    "speedup_vs_pytorch",
    "metric",
    "metric_value",
    "params",
    "flops_per_image",
    "cpu",
    "load_avg_1m",
    "onnxruntime",
    "torch",
    "timestamp",
]
ROW_KEY = ("model", "engine", "provider", "precision", "batch")


def read_latency_csv(path: str | Path) -> list[dict[str, Any]]:
    return files.read_csv(path)


def update_latency_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` into the CSV.  Earlier rows of the same (model, engine, provider, precision, batch)
    are replaced, and so is every earlier row of a (model, provider) measured now whose source run
    differs or whose precision was not measured now (an INT8 row of an older export is stale);
    rows of other models and providers are kept."""
    new = {tuple(str(r[k]) for k in ROW_KEY) for r in rows}
    fresh = {
        (str(r["model"]), str(r["provider"])): (
            str(r["source_run"]),
            {str(x["precision"]) for x in rows if (x["model"], x["provider"]) == (r["model"], r["provider"])},
        )
        for r in rows
    }

    def stale(r: dict[str, Any]) -> bool:
        if tuple(str(r.get(k, "")) for k in ROW_KEY) in new:
            return True
        f = fresh.get((str(r.get("model")), str(r.get("provider"))))
        return f is not None and (str(r.get("source_run")) != f[0] or str(r.get("precision")) not in f[1])

    old = [r for r in read_latency_csv(path) if not stale(r)]
    files.write_csv(
        path,
        CSV_COLUMNS,
        [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in old + rows],
        extra="ignore",
    )
    return Path(path)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt_si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def write_deployment_md(results_dir: str | Path, onnx_dir: str | Path | None = None) -> Path:
    """``<results>/deployment.md``: the deployment table (embedded by ``bench summary``), from the
    export records ``<onnx_dir>/*.json`` and ``<results>/latency.csv``.

    One ``### <task>`` subsection per exported task, each with its own table, notes and machine
    line.  ONNX files and their records are not committed, so a task exported elsewhere (MNIST on
    a CPU, WARWICK in a GPU session) has no record here: its subsection is kept from the
    existing file verbatim, as ``bench summary`` keeps the sections of runs it does not hold.
    """
    results_dir = Path(results_dir)
    onnx_dir = Path(onnx_dir) if onnx_dir else results_dir / "onnx"
    rows = read_latency_csv(results_dir / "latency.csv")
    recs = [files.read_json(p) for p in sorted(onnx_dir.glob("*.json"))]
    recs = [r for r in recs if isinstance(r, dict) and "parity" in r]
    try:
        rel = onnx_dir.resolve().relative_to(results_dir.resolve()).as_posix()
    except ValueError:
        rel = str(onnx_dir)
    out = [
        "## Deployment (ONNX Runtime)",
        "",
        "Exported with `python -m exporters.onnx best` (the best run of each task by validation metric). "
        "Metrics are on the whole test set, computed through the engine named. Latency: p50 / p99 per call, "
        "PyTorch eager and ONNX Runtime interleaved on the same inputs and thread count; images/s = batch / p50; "
        "×PyTorch = PyTorch p50 / engine p50 at that batch (> 1: faster). FLOPs = 2 × multiply-accumulates of the "
        "convolutions and linear layers per image.",
        "",
    ]
    sections = files.read_markdown_sections(results_dir / "deployment.md", 3, str.strip)
    for rec in recs:
        sections[rec["task"]] = _task_section(rec, rows, rel)
    out += [text for _, text in sorted(sections.items())]
    path = results_dir / "deployment.md"
    files.write_text(path, "\n".join(out))
    return path


TABLE_HEADERS = [
    "model",
    "engine",
    "params",
    "FLOPs / image",
    "test metric",
    "batch 1: p50 / p99 (ms)",
    "×PyTorch (batch 1)",
    "large batch: images/s",
    "×PyTorch (large)",
]
TABLE_ALIGN = ["left", "left", "right", "right", "left", "right", "right", "right", "right"]


def _task_section(rec: dict[str, Any], rows: list[dict[str, Any]], rel: str) -> str:
    """Markdown for one exported model: its table (one line per engine), parity notes, machine line."""
    task = rec["task"]
    mine = [
        r
        for r in rows
        if r["model"] == task and r["source_run"] == rec["source_run"] and (r["precision"] != "int8" or rec.get("int8"))
    ]
    engines = sorted(
        {(r["engine"], r["provider"], r["precision"]) for r in mine}, key=lambda e: (e[1], e[0] != "onnxruntime", e[2])
    ) or [("onnxruntime", "cpu", "fp32")]
    table = [
        _engine_row(rec, eng, [r for r in mine if (r["engine"], r["provider"], r["precision"]) == eng])
        for eng in engines
    ]
    out = [
        f"### {task}",
        "",
        f"Files in `{rel}/`.",
        "",
        files.markdown_table(TABLE_HEADERS, table, TABLE_ALIGN),
        "",
        _parity_note(rec),
        *_int8_note(rec, mine),
        "",
        *_machine_note(mine),
    ]
    return "\n".join(out).rstrip() + "\n"


def _engine_row(rec: dict[str, Any], eng: tuple[str, str, str], rows: list[dict[str, Any]]) -> list[str]:
    """The table row of one (engine, provider, precision): its metric, batch-1 latency, large-batch throughput."""
    par = rec["parity"]
    at = {int(r["batch"]): r for r in rows}
    small, large = at.get(1), at.get(max(at)) if at and max(at) > 1 else None
    if eng == ("onnxruntime", "cpu", "fp32"):
        metric = par["metric_ort"]
    elif eng == ("pytorch", "cpu", "fp32"):
        metric = par["metric_torch"]
    elif eng[2] == "int8" and rec.get("int8"):
        metric = rec["int8"]["metric_ort"]
    else:
        metric = _num((small or large or {}).get("metric_value"))
    label = ("ORT" if eng[0] == "onnxruntime" else "PyTorch eager") + f" {eng[1].upper()} {eng[2]}"
    return [
        rec["task"],
        label,
        f"{int(rec.get('params', 0)):,}",
        _fmt_si(_num(rec.get("flops_per_image"))),
        f"{par['metric']} {metric:.4f}",
        f"{_num(small['p50_ms']):.3f} / {_num(small['p99_ms']):.3f}" if small else "–",
        f"{_num(small['speedup_vs_pytorch']):.2f}×" if small else "–",
        f"{_num(large['images_per_s']):,.0f} (batch {large['batch']})" if large else "–",
        f"{_num(large['speedup_vs_pytorch']):.2f}×" if large else "–",
    ]


def _parity_note(rec: dict[str, Any]) -> str:
    par = rec["parity"]
    agree = (
        f"identical predictions {100 * par['agreement']:.2f} %"
        if "agreement" in par
        else f"pixel agreement {100 * par['pixel_agreement']:.3f} %"
    )
    run_test = rec.get("run_test") or {}
    run_metric = run_test.get(par["metric"])
    return (
        f"- **{rec['task']}** `{rec['onnx']}` from `{rec['source_run']}` (config {rec['config_hash']}, val "
        f"{rec['val_best']:.4f}): parity on {par['n']} test images {gap_text(par)}, "
        f"{agree}; {par['metric']} ORT {par['metric_ort']:.4f} vs PyTorch {par['metric_torch']:.4f}"
        + (
            f" (the run's reported test {par['metric']} {run_metric:.4f}{_tta_words(rec)})"
            if run_metric is not None
            else ""
        )
        + _objects_words(rec)
    )


def _objects_words(rec: dict[str, Any]) -> str:
    """Segmentation: the pooled object F1 of the shipped pipeline (threshold and post-processing of the metadata)
    against the run's; empty for classification and older records."""
    par, meta = rec["parity"], rec.get("metadata") or {}
    if "objects_ort" in par:  # a contour model: its glands' pooled object F1 (ONNX outputs + metadata alone)
        ort, torch_ = par["objects_ort"].get("obj_f1_pooled"), par["objects_torch"].get("obj_f1_pooled")
        what = f"glands (contour threshold {meta.get('contour_threshold', '0.5')})"
    elif "obj_f1_pooled_ort" in par:
        ort, torch_, what = par["obj_f1_pooled_ort"], par["obj_f1_pooled_torch"], "objects"
    else:
        return ""
    if ort is None:  # a record written before the pooled metrics existed
        return ""
    run = (rec.get("run_test") or {}).get("obj_f1_pooled")
    post = f"{what} under {meta.get('min_area', '0')} px removed"
    post += ", holes filled" if meta.get("fill_holes") == "true" else ""
    return (
        f"; pooled object F1 ORT {ort:.4f} vs PyTorch {torch_:.4f}"
        + (f" (the run's {run:.4f})" if run is not None else "")
        + f", {post}"
    )


def _tta_words(rec: dict[str, Any]) -> str:
    """How the run's metric and the exported graph stand with respect to TTA."""
    run_tta, graph_tta = bool(rec.get("run_tta")), bool(rec.get("tta"))
    if run_tta and graph_tta:
        return ", with 8-fold TTA, which the exported graph computes too"
    if run_tta:
        return " used 8-fold TTA; this export is one forward pass (`--no-tta`)"
    return "; the exported graph averages 8 flips/rotations (`--tta`), the run did not" if graph_tta else ""


def _int8_note(rec: dict[str, Any], mine: list[dict[str, Any]]) -> list[str]:
    if not rec.get("int8"):
        return []
    q, par = rec["int8"], rec["parity"]
    ort_cpu = [r for r in mine if r["engine"] == "onnxruntime" and r["provider"] == "cpu"]
    sp = {int(r["batch"]): _num(r["p50_ms"]) for r in ort_cpu if r["precision"] == "fp32"}
    s8 = {int(r["batch"]): _num(r["p50_ms"]) for r in ort_cpu if r["precision"] == "int8"}
    speed = ", ".join(f"{sp[b] / s8[b]:.2f}× at batch {b}" for b in sorted(s8) if b in sp)
    return [
        f"  - INT8 `{q['onnx']}`: {par['metric']} {q['metric_ort']:.4f} ({q['metric_change']:+.4f} vs fp32 "
        f"ORT), {q['agreement_label']} {100 * q['agreement']:.2f} % with fp32; speed-up over fp32 ORT: "
        f"{speed or 'not benchmarked'}"
    ]


def _machine_note(mine: list[dict[str, Any]]) -> list[str]:
    """Where and when the timings were taken, and how loaded the machine was."""
    if not mine:
        return []
    machines = sorted({(r["cpu"], r["onnxruntime"], r["torch"]) for r in mine})
    loads = [_num(x) for r in mine for x in str(r["load_avg_1m"]).split("-")]
    threads = sorted({(int(r["batch"]), int(r["threads"])) for r in mine})
    return [
        "Measured on "
        + "; ".join(f"{c} with onnxruntime {o}, torch {t}" for c, o, t in machines)
        + "; threads (both engines): "
        + ", ".join(f"{t} at batch {b}" for b, t in threads)
        + f"; 1-minute load average during the timings {min(loads):.2f}–{max(loads):.2f} "
        f"(on {usable_cores()} logical CPUs; other jobs add noise); {min(r['timestamp'] for r in mine)[:16]} to "
        f"{max(r['timestamp'] for r in mine)[:16]}. Raw numbers: `latency.csv`.",
        "",
    ]
