"""The run store: the one place that knows where runs live, which of them are finished and
current, which are superseded, and that claims and records them.

Layout (``results/runs``)::

    <group>/spec.json                     the group's definition: its role, its variants and the key
                                          of every (variant, seed) run it holds (its scope)
    <group>/<variant>/seed-<k>/           one run: config.json, metrics.csv, best.pt, result.json, ...
    <group>/<variant>/seed-<k>.superseded-<key>/   an older config of that run, kept aside
    <group>/.locks/<variant>.seed-<k>.lock         the kernel lock a worker holds while training it

A group's role is ``published`` (a spec and profile as written: its table is in
``results/summary.md``), ``adhoc`` (an experiment with overrides, see
:func:`bench.spec.place_in_group`) or ``study`` (the trials of ``bench tune``).  A run is
*finished and current* when its result.json and config.json carry the key the group's
definition expects for that (variant, seed).  Summary, exporters, tune and the runner all ask
this module.  Several machines share the same folders (a shared file system); which of them trains
which run is then decided by an Optuna study in a database (``bench/grid.py``), not by the locks here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import files
from bench.config import Config, ConfigError
from bench.ensemble import build_ensemble
from bench.factories import build_model
from bench.records import GroupRecord, RecordError, RunRecord, VariantRecord, read_record, write_record
from bench.spec import Run, Spec, config_from_dict, slug
from bench.tasks import TASKS
from bench.tasks.base import DataInfo, Task

GROUP_FILE = "spec.json"
COSTS_FILE = "costs.json"  # per group: exporters.onnx rungs
ROLES = ("published", "adhoc", "study")
_SEED_DIR = re.compile(r"seed-(\d+)")

log = logging.getLogger(__name__)


@dataclass
class StoredRun:
    """A finished, current run of a group, as read back from its folder."""

    group: str
    variant: str
    seed: int
    key: str
    dir: Path
    result: RunRecord


@dataclass
class LoadedRun:
    """A finished run rebuilt from its folder: the model with its best weights (eval mode, CPU)."""

    run_dir: Path
    model: nn.Module
    config: Config
    task: Task
    info: DataInfo
    key: str
    result: RunRecord | None  # None while the run is unfinished


class RunStore:
    """Run folders under ``<results>/runs``."""

    def __init__(self, results_dir: str | Path):
        self.results = Path(results_dir)
        self.root = self.results / "runs"

    def path(self, run: Run) -> Path:
        return self.root / run.rel_dir

    # ----------------------------------------------------------------------- groups

    def write_group(self, spec: Spec, role: str | None = None, **extra: Any) -> None:
        """Write the definition of ``spec``'s group: every run it holds, with its key."""
        role = self.check_owner(spec, role)
        files.write_json(
            self.root / spec.group / GROUP_FILE,
            GroupRecord(
                name=spec.name,
                group=spec.group,
                role=role,
                published_group=spec.published_group,
                path=spec.path,
                task=spec.task,
                profile=spec.profile,
                seeds=spec.seeds,
                overrides=spec.overrides,
                description=spec.description,
                target=spec.target,
                tuned=spec.tuned,
                variants=[
                    VariantRecord(v.name, slug(v.name), v.parent, v.ablation, v.change, v.label, v.reported)
                    for v in spec.variants
                ],
                runs=[{"variant": r.variant.name, "seed": r.seed, "key": r.key} for r in spec.runs()],
                extra=extra,
            ).to_dict(),
        )

    def check_owner(self, spec: Spec, role: str | None = None) -> str:
        """The role ``spec``'s group would be written with; ConfigError when its folder already holds another
        spec's group or a group of another role (a published table is never taken over by an experiment)."""
        role = role or ("adhoc" if spec.adhoc else "published")
        assert role in ROLES, role
        if (self.root / spec.group / GROUP_FILE).exists():
            old = self.read_group(spec.group)
            if (old.role, old.name) != (role, spec.name):
                raise ConfigError(
                    f"{self.root / spec.group} holds the {old.role} group of spec {old.name!r} "
                    f"({old.path}); a group's folder never changes hands: choose another --group"
                )
        return role

    def read_group(self, group: str) -> GroupRecord:
        """A group's definition (in the current record format, whatever version wrote it)."""
        path = self.root / group / GROUP_FILE
        try:
            return GroupRecord.from_dict(files.read_json(path))
        except (RecordError, TypeError) as e:
            raise ConfigError(f"{path}: not a group record this bench can read ({e})") from None

    def groups(self, role: str | None = None) -> list[str]:
        """Names of the groups under ``runs/`` (of one role), sorted."""
        if not self.root.is_dir():
            return []
        names = sorted(p.parent.name for p in self.root.glob(f"*/{GROUP_FILE}"))
        return [g for g in names if role is None or self.read_group(g).role == role]

    def write_costs(self, group: str, costs: dict[str, Any]) -> None:
        """The deployment cost of the group's rungs (``exporters.onnx rungs``), kept beside its runs."""
        files.write_json(self.root / group / COSTS_FILE, costs)

    def read_costs(self, group: str) -> dict[str, Any] | None:
        """The group's ``costs.json``, None when its rungs were never exported and timed."""
        path = self.root / group / COSTS_FILE
        return files.read_json(path) if path.exists() else None

    # ----------------------------------------------------------------------- runs

    def finished(self, group: str) -> list[StoredRun]:
        """The finished, current runs of ``group``, in the definition's variant order, then by seed.

        Current: result.json's key equals config.json's and the key the group expects for that
        (variant, seed).  (Groups written before definitions listed their keys accept any run
        whose result and config agree.)"""
        meta = self.read_group(group)
        expected = meta.expected_keys()
        out = []
        for v in meta.variants:
            for seed, d in self._seed_dirs(group, v.dir):
                result = _current_result(d)
                if result is None or (expected is not None and expected.get((v.name, seed)) != result.key):
                    continue
                out.append(StoredRun(group, v.name, seed, result.key, d, result))
        return out

    def _seed_dirs(self, group: str, variant_dir: str) -> list[tuple[int, Path]]:
        """(seed, folder) of a variant's runs, by seed; not the ``seed-K.superseded-<key>`` folders set aside."""
        dirs = (self.root / group / variant_dir).glob("seed-*")
        return sorted((int(m.group(1)), d) for d in dirs if (m := _SEED_DIR.fullmatch(d.name)))

    def result(self, run: Run) -> RunRecord | None:
        """The run's result when it is finished with this config, else None."""
        result = _current_result(self.path(run))
        return result if result is not None and result.key == run.key else None

    def todo(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if self.result(r) is None]

    def twin(self, run: Run) -> Path | None:
        """The folder of a finished run with ``run``'s key in another group of runs (not a tuning study): the same
        config and seed, trained for another profile (a rung kept as written in every profile is the same run in
        each) or by an experiment that happened to match it.  None for a seed ensemble, or without such a run."""
        if run.members:
            return None
        inside = Path(*run.rel_dir.parts[1:])  # <variant>/seed-N
        for group in self.groups():
            if group == run.spec:
                continue
            try:
                if self.read_group(group).role == "study":
                    continue
            except ConfigError:
                continue
            result = _current_result(self.root / group / inside)
            if result is not None and result.key == run.key and result.test:
                return self.root / group / inside
        return None

    def copy_twin(self, run: Run, twin: Path) -> None:
        """Record ``run`` as finished from its twin's folder (see :meth:`twin`): its files copied, its group named
        as ``run``'s, and ``copied_from`` saying where it was trained."""
        d = self.path(run)
        d.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.csv", "curves.png", "best.pt"):
            if (twin / name).exists():
                data = (twin / name).read_bytes()
                files.atomic_write(d / name, lambda f, data=data: f.write(data), mode="wb")
        files.write_json(d / "config.json", {**files.read_json(twin / "config.json"), "spec": run.spec})
        copied_from = twin.relative_to(self.root).as_posix()
        self.record(run, {**files.read_json(twin / "result.json"), "spec": run.spec, "copied_from": copied_from})

    def epochs_done(self, run: Run) -> int:
        """Epochs of an unfinished run that a restart resumes after (0: none, or another config's)."""
        d = self.path(run)
        try:
            if files.read_json(d / "config.json").get("key") != run.key:
                return 0
            return max(0, len((d / "metrics.csv").read_text().splitlines()) - 1)
        except (OSError, ValueError):
            return 0

    @contextmanager
    def claim(self, run: Run) -> Iterator[bool]:
        """``with store.claim(run) as mine:`` -- True while this process holds the run's lock, False
        when another process holds it or the run is already finished.

        The lock is the kernel's (``flock``): it is released when the holder exits or dies, even by
        SIGKILL, so there is no stale lock to detect.  A folder left by another config of the same
        (variant, seed) is kept aside as ``seed-K.superseded-<key>``, so an edited spec never mixes results.
        """
        lock = self._lock(run)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                # Finished by another worker since the caller's todo list was made: do not train it again.
                if self.result(run) is not None:
                    yield False
                    return
                f.truncate(0)  # who holds it, for a human looking at a busy grid
                f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}) + "\n")
                f.flush()
                self.take_over(run)
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lock(self, run: Run) -> Path:
        return self.root / run.spec / ".locks" / f"{slug(run.variant.name)}.seed-{run.seed}.lock"

    def busy(self, run: Run) -> bool:
        """Whether another process holds ``run``'s lock (:meth:`claim`): it is training it now."""
        try:
            with open(self._lock(run)) as f:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(f, fcntl.LOCK_UN)
        except FileNotFoundError:
            pass
        return False

    def wait_for(self, run: Run) -> None:
        """Return once no other process holds ``run``'s lock (it finished, failed, was stopped or died)."""
        try:
            with open(self._lock(run)) as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # blocks while the holder lives; the kernel releases it when it ends
                fcntl.flock(f, fcntl.LOCK_UN)
        except FileNotFoundError:
            pass

    def take_over(self, run: Run) -> None:
        """Make the run's folder ready for the process that now holds the run (by lock or by database claim):
        another config's folder is kept aside, half-written files of a killed writer are removed; a
        ``last.pt`` of this config stays, so training resumes after its last completed epoch."""
        self._set_aside_other_config(run)
        for tmp in self.path(run).glob(".*.tmp"):  # leftovers of a write killed before its rename
            tmp.unlink(missing_ok=True)

    def _set_aside_other_config(self, run: Run) -> None:
        d = self.path(run)
        try:
            old = files.read_json(d / "config.json").get("key", "unknown")
        except (OSError, ValueError):
            return
        if old != run.key:
            aside, k = d.with_name(f"{d.name}.superseded-{old}"), 2
            while aside.exists():
                aside, k = d.with_name(f"{d.name}.superseded-{old}-{k}"), k + 1
            d.rename(aside)

    def record(self, run: Run, result: dict[str, Any]) -> None:
        """Write the run's result.json (``status`` defaults to ``finished``); drop its resume state."""
        d = self.path(run)
        write_record(d, RunRecord.from_dict({"status": "finished", **result}))
        (d / "last.pt").unlink(missing_ok=True)  # resume state is not needed once the result is in

    def record_failure(self, run: Run, error: str) -> None:
        """Write a result.json with ``status: failed`` and the error: the run counts as unfinished (a rerun
        of the command tries it again) and the summary lists it; its last.pt stays for that rerun."""
        write_record(
            self.path(run),
            RunRecord(
                run.key,
                "failed",
                run.variant.name,
                run.seed,
                error=error,
                extra={"failed": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
            ),
        )

    def failed(self, group: str) -> list[RunRecord]:
        """result.json of the group's runs whose last attempt failed with the config the group expects."""
        meta = self.read_group(group)
        expected = meta.expected_keys() or {}
        out = []
        for v in meta.variants:
            for _, d in self._seed_dirs(group, v.dir):
                try:
                    res = read_record(d)
                except (OSError, ValueError):
                    continue
                if res.status == "failed" and expected.get((v.name, res.seed)) == res.key:
                    out.append(res)
        return out

    def load(self, run: StoredRun) -> LoadedRun:
        return load_run(run.dir)


def _current_result(d: Path) -> RunRecord | None:
    """result.json of a run folder when it is a finished run whose config.json has the same key."""
    try:
        result = read_record(d)
        config_key = files.read_json(d / "config.json").get("key")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # written atomically, so this is damage from outside: say so
        log.warning(
            f"{d}: unreadable result.json or config.json ({type(e).__name__}: {e}); the run counts as "
            f"unfinished and will be trained again"
        )
        return None
    if result.status != "finished" or result.key != config_key:
        return None
    return result


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the model of a run folder from best.pt (loaded with ``weights_only=True``)."""
    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    if not best.exists():
        raise FileNotFoundError(f"{run_dir}: no best.pt (is this a finished run folder?)")
    ck = torch.load(best, map_location="cpu", weights_only=True)
    cfg = config_from_dict(ck["config"], where=str(best))
    task = TASKS[cfg.task].for_config(cfg)  # a folder task finds the run's files by its data settings
    info = DataInfo.from_dict(ck["data_info"])
    if "members" in ck:  # a seed ensemble (bench/ensemble.py): every member's weights
        model = build_ensemble(ck, cfg, task, task.model_kwargs(info))
    else:
        model = build_model(cfg, **task.model_kwargs(info))
        model.load_state_dict(ck["state_dict"])
    model.eval()
    res = run_dir / "result.json"
    return LoadedRun(run_dir, model, cfg, task, info, ck["key"], read_record(run_dir) if res.exists() else None)
