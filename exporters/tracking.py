"""``--mlflow [URI]`` of ``python -m exporters.onnx``: each exported file is attached to the MLflow run of the run it
was exported from (found by its group and config key, and logged first when MLflow lacks it; see bench/tracking.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from bench.tracking import INSTALL, Tracker, open_tracker

ARTIFACT_PATH = "onnx"  # the folder of the MLflow run's artifacts that holds the exported files

log = logging.getLogger(__name__)


def add_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mlflow",
        nargs="?",
        const=True,
        default=None,
        metavar="URI",
        help="attach each exported file (and its INT8 file and record) to its source run's MLflow run in URI "
        f"(default: sqlite:///<results>/mlflow.db); needs the extra: {INSTALL}",
    )


def tracker(args: argparse.Namespace, results: Path) -> Tracker | None:
    """The connected tracker --mlflow asks for (None without it); ConfigError when it cannot be used."""
    return open_tracker(args.mlflow, results)


def log_exports(tracker: Tracker | None, done: list[Any]) -> int:
    """Attach every export of ``done`` (``exporters.export.Exported``) to its run's MLflow run; exit status so far:
    0, or 1 when one could not be logged (said on stderr)."""
    status = 0
    for ex in done if tracker else []:
        int8 = ex.record.get("int8") or {}
        paths = [
            p for p in (ex.path, ex.path.parent / int8["onnx"] if int8 else None, ex.record_path) if p and p.is_file()
        ]
        try:
            run_id = tracker.log_artifacts(ex.run.run_dir, paths, ARTIFACT_PATH)
        except Exception as e:  # the store went away, or the run is not a finished run of a results folder
            log.error(f"MLflow: could not attach {ex.path.name} to the run of {ex.run.run_dir}: {e}")
            status = 1
            continue
        log.info(f"MLflow: {', '.join(p.name for p in paths)} attached to run {run_id} ({ex.run.run_dir})")
    return status
