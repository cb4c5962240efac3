"""Hyperparameter search with Optuna: ``python -m bench tune mnist``.

The spec's ``search:`` section names the variant to tune and the space (dotted config
paths).  Each trial trains that variant with seed ``seeds[0]`` and is scored on the
*validation* split only (the test split is never evaluated), with median pruning after
every epoch.  The study lives in ``results/optuna/<spec>.db`` (SQLite), so an interrupted
search continues where it stopped; the best trial is written as a ready-to-paste
variant to ``results/optuna/<spec>-best.yaml``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from bench import files
from bench.config import ConfigError
from bench.spec import Spec, apply_set, build_config, run_key


def resolve_spec_path(name_or_path: str) -> Path:
    """``mnist`` -> ``ablations/mnist.yaml``; a path is used as given."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return Path("ablations") / f"{name_or_path}.yaml"


def suggest(trial: Any, path: str, dist: dict[str, Any]) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(path, dist["choices"])
    if isinstance(dist["low"], int) and isinstance(dist["high"], int) and not isinstance(dist["low"], bool):
        return trial.suggest_int(path, dist["low"], dist["high"], step=dist.get("step", 1), log=dist.get("log", False))
    return trial.suggest_float(path, float(dist["low"]), float(dist["high"]), log=dist.get("log", False),
                               step=dist.get("step"))


def tune(spec: Spec, results_dir: str | Path = "results", data_root: str | None = None, device: str | None = None,
         trials: int | None = None, timeout: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the spec's study; returns {"value", "params", "trials"} of the best trial."""
    import optuna
    import torch

    from bench.runner import resolve_data_root
    from bench.tasks import TASKS
    from bench.train import fit, resolve_device

    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see README)")
    variant = next(v for v in spec.variants if v.name == spec.search["variant"])
    task = TASKS[spec.task]
    base = variant.config.to_dict()
    base.pop("task"), base.pop("seed")
    base["data"]["root"] = base["data"]["root"] or resolve_data_root(data_root)
    if device:
        base["train"]["device"] = device
    seed = spec.seeds[0]
    out = Path(results_dir) / "optuna"
    out.mkdir(parents=True, exist_ok=True)
    data_cache: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        leaves = {p: suggest(trial, p, d) for p, d in spec.search["space"].items()}
        cfg = build_config(spec.task, apply_set(base, leaves, "search"), f"trial {trial.number}", seed)
        dev = resolve_device(cfg.train.device)
        dkey = repr((dataclasses.asdict(cfg.data), str(dev)))
        if dkey not in data_cache:
            data_cache.clear()
            data_cache[dkey] = task.load(cfg, dev)

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        run_dir = out / spec.group / f"trial-{trial.number:04d}"
        meta = {"name": f"trial {trial.number}", "trial": trial.number, "search_params": leaves}
        res = fit(run_dir, cfg, task, data_cache[dkey], dev, run_key(cfg), meta, progress, on_epoch=report, test=False)
        files.write_json(run_dir / "result.json", res)
        (run_dir / "last.pt").unlink(missing_ok=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return res["val_best"]

    storage = f"sqlite:///{(out / f'{spec.group}.db').resolve()}"
    study = optuna.create_study(study_name=f"{spec.group}/{variant.name}", storage=storage, direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1))
    done = sum(t.state.is_finished() for t in study.trials)
    todo = max(0, (trials or spec.search["trials"]) - done)
    if todo:
        study.optimize(objective, n_trials=todo, timeout=timeout, catch=())
    best = study.best_trial
    summary = {"spec": spec.path, "group": spec.group, "tuned_variant": variant.name,
               "metric": f"validation {task.metric} (seed {seed})", "value": best.value,
               "trials": len(study.trials), "complete": sum(t.state.name == "COMPLETE" for t in study.trials),
               "pruned": sum(t.state.name == "PRUNED" for t in study.trials), "storage": storage}
    suggestion = {"name": f"{variant.name}-tuned", "note": f"Optuna best of {summary['trials']} trials "
                  f"(validation {task.metric} {best.value:.4f})", "set": dict(best.params)}
    text = ("# " + yaml.safe_dump(summary, sort_keys=False).replace("\n", "\n# ").rstrip("# ") + "\n"
            "# paste under `variants:` of the spec to benchmark it with error bars:\n"
            + yaml.safe_dump([suggestion], sort_keys=False))
    files.write_text(out / f"{spec.group}-best.yaml", text)
    return {**summary, "params": dict(best.params)}
