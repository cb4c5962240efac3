"""Runs that train nothing of their own: a post-processing rung evaluated from the weights of the rung it changes.

A run whose config differs from another run of its group only in keys that act once training is over
(:data:`bench.spec.POST_TRAINING_KEYS`: the post-processing chosen on validation) would train that run's weights
again, epoch for epoch: same config, same seed, same validation choosing the same best epoch.  So it is evaluated
from that run's ``best.pt`` instead (the *source*, :func:`source_of`).  Its folder is a run folder like any other:

- ``metrics.csv`` and ``curves.png``: the source's training log, copied;
- ``best.pt``: the source's weights under this run's key and config;
- ``config.json``: the source's recorded config (its thread count too, which a rerun needs to be identical) with this
  run's evaluation settings;
- ``result.json``: its own test metrics (with the post-processing it chose on validation) beside the source's
  training fields (best epoch, epochs, seconds, machine, :data:`TRAINING_FIELDS`), and ``trained_by`` naming the
  source.

On the machine and thread count that trained the source this is exactly the result training the run would give (a
trained one is identical to the last digit); on another it is one of the trainings the run could have had, as any
rerun is.  ``bench reproduce`` trains such a run from its config like any other run.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from bench import files
from bench.config import Config
from bench.factories import build_loss
from bench.inference import EVAL_PRECISION
from bench.records import read_record
from bench.spec import POST_TRAINING_KEYS, Run, run_key, training_key
from bench.store import RunStore, load_run
from bench.tasks.base import Data, Task

# What a derived run's record takes from its source's: how the weights were trained, not how they were scored.
TRAINING_FIELDS = (
    "val_best",
    "best_epoch",
    "epochs_run",
    "stopped_early",
    "train_time_s",
    "train_seconds",
    "params",
    "device",
    "device_name",
    "train_precision",
    "torch",
)
COPIED_FILES = ("metrics.csv", "curves.png")


def post_training_keys() -> str:
    """The keys a derived run may differ in, for messages: ``eval.postprocess``."""
    return ", ".join(f"{section}.{name}" for section, names in POST_TRAINING_KEYS.items() for name in names)


def source_of(run: Run, group: list[Run]) -> Run | None:
    """The run of ``group`` (its group's runs) that trains ``run``'s weights: same seed, and its key is ``run``'s
    :func:`~bench.spec.training_key`.  None for a seed ensemble, a run whose post-training keys are at their defaults
    (it is a source itself) or one whose group has no such run."""
    if run.members:
        return None
    wanted = training_key(run.config)
    if wanted == run.key:
        return None
    return next((r for r in group if r.seed == run.seed and r.key == wanted and not r.members), None)


def plan(
    todo: list[Run], group: list[Run], store: RunStore, coming: list[Run] = ()
) -> tuple[list[tuple[Run, Run]], list[tuple[Run, Run]]]:
    """(the runs of ``todo`` to evaluate from their source's weights, the runs of ``todo`` whose source is finished
    without its best.pt here and that are therefore trained), each as (run, source) pairs.  A run's source must be
    coming: among ``todo`` (trained first), among ``coming`` (twins copied from another group first), trained by
    another process now (its lock held: the run waits for it), or finished with its best.pt here (checkpoints are not
    in git).  A run whose source is none of these nor finished is trained, as any run."""
    pending = {(r.variant.name, r.seed) for r in [*todo, *coming]}
    evaluated, trained = [], []
    for run in todo:
        source = source_of(run, group)
        if source is None:
            continue
        finished = store.result(source) is not None
        if (source.variant.name, source.seed) in pending or (store.path(source) / "best.pt").exists():
            evaluated.append((run, source))
        elif finished:
            trained.append((run, source))
        elif store.busy(source):
            evaluated.append((run, source))
    return evaluated, trained


def evaluate(
    run: Run, source: Run, source_dir: Path, run_dir: Path, task: Task, data: Data, device: torch.device, meta: dict
) -> dict[str, Any]:
    """Write ``run``'s folder from the finished ``source`` run in ``source_dir`` (see the module's docstring), score the
    source's weights on the test split with ``run``'s evaluation settings (``task.test_record``: the post-processing
    chosen on validation) and with the source's thread count (a CPU's sums depend on it), and return the result (for
    ``result.json``).  ``data``: ``run``'s data on ``device``.  The training log is copied last, so a folder left by
    an interrupted evaluation never looks like a training to resume."""
    loaded = load_run(source_dir)
    if loaded.result is None or loaded.result.key != loaded.key or loaded.key != source.key:
        raise ValueError(f"{source_dir}: its best.pt (key {loaded.key}) is not its finished run's ({source.key})")
    cfg = _config(loaded.config, run)
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(
        run_dir / "config.json", {"key": run.key, **meta, "config": cfg.to_dict(), "data_info": data.info.to_dict()}
    )
    checkpoint = torch.load(source_dir / "best.pt", map_location="cpu", weights_only=True)
    files.torch_save(run_dir / "best.pt", {**checkpoint, "config": cfg.to_dict(), "key": run.key})
    model, threads = loaded.model.to(device), torch.get_num_threads()
    t0 = time.perf_counter()
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        scored = task.test_record(model, data, cfg, build_loss(cfg))
    finally:
        torch.set_num_threads(threads)
    test_time = time.perf_counter() - t0
    for name in COPIED_FILES:
        if (source_dir / name).exists():
            blob = (source_dir / name).read_bytes()
            files.atomic_write(run_dir / name, lambda f, blob=blob: f.write(blob), mode="wb")
    trained = loaded.result.to_dict()
    return {
        "key": run.key,
        **meta,
        **scored,  # test, and with eval.postprocess: postprocess, test_raw
        **{k: trained[k] for k in TRAINING_FIELDS if k in trained},
        "test_time_s": test_time,
        "eval_precision": EVAL_PRECISION,
        "commit": files.git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "trained_by": f"{source.variant.name} seed {source.seed}",
    }


def _config(trained: Config, run: Run) -> Config:
    """The source's recorded config (data root, threads: where and how it was trained) with ``run``'s post-training
    keys; checked to be ``run``'s config (its key)."""
    cfg = trained.copy()
    for section, names in POST_TRAINING_KEYS.items():
        own = getattr(run.config, section)
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **{k: getattr(own, k) for k in names}))
    if run_key(cfg) != run.key:
        raise ValueError(f"the source's config with {post_training_keys()} of {run.variant.name} is not its config")
    return cfg


class SourceFailed(Exception):
    """The run that trains a derived run's weights failed: the derived run is recorded as failed with its error."""


def failure_of(source_dir: Path, key: str) -> str | None:
    """The error of the source run in ``source_dir`` when its last attempt with ``key`` failed, else None."""
    try:
        record = read_record(source_dir)
    except (OSError, ValueError):
        return None
    return record.error if record.status == "failed" and record.key == key else None
