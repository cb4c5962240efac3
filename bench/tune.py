"""Hyperparameter search with Optuna: ``python -m bench tune mnist``.

The spec's ``search:`` section names the variant to tune and the space (dotted config
paths).  Each trial trains that variant with seed ``seeds[0]`` and is scored on the
*validation* split only (the test split is never evaluated), with median pruning after
every epoch.  Trials are runs of the run store (group ``<spec>[@profile]--tune-<variant>-<study key>``).

The study lives in ``results/optuna/<spec>[@profile].db`` (SQLite).  Its name carries a hash of
the tuned variant's configuration without the searched keys (the budget: epochs, data,
``--set`` overrides), so a search with a different budget is a different study rather than
a continuation whose "best" trial might only have had more data.  Re-running continues the
study: the sampler is seeded with the spec's seed *and* the number of trials already in
the study (a fixed seed would draw trial 0's parameters again), and a trial whose
parameters equal a finished one's reuses its value instead of training it again.  The best
trial is written as a ready-to-paste variant (with ``from:`` naming the tuned variant) to
``results/optuna/<group>-best.yaml``, ``<group>`` being the group ``bench run`` would use with the
same options (the spec's own, or an ad-hoc one named after ``--set`` overrides).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from bench import files
from bench.config import ConfigError, config_hash
from bench.runner import RunOptions, load_data, preflight, runtime_config
from bench.spec import Run, Spec, Variant, apply_set, build_config, describe, run_key, slug
from bench.store import RunStore
from bench.tasks import TASKS
from bench.tasks.base import Data
from bench.train import fit, resolve_device


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
         timeout: float | None = None, download: bool = False) -> dict[str, Any]:
    """Run (or continue) the spec's study until it has ``trials`` finished (complete or pruned) trials;
    returns a summary of the study and its best trial.  Ctrl-C raises KeyboardInterrupt whose message
    says what resumes; the interrupted trial is queued again with its parameters, so the next run
    continues it from its last completed epoch."""
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see README)")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module says what the study does, in its own lines
    searched = sorted(set(spec.search["space"]) & set(spec.overrides))
    if searched:
        raise ConfigError(f"--set {', '.join(searched)}: the study searches {'this key' if len(searched) == 1 else 'these keys'}"
                          f" (search.space of {spec.path}); drop the --set, or the key from the space")
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    key = study_key(variant, spec.search["space"])
    name = f"{spec.published_group}/{variant.name}/{key}"
    group = f"{spec.published_group}--tune-{slug(variant.name)}-{key}"
    runs = [r for r in spec.runs([variant.name]) if r.seed == seed]
    cache = preflight(spec, runs, opts, download)  # before the study exists: a bad device or data records no failure
    out = Path(results_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / f'{spec.published_group}.db').resolve()}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    # A fixed seed would restart the sampler's random stream and draw the finished trials' parameters again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials))
    study.set_user_attr("spec", spec.path)
    study.set_user_attr("overrides", spec.overrides)
    store = RunStore(results_dir)
    store.write_group(dataclasses.replace(spec, group_name=group, variants=[]), role="study", study=name, storage=storage)
    target, done = trials or spec.search["trials"], _finished(study)
    print(f"study {name} in {storage}: " + (f"continuing after {done} finished trials" if study.trials else "new")
          + ("" if done < target else f"; it already has {done} of --trials {target}: ask for more to go on"),
          file=sys.stderr)
    train = _Trainer(spec, variant, seed, group, store, opts, cache)
    t0 = time.monotonic()
    while _finished(study) < target and (timeout is None or time.monotonic() - t0 < timeout):
        _run_trial(study, train)
    return _write_best(spec, variant, study, seed, storage, out)


def _finished(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete or pruned (a failed or interrupted one does not)."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _run_trial(study: optuna.Study, train: _Trainer) -> None:
    """Ask the study for a trial, train it, tell the study how it ended."""
    trial = study.ask()
    try:
        value = train(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except KeyboardInterrupt:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        run_of = trial.user_attrs.get("run_of_trial", trial.number)
        study.enqueue_trial(trial.params, user_attrs={"run_of_trial": run_of})  # the next run continues it
        done = train.store.epochs_done(train.run) if train.run else 0
        raise KeyboardInterrupt(f"trial {run_of} from epoch {done + 1}") from None
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
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
        same = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
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
        data = load_data(self.cache, self.task, rcfg, device)
        meta = {"name": f"trial {number}", "trial": number, "search_params": leaves}
        best: list[float] = []

        def report(epoch: int, value: float) -> None:
            best.append(value)
            trial.report(value, epoch)
            if epoch < rcfg.train.epochs and trial.should_prune():  # after the last epoch there is nothing to save
                raise optuna.TrialPruned()

        with self.store.claim(run) as mine:
            if not mine:
                raise RuntimeError(f"{self.store.path(run)} is being trained by another process")
            try:
                res = fit(self.store.path(run), rcfg, self.task, data, device, run.key, meta, self.opts.progress,
                          on_epoch=report, test=False)
            except optuna.TrialPruned:
                self.store.record(run, {"key": run.key, **meta, "status": "pruned",
                                        "epochs_run": self.store.epochs_done(run), "val_best": max(best)})
                raise
            self.store.record(run, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return res["val_best"]


def _write_best(spec: Spec, variant: Variant, study: optuna.Study, seed: int, storage: str, out: Path) -> dict[str, Any]:
    """Write ``<group>-best.yaml``: the study's summary as comments, then the best trial as a variant."""
    task = TASKS[spec.task]
    states = [t.state.name for t in study.trials]
    if "COMPLETE" not in states:
        return {"spec": spec.path, "study": study.study_name, "metric": f"validation {task.metric} (seed {seed})",
                "value": None, "trials": len(states), "pruned": states.count("PRUNED"), "params": {}}
    best = study.best_trial
    summary = {"spec": spec.path, "group": spec.group, "study": study.study_name, "tuned_variant": variant.name,
               "overrides": spec.overrides, "metric": f"validation {task.metric} (seed {seed})", "value": best.value,
               "trials": len(study.trials), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
               "storage": storage}
    suggestion = {"name": f"{variant.name}-tuned", "from": variant.name,
                  "note": f"Optuna best of {summary['trials']} trials (validation {task.metric} {best.value:.4f})",
                  "set": dict(best.params)}
    text = ("# " + yaml.safe_dump(summary, sort_keys=False).replace("\n", "\n# ").rstrip("# ") + "\n"
            "# paste at the end of `variants:` in the spec to benchmark it with error bars:\n"
            + yaml.safe_dump([suggestion], sort_keys=False))
    files.write_text(out / f"{spec.group}-best.yaml", text)
    return {**summary, "params": dict(best.params)}
