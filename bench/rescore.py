"""``bench rescore``: the stored runs of a group scored again, from their ``best.pt``, by today's evaluation and
metric code, without training.

This is how a change of evaluation (fp32 instead of bf16 autocast) or of a metric reaches a published table:
each run's ``result.json`` gets the new validation and test metrics, and the numbers they replace go to its
``history`` with the commit that computed them.  The best epoch stays the one training chose: choosing it
again would need every epoch's weights, which no run keeps.  Checkpoints are not in git, so a fresh clone
can rescore only after training (``bench run``); the runs without one are named and left as they are.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench import files
from bench.factories import build_loss
from bench.inference import EVAL_PRECISION
from bench.records import RunRecord, write_record
from bench.runner import run_data_root
from bench.store import RunStore, StoredRun, load_run

log = logging.getLogger(__name__)


@dataclass
class Rescored:
    """What rescoring one run did: ``old`` and ``new`` records (``new`` is None when the run has no best.pt)."""

    run: StoredRun
    old: RunRecord
    new: RunRecord | None

    @property
    def changed(self) -> bool:
        return self.new is not None and _scores(self.new) != _scores(self.old)


def _scores(r: RunRecord) -> tuple[Any, ...]:
    """What a rescore computes again: the test metrics (with and before post-processing), the validation metric and
    the post-processing chosen on validation."""
    return r.test, r.val_best, r.postprocess, r.test_raw


def rescore_run(run: StoredRun, data_root: str | None, commit: str) -> RunRecord:
    """``run``'s record with validation and test metrics computed again from its best.pt (on the CPU, fp32).

    The replaced numbers join ``history``; a record whose numbers do not change keeps its history as it was."""
    loaded = load_run(run.dir)
    cfg = loaded.config
    cfg.data.root = run_data_root(loaded, data_root)
    data = loaded.task.load(cfg, torch.device("cpu"))
    loss = build_loss(cfg)
    val = loaded.task.evaluate(loaded.model, data.val, cfg, loss, final=False)[loaded.task.metric]
    scored = loaded.task.test_record(loaded.model, data, cfg, loss)
    old = run.result
    new = dataclasses.replace(
        old,
        test=scored["test"],
        val_best=val,
        postprocess=scored.get("postprocess"),
        test_raw=scored.get("test_raw"),
        eval_precision=EVAL_PRECISION,
    )
    if (_scores(new), new.eval_precision) == (_scores(old), old.eval_precision):
        return old
    entry = {
        "test": old.test,
        "val_best": old.val_best,
        "eval_precision": old.eval_precision,
        **{k: v for k, v in (("postprocess", old.postprocess), ("test_raw", old.test_raw)) if v is not None},
        "scored_by": old.extra.get("scored_by", old.commit),
        "replaced": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return dataclasses.replace(new, history=[*old.history, entry], extra={**old.extra, "scored_by": commit})


def rescore_group(results: str | Path, group: str, data_root: str | None) -> list[Rescored]:
    """Rescore every finished run of ``group`` that has its best.pt, writing each new record at once (so an
    interrupted rescore keeps what it did); runs without best.pt come back with ``new=None``."""
    store, commit, out = RunStore(results), files.git_commit(), []
    for run in store.finished(group):
        if not (run.dir / "best.pt").exists():
            out.append(Rescored(run, run.result, None))
            continue
        new = rescore_run(run, data_root, commit)
        if new is not run.result:
            write_record(run.dir, new)
        out.append(Rescored(run, run.result, new))
        log.info(f"{run.variant} seed {run.seed}: {_change(run.result, new)}")
    return out


def _change(old: RunRecord, new: RunRecord) -> str:
    if new is old:
        return "unchanged"
    moved = [f"{k} {old.test.get(k)!r} -> {v!r}" for k, v in new.test.items() if old.test.get(k) != v]
    return "; ".join(moved) or f"same test metrics, now recorded as {new.eval_precision} evaluation"
