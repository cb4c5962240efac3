"""A finished run's checkpoint for an export: its best.pt, or the run trained again from its record.

Records come from git, checkpoints do not: a clone or a new machine has a run's config.json and result.json but not its
best.pt.  An export of such a run (``best``, a run folder, ``rungs``) trains it again once from the record into
``<results>/retrained`` when ``--retrain`` asks for it (:func:`bench.runner.checkpoint_of`), and reuses that copy
afterwards; without ``--retrain`` it says first what the training would cost.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import bench.log
from bench import ensemble, files
from bench.config import ConfigError
from bench.runner import (
    RETRAINED,
    RunOptions,
    checkpoint_of,
    derived_source,
    resolve_data_root,
    retrained_checkpoint,
    retrained_dir,
)
from bench.stats import format_duration
from bench.store import RunStore, StoredRun

log = logging.getLogger(__name__)


def check_retraining(run_dirs: list[Path], results: Path, allowed: bool) -> None:
    """Before any training: the runs that exporting ``run_dirs`` must train again (no best.pt here, no re-trained copy)
    and what their records say that cost; ConfigError unless ``allowed`` (--retrain), a note otherwise."""
    todo = [s for rd in run_dirs for s in untrained_here(rd, results)]
    if not todo:
        return
    listed = "; ".join(
        f"{s.dir} ({format_duration(s.result.train_time_s or 0)} on {s.result.device_name or 'an unknown machine'})"
        for s in todo
    )
    what = f"training {len(todo)} run{'s' if len(todo) > 1 else ''} again from the record"
    if not allowed:
        raise ConfigError(
            f"no best.pt here (checkpoints are not in git): this export means {what}, about as long as the "
            f"recorded training: {listed}. Add --retrain to do that (into {results / RETRAINED}), or export a run "
            f"trained here"
        )
    bench.log.note(log, f"--retrain: {what}; recorded training: {listed}")


def _stored(run_dir: Path, results: Path) -> StoredRun:
    """The finished run of ``results`` in ``run_dir``; ConfigError when it is none."""
    store = RunStore(results)
    group = run_dir.parent.parent.name
    stored = next((r for r in store.finished(group) if r.dir.resolve() == run_dir.resolve()), None)
    if stored is None:
        raise ConfigError(
            f"{run_dir}: not a finished run of {store.root} (no best.pt to export, no record to re-train)"
        )
    return stored


def untrained_here(run_dir: Path, results: Path) -> list[StoredRun]:
    """The runs :func:`with_checkpoint` would train to export ``run_dir``: none when its best.pt is here; for a seed
    ensemble, its members that lack theirs; else the run itself unless an earlier re-trained copy serves."""
    if (run_dir / "best.pt").exists():
        return []
    stored = _stored(run_dir, results)
    if "members" in stored.result.extra:
        members = [run_dir.parent.parent / m["run"] for m in stored.result.extra["members"]]
        return [s for m in members for s in untrained_here(m, results)]
    if retrained_checkpoint(stored, results) is not None:
        return []
    source = derived_source(stored, results)  # a post-processing rung: its source's weights, scored again
    return [stored] if source is None else untrained_here(source.dir, results)


def with_checkpoint(run_dir: Path, results: Path, data_root: str | None) -> Path:
    """``run_dir`` when it holds its best.pt; else the same run trained again from its record (config, seed, thread
    count) into ``<results>/retrained``, once, and that folder (``bench.runner.checkpoint_of``): records come from
    git, checkpoints do not.  A seed ensemble's best.pt is rebuilt there from its members' (each found so)."""
    if (run_dir / "best.pt").exists():
        return run_dir
    stored = _stored(run_dir, results)
    if "members" in stored.result.extra:  # a seed ensemble: its members' checkpoints (re-trained where missing)
        done = retrained_dir(results, run_dir)
        members = [
            with_checkpoint(run_dir.parent.parent / m["run"], results, data_root)
            for m in stored.result.extra["members"]
        ]
        saved = files.read_json(run_dir / "config.json")
        ensemble.write_checkpoint(
            done,
            stored.key,
            saved["config"],
            saved["data_info"],
            members,
            [m["key"] for m in stored.result.extra["members"]],
        )
        for name in ("config.json", "result.json"):
            shutil.copyfile(run_dir / name, done / name)
        return done
    # Progress bars only where notes are shown: `-q` asks for warnings and errors alone on stderr.
    opts = RunOptions(resolve_data_root(data_root)[0], progress=log.isEnabledFor(logging.INFO))
    return checkpoint_of(stored, results, opts, data_root, "export it", "exporting")
