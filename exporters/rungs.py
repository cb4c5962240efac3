"""Deployment cost of every rung of a spec: export, verify and time the best seed of each variant.

    python -m exporters.onnx rungs ablations/mnist.yaml --profile quick [--int8]

For each variant of the spec (and profile) as written, the finished run with the best validation
metric is exported to ``<results>/onnx/rungs/<group>/<variant>.onnx`` and checked for parity on the
whole test set, as ``best`` does; a variant whose metric used TTA is exported as the TTA graph,
and only such a variant, so that each latency is what the metric beside it costs.  An export is
reused while its source run (its best.pt) and the code that makes the graph are unchanged (see
:func:`fingerprint`); ``--force`` redoes them.

Latency is always measured again, for every rung together in one process: ONNX Runtime, batch 1,
one thread (``--threads``), one test image, the calls of all rungs interleaved in chunks (see
:func:`exporters.benchmark.time_calls`), so that the rungs are compared under the same load.  The
result goes to ``<results>/runs/<group>/costs.json`` (beside the group's records, committed with
them), from which ``bench summary`` adds the cost columns and the trade-off figure to the
group's table.  A variant without a finished run is "not run", not an error; nor is one whose finished runs have
no best.pt on this machine (a clone holds records, not checkpoints): the best seed that has one stands for it, and
without any its cost columns stay empty (``no_weights``).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from bench import files
from bench.config import ConfigError
from bench.spec import Spec, slug
from bench.store import LoadedRun, RunStore, StoredRun
from bench.tasks import TASKS
from bench.train import device_name
from exporters import export as export_module
from exporters import metadata as metadata_module
from exporters import parity as parity_module
from exporters.benchmark import add_int8, time_calls
from exporters.checkpoints import check_retraining, untrained_here, with_checkpoint
from exporters.export import OPSET, Exported, export_run, load_exported, source_of
from exporters.runtime import provider_session, timed_providers

REPEATS = 200
WARMUP = 10
MAX_SECONDS = 240.0

log = logging.getLogger(__name__)


@dataclass
class Rung:
    """A variant of the spec and the run chosen to stand for it (None when none can: see :func:`choose`)."""

    variant: str
    run_dir: Path | None
    seed: int | None = None
    val: float | None = None
    # seeds finished but without weights here (checkpoints are not in git)
    no_weights: tuple[int, ...] = ()
    best_seed: int | None = None  # the seed with the best validation metric, weights or not

    @property
    def stand_in(self) -> bool:
        """Whether another seed than the best, or none, stands for the rung: its best seed has no weights here."""
        return self.best_seed is not None and self.seed != self.best_seed


def choose(spec: Spec, store: RunStore, retrain: bool = False) -> list[Rung]:
    """Per variant, the finished current run with the best validation metric (ties: lower seed) among those whose
    weights are here (:func:`exporters.checkpoints.untrained_here`: its best.pt, a copy trained again earlier into
    ``<results>/retrained``, or for a seed ensemble its members').  A clone has the records but not the checkpoints,
    and a rung's cost (parameters, FLOPs, latency) is its network's, the same for every seed: only the INT8 metric
    and the parity are the seed's.  With ``retrain`` the best run stands for its rung whether or not its weights are
    here (it is trained again)."""
    metric, out = TASKS[spec.task].metrics[0], []
    for v in spec.variants:
        done = [(r, res) for r in spec.runs([v.name]) if (res := store.result(r)) is not None]
        done = sorted(
            ((r, res) for r, res in done if isinstance(res.val_best, (int, float))),
            key=lambda d: (metric.rank(d[1].val_best), d[0].seed),
        )
        stored = [StoredRun(spec.group, v.name, r.seed, r.key, store.path(r), res) for r, res in done]
        missing = tuple(s.seed for s in stored if untrained_here(s.dir, store.results))
        usable = stored if retrain else [s for s in stored if s.seed not in missing]
        first = stored[0].seed if stored else None
        if not usable:
            out.append(Rung(v.name, None, no_weights=missing, best_seed=first))
            continue
        best = usable[0]
        out.append(Rung(v.name, best.dir, best.seed, float(best.result.val_best), missing, first))
    return out


def fingerprint(run: LoadedRun, tta: bool) -> str:
    """What an export of ``run`` depends on: its best.pt, the TTA choice, torch and the opset, and the source of the
    modules that build, describe and check the graph (the model's and the task's included)."""
    h = hashlib.sha256((run.run_dir / "best.pt").read_bytes())
    h.update(f"tta={tta};torch={torch.__version__};opset={OPSET}".encode())
    modules = (
        export_module,
        metadata_module,
        parity_module,
        sys.modules["bench.augment"],
        sys.modules[type(run.model).__module__],
        sys.modules[type(run.task).__module__],
    )
    for mod in modules:
        h.update(Path(inspect.getsourcefile(mod) or "").read_bytes())
    return h.hexdigest()[:16]


def export_rung(rung: Rung, out_dir: Path, results: Path, data_root: str | None, force: bool) -> tuple[Exported, bool]:
    """(the export of ``rung``'s run, whether it was reused).  Raises what :func:`export_run` raises."""
    assert rung.run_dir is not None
    name = slug(rung.variant)
    record_path = out_dir / f"{name}.json"
    ex = None if force or not record_path.exists() else load_exported(record_path, results, data_root)
    if (
        ex is not None
        and ex.record.get("fingerprint") == fingerprint(ex.run, bool(ex.run.config.eval.tta))
        and ex.record.get("source_run") == source_of(rung.run_dir, results)
    ):
        return ex, True
    ex = export_run(rung.run_dir, out_dir, data_root, results, name=name)  # TTA graph exactly when the run used TTA
    ex.record["fingerprint"] = fingerprint(ex.run, ex.tta)
    files.write_json(ex.record_path, ex.record)
    return ex, False


def time_rungs(
    exports: dict[str, Exported], threads: int, repeats: int | None, providers: list[str] | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """Batch-1 latency of every export (and its INT8 file) on every provider, all calls interleaved:
    {variant: {"cpu/fp32": {"p50_ms", "p90_ms", "p99_ms", "calls"}, ...}}."""
    provs = providers or timed_providers()
    fns: dict[str, Any] = {}
    for variant, ex in exports.items():
        x = np.ascontiguousarray(ex.inputs[:1])
        paths = {"fp32": ex.path}
        if ex.record.get("int8") and (ex.path.parent / ex.record["int8"]["onnx"]).exists():
            paths["int8"] = ex.path.parent / ex.record["int8"]["onnx"]
        for prov in provs:
            for prec, path in paths.items():
                if prov != "cpu" and prec == "int8":
                    continue  # QDQ int8 targets the CPU kernels
                try:
                    sess = provider_session(path, prov, threads)
                except Exception as e:  # e.g. the CUDA provider cannot start or fell back: keep the CPU numbers
                    log.warning(f"{path} not timed on {prov}: {type(e).__name__}: {e}")
                    continue
                fns[f"{variant}|{prov}/{prec}"] = lambda s=sess, feed={ex.meta.input_name: x}: s.run(None, feed)
    times = time_calls(fns, WARMUP, repeats or REPEATS, max_seconds=MAX_SECONDS)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key, t in times.items():
        variant, column = key.split("|")
        p50, p90, p99 = (float(v) for v in np.percentile(t, [50, 90, 99]))
        out.setdefault(variant, {})[column] = {"p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "calls": len(t)}
    return out


def rung_record(ex: Exported, rung: Rung, reused: bool) -> dict[str, Any]:
    """What the summary shows of one exported rung."""
    rec = ex.record
    par = rec["parity"]
    return {
        "run": rec["source_run"],
        "key": rec["config_hash"],
        "seed": rung.seed,
        "val_best": rung.val,
        "onnx": (ex.path.parent.name + "/" + ex.path.name),
        "tta": bool(rec.get("tta")),
        "run_tta": bool(rec["run_tta"]),
        "params": int(rec["params"]),
        "flops_per_image": int(rec["flops_per_image"]),
        "metric": par["metric"],
        "metric_ort": par["metric_ort"],
        "metric_torch": par["metric_torch"],
        "int8_metric_ort": (rec.get("int8") or {}).get("metric_ort"),
        "export_reused": reused,
        "members": len(rec.get("members") or []) or None,  # a seed ensemble: the networks its graph holds
        "exported": rec["exported"],
    }


def measure_rungs(
    spec: Spec,
    results: Path,
    data_root: str | None = None,
    int8: bool = False,
    threads: int = 1,
    repeats: int | None = None,
    force: bool = False,
    command: str = "",
    retrain: bool = False,
    variants: list[str] | None = None,
) -> tuple[dict[str, Any], int]:
    """Export (or reuse) every rung's best run, time them together and write ``runs/<group>/costs.json``.
    ``retrain``: a rung's best run whose weights are not here is trained again from its record first.
    ``variants``: only these rungs are exported and timed; the other rows of costs.json stay as measured, and the
    new rows say when they were timed (:func:`merge_costs`).

    Returns (the costs document, exit status: 0, or 1 when an export failed its check or parity).  Raises
    ConfigError (usage, data) before anything is written."""
    store = RunStore(results)
    rungs = choose(spec, store, retrain)
    old = store.read_costs(spec.group) or {}
    if variants is not None:
        named = spec.variant_names(variants)
        rungs = [r for r in rungs if r.variant in named]
        check_same_timing(old, store.root / spec.group / "costs.json", threads)
    lost = [r.variant for r in rungs if r.run_dir is None and r.variant in old.get("rungs", {})]
    if lost:  # the costs are timed together: a new costs.json without them would drop their measured columns
        raise ConfigError(
            f"{store.root / spec.group / 'costs.json'} holds the costs of {', '.join(lost)} (measured "
            f"{old.get('measured', '?')[:16]}), but none of their seeds has its weights here (checkpoints are not in "
            f"git): --retrain trains their best seeds again"
            + (
                ""
                if variants is not None
                else "; --variants times only the rungs named, keeping the others' columns; or move costs.json away "
                "to measure the rungs without them"
            )
        )
    if retrain:
        check_retraining([r.run_dir for r in rungs if r.run_dir is not None], results, True)
    out_dir = results / "onnx" / "rungs" / spec.group
    exports: dict[str, Exported] = {}
    records: dict[str, dict[str, Any]] = {}
    status = 0
    for rung in rungs:
        if rung.stand_in:
            seeds = ", ".join(map(str, rung.no_weights))
            standing = f"seed {rung.seed} stands for it" if rung.run_dir else "no cost columns (--retrain trains one)"
            log.warning(f"{spec.group} {rung.variant}: seeds {seeds} have no best.pt here: {standing}")
        if rung.run_dir is None:
            if rung.best_seed is None:
                log.info(f"{spec.group} {rung.variant}: not run (no finished run of the spec as written)")
            continue
        try:
            rung.run_dir = with_checkpoint(rung.run_dir, results, data_root)  # trains only with retrain
            ex, reused = export_rung(rung, out_dir, results, data_root, force)
        except (parity_module.ParityError, export_module.ExportError) as e:
            log.error(f"{rung.variant}: {e}")
            status = 1
            continue
        if int8 and not (ex.record.get("int8") and (out_dir / ex.record["int8"]["onnx"]).exists()):
            add_int8(ex)
        exports[rung.variant] = ex
        records[rung.variant] = rung_record(ex, rung, reused)
        log.info(
            f"{spec.group} {rung.variant}: {'reused' if reused else 'exported'} {ex.path} (seed {rung.seed}"
            f"{', TTA graph' if ex.tta else ''}; {par_line(ex.record)})"
        )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    timings = time_rungs(exports, threads, repeats) if exports else {}
    for variant, cols in timings.items():
        records[variant]["latency"] = cols
    cuda = "cuda" in {c.split("/")[0] for cols in timings.values() for c in cols}
    doc = {
        "group": spec.group,
        "spec": spec.path,
        "profile": spec.profile,
        "command": command,
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 1),
        **timing_setup(threads),
        "torch": torch.__version__,
        "gpu": device_name(torch.device("cuda")) if cuda else None,
        "load_avg_1m": f"{load0:.2f}-{os.getloadavg()[0]:.2f}",
        "commit": files.git_commit(),
        "not_run": [r.variant for r in rungs if r.best_seed is None],
        # the rungs whose best seed has no weights here: {variant: the seeds without}; another seed, or none, stands in
        "no_weights": {r.variant: list(r.no_weights) for r in rungs if r.stand_in},
        "rungs": records,
    }
    if variants is not None and old:
        doc = merge_costs(old, doc, [r.variant for r in rungs], [v.name for v in spec.variants])
    store.write_costs(spec.group, doc)
    return doc, status


def timing_setup(threads: int) -> dict[str, Any]:
    """What the timings' milliseconds depend on besides the graphs: batch, threads, engine and CPU (costs.json keeps
    it; two timings share a table only where it matches, see :func:`check_same_timing`)."""
    return {
        "batch": 1,
        "threads": threads,
        "engine": f"onnxruntime {ort.__version__}",
        "cpu": device_name(torch.device("cpu")),
    }


def check_same_timing(old: dict[str, Any], path: Path, threads: int) -> None:
    """ConfigError when the rows kept from ``old`` were timed on another machine kind, engine or thread count than
    rows timed now would be: their milliseconds would not compare."""
    if not old:
        return
    now = timing_setup(threads)
    differ = [f"{k} {old.get(k)!r} there, {v!r} here" for k, v in now.items() if old.get(k) != v]
    if differ:
        raise ConfigError(
            f"--variants keeps the other rows of {path}, timed with another setup ({'; '.join(differ)}): their "
            f"milliseconds and the new ones would not compare; measure every rung (without --variants)"
        )


def merge_costs(old: dict[str, Any], new: dict[str, Any], timed: list[str], order: list[str]) -> dict[str, Any]:
    """``old`` with the rows of ``timed`` replaced by ``new``'s (in the spec's ``order``): each new row keeps when
    and under which load it was timed (``timed_apart``), since the document's own stamp is the other rows'."""
    stamp = {k: new[k] for k in ("measured", "seconds", "load_avg_1m", "commit", "command")}
    rows = {v: r for v, r in old["rungs"].items() if v not in timed}
    rows |= {v: {**r, "timed_apart": stamp} for v, r in new["rungs"].items()}
    no_weights = {v: s for v, s in (old.get("no_weights") or {}).items() if v not in timed} | new["no_weights"]
    return {
        **old,
        "no_weights": no_weights,
        "not_run": [v for v in order if v in set(old.get("not_run", [])) - set(timed) | set(new["not_run"])],
        "rungs": {v: rows[v] for v in order if v in rows},
    }


def par_line(rec: dict[str, Any]) -> str:
    par = rec["parity"]
    return (
        f"parity {parity_module.gap_text(par)}, {par['metric']} ORT {par['metric_ort']:.4f} vs PyTorch "
        f"{par['metric_torch']:.4f}"
    )
