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
same options (the spec's own, or an ad-hoc one named after ``--set`` overrides); for the spec as
written, also as the variant ``tuned`` into the file the spec's ``search.tuned`` names, which
``bench run`` then trains beside the hand-made rungs.  Tuning never opens the test split's files.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from bench import files
from bench.config import ConfigError, config_hash
from bench.runner import RunOptions, load_data, preflight, runtime_config
from bench.spec import TUNED, Run, Spec, Variant, apply_set, build_config, describe, run_key, slug, tuned_path
from bench.storage import StorageOptions, fail_stale_trials, heartbeat, open_storage, shown, trial_id
from bench.store import RunStore
from bench.tasks import TASKS
from bench.tasks.base import Data
from bench.train import fit, resolve_device

State = optuna.trial.TrialState


def suggest(trial: optuna.Trial, path: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(path, dist["choices"])
    if isinstance(dist["low"], int) and isinstance(dist["high"], int) and not isinstance(dist["low"], bool):
        return trial.suggest_int(path, dist["low"], dist["high"], step=dist.get("step", 1), log=dist.get("log", False))
    return trial.suggest_float(path, float(dist["low"]), float(dist["high"]), log=dist.get("log", False),
                               step=dist.get("step"))


def study_key(variant: Variant, space: dict[str, Any]) -> str:
    """Hash of what every trial shares: the variant's config without the searched keys and without
    where it runs.  Two searches with different budgets (epochs, data, --set) get different studies."""
    d = variant.config.to_dict()
    d.pop("seed")
    for path in space:
        section, key = path.split(".")
        d[section].pop(key, None)
    d["data"].pop("root", None)
    for key in ("threads", "device"):
        d["train"].pop(key, None)
    return config_hash(d)[:8]


def tune(spec: Spec, seed: int, results_dir: str | Path, opts: RunOptions, trials: int | None = None,
         timeout: float | None = None, download: bool = False, storage: StorageOptions | None = None,
         poll: float | None = None) -> dict[str, Any]:
    """Run (or continue) the spec's study until it has ``trials`` finished (complete or pruned) trials in
    all, counting those of every process that shares its ``storage``; returns a summary of the study and
    its best trial.  Ctrl-C raises KeyboardInterrupt whose message says what resumes; the interrupted
    trial is queued again with its parameters, so the next run continues it from its last completed
    epoch (a killed worker's trial is queued again the same way once its heartbeat is ``grace`` old)."""
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see README)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module says what the study does, in its own lines
    # Optuna beats on its own only inside study.optimize; _run_trial starts the same heartbeat thread around ask/tell.
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
    searched = sorted(set(spec.search["space"]) & set(spec.overrides))
    if searched:
        raise ConfigError(f"--set {', '.join(searched)}: the study searches {'this key' if len(searched) == 1 else 'these keys'}"
                          f" (search.space of {spec.path}); drop the --set, or the key from the space")
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    key = study_key(variant, spec.search["space"])
    name = f"{spec.published_group}/{variant.name}/{key}"
    group = f"{spec.published_group}--tune-{slug(variant.name)}-{key}"
    runs = [r for r in spec.runs([variant.name]) if r.seed == seed]
    # Before the study exists: a bad device or data records no failure.  The test split is never read.
    cache = preflight(spec, runs, opts, download, test=False)
    out = Path(results_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or StorageOptions(f"sqlite:///{study_file(results_dir, spec).resolve()}")
    rdb = open_storage(storage)
    study = optuna.create_study(study_name=name, storage=rdb, direction=TASKS[spec.task].metrics[0].direction,
                                load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    study.set_user_attr("spec", spec.path)
    study.set_user_attr("overrides", spec.overrides)
    store = RunStore(results_dir)
    store.write_group(dataclasses.replace(spec, group_name=group, variants=[]), role="study", study=name,
                      storage=shown(storage.url))
    target, done = trials or spec.search["trials"], _finished(study)
    print(f"study {name} in {shown(storage.url)}: " + (f"continuing after {done} finished trials" if study.trials else "new")
          + ("" if done < target else f"; it already has {done} of --trials {target}: ask for more to go on"),
          file=sys.stderr)
    train = _Trainer(spec, variant, seed, group, store, opts, cache)
    t0, waiting = time.monotonic(), False
    while timeout is None or time.monotonic() - t0 < timeout:
        fail_stale_trials(study)  # a dead worker's trial is queued again, to resume from its last epoch
        done, running = _finished(study), len(study.get_trials(deepcopy=False, states=(State.RUNNING,)))
        if done >= target:
            break
        if done + running >= target:  # the last trials are in other workers' hands: stay to take over if one dies
            if not waiting:
                print(f"{done} of {target} trials finished, {running} running elsewhere: waiting for them (a dead "
                      f"worker's trial is retried here after {storage.grace} s without a heartbeat)", file=sys.stderr)
            waiting = True
            time.sleep(poll if poll is not None else storage.heartbeat)
            continue
        waiting = False
        _run_trial(study, rdb, train, target)
    return _write_best(spec, variant, study, seed, shown(storage.url), out, Path(results_dir))


def study_file(results_dir: str | Path, spec: Spec) -> Path:
    """The SQLite file of a spec's studies when no --storage is given."""
    return Path(results_dir) / "optuna" / f"{spec.published_group}.db"


def _finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete or pruned (a failed or interrupted one does not)."""
    return len(study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED)))


def _run_trial(study: optuna.Study, storage: optuna.storages.BaseStorage, train: _Trainer, target: int) -> None:
    """Ask the study for a trial (a queued retry first), train it while beating, tell the study how it ended.

    Several workers may ask at the same moment for the last trial; the storage numbers trials in
    order, so a trial with ``target`` live (finished or running) trials before it is surplus: it is
    failed at once, marked ``surplus``, and the study ends with exactly ``target`` finished trials."""
    trial = study.ask()
    before = study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.RUNNING))
    if sum(t.number < trial.number for t in before) >= target:
        trial.set_user_attr("surplus", True)
        study.tell(trial, state=State.FAIL)
        return
    # The sampler draws when the trial suggests its parameters, after ask() gave it its number.  Seeded by that
    # number, a resumed study never draws a finished trial's parameters again, and workers asking at the same
    # moment (same study, same history) draw different ones; constant_liar keeps TPE away from running trials.
    study.sampler = optuna.samplers.TPESampler(seed=train.seed + trial.number, constant_liar=True)
    if "run_of_trial" not in trial.user_attrs:  # a retry copies the attributes, so it trains in the same folder
        trial.set_user_attr("run_of_trial", trial.number)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    try:
        with heartbeat(storage, trial_id(storage, study, trial)):
            value = train(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=State.PRUNED)
    except KeyboardInterrupt:
        study.tell(trial, state=State.FAIL)
        run_of = trial.user_attrs.get("run_of_trial", trial.number)
        study.enqueue_trial(trial.params, user_attrs={"run_of_trial": run_of})  # the next run continues it
        done = train.store.epochs_done(train.run) if train.run else 0
        raise KeyboardInterrupt(f"trial {run_of} from epoch {done + 1}") from None
    except BaseException:
        study.tell(trial, state=State.FAIL)
        raise
    else:
        study.tell(trial, value)


class _Trainer:
    """Trains one trial as a run of the store and returns its best validation metric."""

    def __init__(self, spec: Spec, variant: Variant, seed: int, group: str, store: RunStore, opts: RunOptions,
                 cache: dict[str, Data]):
        self.spec, self.variant, self.seed, self.group, self.store, self.opts, self.cache = (
            spec, variant, seed, group, store, opts, cache)
        self.task = TASKS[spec.task]
        self.base = variant.config.to_dict()
        self.base.pop("task"), self.base.pop("seed")
        self.run: Run | None = None  # the trial being trained

    def __call__(self, trial: optuna.Trial) -> float:
        leaves = {p: suggest(trial, p, d) for p, d in self.spec.search["space"].items()}
        same = [t for t in trial.study.get_trials(deepcopy=False, states=(State.COMPLETE,))
                if t.params == trial.params]
        if same:  # the sampler proposed a finished trial's parameters: its value is known, do not train again
            trial.set_user_attr("same_as_trial", same[0].number)
            return float(same[0].value)
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
            trial.report(value, epoch)
            if epoch < rcfg.train.epochs and trial.should_prune():  # after the last epoch there is nothing to save
                raise optuna.TrialPruned()

        self.store.take_over(run)  # the trial is this process's alone: the study handed it out
        try:
            res = fit(self.store.path(run), rcfg, self.task, data, device, run.key, meta, self.opts.progress,
                      on_epoch=report, test=False)
        except optuna.TrialPruned:
            self.store.record(run, {"key": run.key, **meta, "status": "pruned",
                                    "epochs_run": self.store.epochs_done(run),
                                    "val_best": self.task.metrics[0].best(best)})
            for hook in self.opts.after_run:
                hook(self.store, run)
            raise
        self.store.record(run, res)
        for hook in self.opts.after_run:  # before the study hears of it: a finished study has every trial's hook done
            hook(self.store, run)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return res["val_best"]


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Counts and wall time of a study, over every worker that shared it (surplus trials of a race for the last
    slot are not counted as failures: they never trained)."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials if not t.user_attrs.get("surplus")]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
    return {"finished": states.count(State.COMPLETE) + states.count(State.PRUNED), "complete": states.count(State.COMPLETE),
            "pruned": states.count(State.PRUNED), "failed": states.count(State.FAIL),
            "wall_time_s": round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None,
            "workers": len(workers), "hosts": len({w.rsplit(":", 1)[0] for w in workers})}


def plot_study(study: optuna.Study, prefix: Path) -> list[str]:
    """Optuna's own optimization-history and parameter-importance figures (matplotlib) as PNGs; the names written.
    Importances need two finished trials that differ; a figure Optuna cannot draw is skipped with a note."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out = []
    for kind, draw in (("history", ovm.plot_optimization_history), ("importance", ovm.plot_param_importances)):
        png = prefix.with_name(f"{prefix.name}-{kind}.png")
        try:
            with warnings.catch_warnings():  # optuna marks its matplotlib backend experimental
                warnings.simplefilter("ignore")
                ax = draw(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(7, 4)
            fig.tight_layout()
            png.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(png, dpi=90)
            plt.close(fig)
            out.append(png.name)
        except Exception as e:  # e.g. importances of a study whose finished trials all share one value
            print(f"note: no {kind} figure for study {study.study_name} ({type(e).__name__}: {e})", file=sys.stderr)
    return out


def _same_tuned(path: Path, study: dict[str, Any], variant: dict[str, Any]) -> bool:
    """Whether ``path`` already says this (apart from when and at which commit it was written)."""
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in ("written", "commit")}  # noqa: E731
    return isinstance(old, dict) and old.get("variant") == variant and strip(old.get("study") or {}) == strip(study)


def _write_best(spec: Spec, variant: Variant, study: optuna.Study, seed: int, storage: str, out: Path,
                results_dir: Path) -> dict[str, Any]:
    """Write ``<group>-best.yaml`` (the study's summary as comments, then the best trial as a variant) and, for
    the spec as written (no --set), the spec's ``search.tuned`` file, whose ``tuned`` variant ``bench run`` trains
    beside the hand-made rungs, with the study's figures in results/figures."""
    task = TASKS[spec.task]
    counts = study_summary(study)
    if not counts["complete"]:
        return {"spec": spec.path, "study": study.study_name, "metric": f"validation {task.metric} (seed {seed})",
                "value": None, "trials": counts["finished"], "pruned": counts["pruned"], "params": {}}
    best = study.best_trial
    summary = {"spec": spec.path, "group": spec.group, "study": study.study_name, "tuned_variant": variant.name,
               "overrides": spec.overrides, "metric": f"validation {task.metric} (seed {seed})", "value": best.value,
               "trials": counts["finished"], "complete": counts["complete"], "pruned": counts["pruned"],
               "failed": counts["failed"], "storage": storage}
    suggestion = {"name": f"{variant.name}-tuned", "from": variant.name,
                  "note": f"Optuna best of {summary['trials']} trials (validation {task.metric} {best.value:.4f})",
                  "set": dict(best.params)}
    text = ("# " + yaml.safe_dump(summary, sort_keys=False).replace("\n", "\n# ").rstrip("# ") + "\n"
            "# paste at the end of `variants:` in the spec to benchmark it with error bars:\n"
            + yaml.safe_dump([suggestion], sort_keys=False))
    files.write_text(out / f"{spec.group}-best.yaml", text)
    written = [out / f"{spec.group}-best.yaml"]
    target = tuned_path(spec.path, spec.search)
    if target is not None and not spec.adhoc:
        prefix = results_dir / "figures" / f"tune-{spec.published_group.replace('@', '-')}"
        study_info = {"name": study.study_name, "storage": storage, "profile": spec.profile, "seed": seed,
                      "metric": f"validation {task.metric}", "best_trial": best.number, "value": round(best.value, 6),
                      **counts, "figures": [f"figures/{n}" for n in plot_study(study, prefix)],
                      "commit": files.git_commit(), "written": time.strftime("%Y-%m-%d %H:%M %Z")}
        minutes = f"{counts['wall_time_s'] / 60:.1f} min" if counts["wall_time_s"] is not None else "?"
        tuned = {"name": TUNED, "from": variant.name,
                 "note": (f"Optuna best of {counts['finished']} trials ({counts['pruned']} pruned, {counts['failed']} "
                          f"failed; {minutes} on {counts['workers']} worker{'s' if counts['workers'] != 1 else ''}), "
                          f"trial {best.number}"),
                 "set": dict(best.params)}
        if not _same_tuned(target, study_info, tuned):  # a rerun of a finished study keeps the committed file
            files.write_text(target, f"# Written by `python -m bench tune {spec.path}"
                                     f"{' --profile ' + spec.profile if spec.profile else ''}`: the best trial of its "
                                     f"study (validation split only). `bench run` trains the `tuned` variant on the "
                                     f"spec's seeds.\n" + yaml.safe_dump({"study": study_info, "variant": tuned},
                                                                         sort_keys=False))
            written.append(target)
    return {**summary, "params": dict(best.params), "written": [str(p) for p in written]}
