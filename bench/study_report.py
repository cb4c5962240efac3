"""What a finished Optuna study leaves behind (see :mod:`bench.tune` for the study itself): the best trial of a single
objective as a ready-to-paste variant (``results/optuna/<group>-best.yaml``, or the spec's ``search.tuned`` file for
the study that publishes it, see :func:`publishes`), the study's trials as CSV and Optuna's figures; of several
objectives, the Pareto front as a Markdown table, a figure and every trial as CSV (:func:`write_front`).  Reads the
study from its storage and trains nothing."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import optuna
import yaml

from bench import files, usable_cores
from bench.log import count, note
from bench.spec import TUNED, Spec, Variant, describe, group_file_prefix, tuned_path
from bench.storage import where_it_ran
from bench.tasks import TASKS

log = logging.getLogger(__name__)

State = optuna.trial.TrialState


def plain_choices(choices: list[Any]) -> bool:
    """Whether Optuna can store these choices as they are (None, bool, int, float, str)."""
    return all(c is None or isinstance(c, (bool, int, float, str)) for c in choices)


def config_params(params: dict[str, Any], space: dict[str, Any]) -> dict[str, Any]:
    """A trial's parameters as config values: a list choice stored as its JSON text (see :func:`suggest`) decoded."""
    return {
        k: json.loads(v) if "choices" in space.get(k, {}) and not plain_choices(space[k]["choices"]) else v
        for k, v in params.items()
    }


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Counts and wall time of a study, over every worker that shared it.  ``failed`` counts the trials that failed by
    themselves (their reasons in ``failures``, most frequent first); a trial stopped by Ctrl-C or a dead worker and
    queued again is ``requeued``, and surplus trials of a race for the last slot are not counted: neither trained.
    ``workers`` is the most that trained at once, ``hosts`` the machines that took part."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}  # Optuna's retry of a dead worker's
    requeued = [t for t in trials if t.state == State.FAIL and (t.user_attrs.get("requeued") or t.number in retried)]
    failed = [t for t in trials if t.state == State.FAIL and t not in requeued]
    reasons: dict[str, int] = {}
    for t in failed:
        reason = t.user_attrs.get("fail_reason", "no reason recorded")
        reasons[reason] = reasons.get(reason, 0) + 1
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    workers = {t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}
    states = [t.state for t in trials]
    return {
        "finished": states.count(State.COMPLETE) + states.count(State.PRUNED),
        "complete": states.count(State.COMPLETE),
        "pruned": states.count(State.PRUNED),
        "failed": len(failed),
        "requeued": len(requeued),
        "failures": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "wall_time_s": round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else None,
        "workers": most_at_once(
            [
                (t.datetime_start, t.datetime_complete)
                for t in trials
                if "worker" in t.user_attrs and t.datetime_start and t.datetime_complete
            ]
        ),
        "hosts": len({w.rsplit(":", 1)[0] for w in workers}),
    }


def most_at_once(spans: list[tuple[Any, Any]]) -> int:
    """The most of the (start, end) spans that overlap at one moment (an end and a start at the same moment do not)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans], key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


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
            note(log, f"no {kind} figure for study {study.study_name} ({type(e).__name__}: {e})")
    return out


def _same_tuned(path: Path, study: dict[str, Any], variant: dict[str, Any]) -> bool:
    """Whether ``path`` already says this (apart from when and at which commit it was written)."""
    try:
        old = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    strip = lambda d: {k: v for k, v in d.items() if k not in ("written", "commit")}  # noqa: E731
    return isinstance(old, dict) and old.get("variant") == variant and strip(old.get("study") or {}) == strip(study)


def publishes(spec: Spec, seed: int, trials: int | None) -> bool:
    """Whether this tune is the study behind the spec's published ``tuned`` rung: the spec as written (no --set),
    its ``search.profile`` (none: the full budget), its first seed and its ``search.trials``.  Any other tune is an
    experiment, whose best goes beside its study (results/optuna/) and never over the spec's tuned file."""
    return (
        tuned_path(spec.path, spec.search) is not None
        and not spec.adhoc
        and spec.profile == spec.search.get("profile")
        and seed == spec.seeds[0]
        and trials in (None, spec.search["trials"])
    )


def why_experiment(spec: Spec, seed: int, trials: int | None) -> str:
    """What makes a tune an experiment rather than the published study (see :func:`publishes`)."""
    reasons = (
        ([f"--set {', '.join(spec.overrides)}"] if spec.adhoc else [])
        + (
            [f"profile {spec.profile or 'full'}, not the search's {spec.search.get('profile') or 'full'}"]
            if spec.profile != spec.search.get("profile")
            else []
        )
        + ([f"seed {seed}, not the spec's {spec.seeds[0]}"] if seed != spec.seeds[0] else [])
        + (
            [f"--trials {trials}, not the spec's {spec.search['trials']}"]
            if trials not in (None, spec.search["trials"])
            else []
        )
    )
    return "; ".join(reasons)


def write_trials_csv(study: optuna.Study, path: Path) -> None:
    """One row per trial: number, state (``requeued`` for a trial stopped by Ctrl-C or a dead worker and queued
    again), validation value, seconds, parameters, worker and a failed trial's reason; a small file for git."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    params = list(dict.fromkeys(k for t in trials for k in t.params))
    rows = []
    for t in trials:
        requeued = t.state == State.FAIL and (t.user_attrs.get("requeued") or t.number in retried)
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            {
                "number": t.number,
                "state": "requeued" if requeued else t.state.name.lower(),
                "value": t.value,
                "seconds": None if seconds is None else round(seconds, 1),
                **{k: t.params.get(k) for k in params},
                "worker": t.user_attrs.get("worker"),
                "reason": t.user_attrs.get("fail_reason"),
            }
        )
    files.write_csv(path, ["number", "state", "value", "seconds", *params, "worker", "reason"], rows)


def write_best(
    spec: Spec,
    variant: Variant,
    study: optuna.Study,
    seed: int,
    storage: str,
    out: Path,
    results_dir: Path,
    published: bool,
) -> dict[str, Any]:
    """Write ``<group>-best.yaml`` (the study's summary as comments, then the best trial as a variant), and beside it
    the study's trials as CSV and its figures.  For the study that ``published`` the spec's rung (see
    :func:`publishes`), the spec's ``search.tuned`` file instead takes the figures (results/figures) and the trials
    (``<tuned file>.trials.csv`` beside it): its ``tuned`` variant is what ``bench run`` trains beside the hand-made
    rungs, and file, figures and trials change together or not at all."""
    counts = study_summary(study)
    if not counts["complete"]:
        return _no_best(spec, study, seed, counts)
    best = study.best_trial
    summary = _best_summary(spec, variant, study, seed, storage, counts)
    params = config_params(best.params, spec.search["space"])
    written = [_write_best_yaml(spec, variant, summary, params, out)]
    target = tuned_path(spec.path, spec.search)
    if not published or target is None:
        write_trials_csv(study, out / f"{spec.group}-trials.csv")
        written += [out / f"{spec.group}-trials.csv"] + [out / n for n in plot_study(study, out / spec.group)]
    else:
        written += _write_tuned(spec, variant, study, seed, storage, results_dir, target, counts)
    return {**summary, "params": params, "written": [str(p) for p in written]}


def _no_best(spec: Spec, study: optuna.Study, seed: int, counts: dict[str, Any]) -> dict[str, Any]:
    """The summary of a study without a complete trial: nothing to write."""
    return {
        "spec": spec.path,
        "study": study.study_name,
        "metric": f"validation {TASKS[spec.task].metric} (seed {seed})",
        "value": None,
        "trials": counts["finished"],
        "pruned": counts["pruned"],
        "failed": counts["failed"],
        "failures": counts["failures"],
        "params": {},
        "written": [],
    }


def _best_summary(
    spec: Spec, variant: Variant, study: optuna.Study, seed: int, storage: str, counts: dict[str, Any]
) -> dict[str, Any]:
    """What ``bench tune`` prints of a study with a best trial (and the comments of ``<group>-best.yaml``)."""
    return {
        "spec": spec.path,
        "group": spec.group,
        "study": study.study_name,
        "tuned_variant": variant.name,
        "overrides": spec.overrides,
        "metric": f"validation {TASKS[spec.task].metric} (seed {seed})",
        "value": study.best_trial.value,
        "trials": counts["finished"],
        "complete": counts["complete"],
        "pruned": counts["pruned"],
        "failed": counts["failed"],
        "requeued": counts["requeued"],
        "failures": counts["failures"],
        "storage": storage,
    }


def _write_best_yaml(spec: Spec, variant: Variant, summary: dict[str, Any], params: dict[str, Any], out: Path) -> Path:
    """``<group>-best.yaml``: the summary as comments, then the best trial as a variant to paste into the spec."""
    suggestion = {
        "name": f"{variant.name}-tuned",
        "from": variant.name,
        "note": (
            f"Optuna best of {summary['trials']} trials (validation {TASKS[spec.task].metric} {summary['value']:.4f})"
        ),
        "set": params,
    }
    text = (
        "# " + yaml.safe_dump(summary, sort_keys=False).replace("\n", "\n# ").rstrip("# ") + "\n"
        "# paste at the end of `variants:` in the spec to benchmark it with error bars:\n"
        + yaml.safe_dump([suggestion], sort_keys=False)
    )
    files.write_text(out / f"{spec.group}-best.yaml", text)
    return out / f"{spec.group}-best.yaml"


def _write_tuned(
    spec: Spec,
    variant: Variant,
    study: optuna.Study,
    seed: int,
    storage: str,
    results_dir: Path,
    target: Path,
    counts: dict[str, Any],
) -> list[Path]:
    """The spec's ``search.tuned`` file (the study, then the variant ``tuned``), its trials beside it and its figures
    in results/figures, written together; none of them when the file already says this (a rerun of a finished study
    keeps the committed file).  The paths written."""
    trials_csv = target.with_name(f"{target.stem}.trials.csv")
    study_info = _tuned_study_info(spec, study, seed, storage, counts, trials_csv)
    tuned = _tuned_variant(spec, variant, study.best_trial, counts)
    if _same_tuned(target, study_info, tuned):
        return []
    prefix = results_dir / "figures" / f"tune-{group_file_prefix(spec.published_group)}"
    study_info["figures"] = [f"figures/{n}" for n in plot_study(study, prefix)]
    write_trials_csv(study, trials_csv)
    files.write_text(
        target,
        f"# Written by `python -m bench tune {spec.path}"
        f"{' --profile ' + spec.profile if spec.profile else ''}`: the best trial of its "
        f"study (validation split only; every trial in {trials_csv.name}). `bench run` trains "
        f"the `tuned` variant on the spec's seeds.\n"
        + yaml.safe_dump({"study": study_info, "variant": tuned}, sort_keys=False),
    )
    return [target, trials_csv]


def _tuned_study_info(
    spec: Spec, study: optuna.Study, seed: int, storage: str, counts: dict[str, Any], trials_csv: Path
) -> dict[str, Any]:
    """The ``study:`` entry of the tuned file: where and how the study ran, its best trial, its counts and files."""
    best = study.best_trial
    return {
        "name": study.study_name,
        "ran_in": where_it_ran(storage),
        "profile": spec.profile,
        "seed": seed,
        "metric": f"validation {TASKS[spec.task].metric}",
        "best_trial": best.number,
        "value": round(best.value, 6),
        **counts,
        "trials_csv": trials_csv.name,
        "figures": [
            f"figures/tune-{group_file_prefix(spec.published_group)}-{k}.png" for k in ("history", "importance")
        ],
        "commit": files.git_commit(),
        "written": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _tuned_variant(
    spec: Spec, variant: Variant, best: optuna.trial.FrozenTrial, counts: dict[str, Any]
) -> dict[str, Any]:
    """The variant ``tuned``: the tuned variant with the best trial's parameters."""
    minutes = f"{counts['wall_time_s'] / 60:.1f} min" if counts["wall_time_s"] is not None else "?"
    return {
        "name": TUNED,
        "from": variant.name,
        "note": (
            f"Optuna best of {counts['finished']} trials ({counts['pruned']} pruned, {counts['failed']} "
            f"failed; {minutes} on {count(counts['workers'], 'worker')} at "
            f"once), trial {best.number}"
        ),
        "set": config_params(best.params, spec.search["space"]),
    }


# --------------------------------------------------------------------------- several objectives: the Pareto front

COLUMNS = {"train_seconds": "train s", "params": "params", "flops": "MFLOP/image"}


def front_prefix(spec: Spec) -> str:
    """The name of a spec's multi-objective outputs: ``<prefix>-pareto`` (see :func:`bench.spec.group_file_prefix`);
    the figure is ``tune-<prefix>-pareto.png``."""
    return f"{group_file_prefix(spec.group)}-pareto"


def write_front(
    spec: Spec,
    variant: Variant,
    name: str,
    rdb: optuna.storages.BaseStorage,
    seed: int,
    storage: str,
    out: Path,
    results_dir: Path,
) -> dict[str, Any]:
    """Write a multi-objective study's Pareto front, read back from its storage (every worker's trials): a Markdown
    table ``results/optuna/<prefix>.md``, the figure ``results/figures/tune-<prefix>.png`` and every trial as CSV
    beside the table (``<prefix>``: :func:`front_prefix`).  The summary that ``bench tune`` prints, with ``front``
    (its trials, in table order)."""
    study = optuna.load_study(study_name=name, storage=rdb)  # the values stored by every worker, not this one's
    objectives = study.user_attrs["objectives"]
    counts = study_summary(study)
    front = _front_rows(study)
    prefix = front_prefix(spec)
    table, figure, trials_csv = (
        out / f"{prefix}.md",
        results_dir / "figures" / f"tune-{prefix}.png",
        out / f"{prefix}-trials.csv",
    )
    _write_mo_trials_csv(study, spec.search["space"], trials_csv)
    written = [trials_csv]
    if front:
        files.write_text(table, front_markdown(spec, variant, study, objectives, front, counts, seed, storage))
        plot_front(study, objectives, [t.number for t in front], TASKS[spec.task].metrics[0], figure)
        written = [table, figure, trials_csv]
    return {
        "spec": spec.path,
        "study": study.study_name,
        "objectives": objectives,
        "metric": f"validation {TASKS[spec.task].metric} (seed {seed})",
        "value": None,
        "trials": counts["finished"],
        "complete": counts["complete"],
        "pruned": counts["pruned"],
        "failed": counts["failed"],
        "requeued": counts["requeued"],
        "failures": counts["failures"],
        "front": [t.number for t in front],
        "params": {},
        "written": [str(p) for p in written],
    }


def _front_rows(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Optuna's Pareto front (its ``best_trials``), each set of parameters once (a trial that reused a finished
    trial's values is left out), cheapest first by the first cost."""
    front = [t for t in study.best_trials if "same_as_trial" not in t.user_attrs]
    return sorted(front, key=lambda t: (t.values[1], t.number))


def _machines(trials: list[optuna.trial.FrozenTrial]) -> list[str]:
    return sorted({t.user_attrs["machine"] for t in trials if "machine" in t.user_attrs})


def front_markdown(
    spec: Spec,
    variant: Variant,
    study: optuna.Study,
    objectives: list[str],
    front: list[optuna.trial.FrozenTrial],
    counts: dict[str, Any],
    seed: int,
    storage: str,
) -> str:
    """The Pareto table with the sentences that say what its numbers mean and where they hold."""
    metric = TASKS[spec.task].metrics[0]
    space = spec.search["space"]
    machines = _machines([t for t in study.trials if t.state == State.COMPLETE])
    where = (
        f"on {machines[0]}"
        if len(machines) == 1
        else f"on {len(machines)} different machines ({'; '.join(machines)}): these times mix machines"
    )
    workers = counts["workers"]
    loads = [t.user_attrs["load"] for t in study.trials if "load" in t.user_attrs]
    load = f" (1-minute load average {min(loads):.1f} to {max(loads):.1f} at the trials' ends)" if loads else ""
    costs = ", ".join(f"{COLUMNS[o]} (minimized)" for o in objectives[1:])
    lines = [
        f"# Pareto front of `{study.study_name}`",
        "",
        f"Optuna study (TPE, 4 random trials first; {counts['finished']} finished trials: {counts['complete']} complete, "
        f"{counts['failed']} failed) of `{variant.name}` in `{spec.path}`"
        f"{' with --set ' + describe(spec.overrides) if spec.overrides else ''}, profile "
        f"{spec.profile or 'full'}, seed {seed}, stored in {where_it_ran(storage)}.  Objectives: validation "
        f"{TASKS[spec.task].metric} ({metric.direction}d), {costs}.  The {len(front)} trials below are those no other trial "
        f"beats on every objective (validation split only; the test split was never read).",
        "",
    ]
    if "train_seconds" in objectives:
        lines += [
            f"**train s** is the harness's own measured training time of the trial (training steps of all its "
            f"epochs, `train_seconds` of its metrics.csv), measured {where}{load}, with up to {count(workers, 'trial')} "
            f"training at once: the front holds on that machine, not on another."
            + (
                f"  The load exceeded its {usable_cores()} cores: other work ran beside the trials and their "
                f"times include its share (on a shared machine, `flops` or `params` is a cost it does not move)."
                if loads and max(loads) > usable_cores()
                else ""
            ),
            "",
        ]
    val = f"val {TASKS[spec.task].metric}" + (f" ({metric.unit})" if metric.unit else "")
    head = ["trial", val, *COLUMNS.values(), "epochs", *space]
    rows = []
    for t in front:
        m = t.user_attrs.get("measures", {})
        p = config_params(t.params, space)
        rows.append(
            [
                str(t.number),
                metric.text(t.values[0]),
                f"{m.get('train_seconds', float('nan')):.1f}",
                f"{m.get('params', 0):,}",
                f"{m.get('flops', 0) / 1e6:.2f}",
                str(t.user_attrs.get("epochs", "")),
                *(_short(p.get(k)) for k in space),
            ]
        )
    lines += [
        files.markdown_table(head, rows, ["right"] * (len(head) - len(space)) + ["left"] * len(space)),
        "",
        f"![Pareto front](../figures/tune-{front_prefix(spec)}.png)",
        "",
        f"A trial of the front becomes a rung of the spec (trained on its seeds by `bench run`): `python -m bench "
        f"tune {spec.path}{' --profile ' + spec.profile if spec.profile else ''} --objectives "
        f"{','.join(objectives)} --rung NAME --trial N` (the spec's `search.rungs` names the file it goes to).",
        "",
    ]
    return "\n".join(lines)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot_front(study: optuna.Study, objectives: list[str], front: list[int], metric: Any, png: Path) -> None:
    """One panel per cost: every complete trial (grey) and the front (its trials numbered), the metric against the
    cost, from the values stored in the study."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in study.trials if t.state == State.COMPLETE and "same_as_trial" not in t.user_attrs]
    on = [t for t in done if t.number in front]
    fig, axes = plt.subplots(1, len(objectives) - 1, figsize=(5.5 * (len(objectives) - 1), 4), squeeze=False)
    for i, (ax, cost) in enumerate(zip(axes[0], objectives[1:], strict=True), start=1):
        scale = 1e-6 if cost == "flops" else 1.0
        ax.scatter(
            [t.values[i] * scale for t in done],
            [t.values[0] * metric.scale for t in done],
            c="0.7",
            s=18,
            label="trial",
        )
        ax.scatter(
            [t.values[i] * scale for t in on],
            [t.values[0] * metric.scale for t in on],
            c="C3",
            s=30,
            label="Pareto front",
        )
        if len(objectives) == 2:  # the front as the staircase it is: nothing above and left of it was found
            line = sorted((t.values[1] * scale, t.values[0] * metric.scale) for t in on)
            ax.step([x for x, _ in line], [y for _, y in line], where="post", c="C3", lw=0.8, alpha=0.6)
        for t in on:
            ax.annotate(
                str(t.number),
                (t.values[i] * scale, t.values[0] * metric.scale),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(COLUMNS[cost] if cost != "train_seconds" else "train s (measured on the tuning machine)")
        ax.set_ylabel(f"validation {metric.key}" + (f" ({metric.unit})" if metric.unit else ""))
        if cost != "train_seconds":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(study.study_name, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)


def _write_mo_trials_csv(study: optuna.Study, space: dict[str, Any], path: Path) -> None:
    """One row per trial: number, state, every measure, seconds, parameters, machine, worker, a failure's reason."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    keys = ["val_metric", *COLUMNS]
    rows = []
    for t in trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        m = t.user_attrs.get("measures", {})
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                **{k: m.get(k) for k in keys},
                "seconds": None if seconds is None else round(seconds, 1),
                **{k: json.dumps(v) if isinstance(v, list) else v for k, v in config_params(t.params, space).items()},
                "machine": t.user_attrs.get("machine"),
                "worker": t.user_attrs.get("worker"),
                "reason": t.user_attrs.get("fail_reason"),
            }
        )
    files.write_csv(path, ["number", "state", *keys, "seconds", *space, "machine", "worker", "reason"], rows)
