"""Trains a spec's grid of (variant, seed) runs, skipping finished ones.

Which runs remain and where results go is the run store's business (``bench/store.py``), who
trains which run is the grid's (``bench/grid.py``: kernel locks on one machine, an Optuna study
in a database across machines); this module only loops: claim a run, train it, record how it
ended.  Several worker processes (``--workers N``) run the same loop over the same grid.  A run
that fails for its own reason (a diverged loss, out of memory) is recorded as failed and the
loop goes on; :class:`RunsFailed` names them at the end.  Seed ensembles train nothing: they are evaluated
after the grid from their members' best.pt; so is a run that differs from another only in its post-processing, from
that run's best.pt (``bench/derived.py``).  A finished run whose best.pt is not here (checkpoints are not in git)
is trained again from its record into ``<results>/retrained`` first (:func:`checkpoint_of`, which the ONNX export
uses too; a post-processing rung is scored there from its source's copy instead; ``bench reproduce`` trains runs
again by :func:`retrain`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bench import derived, ensemble, files, usable_cores
from bench.config import ConfigError
from bench.factories import build_loss, build_model, build_optimizer, factory
from bench.grid import LocalGrid, StudyGrid
from bench.log import count, first_line, note, setup, verbosity
from bench.records import GroupRecord, read_record
from bench.spec import Run, Spec, Variant, config_from_dict, run_key, run_keys, training_key
from bench.storage import StorageOptions
from bench.store import LoadedRun, RunStore, StoredRun
from bench.tasks import TASKS
from bench.tasks.base import Data
from bench.train import fit, resolve_device, steps_per_epoch

log = logging.getLogger(__name__)
RETRAINED = "retrained"  # <results>/retrained/runs/...: stored runs trained again there for their checkpoints


@dataclass
class RunOptions:
    """How (not what) to train: the same for every run of an invocation, and for its workers."""

    data_root: str  # resolved, absolute
    device: str | None = None  # --device; None: each run's train.device
    threads: int | None = None  # torch threads per process; None: the config's, else torch's default
    progress: bool = True  # progress bars (stderr)
    channels_last: bool | None = None  # --set train.channels_last; None: the config's
    compile: str | None = None  # --set train.compile; None: the config's
    storage: StorageOptions | None = None  # --storage: share the grid through this database; None: kernel locks
    # Called as hook(store, run) in the process that trained the run, once its result is recorded (e.g. MLflow
    # logging, bench/tracking.py); plain picklable objects: --workers processes receive them too.
    after_run: tuple[Callable[[RunStore, Run], None], ...] = ()


def resolve_data_root(cli_root: str | None, default: str = "data") -> tuple[str, bool]:
    """(absolute data root, whether it is the default): --data-root, else $BENCH_DATA, else ``default``."""
    given = cli_root or os.environ.get("BENCH_DATA")
    return str(Path(given or default).expanduser().resolve()), not given


def run_data_root(run: LoadedRun, data_root: str | None) -> str:
    """Where a stored run's data is read again (rescore, export): ``data_root`` (--data-root) when given; else a folder
    task's own root (it is the data set itself, not a folder holding several); else $BENCH_DATA; else the run's own."""
    own = run.config.data.root if run.task.data_keys else None
    return resolve_data_root(data_root or own, default=run.config.data.root or "data")[0]


def load_data(cache: dict[str, Data], task: Any, cfg: Any, device: torch.device, test: bool = True) -> Data:
    """``cfg``'s data on ``device`` from ``cache`` (which holds one data set at a time), loading it when
    missing; a CPU copy already there (the preflight's) serves a CPU run without reading the files again.
    ``test=False``: without the test split (tuning)."""
    key = data_key(cfg, device, test)
    if key not in cache:
        cpu_copy = cache.get(data_key(cfg, torch.device("cpu"), test))
        cache.clear()
        cache[key] = cpu_copy if device.type == "cpu" and cpu_copy else task.load(cfg, device, test)
    return cache[key]


def data_key(cfg: Any, device: torch.device, test: bool = True) -> str:
    return json.dumps([asdict(cfg.data), str(device), test], sort_keys=True)


def preflight(
    spec: Spec, runs: list[Run], opts: RunOptions, download: bool = False, test: bool = True
) -> dict[str, Data]:
    """Before anything trains or is written: check each run's device, the task's files (fetching them when ``download``),
    load every distinct data configuration of ``runs`` once on the CPU, and build each variant's
    network, loss and optimizer and run them on two training images, so that broken data, an
    impossible data setting or a config that cannot work on this task (a network for another task,
    five widths where five are needed) stops the command with one message.  Returns the loaded data,
    keyed for reuse by :func:`run_grid`."""
    task = TASKS[spec.task]
    for run in runs:  # a device this machine lacks is the first thing to say
        resolve_device(runtime_config(run, opts).train.device, "train.device")
    task.prepare(Path(opts.data_root), download, test)
    cpu, loaded, tried = torch.device("cpu"), {}, set()
    for run in runs:
        cfg = runtime_config(run, opts)
        key = data_key(cfg, cpu, test)
        if key not in loaded:
            loaded[key] = task.load(cfg, cpu, test)
        if run.variant.name not in tried:
            tried.add(run.variant.name)
            _try_one_step(run, cfg, task, loaded[key])
    return loaded


def _try_one_step(run: Run, cfg: Any, task: Any, data: Data) -> None:
    """Build the run's objects and compute the loss of two training images; ConfigError when that fails."""
    where = f"variant {run.variant.name!r} (model.name={cfg.model['name']})"
    try:
        kwargs = task.model_kwargs(data.info)
        model = build_model(cfg, **kwargs)
        # The real number of batches: a schedule that cannot run on them (a one-cycle too short) is said now.
        build_optimizer(cfg, model, steps_per_epoch(len(data.train), cfg.train.batch_size))
        x, y = task.augment(data.train.x[:2], data.train.y[:2], cfg, torch.Generator().manual_seed(0))
        out = model(x)
    except ConfigError as e:  # a factory's own check names its key
        raise ConfigError(f"variant {run.variant.name!r}: {e}") from None
    except Exception as e:  # whatever the factories or the forward pass raise, the config is at fault
        raise ConfigError(
            f"{where}: this config does not run on {task.name} data: {type(e).__name__}: {first_line(e, empty='')}"
        ) from None
    # A network of the wrong width may still "train" (5 logits for 3 classes reach 0 %): say so before anything runs.
    channels = kwargs.get("num_classes", 0) + bool(cfg.model.get("contours"))  # + the gland-contour channel
    want = (x.shape[0], channels, *(x.shape[-2:] if task.kind == "segmentation" else ()))
    outs = out if isinstance(out, list) else [out]  # deep supervision: every training output goes to the loss
    bad = [tuple(o.shape) for o in outs if tuple(o.shape) != want]
    if "num_classes" in kwargs and bad:
        layout = "(N, classes)" if task.kind == "classification" else "(N, C, H, W) at the input's height and width"
        raise ConfigError(
            f"{where}: the network returns {bad[0]} for a batch of {tuple(x.shape)}; "
            f"{task.name} needs {want}, {layout} (it was built with {kwargs})"
        )
    try:
        for o in outs:
            build_loss(cfg)(o.float(), y)
    except Exception as e:
        raise ConfigError(
            f"{where}: this config does not run on {task.name} data: {type(e).__name__}: {first_line(e, empty='')}"
        ) from None


def check_schedule(cfg: Any, n_train: int) -> None:
    """ConfigError naming the key when ``cfg``'s learning-rate schedule cannot run on ``n_train`` training images
    (a one-cycle with too few steps), found by building it on a one-parameter optimizer."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    fn, kwargs = factory("sched", cfg.sched)
    fn(opt, cfg.train.epochs, steps_per_epoch(n_train, cfg.train.batch_size), **kwargs)


def runtime_config(run: Run, opts: RunOptions) -> Any:
    """The run's config with where it runs filled in (a copy: the run's own config stays as the spec made it)."""
    cfg = run.config.copy()
    # The spec's own root first; absolute either way, so the run's config.json finds it from any folder later.
    cfg.data.root = str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else opts.data_root
    if opts.device:
        cfg.train.device = opts.device
    # The thread count is recorded (config.json) even when none was asked for: a CPU run's rounding depends on it
    # (how reductions are split), so `bench reproduce` gives an identical run only with the same count.
    cfg.train.threads = opts.threads or cfg.train.threads or torch.get_num_threads()
    if opts.channels_last is not None:
        cfg.train.channels_last = opts.channels_last
    if opts.compile is not None:
        cfg.train.compile = opts.compile
    return cfg


def run_meta(run: Run) -> dict[str, Any]:
    """What a run's config.json and result.json say of where it belongs."""
    return {"spec": run.spec, "variant": run.variant.name, "seed": run.seed, "name": f"{run.variant.name}/s{run.seed}"}


class RunsFailed(Exception):
    """Some runs of the grid failed for their own reasons (recorded in their result.json); the others finished."""


def open_grid(spec: Spec, runs: list[Run], store: RunStore, opts: RunOptions) -> LocalGrid | StudyGrid:
    return StudyGrid(store, spec, runs, opts.storage) if opts.storage else LocalGrid(store, runs)


def run_grid(
    spec: Spec,
    runs: list[Run],
    results_dir: str | Path,
    opts: RunOptions,
    cache: dict[str, Data] | None = None,
    enqueue: bool = True,
) -> None:
    """Train every run of ``runs`` that is not finished and not claimed by another process (with
    ``opts.storage``, first queue the unfinished ones in the grid's study unless ``enqueue`` is False:
    a parent process did it for its workers).  Raises :class:`RunsFailed` when some run failed."""
    store = RunStore(results_dir)
    task = TASKS[spec.task]
    cache = cache if cache is not None else {}
    grid = open_grid(spec, runs, store, opts)
    if enqueue and isinstance(grid, StudyGrid):
        grid.enqueue()
    failed = []
    bar = tqdm(
        total=len(runs),
        initial=len(runs) - len(store.todo(runs)),
        desc=f"{spec.group} runs",
        disable=not opts.progress,
        unit="run",
    )
    for run in grid.claims():
        cfg = runtime_config(run, opts)
        device = resolve_device(cfg.train.device, "train.device")
        meta = run_meta(run)
        log.debug(
            f"training {run.rel_dir} (key {run.key}) on {device} with {cfg.train.threads} threads in process "
            f"{os.getpid()}"
        )
        try:
            data = load_data(cache, task, cfg, device)
            # On the CPU, a core per thread, machine-wide: another bench process's trainers wait rather than share.
            with (
                files.hold_cores(cfg.train.threads or torch.get_num_threads(), _waiting_note(run))
                if device.type == "cpu"
                else contextlib.nullcontext()
            ):
                result = fit(store.path(run), cfg, task, data, device, run.key, meta, opts.progress)
        except files.DiskFull:  # not the run's fault, and every other run would fail the same way: stop here
            raise
        except Exception as e:  # the run's own failure: recorded; the other runs go on
            error = f"{type(e).__name__}: {e}"
            grid.failed(run, error)
            failed.append(f"{run.variant.name} seed {run.seed}: {error}")
            log.info(f"failed {run.spec} {run.variant.name} seed {run.seed}: {error}")
        else:
            grid.done(run, result)
            for hook in opts.after_run:  # while the run is still this process's (its claim is held)
                hook(store, run)
            bar.update(1)
            report_finished(run, result, task, opts.progress)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    if isinstance(grid, StudyGrid):
        failed += grid.abandoned()
    if failed:
        raise RunsFailed("\n".join(failed))


def check_members(runs: list[Run], store: RunStore) -> None:
    """ConfigError, before anything runs, when an ensemble among ``runs`` has a member that is neither finished nor
    among ``runs`` (``--variants`` named the ensemble without the rung it averages, which is not trained yet)."""
    training = {(r.variant.name, r.seed) for r in runs if not r.members}
    for run in runs:
        for m in run.members:
            if (m.variant.name, m.seed) not in training and store.result(m) is None:
                raise ConfigError(
                    f"{run.variant.name} seed {run.seed}: its member {m.variant.name} seed {m.seed} is "
                    f"not finished; train it first or with it (--variants {m.variant.name} "
                    f"{run.variant.name})"
                )


# ----------------------------------------------------------------------- stored runs trained again
# Records come from git, checkpoints do not: a finished run whose best.pt is not here is trained again from its
# record into <results>/retrained when its weights are needed (an export, a seed ensemble's members), and
# `bench reproduce` trains runs again the same way to compare them with their records.


def rerun_of(stored: StoredRun, meta: GroupRecord, data_root: str | None) -> Run:
    """The stored run as the runner's Run: its recorded config, seed and key.  The recorded data root is kept
    when it exists on this machine and ``data_root`` (--data-root) is None."""
    path = stored.dir / "config.json"
    saved = files.read_json(path)
    cfg = config_from_dict(saved["config"], where=str(path))
    if data_root or (cfg.data.root and not Path(cfg.data.root).is_dir()):
        cfg.data.root = None  # the runner's data root then: --data-root, else $BENCH_DATA, else ./data
    if run_key(cfg) != stored.key:  # a config section gained a key since: the rerun still uses the recorded values
        note(
            log,
            "%s: the config hashes to %s with this code, not to the recorded key %s",
            path,
            run_key(cfg),
            stored.key,
        )
    index, v = next((i, v) for i, v in enumerate(meta.variants) if v.name == stored.variant)
    variant = Variant(v.name, index, v.parent, v.ablation, v.change, v.reported, cfg, v.label)
    return Run(stored.group, variant, stored.seed, cfg, stored.key)


def retrain(
    meta: GroupRecord, chosen: list[StoredRun], into: str | Path, opts: RunOptions, data_root: str | None = None
) -> tuple[RunStore, list[Run]]:
    """Train the stored runs ``chosen`` of the group ``meta`` again, each from its own record (config, seed, thread
    count), into the results folder ``into`` (same group, variant and seed folders) with ``opts`` (its data root for
    a run whose recorded one is not on this machine, or for every run when ``data_root``, --data-root, is given);
    (that folder's store, the runs).  A run that fails is recorded there as failed (``store.result(run)`` is None)."""
    runs = [rerun_of(r, meta, data_root) for r in chosen]
    spec = Spec(
        meta.name,
        meta.path or "",
        meta.task,
        sorted({r.seed for r in runs}),
        meta.profile,
        list({r.variant.name: r.variant for r in runs}.values()),
        group_name=meta.group,
    )
    cache = preflight(spec, runs, opts)  # a device or data this machine lacks: one error before any training
    try:
        run_grid(spec, runs, into, opts, cache)
    except RunsFailed:
        pass  # said run by run; the caller sees each failure in the store
    return RunStore(into), runs


def retrained_dir(results: str | Path, run_dir: Path) -> Path:
    """Where the run folder ``run_dir`` of ``results`` is trained again for its checkpoint."""
    return Path(results) / RETRAINED / run_dir.relative_to(results)


def retrained_checkpoint(stored: StoredRun, results: str | Path) -> Path | None:
    """The folder of ``stored`` trained again earlier (:func:`retrained_dir`) when it is finished with the run's
    key and holds its best.pt; else None."""
    done = retrained_dir(results, stored.dir)
    try:
        record = read_record(done)
    except (OSError, ValueError):  # none yet (RecordError is a ValueError)
        return None
    return done if record.status == "finished" and record.key == stored.key and (done / "best.pt").exists() else None


def checkpoint_of(
    stored: StoredRun, results: str | Path, opts: RunOptions, data_root: str | None, purpose: str, using: str
) -> Path:
    """The folder holding the best.pt of the finished run ``stored`` of ``results``: its own; else its copy trained
    again from its record into ``<results>/retrained`` (reused while it holds the run's key); else that copy, trained
    now with ``opts`` and ``data_root`` (see :func:`retrain`).  ``purpose`` ("export it") and ``using`` ("exporting")
    word the notes; ConfigError when the training fails."""
    if (stored.dir / "best.pt").exists():
        return stored.dir
    done = retrained_checkpoint(stored, results)
    if done is not None:
        return done
    source = derived_source(stored, results)
    if source is not None:  # a post-processing rung: its source's weights (trained again if need be), scored again
        return evaluate_again(stored, source, results, opts, data_root, purpose, using)
    note(
        log,
        "%s has no best.pt (checkpoints are not in git): re-training it from its record into %s to %s",
        stored.dir,
        Path(results) / RETRAINED,
        purpose,
    )
    meta = RunStore(results).read_group(stored.group)
    again, (run,) = retrain(meta, [stored], Path(results) / RETRAINED, opts, data_root)
    result = again.result(run)
    if result is None:
        raise ConfigError(f"{stored.dir}: re-training it to {purpose} failed; see above")
    _note_remade(stored, "re-trained", "", result.test, meta.task, using, again.path(run))
    return again.path(run)


def _note_remade(
    stored: StoredRun, verb: str, suffix: str, test: dict[str, Any], task: str, using: str, where: Path
) -> None:
    """The note once ``stored``'s checkpoint is made again into ``where``: its test metric against the recorded one."""
    metric = TASKS[task].metrics[0]
    old, new = stored.result.test.get(metric.key), test.get(metric.key)
    same = "identical to" if new == old else "recorded"
    note(
        log,
        "%s %s %s seed %d%s: %s %s (%s %s); %s %s",
        verb,
        stored.group,
        stored.variant,
        stored.seed,
        suffix,
        metric.label,
        metric.text(new, unit=True),
        same,
        metric.text(old, unit=True),
        using,
        where,
    )


def derived_source(stored: StoredRun, results: str | Path) -> StoredRun | None:
    """The finished run of ``stored``'s group (same seed) whose weights ``stored`` is evaluated from, when it differs
    from it only in what acts after training (its key is ``stored``'s training key, as :func:`bench.derived.source_of`
    finds it); None for a run that trains its own.  Runs recorded before derived runs existed trained those same
    weights themselves, so this holds for them too."""
    if "members" in stored.result.extra:
        return None
    saved = files.read_json(stored.dir / "config.json")
    wanted = training_key(config_from_dict(saved["config"], where=str(stored.dir / "config.json")))
    if wanted == stored.key:  # its post-training keys are at their defaults: it trains its own weights
        return None
    finished = RunStore(results).finished(stored.group)
    return next((s for s in finished if s.seed == stored.seed and s.key == wanted), None)


def evaluate_again(
    stored: StoredRun,
    source: StoredRun,
    results: str | Path,
    opts: RunOptions,
    data_root: str | None,
    purpose: str,
    using: str,
) -> Path:
    """The derived run ``stored`` (:func:`derived_source` is ``source``) evaluated again into
    ``<results>/retrained`` from its source's weights: the source's own best.pt, else its copy trained again from its
    record (:func:`checkpoint_of`).  Nothing is trained twice: the source's weights are the run's.  Returns the folder;
    ConfigError when the evaluation fails."""
    source_dir = checkpoint_of(
        source,
        results,
        opts,
        data_root,
        f"{purpose} (its weights are those of {source.variant} seed {source.seed})",
        using,
    )
    meta = RunStore(results).read_group(stored.group)
    run, src = rerun_of(stored, meta, data_root), rerun_of(source, meta, data_root)
    store, task = RunStore(Path(results) / RETRAINED), TASKS[meta.task]

    def score(cfg: Any, device: torch.device) -> dict[str, Any]:
        data = load_data({}, task, cfg, device)
        return derived.evaluate(run, src, source_dir, store.path(run), task, data, device, run_meta(run))

    if evaluate_claimed(store, run, task, opts, score) is None:  # another process evaluates it: its outcome
        store.wait_for(run)
    done = retrained_checkpoint(stored, results)
    if done is None:
        raise ConfigError(f"{stored.dir}: evaluating it from {source_dir}'s weights to {purpose} failed; see above")
    suffix = f" from the weights of {source.variant} seed {source.seed}"
    _note_remade(stored, "evaluated", suffix, read_record(done).test, meta.task, using, done)
    return done


def member_checkpoint(store: RunStore, member: Run, run: Run, opts: RunOptions) -> Path:
    """The folder holding the best.pt of the finished ``member`` of the ensemble ``run`` (:func:`checkpoint_of`:
    trained again from its record with the grid's data root and device when needed)."""
    result = store.result(member)
    assert result is not None, "run_ensembles evaluates only ensembles whose members are finished"
    stored = StoredRun(member.spec, member.variant.name, member.seed, member.key, store.path(member), result)
    if not (stored.dir / "best.pt").exists() and (done := retrained_checkpoint(stored, store.results)) is not None:
        note(
            log,
            "%s seed %d: its member %s seed %d has no best.pt here (checkpoints are not in git): using the one "
            "re-trained from its record in %s",
            run.variant.name,
            run.seed,
            member.variant.name,
            member.seed,
            done,
        )
        return done
    again = RunOptions(opts.data_root, opts.device, progress=opts.progress)  # the record's threads, no hooks
    return checkpoint_of(
        stored,
        store.results,
        again,
        None,
        f"evaluate the ensemble {run.variant.name} seed {run.seed}",
        "evaluating the ensemble from",
    )


def members_to_retrain(runs: list[Run], store: RunStore) -> list[tuple[Run, list[Run]]]:
    """Each finished member of the unfinished ensembles among ``runs`` that has no best.pt here, neither its own nor
    one trained again earlier, with the ensembles that will train it again (what ``--dry-run`` says)."""
    out: dict[tuple[str, int], tuple[Run, list[Run]]] = {}
    for run in store.todo([r for r in runs if r.members]):
        for m in run.members:
            result = store.result(m)
            if result is None or (store.path(m) / "best.pt").exists():
                continue
            stored = StoredRun(m.spec, m.variant.name, m.seed, m.key, store.path(m), result)
            if retrained_checkpoint(stored, store.results) is None:
                out.setdefault((m.variant.name, m.seed), (m, []))[1].append(run)
    return list(out.values())


def evaluate_claimed(
    store: RunStore, run: Run, task: Any, opts: RunOptions, score: Callable[[Any, torch.device], dict[str, Any]]
) -> dict[str, Any] | str | None:
    """Evaluate a run that trains nothing (an ensemble, a derived run) while this process holds it: ``score(cfg,
    device)`` with the run's config for this process gives its result, recorded as a training's would be (then the
    ``after_run`` hooks and the done line).  Returns the result; the error when scoring failed (recorded as the run's
    failure: the other runs go on); None when another process holds the run or it is finished."""
    with store.claim(run) as mine:
        if not mine:
            return None
        cfg = runtime_config(run, opts)
        try:
            result = score(cfg, resolve_device(cfg.train.device, "train.device"))
        except files.DiskFull:  # not the run's fault: stop here
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            store.record_failure(run, error)
            return error
        store.record(run, result)
        for hook in opts.after_run:  # while the run is still this process's (its claim is held)
            hook(store, run)
        report_finished(run, result, task, opts.progress)
        return result


def run_ensembles(
    spec: Spec, runs: list[Run], results_dir: str | Path, opts: RunOptions, cache: dict[str, Data] | None = None
) -> None:
    """Evaluate every ensemble run of ``runs`` (see :mod:`bench.ensemble`) whose members are finished and that no
    other process holds, a member without its best.pt trained again first (:func:`member_checkpoint`); RunsFailed
    naming those whose members are not finished, or whose evaluation failed."""
    store, task, cache, failed = RunStore(results_dir), TASKS[spec.task], cache if cache is not None else {}, []
    scored: dict[str, dict[str, Any]] = {}  # the scores of each ensemble evaluated here, for its seeds alike
    for run in store.todo([r for r in runs if r.members]):
        missing = [f"{m.variant.name} seed {m.seed}" for m in run.members if store.result(m) is None]
        if missing:
            failed.append(f"{run.variant.name} seed {run.seed}: its members {', '.join(missing)} are not finished")
            continue

        def score(cfg: Any, device: torch.device, run: Run = run) -> dict[str, Any]:
            weights = [member_checkpoint(store, m, run, opts) for m in run.members]
            return ensemble.evaluate(
                dataclasses.replace(run, config=cfg),
                store.path(run),
                [store.path(m) for m in run.members],
                task,
                load_data(cache, task, cfg, device),
                device,
                run_meta(run),
                scored.get(ensemble.scored_alike(run)),
                weights,
            )

        outcome = evaluate_claimed(store, run, task, opts, score)
        if isinstance(outcome, str):
            failed.append(f"{run.variant.name} seed {run.seed}: {outcome}")
        elif outcome is not None:
            scored[ensemble.scored_alike(run)] = {k: outcome[k] for k in ensemble.SCORES if k in outcome}
    if failed:
        raise RunsFailed("\n".join(failed))


def run_derived(
    spec: Spec, runs: list[tuple[Run, Run]], results_dir: str | Path, opts: RunOptions, cache: dict[str, Data]
) -> None:
    """Evaluate each (run, source) of ``runs`` (:func:`bench.derived.plan`) from its source's best.pt, unless another
    process holds the run; a source another process trains is waited for.  A run whose source failed is recorded as
    failed with its source's error (its training would fail the same way); one whose source is still not finished
    with its best.pt here (stopped, or lost with a dead process) is trained instead.  RunsFailed naming the runs that
    failed either way."""
    store, task, untrained, failed = RunStore(results_dir), TASKS[spec.task], [], []
    for run, source in runs:
        if store.result(source) is None and store.busy(source):
            log.info(
                f"{run.variant.name} seed {run.seed}: waiting for {source.variant.name} seed {source.seed}, which "
                "another process trains, to be evaluated from its weights"
            )
            store.wait_for(source)
        source_dir = store.path(source)
        ready = store.result(source) is not None and (source_dir / "best.pt").exists()
        source_error = None if ready else derived.failure_of(source_dir, source.key)
        if not ready and source_error is None:
            untrained.append(run)
            continue

        def score(
            cfg: Any, device: torch.device, run: Run = run, source: Run = source, error: str | None = source_error
        ):
            if error is not None:
                raise derived.SourceFailed(f"{source.variant.name} seed {source.seed} failed ({error})")
            data = load_data(cache, task, cfg, device)
            return derived.evaluate(run, source, store.path(source), store.path(run), task, data, device, run_meta(run))

        outcome = evaluate_claimed(store, run, task, opts, score)
        if isinstance(outcome, str):
            failed.append(f"{run.variant.name} seed {run.seed}: {outcome}")
    try:
        if untrained:
            run_grid(spec, untrained, results_dir, opts, cache)
    except RunsFailed as e:
        failed.append(str(e))
    if failed:
        raise RunsFailed("\n".join(failed))


def train_then_evaluate(
    spec: Spec,
    todo: list[Run],
    ensembles: list[Run],
    results_dir: str | Path,
    opts: RunOptions,
    cache: dict[str, Data],
    workers: int,
    derived_runs: list[tuple[Run, Run]] | None = None,
) -> None:
    """Train ``todo`` (``workers`` processes, or this one); then evaluate the ``derived_runs`` (run, source) from
    their sources' weights (training those whose source did not finish); then the ``ensembles`` whose members are
    finished, even when some runs failed.  RunsFailed naming every failure."""
    failed = []
    try:
        if workers > 1:
            run_workers(spec, todo, results_dir, opts, workers)
        elif todo:
            run_grid(spec, todo, results_dir, opts, cache)
    except RunsFailed as e:
        failed.append(str(e))
    try:
        run_derived(spec, derived_runs or [], results_dir, opts, cache)
    except RunsFailed as e:
        failed.append(str(e))
    try:
        run_ensembles(spec, ensembles, results_dir, opts, cache)
    except RunsFailed as e:
        failed.append(str(e))
    if failed:
        raise RunsFailed("\n".join(failed))


def _waiting_note(run: Run) -> Callable[[], None]:
    def note() -> None:
        log.info(
            f"{run.variant.name} seed {run.seed}: waiting for a free core (other bench processes on this machine "
            f"train on all of them, holding the slots in {files.core_slots_dir()}; set BENCH_CORE_SLOTS to another "
            f"folder to train beside them anyway)"
        )

    return note


def report_finished(run: Run, result: dict[str, Any], task: Any, progress: bool) -> None:
    """One line per finished run on stdout (the progress bars are on stderr), for logs and pipes."""
    m = task.metrics[0]
    trained = (
        f"evaluated from the weights of {result['trained_by']}"
        if result.get("trained_by")
        else f"{count(result['epochs_run'], 'epoch')}, {result['train_time_s']:.0f} s"
    )
    line = (
        f"done {run.spec} {run.variant.name} seed {run.seed}: "
        f"{m.label} {m.text(result['test'].get(m.key), unit=True)} (val {m.text(result['val_best'])}), {trained}"
    )
    if progress:
        tqdm.write(line, file=sys.stdout)
    else:
        print(line, flush=True)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Inside the block a SIGTERM (a scheduler's preemption, ``timeout``, ``kill``, a parent's terminate()) raises
    KeyboardInterrupt like Ctrl-C, so the run in hand is released and what resumes is said; restored afterwards."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def gpu_slots(n: int, visible: list[str]) -> list[str | None]:
    """The GPU each of ``n`` workers sees (its CUDA_VISIBLE_DEVICES): round-robin over ``visible``, so
    with more workers than GPUs several small runs share each GPU; all None with fewer than two GPUs."""
    return [visible[i % len(visible)] for i in range(n)] if len(visible) > 1 else [None] * n


def visible_gpus(opts: RunOptions) -> list[str]:
    """The GPUs workers are spread over: those this process sees, unless a device was named (cpu, cuda:N)."""
    if opts.device not in (None, "auto", "cuda") or not torch.cuda.is_available():
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (
        [g.strip() for g in given.split(",") if g.strip()]
        if given
        else [str(i) for i in range(torch.cuda.device_count())]
    )


def _worker(
    spec: Spec, runs: list[Run], results_dir: str, opts: RunOptions, gpu: str | None, verbosity: int | None = None
) -> None:
    """One worker process: the parent's way of printing messages (a spawned interpreter starts without it; None:
    the parent had none), its GPU (CUDA reads CUDA_VISIBLE_DEVICES when it starts), then the grid's loop."""
    if verbosity is not None:
        setup(verbosity)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        with sigterm_as_ctrl_c():  # the parent's terminate(): let the grid release its run
            run_grid(spec, runs, results_dir, opts, enqueue=False)
    except RunsFailed:
        sys.exit(3)  # already said, run by run; the parent reads the failures from the store
    except files.DiskFull:
        sys.exit(errno.ENOSPC)  # the parent says it, once
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(spec: Spec, runs: list[Run], results_dir: str | Path, opts: RunOptions, n: int) -> None:
    """Train ``runs`` with ``n`` processes of one thread-share each (cores // n), spread over the GPUs when there
    are several; they share the grid (kernel locks, or the study of ``opts.storage``, queued here once).
    Raises RunsFailed when runs failed, SystemExit naming the exit codes when a worker crashed."""
    threads = max(1, usable_cores() // n)
    slots = gpu_slots(n, visible_gpus(opts))
    opts = dataclasses.replace(opts, threads=threads, progress=False, device="cuda" if slots[0] else opts.device)
    log.info(f"{n} workers x {threads} threads" + (f" on GPUs {','.join(s or '' for s in slots)}" if slots[0] else ""))
    if opts.storage:
        StudyGrid(RunStore(results_dir), spec, runs, opts.storage).enqueue()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    procs = [
        ctx.Process(target=_worker, args=(spec, runs, str(results_dir), opts, gpu, verbosity()), daemon=False)
        for gpu in slots
    ]
    # The workers ignore Ctrl-C (an ignored signal stays ignored in a spawned child): the terminal sends it to
    # every process of the group, and a worker caught half-way through starting up would print a traceback.
    # This process stops them instead; each run's last completed epoch is on disk, so nothing is lost.
    default = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, default)
    # A SIGTERM (a scheduler, `timeout`, `kill`) stops the workers the same way instead of orphaning them.
    try:
        with sigterm_as_ctrl_c():
            for p in procs:
                p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join()
        raise
    codes, store = [p.exitcode for p in procs], RunStore(results_dir)
    if errno.ENOSPC in codes:
        raise files.DiskFull(Path(results_dir), shutil.disk_usage(results_dir).free)
    crashed = any(c not in (0, 3) for c in codes)
    if crashed and opts.storage and not store.todo(runs):
        note(log, f"a worker died (exit codes {codes}); the others took over its run: every run is finished")
    elif crashed:
        log.error(f"a worker failed (exit codes {codes}); its message is above")
        raise SystemExit(1)
    # From the records, not the exit codes: a worker may have failed a run that another one then finished.
    failed = failures(spec, runs, store, opts.storage)
    if failed:
        raise RunsFailed("\n".join(failed))


def failures(spec: Spec, runs: list[Run], store: RunStore, storage: StorageOptions | None) -> list[str]:
    """One line naming each run of ``runs`` that failed: its record says so (a result.json with status failed and
    the run's key), or, sharing the grid through ``storage``, its workers kept dying until --retries ran out."""
    keys = run_keys(runs)
    out = [
        f"{r.variant} seed {r.seed}: {r.error}"
        for r in store.failed(spec.group)
        if keys.get((r.variant, r.seed)) == r.key
    ]
    return out + (StudyGrid(store, spec, runs, storage).abandoned() if storage else [])
