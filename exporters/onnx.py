"""Export finished runs to ONNX, verify them on the test set, benchmark them on ONNX Runtime.

    python -m exporters.onnx best [--results results] [--task mnist|warwick] [--groups G ...] [--int8] [--no-bench]
    python -m exporters.onnx rungs SPEC [--profile P] [--int8] [--variants V ...]   # every rung's cost: exporters.rungs
    python -m exporters.onnx RUN_DIR [--out DIR] ...

Only ``best`` of the published groups, written to the default ``<results>/onnx``, is the shipped
model: its ``deployment.md`` is embedded in ``results/summary.md``.  Any other export (a run folder,
``--groups`` naming ad-hoc groups, ``--out``) keeps its ONNX files, ``latency.csv`` and
``deployment.md`` together in its own folder (default ``<results>/onnx-adhoc``).

``best`` picks, per task, among the finished runs of the *published* groups (a spec and
profile as written; ``--groups`` names others, e.g. an ad-hoc experiment, explicitly) the
run with the best validation metric (``val_best`` in result.json: the highest, or the lowest for a metric where
lower is better; the test set never chooses); ties go to the run whose rung (its variant's finished seeds) has the better mean
validation metric, as the summary's ★ is chosen, then to fewer parameters, then to one whose test metric used no
TTA (its graph is one forward pass instead of 8), then to the first run folder in
alphabetical order.  A run whose test metric used TTA is exported as the TTA graph (the
shipped file computes the metric that was reported) unless ``--no-tta``; ``--tta`` exports
the TTA graph of any run (segmentation, or classification with square inputs).
Which runs are finished and current is the run store's answer.
Exporting, checking and verifying one run is :mod:`exporters.export`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import bench.log
from bench import files
from bench.config import ConfigError
from bench.spec import load_spec, resolve_spec_path
from bench.store import RunStore
from bench.summary import write_summary
from bench.tasks import TASKS
from bench.tasks.base import DataError
from exporters import benchmark as bm
from exporters import report
from exporters import tracking as mlflow_tracking
from exporters.checkpoints import check_retraining, with_checkpoint
from exporters.export import Exported, ExportError, export_run, results_dir_of
from exporters.parity import ParityError, gap_text
from exporters.rungs import measure_rungs

log = logging.getLogger("exporters.onnx")  # not __name__, which is "__main__" under `python -m`


@dataclass
class Candidate:
    """A finished run folder and what ranks it."""

    run_dir: Path
    task: str
    val: float
    params: int
    tta: bool
    rung_val: float = math.nan  # the mean validation metric of the run's rung (its variant's finished seeds)

    def rank(self) -> tuple[float, float, int, bool, str]:
        metric = TASKS[self.task].metrics[0]
        return (metric.rank(self.val), metric.rank(self.rung_val), self.params, self.tta, str(self.run_dir))


def finished_runs(results_dir: str | Path, groups: list[str] | None = None) -> list[Candidate]:
    """The finished, current runs of ``groups`` (default: every published group) with a finite
    validation metric, as ranked candidates."""
    store = RunStore(results_dir)
    out = []
    for group in groups if groups is not None else store.groups("published"):
        meta = store.read_group(group)
        mine = []
        for run in store.finished(group):
            val = run.result.val_best
            if isinstance(val, (int, float)) and math.isfinite(val):
                tta = bool(files.read_json(run.dir / "config.json")["config"].get("eval", {}).get("tta"))
                mine.append(Candidate(run.dir, meta.task, float(val), int(run.result.params or 0), tta))
        for c in mine:  # the run's rung: its variant folder
            c.rung_val = float(np.mean([o.val for o in mine if o.run_dir.parent == c.run_dir.parent]))
        out += mine
    return out


def pick_best(cands: list[Candidate], task: str) -> Candidate | None:
    """The ``task`` run with the best validation metric (ties: see the module docstring)."""
    mine = [c for c in cands if c.task == task]
    return min(mine, key=Candidate.rank) if mine else None


def _parity_line(rec: dict) -> str:
    p = rec["parity"]
    agree = (
        f"identical predictions {100 * p['agreement']:.2f} %"
        if "agreement" in p
        else f"pixel agreement {100 * p['pixel_agreement']:.3f} %"
    )
    line = (
        f"parity on {p['n']} test images: {gap_text(p)}, {agree}, "
        f"{p['metric']} ORT {p['metric_ort']:.4f} vs PyTorch {p['metric_torch']:.4f} (run's own test: "
        f"{(rec.get('run_test') or {}).get(p['metric'], float('nan')):.4f}{', with TTA' if rec['run_tta'] else ''})"
    )
    if "objects_ort" in p:  # a contour model: object metrics on its instances, from the ONNX outputs + metadata
        o = p["objects_ort"]
        line += (
            f"; obj_f1 ORT {o['obj_f1']:.4f} (run's own: {(rec.get('run_test') or {}).get('obj_f1', float('nan')):.4f}),"
            f" pooled {o['obj_f1_pooled']:.4f} (TP {o['tp']}, FP {o['fp']}, FN {o['fn']})"
        )
    return line


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench.log.ArgumentParser(
        prog="python -m exporters.onnx",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target", help="`best` (the best finished run of each task), `rungs` (every rung of SPEC) or a run folder"
    )
    p.add_argument("spec", nargs="?", help="with `rungs`: the spec (path or short name, e.g. mnist)")
    p.add_argument("--profile", help="with `rungs`: the spec's profile (its published group)")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="with `rungs`: time only these rungs and keep the other rows of costs.json as they were measured "
        "(e.g. a rung added to the spec, or the one whose weights are here; same machine kind and engine only)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export the graph that averages the 8 flips/rotations (--no-tta: one forward pass); "
        "default: TTA exactly when the run's own test metric used it (eval.tta)",
    )
    p.add_argument(
        "--force", action="store_true", help="with `rungs`: export again even when the run and code are unchanged"
    )
    p.add_argument("--results", help="results folder (default: results; for a RUN_DIR the folder holding its runs/)")
    p.add_argument("--task", choices=sorted(TASKS), help="with `best`: only this task")
    p.add_argument(
        "--groups",
        nargs="+",
        help="with `best`: choose among the runs of these groups (folders under "
        "runs/), ad-hoc ones included; default: every published group",
    )
    p.add_argument(
        "--data-root",
        help="data folder (default: $BENCH_DATA, else the run's own data root, else ./data; "
        "image_folder and mask_folder runs: the run's own data set's folder)",
    )
    p.add_argument(
        "--out",
        type=files.output_folder,
        help="output folder (default: <results>/onnx for `best` of the published groups, else "
        "<results>/onnx-adhoc; its deployment.md and latency.csv go beside the files)",
    )
    p.add_argument(
        "--retrain",
        action="store_true",
        help="train a chosen run whose best.pt is not here again from its record, into <results>/retrained (records "
        "come from git, checkpoints do not); without it, such an export stops first and says what the training costs "
        "(`rungs`: another seed with weights stands for the rung, or its cost columns stay empty)",
    )
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 (static, QDQ) and benchmark it")
    p.add_argument("--no-bench", action="store_true", help="export and verify only; no latency benchmark")
    p.add_argument(
        "--threads",
        type=int,
        help="benchmark threads for both engines (default: 1 at batch 1, all cores at the large batch; `rungs`: 1)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="timed calls per engine and batch (default: 200 at batch 1, 30 at the large batch; a "
        "benchmark stops after 60 s once every engine has a tenth of them)",
    )
    p.add_argument("--no-summary", action="store_true", help="do not rebuild <results>/summary.md")
    mlflow_tracking.add_argument(p)
    bench.log.add_options(p)
    args = p.parse_args(argv)
    if (args.target == "rungs") != (args.spec is not None):
        p.error("`rungs` takes a SPEC (e.g. `rungs mnist --profile quick`); `best` and a run folder take none")
    if (args.profile or args.force or args.variants) and args.target != "rungs":
        p.error("--profile, --force and --variants go with `rungs`")
    if args.target == "rungs" and args.tta is not None:
        p.error(
            "`rungs` pairs each rung's reported metric with the cost of the graph that computes it: a rung is "
            "exported with TTA exactly when its metric used it (eval.tta), so --tta/--no-tta do not apply"
        )
    for name in ("threads", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def choose_runs(args: argparse.Namespace) -> tuple[Path, list[Path], bool]:
    """(the results folder, the run folders to export, whether they are the published groups' best);
    ConfigError when there is nothing to export."""
    if args.target != "best":
        run_dir = Path(args.target)
        results = Path(args.results) if args.results else results_dir_of(run_dir)
        if not (run_dir / "best.pt").is_file() and not (run_dir / "result.json").is_file():
            raise ConfigError(f"{run_dir}: not a run folder (no best.pt, no result.json); give a run folder or `best`")
        check_retraining([run_dir], results, args.retrain)  # a record from git: trained again, if asked
        return results, [with_checkpoint(run_dir, results, args.data_root)], False
    results = Path(args.results or "results")
    store = RunStore(results)
    for g in args.groups or []:
        if g not in store.groups():
            raise ConfigError(
                f"--groups {g}: no such group under {store.root}; groups: {', '.join(store.groups()) or 'none'}"
            )
    cands = finished_runs(results, args.groups)
    tasks = [args.task] if args.task else sorted({c.task for c in cands})
    chosen = [(t, pick_best(cands, t)) for t in tasks]
    missing = [t for t, c in chosen if c is None]
    if missing or not chosen:
        where = "the groups " + ", ".join(args.groups) if args.groups else "the published groups"
        raise ConfigError(
            f"no finished {' or '.join(missing) + ' ' if missing else ''}runs in {where} under "
            f"{store.root} (an ad-hoc group is exported only when named with --groups)"
        )
    for c in (c for _, c in chosen if c is not None):
        log.info(
            f"{c.task}: best of {sum(x.task == c.task for x in cands)} finished runs by validation metric: "
            f"{c.run_dir} (val {c.val:.4f})"
        )
    published = args.groups is None or all(store.read_group(g).role == "published" for g in args.groups)
    check_retraining([c.run_dir for _, c in chosen if c is not None], results, args.retrain)
    return results, [with_checkpoint(c.run_dir, results, args.data_root) for _, c in chosen if c is not None], published


def export_all(
    run_dirs: list[Path], out_dir: Path, data_root: str | None, results: Path, tta: bool | None = None
) -> tuple[list[Exported], int]:
    """Export every run; a failed export does not stop the others.  (exports, exit status so far)."""
    done, status = [], 0
    for rd in run_dirs:
        try:
            ex = export_run(rd, out_dir, data_root, results, tta=tta)
        except (ParityError, ExportError) as e:
            log.error(f"{e}\nno file written for this export")
            status = max(status, 1)
            continue
        except (DataError, ConfigError, FileNotFoundError) as e:
            log.error(str(e))
            status = 2
            continue
        log.info(f"wrote {ex.path}; {_parity_line(ex.record)}")
        done.append(ex)
    return done, status


def benchmark_all(done: list[Exported], reports: Path, args: argparse.Namespace) -> None:
    for ex in done:
        if args.int8:
            bm.add_int8(ex)
        if not args.no_bench:
            rows = bm.benchmark_export(ex, threads=args.threads, repeats=args.repeats)
            report.update_latency_csv(reports / "latency.csv", rows)
            for line in bm.describe(rows):
                log.info(f"{ex.meta.task}: {line}")


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 1 an export failed its check or parity, 2 usage or data error (the others still run),
    130 interrupted (Ctrl-C)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:  # e.g. during --retrain's training: one line, as `bench run` says it
        log.info("interrupted; run the same command to go on (a run being trained again resumes from its last epoch)")
        return 130


def _main(argv: list[str] | None) -> int:
    bench.log.setup()
    args = _parse_args(argv)
    bench.log.setup(args.verbosity)
    if args.target == "rungs":
        return rungs_main(args, argv)
    try:
        results, run_dirs, published = choose_runs(args)
        tracker = mlflow_tracking.tracker(args, results)  # a missing extra or a bad --mlflow URI: before any export
    except (ConfigError, OSError, ValueError) as e:  # also unreadable result/config files
        log.error(str(e))
        return 2
    # Only the best of the published groups, exported to the default place, is the shipped model whose table
    # results/summary.md embeds; any other export (a chosen run folder, ad-hoc groups, --out) keeps its files,
    # latency.csv and deployment.md together in its own folder.
    shipped = published and args.out is None
    out_dir = Path(args.out) if args.out else results / ("onnx" if published else "onnx-adhoc")
    reports = results if shipped else out_dir
    done, status = export_all(run_dirs, out_dir, args.data_root, results, args.tta)
    if not done:
        return status
    benchmark_all(done, reports, args)
    status = max(status, mlflow_tracking.log_exports(tracker, done))
    log.info(f"wrote {report.write_deployment_md(reports, out_dir)}")
    if shipped and not args.no_summary and (results / "runs").is_dir():
        command = "python -m exporters.onnx " + " ".join(sys.argv[1:] if argv is None else argv)
        # re-embed the deployment table; rebuild no group's table unless there is no summary yet
        have = (results / "summary.md").is_file()
        for path in write_summary(results, command, groups=[] if have else None, refresh_published=have):
            log.info(f"wrote {path}")
    return status


def rungs_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``rungs SPEC``: every rung's cost (exporters.rungs), then the group's table rebuilt with it."""
    if args.groups or args.task or args.out or args.no_bench or args.mlflow:
        log.error(
            "`rungs` exports the spec's own group into <results>/onnx/rungs: --groups, --task, --out, "
            "--no-bench and --mlflow do not apply"
        )
        return 2
    results = Path(args.results or "results")
    command = "python -m exporters.onnx " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        spec = load_spec(resolve_spec_path(args.spec), args.profile)
        if spec.group not in RunStore(results).groups("published"):
            raise ConfigError(
                f"no runs of {spec.group} under {results / 'runs'}; train them first: "
                f"python -m bench run {args.spec}" + (f" --profile {args.profile}" if args.profile else "")
            )
        doc, status = measure_rungs(
            spec,
            results,
            args.data_root,
            args.int8,
            args.threads or 1,
            args.repeats,
            args.force,
            command,
            args.retrain,
            args.variants,
        )
    except (ConfigError, DataError, OSError, ValueError) as e:
        log.error(str(e))
        return 2
    for variant, rec in doc["rungs"].items():
        lat = ", ".join(f"{k} {v['p50_ms']:.3f} ms" for k, v in rec.get("latency", {}).items())
        log.info(
            f"{spec.group} {variant}: {rec['params']:,} params, {rec['flops_per_image'] / 1e6:.2f} MFLOP/image, "
            f"batch-1 p50 {lat or 'not timed'}"
        )
    log.info(f"wrote {RunStore(results).root / spec.group / 'costs.json'}")
    if not args.no_summary:
        for path in write_summary(results, command, groups=[spec.group]):
            log.info(f"wrote {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
