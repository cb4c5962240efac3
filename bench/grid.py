"""Who trains which run of a grid: the claims that the runner's loop takes one at a time.

Two ways to share a grid, one interface (``claims()`` yields a run while this process holds it;
``done``/``failed`` say how it ended):

* :class:`LocalGrid` -- worker processes of one machine: the run store's kernel lock per run
  folder (released by the kernel when a worker dies, so a rerun picks the run up).
* :class:`StudyGrid` -- workers on any number of machines sharing a database (``--storage``):
  the grid is an Optuna study named ``grid:<group>`` with one enqueued trial per run (its
  ``user_attrs`` name the run folder and config key).  Claiming a run is Optuna's own
  ``WAITING -> RUNNING`` transition; a worker beats while it trains; a worker that stops beating
  has its trial failed and queued again by the storage's retry callback, and whoever claims the
  retry resumes from the run's ``last.pt`` on the shared results folder.  A worker with nothing
  left to claim waits while other trials of the grid are running, so that it is there to take
  over a dead worker's run, and leaves when none is.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator
from typing import Any

import optuna

from bench.spec import Run, Spec
from bench.storage import StorageOptions, fail_stale_trials, heartbeat, open_storage, trial_id
from bench.store import RunStore
from bench.tasks import TASKS

log = logging.getLogger(__name__)

State = optuna.trial.TrialState


class LocalGrid:
    """Runs of one machine's grid, claimed through the run store's kernel locks."""

    def __init__(self, store: RunStore, runs: list[Run]):
        self.store, self.runs = store, runs

    def claims(self) -> Iterator[Run]:
        for run in self.store.todo(self.runs):
            with self.store.claim(run) as mine:
                if mine:
                    yield run

    def done(self, run: Run, result: dict[str, Any]) -> None:
        self.store.record(run, result)

    def failed(self, run: Run, error: str) -> None:
        self.store.record_failure(run, error)


def retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The numbers of the trials ``trial`` retries (Optuna's retry callback records them; empty for a first try)."""
    with warnings.catch_warnings():  # marked experimental since Optuna 3.0, unchanged since
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def study_name(spec: Spec) -> str:
    return f"grid:{spec.group}"


def _ident(run: Run) -> dict[str, Any]:
    return {"run": str(run.rel_dir), "key": run.key}


class StudyGrid:
    """Runs of a grid shared by workers on several machines through an Optuna study (see the module doc)."""

    def __init__(
        self, store: RunStore, spec: Spec, runs: list[Run], storage: StorageOptions, poll: float | None = None
    ):
        self.store, self.runs = store, runs
        self.storage = open_storage(storage)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the runner says what happens, in its own lines
        self.study = optuna.create_study(
            study_name=study_name(spec),
            storage=self.storage,
            load_if_exists=True,
            direction=TASKS[spec.task].metrics[0].direction,
        )
        self.poll = poll if poll is not None else storage.heartbeat
        self.retries = storage.retries
        self._mine: dict[tuple[str, str], Run] = {(str(r.rel_dir), r.key): r for r in runs}
        self._outcome: dict[str, tuple[str, Any]] = {}  # run folder -> ("done", val_best) | ("failed", error)

    def _trials(self, *states: State) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=states or None)

    def enqueue(self) -> int:
        """Queue a trial for every run unfinished *in the results folder* that has none waiting or running (a run
        whose last attempt failed for its own reason is queued again: rerunning the command is how a human retries
        it).  The folder, not the study, says what is finished; a run the study has complete but the folder lacks is
        trained again, with a warning (a deleted run, or a --results that is not the shared folder).  Returns how
        many were queued.  Two workers starting together may queue a run twice; the claim keeps the duplicate from
        training (see :meth:`_is_duplicate`)."""
        trials = self._trials()
        live = {
            (t.user_attrs.get("run"), t.user_attrs.get("key"))
            for t in trials
            if t.state in (State.WAITING, State.RUNNING)
        }
        complete = {(t.user_attrs.get("run"), t.user_attrs.get("key")) for t in trials if t.state == State.COMPLETE}
        todo = [r for r in self.store.todo(self.runs) if (str(r.rel_dir), r.key) not in live]
        lost = [r for r in todo if (str(r.rel_dir), r.key) in complete]
        if lost:
            log.warning(
                f"the study {self.study.study_name} has {len(lost)} of these runs finished, but "
                f"{self.store.results} does not hold them (e.g. {lost[0].rel_dir}); they are trained again "
                f"here. Is --results the folder every worker shares?"
            )
        for run in todo:
            self.study.enqueue_trial({}, user_attrs=_ident(run))
        return len(todo)

    def claims(self) -> Iterator[Run]:
        while True:
            fail_stale_trials(self.study)  # a dead worker's run is queued again (by the storage's retry callback)
            claimed = self._claim_next()
            if claimed is None:
                if not any(self._run_of(t) for t in self._trials(State.RUNNING)):
                    return
                time.sleep(self.poll)  # stay to take over if one of them dies
                continue
            trial, run = claimed
            result = self.store.result(run)
            if result is not None:  # finished in the folder: a duplicate of a complete trial, or its worker died
                if self._is_duplicate(trial, State.COMPLETE):  # after writing result.json, before telling the study
                    self._fail(trial, duplicate=True)
                else:
                    self.study.tell(trial.number, result.val_best)
                continue
            self.store.take_over(run)
            self.storage.set_trial_user_attr(self._id(trial), "worker", f"{socket.gethostname()}:{os.getpid()}")
            key = str(run.rel_dir)
            try:
                with heartbeat(self.storage, self._id(trial)):
                    yield run  # the caller trains it and calls done() or failed()
            finally:
                self._tell(trial, self._outcome.pop(key, None))

    def abandoned(self) -> list[str]:
        """This worker's runs left unfinished because their workers kept dying: not finished in the folder, and the
        last trial of each failed by heartbeat after ``--retries`` retries, so nobody will take it up until the command
        is run again.  A stale trial with retries left is not abandoned even before its retry is queued (another
        worker's ``fail_stale_trials`` fails it first and queues the retry a moment later)."""
        last: dict[tuple[str, str], optuna.trial.FrozenTrial] = {}
        for t in self._trials():
            if self._run_of(t) is not None and not t.user_attrs.get("duplicate"):
                last[(t.user_attrs["run"], t.user_attrs["key"])] = t
        return [
            f"{t.user_attrs['run']}: its worker stopped beating {len(retry_history(t)) + 1} times (--retries "
            f"exhausted); run the same command to try again from its last epoch"
            for t in last.values()
            if t.state == State.FAIL
            and not {"error", "interrupted"} & set(t.user_attrs)
            and len(retry_history(t)) >= self.retries
            and self.store.result(self._run_of(t)) is None
        ]

    def _id(self, trial: optuna.trial.FrozenTrial) -> int:
        return trial_id(self.storage, self.study, trial)

    def _run_of(self, trial: optuna.trial.FrozenTrial) -> Run | None:
        return self._mine.get((trial.user_attrs.get("run"), trial.user_attrs.get("key")))

    def _claim_next(self) -> tuple[optuna.trial.FrozenTrial, Run] | None:
        """Take the oldest waiting trial of one of this worker's runs (Optuna's own claim: the storage lets one
        ``WAITING -> RUNNING`` update win); None when there is none."""
        for trial in self._trials(State.WAITING):
            run = self._run_of(trial)
            if run is None:  # a run of another subset (--variants) or of another config of the spec
                continue
            try:
                if not self.storage.set_trial_state_values(self._id(trial), state=State.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if self._is_duplicate(trial, State.WAITING, State.RUNNING):
                self._fail(trial, duplicate=True)
                continue
            return trial, run
        return None

    def _fail(self, trial: optuna.trial.FrozenTrial, **attrs: Any) -> None:
        """Fail ``trial``, saying why in its user attributes; they are set first: a finished trial is frozen."""
        for name, value in attrs.items():
            self.storage.set_trial_user_attr(self._id(trial), name, value)
        self.study.tell(trial.number, state=State.FAIL)

    def _is_duplicate(self, trial: optuna.trial.FrozenTrial, *states: State) -> bool:
        """Another trial of the same run in one of ``states`` with a smaller number owns it.  Claims check waiting and
        running ones: the oldest live trial of a run trains it, whatever order the claims happen in; a run already
        finished in the folder checks complete ones, so that the study counts each run once."""
        ident = (trial.user_attrs.get("run"), trial.user_attrs.get("key"))
        return any(
            t.number < trial.number and (t.user_attrs.get("run"), t.user_attrs.get("key")) == ident
            for t in self._trials(*states)
        )

    def done(self, run: Run, result: dict[str, Any]) -> None:
        self.store.record(run, result)
        self._outcome[str(run.rel_dir)] = ("done", result["val_best"])

    def failed(self, run: Run, error: str) -> None:
        """The run's own failure (diverged, out of memory, a bug): recorded and failed in the study, which the
        retry callback leaves alone (it only retries trials whose worker stopped beating)."""
        self.store.record_failure(run, error)
        self._outcome[str(run.rel_dir)] = ("failed", error)

    def _tell(self, trial: optuna.trial.FrozenTrial, outcome: tuple[str, Any] | None) -> None:
        """Tell the study how the held trial ended, after its heartbeat stopped."""
        if outcome is None:  # neither done nor failed: interrupted (Ctrl-C, SIGTERM)
            self._release(trial)
        elif outcome[0] == "done":
            self.study.tell(trial.number, outcome[1])
        else:
            self._fail(trial, error=outcome[1][:2000])

    def _release(self, trial: optuna.trial.FrozenTrial) -> None:
        """Fail an interrupted trial (Ctrl-C, SIGTERM: a scheduler's preemption) and queue its run again at once,
        so another worker resumes it from its last epoch.  A clean stop is not a death: it does not count
        against --retries."""
        try:
            self._fail(trial, interrupted=True)
            self.study.enqueue_trial({}, user_attrs={"run": trial.user_attrs["run"], "key": trial.user_attrs["key"]})
        except Exception as e:  # the database went away too: the heartbeat's grace period will do it
            log.warning(f"could not release trial {trial.number}: {e}")
