"""Runs a spec's grid of (variant, seed) runs, skipping finished ones.

The only place that decides which runs remain, claims one and records its result is
:class:`LocalStore`.  A later store (a database shared by several machines) or several
worker processes replace or share it without touching the loop in :func:`run_spec`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench import files
from bench.spec import Run, Spec, slug


class LocalStore:
    """Run folders under ``root`` (results/runs); a run is done when its result.json
    carries the run's config key, and claimed while a live process holds its lock file."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, run: Run) -> Path:
        return self.root / run.rel_dir

    def result(self, run: Run) -> dict[str, Any] | None:
        p = self.path(run) / "result.json"
        if not p.exists():
            return None
        res = files.read_json(p)
        return res if res.get("key") == run.key else None

    def remaining(self, runs: list[Run]) -> list[Run]:
        return [r for r in runs if self.result(r) is None]

    def claim(self, run: Run) -> bool:
        """Take the run's lock; False when another live process holds it or the run is already done.

        A folder left by a different config of the same (variant, seed) is kept, renamed
        ``seed-K.superseded-<key>``, so an edited spec never silently mixes results.
        """
        d = self.path(run)
        d.mkdir(parents=True, exist_ok=True)
        lock = d / "lock"
        # The lock appears with its owner already written in it: the record goes to a private file
        # that is then hard-linked as `lock` (atomic, fails if `lock` exists).  Creating `lock` empty
        # and writing it afterwards let a second worker read it empty in between, take it for a dead
        # owner's and train the same run at once (seen: 88 s of one of two workers lost at the start
        # of the WARWICK quick profile).
        mine = d / f"lock.{os.getpid()}.new"
        mine.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "start": _proc_start(os.getpid()), "since": time.time()}))
        try:
            for _ in range(2):
                try:
                    os.link(mine, lock)
                except FileExistsError:
                    if self._lock_alive(lock):
                        return False
                    lock.unlink(missing_ok=True)  # its owner died (e.g. SIGKILL): take over
                    continue
                break
            else:
                return False
        finally:
            mine.unlink(missing_ok=True)
        cfg = d / "config.json"
        if cfg.exists() and files.read_json(cfg).get("key") != run.key:
            old = files.read_json(cfg).get("key", "unknown")
            lock.unlink()
            d.rename(d.with_name(f"{d.name}.superseded-{old}"))
            return self.claim(run)
        if self.result(run) is not None:
            # Finished by another worker since our todo list was made: without this check a worker
            # that reached the run after its owner released the lock trained it again (seen: the
            # WARWICK quick profile's initial/seed-1 trained by both workers, 60-80 s of one lost).
            self.release(run)
            return False
        for tmp in d.glob(".*.tmp"):  # leftovers of a write that was killed before its rename
            tmp.unlink(missing_ok=True)
        return True

    @staticmethod
    def _lock_alive(lock: Path) -> bool:
        try:
            info = json.loads(lock.read_text())
        except (OSError, ValueError):
            return False  # unreadable (not written by this version's claim): treat as dead
        if info.get("host") != socket.gethostname():
            return True  # cannot check another machine's process: assume it is working
        pid = int(info.get("pid", -1))
        if pid == os.getpid():
            return False  # left by an earlier process that had our pid
        # The pid must still exist and be the same process (pids are reused after a kill).
        return _proc_start(pid) is not None and _proc_start(pid) == info.get("start")

    def record(self, run: Run, result: dict[str, Any]) -> None:
        d = self.path(run)
        files.write_json(d / "result.json", result)
        (d / "last.pt").unlink(missing_ok=True)  # resume state is not needed once the result is in

    def release(self, run: Run) -> None:
        (self.path(run) / "lock").unlink(missing_ok=True)

    def write_spec_meta(self, spec: Spec) -> None:
        """results/runs/<group>/spec.json: what the summary needs to order and label the rows."""
        files.write_json(self.root / spec.group / "spec.json", {
            "name": spec.name, "group": spec.group, "path": spec.path, "task": spec.task, "profile": spec.profile,
            "seeds": spec.seeds, "description": spec.description,
            "variants": [{"name": v.name, "parent": v.parent, "ablation": v.ablation, "change": v.change,
                          "reported": v.reported, "dir": slug(v.name)}
                         for v in spec.variants],
        })


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc (macOS): existence is the best we can check
        except (ProcessLookupError, PermissionError):
            return None
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


def resolve_data_root(cli_root: str | None) -> str:
    """--data-root, else $BENCH_DATA, else ./data."""
    return str(Path(cli_root or os.environ.get("BENCH_DATA") or "data").expanduser().resolve())


def check_data(spec: Spec, data_root: str | None = None) -> None:
    """Load (on the CPU) every distinct data configuration of ``spec``'s runs once, so broken
    data raises its DataError here, in one process, before any worker or run starts."""
    import torch

    from bench.tasks import TASKS

    task, root, seen = TASKS[spec.task], resolve_data_root(data_root), set()
    for run in spec.runs():
        cfg = run.config
        cfg.data.root = cfg.data.root or root
        key = json.dumps(dataclasses.asdict(cfg.data), sort_keys=True)
        if key not in seen:
            seen.add(key)
            task.load(cfg, torch.device("cpu"))


def run_spec(spec: Spec, results_dir: str | Path = "results", data_root: str | None = None,
             device: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Train every remaining run of ``spec``; returns the results of all runs that are done."""
    import torch

    from bench.tasks import TASKS
    from bench.train import fit, resolve_device

    store = LocalStore(Path(results_dir) / "runs")
    store.write_spec_meta(spec)
    runs = spec.runs()
    todo = store.remaining(runs)
    task = TASKS[spec.task]
    root = resolve_data_root(data_root)
    cache: dict[str, Any] = {}
    grid = tqdm(total=len(runs), initial=len(runs) - len(todo), desc=f"{spec.group} runs", disable=not progress, unit="run")
    for run in todo:
        cfg = run.config
        cfg.data.root = cfg.data.root or root
        if device:
            cfg.train.device = device
        dev = resolve_device(cfg.train.device)
        if not store.claim(run):
            grid.write(f"skip {run.rel_dir}: claimed or finished by another process")
            continue
        try:
            dkey = json.dumps([dataclasses.asdict(cfg.data), str(dev)], sort_keys=True)
            if dkey not in cache:
                cache.clear()  # one data set in memory at a time
                cache[dkey] = task.load(cfg, dev)
            meta = {"spec": spec.group, "variant": run.variant.name, "seed": run.seed, "name": f"{run.variant.name}/s{run.seed}"}
            result = fit(store.path(run), cfg, task, cache[dkey], dev, run.key, meta, progress)
            store.record(run, result)
        finally:
            store.release(run)
        grid.update(1)
        grid.set_postfix_str(f"{run.variant.name} seed {run.seed}: {task.metric}={result['test'][task.metric]:.4f}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    grid.close()
    return [r for r in (store.result(run) for run in runs) if r is not None]
