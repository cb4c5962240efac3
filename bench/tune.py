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
from pathlib import Path
from typing import Any

import optuna
import torch
import yaml

from bench import files
from bench.config import ConfigError, config_hash
from bench.runner import RunOptions, check_data, data_key, runtime_config
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


def tune(spec: Spec, results_dir: str | Path, opts: RunOptions, trials: int | None = None, timeout: float | None = None,
         download: bool = False) -> dict[str, Any]:
    """Run (or continue) the spec's study; returns a summary of the study and its best trial."""
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see README)")
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    seed = spec.seeds[0]
    key = study_key(variant, spec.search["space"])
    name = f"{spec.published_group}/{variant.name}/{key}"
    group = f"{spec.published_group}--tune-{slug(variant.name)}-{key}"
    store = RunStore(results_dir)
    runs = [r for r in spec.runs([variant.name]) if r.seed == seed]
    resolve_device(runtime_config(runs[0], opts).train.device, "train.device")  # before the study records a failure
    cache = check_data(spec, runs, opts, download)
    out = Path(results_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / f'{spec.published_group}.db').resolve()}"
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    before = len(study.trials)
    # A fixed seed would restart the sampler's random stream and draw the finished trials' parameters again.
    study.sampler = optuna.samplers.TPESampler(seed=seed + before)
    study.set_user_attr("spec", spec.path)
    study.set_user_attr("overrides", spec.overrides)
    store.write_group(dataclasses.replace(spec, group_name=group, variants=[]), role="study", study=name, storage=storage)
    print(f"study {name} in {storage}: " + (f"continuing after {before} trials" if before else "new"), file=sys.stderr)
    objective = _objective(spec, variant, seed, group, store, opts, cache)
    todo = max(0, (trials or spec.search["trials"]) - sum(t.state.is_finished() for t in study.trials))
    if todo:
        study.optimize(objective, n_trials=todo, timeout=timeout, catch=())
    return _write_best(spec, variant, study, seed, storage, out)


def _objective(spec: Spec, variant: Variant, seed: int, group: str, store: RunStore, opts: RunOptions,
               cache: dict[str, Data]) -> Any:
    """Optuna's objective: train one trial as a run of the store, return its best validation metric."""
    task = TASKS[spec.task]
    base = variant.config.to_dict()
    base.pop("task"), base.pop("seed")

    def objective(trial: optuna.Trial) -> float:
        leaves = {p: suggest(trial, p, d) for p, d in spec.search["space"].items()}
        same = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                if t.params == trial.params]
        if same:  # the sampler proposed a finished trial's parameters: its value is known, do not train again
            trial.set_user_attr("same_as_trial", same[0].number)
            return float(same[0].value)
        cfg = build_config(spec.task, apply_set(base, leaves, "search"), f"trial {trial.number}", seed)
        tv = Variant(f"trial-{trial.number:04d}", trial.number, variant.name, False, describe(leaves), None, cfg)
        run = Run(group, tv, seed, cfg, run_key(cfg))
        rcfg = runtime_config(run, opts)
        device = resolve_device(rcfg.train.device, "train.device")
        dkey = data_key(rcfg, device)
        if dkey not in cache:
            cpu_copy = cache.get(data_key(rcfg, torch.device("cpu")))
            cache.clear()
            cache[dkey] = cpu_copy if device.type == "cpu" and cpu_copy else task.load(rcfg, device)
        best_so_far: list[float] = []

        def report(epoch: int, value: float) -> None:
            best_so_far.append(value)
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        meta = {"name": f"trial {trial.number}", "trial": trial.number, "search_params": leaves}
        with store.claim(run) as mine:
            if not mine:
                raise RuntimeError(f"{store.path(run)} is being trained by another process")
            try:
                res = fit(store.path(run), rcfg, task, cache[dkey], device, run.key, meta, opts.progress,
                          on_epoch=report, test=False)
            except optuna.TrialPruned:
                store.record(run, {"key": run.key, **meta, "status": "pruned", "epochs_run": len(best_so_far),
                                   "val_best": max(best_so_far)})
                raise
            store.record(run, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return res["val_best"]

    return objective


def _write_best(spec: Spec, variant: Variant, study: optuna.Study, seed: int, storage: str, out: Path) -> dict[str, Any]:
    """Write ``<group>-best.yaml``: the study's summary as comments, then the best trial as a variant."""
    task = TASKS[spec.task]
    best = study.best_trial
    states = [t.state.name for t in study.trials]
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
