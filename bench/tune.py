"""Hyperparameter search with Optuna: ``python -m bench tune mnist``.

The spec's ``search:`` section names the variant to tune and the space (dotted config
paths).  Each trial trains that variant with seed ``seeds[0]`` and is scored on the
*validation* split only (the test split is never evaluated), with median pruning after
every epoch.  Trials are runs of the run store (group ``<spec>[@profile]--tune-<variant>-<study key>``).

The study lives in ``results/optuna/<spec>[@profile].db`` (SQLite), or in the database of
``--storage URL``, which any number of processes on any number of machines share: each asks the
study for a trial, beats while it trains it, and the study ends with exactly ``--trials`` finished
trials (see :func:`_run_trial`); a trial whose worker stopped beating is queued again with its
parameters and resumed in its first folder.  Its name carries a hash of
the tuned variant's configuration without the searched keys (the budget: epochs, data,
``--set`` overrides), so a search with a different budget is a different study rather than
a continuation whose "best" trial might only have had more data.  Re-running continues the
study: the sampler is seeded with the spec's seed *and* the trial's number (a fixed seed would
draw trial 0's parameters again, and two workers would draw the same ones), and a trial whose
parameters equal a finished one's reuses its value instead of training it again.  The best
trial is written as a ready-to-paste variant (with ``from:`` naming the tuned variant) to
``results/optuna/<group>-best.yaml``, ``<group>`` being the group ``bench run`` would use with the
same options (the spec's own, or an ad-hoc one named after ``--set`` overrides), with the study's trials
as CSV and its figures beside it.  The study of the spec as written with its own budget (``search.profile``,
``search.trials``, its first seed; see :func:`bench.study_report.publishes`) instead writes the variant ``tuned``
into the file the spec's ``search.tuned`` names, its trials beside that file and its figures in results/figures;
``bench run`` then trains it beside the hand-made rungs.  Any exception of a trial's training fails that trial alone
(its reason is recorded) and the study goes on.  Tuning never opens the test split's files.

``--objectives val_metric,train_seconds`` (or ``params``, ``flops``; ``search.objectives``) makes it a study of several
objectives, of its own name: no pruning, no single best, and instead its Pareto front as a table and a figure (see
:func:`bench.study_report.write_front`); ``--rung NAME --trial N`` makes a trial of that front a rung of the spec
(:func:`make_rung`).  What a finished study writes is :mod:`bench.study_report`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml
from optuna.exceptions import UpdateFinishedTrialError

from bench import files
from bench.config import ConfigError, config_hash
from bench.factories import build_model
from bench.log import first_line, note
from bench.models import count_flops
from bench.runner import RunOptions, check_schedule, load_data, preflight, runtime_config
from bench.spec import (
    TUNED,
    Run,
    Spec,
    Variant,
    apply_set,
    build_config,
    describe,
    read_rungs,
    run_key,
    rungs_path,
    slug,
    tuned_path,
)
from bench.storage import (
    StorageOptions,
    fail_stale_trials,
    heartbeat,
    one_asker,
    open_storage,
    shown,
    trial_id,
    where_it_ran,
)
from bench.store import RunStore
from bench.study_report import (
    COLUMNS,
    config_params,
    plain_choices,
    publishes,
    why_experiment,
    write_best,
    write_front,
)
from bench.tasks import TASKS
from bench.tasks.base import Data
from bench.train import device_name, fit, resolve_device

log = logging.getLogger(__name__)

State = optuna.trial.TrialState
# A worker stops after this many failed trials in a row (or --trials, when more): a search space that diverges now
# and then goes on, a harness bug that fails every trial does not train forever.
MIN_FAILURES_IN_A_ROW = 10


class TrialsFailing(Exception):
    """Every one of the last trials of this process failed: the study stops (each failure is recorded in it)."""


def suggest(trial: optuna.Trial, path: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        if plain_choices(dist["choices"]):
            return trial.suggest_categorical(path, dist["choices"])
        # A list (a network's widths) is drawn as its JSON text: Optuna stores plain values only.
        return json.loads(trial.suggest_categorical(path, [json.dumps(c) for c in dist["choices"]]))
    if isinstance(dist["low"], int) and isinstance(dist["high"], int) and not isinstance(dist["low"], bool):
        return trial.suggest_int(path, dist["low"], dist["high"], step=dist.get("step", 1), log=dist.get("log", False))
    return trial.suggest_float(
        path, float(dist["low"]), float(dist["high"]), log=dist.get("log", False), step=dist.get("step")
    )


def study_names(spec: Spec, variant: Variant, objectives: list[str]) -> tuple[str, str]:
    """(the study's name, the run group of its trials).  A study of several objectives is another study than the
    single-objective one of the same budget (its costs are in both names): their trials never share a folder."""
    key = study_key(variant, spec.search["space"]) + "".join(f"+{o}" for o in objectives[1:])
    return f"{spec.published_group}/{variant.name}/{key}", f"{spec.published_group}--tune-{slug(variant.name)}-{key}"


def study_key(variant: Variant, space: dict[str, Any]) -> str:
    """Hash of what every trial shares: the variant's config without the searched keys and without
    where it runs, and the space searched.  Two searches with different budgets (epochs, data, --set) get
    different studies, and so does an edited space: a continued study would keep, and could still pick as its
    best, trials drawn outside the new bounds (Optuna accepts a changed range as compatible)."""
    d = variant.config.to_dict()
    d.pop("seed")
    for path in space:
        section, key = path.split(".")
        d[section].pop(key, None)
    d["data"].pop("root", None)
    for key in ("threads", "device"):
        d["train"].pop(key, None)
    d["search space"] = space
    return config_hash(d)[:8]


def tune(
    spec: Spec,
    seed: int,
    results_dir: str | Path,
    opts: RunOptions,
    trials: int | None = None,
    timeout: float | None = None,
    download: bool = False,
    storage: StorageOptions | None = None,
    poll: float | None = None,
    objectives: list[str] | None = None,
) -> dict[str, Any]:
    """Run (or continue) the spec's study until it has ``trials`` finished (complete or pruned) trials in
    all, counting those of every process that shares its ``storage``; returns a summary of the study and
    its best trial.  Ctrl-C raises KeyboardInterrupt whose message says what resumes; the interrupted
    trial is queued again with its parameters, so the next run continues it from its last completed
    epoch (a killed worker's trial is queued again the same way once its heartbeat is ``grace`` old).
    ``objectives`` (default: the spec's ``search.objectives``): more than ``val_metric`` makes a multi-objective
    study (no pruning: a cost is only known at the end), whose Pareto front is written instead of a best trial."""
    _check_search(spec)
    _quiet_optuna()
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    objectives = objectives or spec.search["objectives"]
    name, group = study_names(spec, variant, objectives)
    runs = [r for r in spec.runs([variant.name]) if r.seed == seed]
    # Before the study exists: a bad device or data records no failure.  The test split is never read.
    cache = preflight(spec, runs, opts, download, test=False)
    for line in _space_problems(spec, variant, runs[0], opts, cache):  # the trials drawn there will fail: say so now
        note(log, line)
    out = Path(results_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or StorageOptions(f"sqlite:///{study_file(results_dir, spec).resolve()}")
    rdb = open_storage(storage)
    study = _open_study(spec, name, rdb, objectives)
    store = RunStore(results_dir)
    store.write_group(
        dataclasses.replace(spec, group_name=group, variants=[]), role="study", study=name, storage=shown(storage.url)
    )
    target = trials or spec.search["trials"]
    _say_where_it_starts(study, storage, target)
    train_trial = TrialObjective(spec, variant, seed, group, store, opts, cache, objectives)
    _optimize(study, rdb, train_trial, target, storage, timeout, poll)
    if len(objectives) > 1:
        return write_front(spec, variant, name, rdb, seed, shown(storage.url), out, Path(results_dir))
    published = _publishes_now(spec, seed, trials, _finished(study), target, out)
    return write_best(spec, variant, study, seed, shown(storage.url), out, Path(results_dir), published)


def _check_search(spec: Spec) -> None:
    """ConfigError when the spec has no search, or a --set fixes a key the study searches."""
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see docs/tuning.md)")
    searched = sorted(set(spec.search["space"]) & set(spec.overrides))
    if searched:
        raise ConfigError(
            f"--set {', '.join(searched)}: the study searches {'this key' if len(searched) == 1 else 'these keys'}"
            f" (search.space of {spec.path}); drop the --set, or the key from the space"
        )


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module says what the study does, in its own lines
    # Optuna beats on its own only inside study.optimize; _run_trial starts the same heartbeat thread around ask/tell.
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")


def _open_study(spec: Spec, name: str, rdb: optuna.storages.BaseStorage, objectives: list[str]) -> optuna.Study:
    """The study of that name, created (with what it tunes and for which objectives) or continued."""
    study = optuna.create_study(
        study_name=name,
        storage=rdb,
        directions=directions(spec, objectives),
        load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
    )
    study.set_user_attr("spec", spec.path)
    study.set_user_attr("overrides", spec.overrides)
    study.set_user_attr("objectives", objectives)
    return study


def _say_where_it_starts(study: optuna.Study, storage: StorageOptions, target: int) -> None:
    done = _finished(study)
    log.info(
        f"study {study.study_name} in {shown(storage.url)}: "
        + (f"continuing after {done} finished trials" if study.trials else "new")
        + ("" if done < target else f"; it already has {done} of --trials {target}: ask for more to go on")
    )


def _optimize(
    study: optuna.Study,
    rdb: optuna.storages.BaseStorage,
    train_trial: TrialObjective,
    target: int,
    storage: StorageOptions,
    timeout: float | None,
    poll: float | None,
) -> None:
    """Train trials until the study has ``target`` finished ones (or ``timeout`` seconds passed); while the last ones
    are in other workers' hands, wait to take over a dead worker's.  TrialsFailing after too many failures in a row."""
    t0, waiting, failures = time.monotonic(), False, []
    while timeout is None or time.monotonic() - t0 < timeout:
        fail_stale_trials(study)  # a dead worker's trial is queued again, to resume from its last epoch
        done, running = _finished(study), len(study.get_trials(deepcopy=False, states=(State.RUNNING,)))
        if done >= target:
            break
        if done + running >= target:  # the last trials are in other workers' hands: stay to take over if one dies
            if not waiting:
                log.info(
                    f"{done} of {target} trials finished, {running} running elsewhere: waiting for them (a dead "
                    f"worker's trial is retried here after {storage.grace} s without a heartbeat)"
                )
            waiting = True
            time.sleep(poll if poll is not None else storage.heartbeat)
            continue
        waiting = False
        reason = _run_trial(study, rdb, train_trial, target, storage.url)
        failures = failures + [reason] if reason else []
        if len(failures) >= max(MIN_FAILURES_IN_A_ROW, target):
            raise TrialsFailing(
                f"the last {len(failures)} trials of study {study.study_name} all failed (last: {failures[-1]}); "
                f"their tracebacks are above: fix the cause (or the search space), then run the same "
                f"command to go on"
            )


def _publishes_now(spec: Spec, seed: int, trials: int | None, done: int, target: int, out: Path) -> bool:
    """Whether this single-objective study writes the spec's ``search.tuned`` file now (see :func:`publishes`: and
    only with exactly its budget of finished trials); says why not when the spec has such a file."""
    published = publishes(spec, seed, trials)
    tuned_file = tuned_path(spec.path, spec.search)
    if tuned_file is not None and not published:
        log.info(
            f"an experiment ({why_experiment(spec, seed, trials)}): its best goes to {out}/, not to {tuned_file}, "
            f"which only `python -m bench tune {spec.path}"
            f"{' --profile ' + spec.search['profile'] if spec.search.get('profile') else ''}` writes"
        )
    elif tuned_file is not None and done != target:
        published = False
        log.info(
            f"the study has {done} finished trials, the spec's budget is {target}: {tuned_file} is written once "
            f"the study has exactly its budget" + (" (run the same command to go on)" if done < target else "")
        )
    return published


def _space_problems(spec: Spec, variant: Variant, run: Run, opts: RunOptions, cache: dict[str, Data]) -> list[str]:
    """Values at the ends of the search space (a range's low and high, every choice) whose schedule cannot run on the
    preflight's data, e.g. a batch size that leaves a one-cycle too few steps: trials drawn there fail (recorded, and
    the study goes on), which the user may prefer to know before the study starts."""
    n_train = len(next(iter(cache.values())).train)
    base = variant.config.to_dict()
    base.pop("task"), base.pop("seed")
    out = []
    for path, dist in spec.search["space"].items():
        for end in dist.get("choices") or (dist["low"], dist["high"]):
            cfg = runtime_config(
                dataclasses.replace(
                    run, config=build_config(spec.task, apply_set(base, {path: end}, "search"), "search", run.seed)
                ),
                opts,
            )
            try:
                check_schedule(cfg, n_train)
            except ConfigError as e:
                out.append(f"search.space.{path}={end}: {e}; trials drawn there will fail")
    return out


def study_file(results_dir: str | Path, spec: Spec) -> Path:
    """The SQLite file of a spec's studies when no --storage is given."""
    return Path(results_dir) / "optuna" / f"{spec.published_group}.db"


def directions(spec: Spec, objectives: list[str]) -> list[str]:
    """Optuna's direction of each objective: the metric's own, and every cost minimized."""
    return [TASKS[spec.task].metrics[0].direction if o == "val_metric" else "minimize" for o in objectives]


def sampler(seed: int, several: bool) -> optuna.samplers.BaseSampler:
    """TPE, seeded; constant_liar keeps it away from the parameters of trials other workers are training.  With
    ``several`` objectives it starts modelling after 4 random trials instead of 10: measured by scripts/mo_sampler.py
    (12-trial studies of a tiny MNIST spec, accuracy against FLOPs, 3 seeds), the front's hypervolume after 8 trials
    was 0.85 +- 0.02 with 4 random trials first, 0.78 +- 0.10 with 10 (Optuna's default) and 0.49 +- 0.17 with
    NSGA-II (population 4: its generations need more trials than a small study has); after 12: 0.85, 0.84, 0.56."""
    if several:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4, constant_liar=True)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def _finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete or pruned (a failed or interrupted one does not)."""
    return len(study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED)))


def _run_trial(
    study: optuna.Study, storage: optuna.storages.BaseStorage, train_trial: TrialObjective, target: int, url: str = ""
) -> str | None:
    """Ask the study for a trial (a queued retry first), train it while beating, tell the study how it ended;
    the reason when the trial failed (any exception of its training is the trial's: recorded, and the study
    goes on), else None.  Ctrl-C and SIGTERM (KeyboardInterrupt) queue it again and stop the study.

    Several workers may ask at the same moment for the last trial; the storage numbers trials in
    order, so a trial with ``target`` live (finished or running) trials before it is surplus: it is
    failed at once, marked ``surplus``, and the study ends with exactly ``target`` finished trials.  ``url``: the
    study's database, whose asks :func:`bench.storage.one_asker` serializes for SQLite (empty: an in-memory study of
    one process, nothing to serialize)."""
    with one_asker(url):
        trial = study.ask()
    before = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.RUNNING))
    if sum(t.number < trial.number for t in before) >= target:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=State.FAIL)
        return None
    # The sampler draws when the trial suggests its parameters, after ask() gave it its number.  Seeded by that
    # number, a resumed study never draws a finished trial's parameters again, and workers asking at the same
    # moment (same study, same history) draw different ones; constant_liar keeps TPE away from running trials.
    study.sampler = sampler(train_trial.seed + trial.number, len(train_trial.objectives) > 1)
    if "run_of_trial" not in trial.user_attrs:  # a retry copies the attributes, so it trains in the same folder
        trial.set_user_attr("run_of_trial", trial.number)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    try:
        with heartbeat(storage, trial_id(storage, study, trial)):
            value = train_trial(trial)
    except UpdateFinishedTrialError:  # failed as stale by another worker while this one trained it: see below
        _say_taken_over(trial)
        return None
    except optuna.TrialPruned:
        if study.tell(trial, state=State.PRUNED, skip_if_finished=True).state != State.PRUNED:
            _say_taken_over(trial)
    except KeyboardInterrupt:
        run_of = trial.user_attrs.get("run_of_trial", trial.number)
        if running(trial):  # (a trial failed as stale by another worker has its retry queued already)
            trial.set_user_attr("requeued", True)  # not a failure of the trial: it goes on in the next run
            study.tell(trial, state=State.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"run_of_trial": run_of})  # the next run continues it
        done = train_trial.store.epochs_done(train_trial.run) if train_trial.run else 0
        raise KeyboardInterrupt(f"trial {run_of} from epoch {done + 1}") from None
    except Exception as e:  # the trial's own failure (a diverged loss, a schedule its batch size cannot run, a bug)
        reason = failure_reason(e)
        try:
            trial.set_user_attr("fail_reason", reason)
        except UpdateFinishedTrialError:  # a trial failed as stale by another worker fails there, not here
            _say_taken_over(trial)
            return None
        study.tell(trial, state=State.FAIL, skip_if_finished=True)
        # The whole traceback for the log: a bug of the harness must not hide behind a one-line reason.
        log.info(f"trial {trial.number} failed (the study goes on): {reason}", exc_info=True)
        return reason
    except BaseException:  # SystemExit and the like: the process is ending, not the trial
        study.tell(trial, state=State.FAIL, skip_if_finished=True)
        raise
    else:
        if study.tell(trial, [value[o] for o in train_trial.objectives], skip_if_finished=True).state != State.COMPLETE:
            _say_taken_over(trial)
    return None


def running(trial: optuna.Trial) -> bool:
    """Whether ``trial`` is still running in the study's storage: not failed as stale by another worker (its
    heartbeat was older than the grace period: this process too busy or too slow to write it in time)."""
    return any(t.number == trial.number for t in trial.study.get_trials(deepcopy=False, states=(State.RUNNING,)))


def _say_taken_over(trial: optuna.Trial) -> None:
    """Another worker failed ``trial`` as stale and queued its retry while this one trained it: the retry is the
    study's trial now (it trains in the same folder, resuming from the last epoch saved there); this worker records
    nothing more of it and goes on."""
    log.warning(
        f"trial {trial.number}: another worker counted it dead (no heartbeat within the grace period) and queued it "
        f"again while this worker trained it; its retry is the study's now and this worker leaves it that (on a "
        f"busy machine or database a longer --grace-period avoids this)"
    )


def failure_reason(e: BaseException) -> str:
    """``Type: first line of the message``: what a failed trial records (the traceback goes to stderr)."""
    line = first_line(e, empty="")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


class TrialObjective:
    """The study's objective function: trains one trial as a run of the store and returns what it measured: its best
    validation metric (``val_metric``), training seconds, parameters and FLOPs per image (see bench.spec.OBJECTIVES),
    also kept in the trial's user attribute ``measures`` with the machine that measured them (``machine``)."""

    def __init__(
        self,
        spec: Spec,
        variant: Variant,
        seed: int,
        group: str,
        store: RunStore,
        opts: RunOptions,
        cache: dict[str, Data],
        objectives: list[str],
    ):
        self.spec, self.variant, self.seed, self.group, self.store, self.opts, self.cache = (
            spec,
            variant,
            seed,
            group,
            store,
            opts,
            cache,
        )
        self.objectives = objectives
        self.task = TASKS[spec.task]
        self.base = variant.config.to_dict()
        self.base.pop("task"), self.base.pop("seed")
        self.run: Run | None = None  # the trial being trained

    def __call__(self, trial: optuna.Trial) -> dict[str, float]:
        leaves = {p: suggest(trial, p, d) for p, d in self.spec.search["space"].items()}
        same = [t for t in trial.study.get_trials(deepcopy=False, states=(State.COMPLETE,)) if t.params == trial.params]
        if same:  # the sampler proposed a finished trial's parameters: its values are known, do not train again
            trial.set_user_attr("same_as_trial", same[0].number)
            for key in ("measures", "machine", "epochs", "load"):
                if key in same[0].user_attrs:
                    trial.set_user_attr(key, same[0].user_attrs[key])
            return same[0].user_attrs.get("measures") or {"val_metric": float(same[0].values[0])}
        cfg = build_config(self.spec.task, apply_set(self.base, leaves, "search"), f"trial {trial.number}", self.seed)
        number = trial.user_attrs.get("run_of_trial", trial.number)  # a resumed trial trains in its first folder
        tv = Variant(f"trial-{number:04d}", number, self.variant.name, False, describe(leaves), None, cfg)
        run = self.run = Run(self.group, tv, self.seed, cfg, run_key(cfg))
        rcfg = runtime_config(run, self.opts)
        device = resolve_device(rcfg.train.device, "train.device")
        data = load_data(self.cache, self.task, rcfg, device, test=False)
        meta = {"name": f"trial {number}", "trial": number, "search_params": leaves}
        best: list[float] = []

        def report(epoch: int, value: float) -> None:
            best.append(value)
            if len(self.objectives) > 1:  # Optuna prunes single-objective studies only; a cost is known at the end
                return
            trial.report(value, epoch)
            if epoch < rcfg.train.epochs and trial.should_prune():  # after the last epoch there is nothing to save
                raise optuna.TrialPruned()

        self.store.take_over(run)  # the trial is this process's alone: the study handed it out
        try:
            res = fit(
                self.store.path(run),
                rcfg,
                self.task,
                data,
                device,
                run.key,
                meta,
                self.opts.progress,
                on_epoch=report,
                test=False,
            )
        except optuna.TrialPruned:
            self.store.record(
                run,
                {
                    "key": run.key,
                    **meta,
                    "status": "pruned",
                    "epochs_run": self.store.epochs_done(run),
                    "val_best": self.task.metrics[0].best(best),
                },
            )
            for hook in self.opts.after_run:
                hook(self.store, run)
            raise
        except Exception as e:  # recorded like a failed run of a grid; the study records it too (_run_trial)
            if running(trial):  # else its folder is the retry's now
                self.store.record_failure(run, failure_reason(e))
            raise
        if not running(trial):  # failed as stale meanwhile: the folder and the record are the retry's (_run_trial)
            raise UpdateFinishedTrialError(f"trial {trial.number} was finished by another worker")
        self.store.record(run, res)
        for hook in self.opts.after_run:  # before the study hears of it: a finished study has every trial's hook done
            hook(self.store, run)
        measures = {
            "val_metric": res["val_best"],
            "train_seconds": round(res["train_seconds"], 3),
            "params": res["params"],
            "flops": self._flops(rcfg, data, device),
        }
        trial.set_user_attr("measures", measures)
        trial.set_user_attr("epochs", res["epochs_run"])
        trial.set_user_attr("load", round(os.getloadavg()[0], 2))  # what else ran: train_seconds depends on it
        trial.set_user_attr(
            "machine", device_name(device) + ("" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return measures

    def _flops(self, cfg: Any, data: Data, device: torch.device) -> int:
        """FLOPs of one forward pass of one validation image through a new network of the trial's shape."""
        model = build_model(cfg, **self.task.model_kwargs(data.info)).to(device)
        return count_flops(model, data.val.x[:1])


def check_rung(spec: Spec, rung: str) -> Path:
    """The file ``--rung NAME`` goes to (the spec's ``search.rungs``); ConfigError when the spec names none or the name
    is taken by one of the spec's own variants (a rung made before under that name is replaced)."""
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see docs/tuning.md)")
    path = rungs_path(spec.path, spec.search)
    if path is None:
        raise ConfigError(
            f"--rung {rung}: {spec.path} names no file for rungs made from trials; add "
            f"`rungs: {Path(spec.path).stem}.rungs.yaml` to its search section"
        )
    made = {str(e["variant"].get("name")) for e in read_rungs(spec.search, Path(spec.path))}
    if slug(rung) != rung or rung.startswith("."):
        raise ConfigError(f"--rung {rung!r}: a rung name must be a folder name (letters, digits, + . _ = -)")
    if rung == TUNED or any(v.name == rung for v in spec.variants if v.name not in made):
        raise ConfigError(f"--rung {rung}: {spec.path} already has a variant {rung!r}; choose another name")
    return path


def make_rung(
    spec: Spec, seed: int, storage: StorageOptions, objectives: list[str], rung: str, number: int | None
) -> Path:
    """Write trial ``number`` (None: the best trial of a single-objective study) of the study that ``bench tune`` with
    the same options ran as the variant ``rung`` of the spec (``from:`` the tuned variant, ``set:`` the trial's
    parameters) into the spec's ``search.rungs`` file; ``bench run`` trains it on the spec's seeds.  Trains nothing.
    ConfigError, before anything is written, when the study does not exist or the trial is not a complete trial of its
    Pareto front (a single objective's front is its best trial)."""
    path = check_rung(spec, rung)
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    name, _ = study_names(spec, variant, objectives)
    sqlite = storage.url.removeprefix("sqlite:///") if storage.url.startswith("sqlite:///") else None
    study = None
    if sqlite is None or Path(sqlite).exists():  # opening a missing SQLite file would create it
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(storage))
        except KeyError:
            pass
    if study is None:
        raise ConfigError(
            f"--rung {rung}: no study {name} in {shown(storage.url)}; run `bench tune` with the same "
            f"spec, profile, --set and --objectives first"
        )
    complete = [t for t in study.trials if t.state == State.COMPLETE]
    # The front: Optuna's (its best_trials); of one objective, every trial with the best value (a tie is as good).
    front = (
        sorted(
            t.number
            for t in (
                study.best_trials
                if len(objectives) > 1
                else [t for t in complete if t.values == study.best_trial.values]
            )
        )
        if complete
        else []
    )
    shown_front = f"the front: {', '.join(map(str, front))}" if front else "the study has no complete trial yet"
    if number is None:
        if len(objectives) > 1:
            raise ConfigError(
                f"--rung {rung}: a study of several objectives has no single best trial; add --trial N "
                f"with a trial of its Pareto front ({shown_front})"
            )
        if not front:
            raise ConfigError(f"--rung {rung}: study {name}: {shown_front}")
        number = study.best_trial.number
    trial = next((t for t in study.trials if t.number == number), None)
    if trial is None or trial.state != State.COMPLETE:
        what = "no such trial" if trial is None else f"trial {number} is {trial.state.name.lower()}"
        raise ConfigError(
            f"--trial {number}: {what} in study {name}; only a complete trial of its Pareto front can "
            f"become a rung ({shown_front})"
        )
    if number not in front:
        by = next(n for n in front if _dominates(study.trials[n].values, trial.values, study.directions))
        raise ConfigError(
            f"--trial {number}: not on the Pareto front of study {name} (trial {by} is at least as good "
            f"on every objective and better on one); {shown_front}"
        )
    _write_rung(path, rung, spec, variant, study, trial, objectives, seed, storage.url, front)
    return path


def _dominates(a: list[float], b: list[float], dirs: list[optuna.study.StudyDirection]) -> bool:
    sign = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in dirs]
    better = [s * x > s * y for s, x, y in zip(sign, a, b, strict=True)]
    return all(s * x >= s * y for s, x, y in zip(sign, a, b, strict=True)) and any(better)


def _write_rung(
    path: Path,
    rung: str,
    spec: Spec,
    variant: Variant,
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    objectives: list[str],
    seed: int,
    url: str,
    front: list[int],
) -> None:
    """Add (or replace) the rung's entry of the spec's rungs file: the study it came from, and the variant."""
    metric = TASKS[spec.task].metrics[0]
    m = trial.user_attrs.get("measures", {"val_metric": trial.values[0]})
    costs = [f"{COLUMNS[o]} {m[o] / 1e6:.2f}" if o == "flops" else f"{COLUMNS[o]} {m[o]:,.4g}" for o in objectives[1:]]
    entry = {
        "study": {
            "name": study.study_name,
            "ran_in": where_it_ran(url),
            "profile": spec.profile,
            "seed": seed,
            "overrides": spec.overrides,
            "objectives": objectives,
            "trial": trial.number,
            "front": front,
            "measures": m,
            "machine": trial.user_attrs.get("machine"),
            "commit": files.git_commit(),
            "written": time.strftime("%Y-%m-%d %H:%M %Z"),
        },
        "variant": {
            "name": rung,
            "from": variant.name,
            "note": f"Optuna trial {trial.number}: val {metric.text(m['val_metric'], unit=True)}"
            + "".join(f", {c}" for c in costs),
            "set": config_params(trial.params, spec.search["space"]),
        },
    }
    entries = [e for e in read_rungs(spec.search, Path(spec.path)) if e["variant"].get("name") != rung] + [entry]
    files.write_text(
        path,
        f"# Written by `python -m bench tune {spec.path} ... --rung NAME --trial N`: trials of Optuna "
        f"studies (validation split only) as variants of {Path(spec.path).name}, which `bench run` "
        f"trains on the spec's seeds after its own rungs.\n" + yaml.safe_dump({"rungs": entries}, sort_keys=False),
    )
