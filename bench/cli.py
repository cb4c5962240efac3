"""Command line: ``python -m bench {run,tune,perf,summary,rescore,reproduce,predict}``.

YAML specs set the defaults; flags override them (``--set optim.lr=0.01``), and the
resolved config is saved beside every run's results.  User errors (a bad spec, a bad
flag, broken data, a device this machine lacks) end with one ``error:`` line and exit
status 2 before anything is trained or written; Ctrl-C ends with one line saying how to resume.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path

import bench.log
from bench import __version__, honour_nice, usable_cores
from bench.log import count, first_line, note

if typing.TYPE_CHECKING:  # the hints only: the command line imports what a command needs when it runs
    from bench.runner import RunOptions
    from bench.spec import Run, Spec
    from bench.store import RunStore
    from bench.tasks.base import Data
    from bench.tracking import Tracker

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = bench.log.ArgumentParser(prog="python -m bench", description="Ablation benchmark harness for CNNs.")
    p.add_argument("--version", action="version", version=f"bench {__version__}")
    bench.log.add_options(p)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train every (variant, seed) of a spec, then rebuild results/summary.md")
    r.add_argument("spec", help="ablation spec: a YAML path, or a name under ablations/ (mnist, warwick)")
    _spec_options(r)
    r.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="train only these variants (the group's table still covers the whole spec and profile)",
    )
    r.add_argument(
        "--group",
        help="put the runs in this group (folder under results/runs) instead of the one chosen "
        "for them; runs with --set overrides never go to the published group",
    )
    r.add_argument(
        "--workers",
        type=int,
        default=None,
        help="train this many runs at once, each in its own process with cores/workers threads (small "
        "CPU models use 2 cores poorly, and one small run leaves a big GPU idle); default: the "
        "profile's `workers`, else measured (the split of the CPU cores that trains fastest; on a "
        "GPU, as many runs as fit in its free memory)",
    )
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="check the spec's keys and list the runs and their group; where the data is here, also build each "
        "variant still to train and run it on two training images, as a real run does first; train and write nothing",
    )
    r.add_argument("--no-summary", action="store_true", help="do not rebuild the summary afterwards")

    t = sub.add_parser("tune", help="search hyperparameters of a spec's variant with Optuna (validation metric only)")
    t.add_argument("spec", help="ablation spec with a `search:` section: a YAML path, or a name under ablations/")
    _spec_options(t)
    t.add_argument("--trials", type=int, help="total trials of the study (default: the spec's search.trials)")
    t.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    t.add_argument(
        "--objectives",
        metavar="A,B",
        help="what the study optimizes, comma-separated: val_metric and any of train_seconds (the harness's "
        "measured training time on this machine), params, flops (per image); two or more: a "
        "multi-objective study whose Pareto front is written as a table and a figure (default: the "
        "spec's search.objectives, else val_metric)",
    )
    t.add_argument(
        "--rung",
        metavar="NAME",
        help="make a trial of the study a rung NAME of the spec (into the file its search.rungs names), "
        "which `bench run` trains: with --trial N that trial of the Pareto front (nothing is trained), "
        "else the best trial of a single-objective study once the study is done",
    )
    t.add_argument("--trial", type=int, metavar="N", help="with --rung: the trial (its number in the Pareto table)")

    f = sub.add_parser(
        "perf",
        help="time the fast rung to the report's numbers against a textbook loop of the "
        "report's recipe; write results/perf.md",
        description="Time to quality on each task: its fast rung toward the spec's target, and where a task has one, "
        "a stretch rung toward a further target (FAST_RUNG and STRETCH in bench/perf.py name them), on "
        "validation and on test at the end of each recipe; the training throughput and its share of the matmul peak; "
        "the report's recipe in a textbook loop as the reference; the speed choices. Writes results/perf.md and "
        "perf.csv; docs/speed.md says what each number is.",
    )
    f.add_argument(
        "--task",
        choices=["mnist", "warwick"],
        action="append",
        help="measure this task only (repeatable; default: both)",
    )
    f.add_argument(
        "--quick",
        action="store_true",
        help="time the reference over a fixed number of steps and extrapolate (MNIST alone: under 10 minutes on a "
        "2-core CPU)",
    )
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED", help="seeds of each timed rung")
    f.add_argument("--compile", action="store_true", help="also time torch.compile (and CUDA graphs on a GPU)")
    f.add_argument(
        "--grid",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time one epoch of every run of each full spec, sequential vs concurrent workers "
        "(default: on a GPU only)",
    )
    f.add_argument("--data-root", help="data folder (default: $BENCH_DATA, else ./data)")
    f.add_argument("--results", default="results", help="results folder (default: results)")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    f.add_argument("--threads", type=int, help="torch threads for every measurement (default: all cores)")

    # Listed for --help only: exporters/predict.py parses its own arguments.
    sub.add_parser(
        "predict",
        add_help=False,
        help="classify digits or segment glands in new images with an exported ONNX model "
        "(python -m bench predict MODEL.onnx PATH... [--out DIR]; --help for more)",
    )

    s = sub.add_parser("summary", help="rebuild results/summary.md (and ad-hoc groups' summaries) from the stored runs")
    s.add_argument("--results", default="results", help="results folder (default: results)")

    c = sub.add_parser(
        "rescore",
        help="score a group's stored runs again from their best.pt with today's evaluation "
        "and metric code (no training), then rebuild its table",
    )
    c.add_argument(
        "group",
        metavar="GROUP|SPEC",
        help="a group under <results>/runs (mnist@quick), or a spec (a YAML path "
        "or a name under ablations/) whose published group is meant",
    )
    c.add_argument("--profile", help="with a spec: its profile, e.g. quick")
    c.add_argument("--results", default="results", help="results folder (default: results)")
    c.add_argument(
        "--data-root", help="data folder (default: $BENCH_DATA, else the runs' own; a folder task's runs: their own)"
    )

    x = sub.add_parser(
        "reproduce",
        help="re-train a group's recorded runs in a temporary folder and compare their test "
        "metric with the record; exit 1 when one is off by more than the tolerance",
    )
    x.add_argument("group", help="a group under <results>/runs, e.g. mnist@quick or warwick")
    x.add_argument("--variants", nargs="+", metavar="NAME", help="only these variants (default: every finished run)")
    x.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="only these seeds")
    x.add_argument("--results", default="results", help="results folder holding the group (default: results)")
    x.add_argument(
        "--data-root", help="data folder (default: the recorded one where it exists, else $BENCH_DATA, else ./data)"
    )
    x.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the recorded train.device)")
    x.add_argument(
        "--tolerance",
        type=float,
        metavar="X",
        help="largest |new - recorded| allowed, in the metric's own units (0.005 = half a point of "
        "accuracy); default: max(3 x sqrt(2) x the rung's seed std, 0.01)",
    )
    x.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, command in sub.choices.items():
        if name != "predict":  # predict parses its own arguments
            bench.log.add_options(command, argparse.SUPPRESS)  # on either side of the command's name
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    args, unknown = build_parser().parse_known_args(argv)
    # a value's error names the subcommand, like argparse's own
    p = bench.log.ArgumentParser(prog=f"python -m bench {args.command}")
    if unknown:  # argparse would blame the top-level parser
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "workers", None) is not None and args.workers < 1:
        p.error(f"--workers: must be >= 1, got {args.workers}")
    if args.command == "perf" and any(s < 0 for s in args.seeds):
        p.error(f"--seeds: must be >= 0, got {args.seeds}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        p.error(f"--threads: must be >= 1, got {args.threads}")
    for flag in ("heartbeat", "grace_period"):
        if getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    if getattr(args, "retries", 0) < 0:
        p.error(f"--retries: must be >= 0, got {args.retries}")
    if getattr(args, "tolerance", None) is not None and not args.tolerance >= 0:
        p.error(f"--tolerance: must be >= 0, got {args.tolerance}")
    if getattr(args, "trials", None) is not None and args.trials < 1:
        p.error(f"--trials: must be >= 1, got {args.trials}")
    if getattr(args, "trial", None) is not None and not args.rung:
        p.error("--trial N: needs --rung NAME (the rung the trial becomes)")
    return args


def _spec_options(p: argparse.ArgumentParser) -> None:
    """The options ``run`` and ``tune`` share."""
    p.add_argument("--profile", help="a profile of the spec, e.g. quick (its budget applies to every run)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="override the spec's seeds")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every variant, e.g. --set train.epochs=2 (repeatable); such runs "
        "go to an ad-hoc group of their own",
    )
    p.add_argument(
        "--data-root",
        help="data folder: MNIST/raw and WARWICK/, or a folder task's own data "
        "(default: $BENCH_DATA, else ./data; a spec's data.root wins)",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch missing MNIST files into the data root (done anyway when it is the default ./data)",
    )
    p.add_argument("--results", default="results", help="results folder (default: results)")
    p.add_argument(
        "--device", help="auto, cpu, cuda or cuda:N (default: the spec's train.device, auto = CUDA if present)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars; one line per finished run still goes to stdout"
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("BENCH_STORAGE") or None,
        metavar="URL",
        help="share the work with every process started with the same URL and results folder, on any machine: "
        "a database for Optuna (postgresql://USER[:PASSWORD]@HOST[:PORT]/DB; sqlite:///PATH on one "
        "machine); default: $BENCH_STORAGE, else this machine alone (run: kernel locks; tune: "
        "<results>/optuna/<spec name>[@profile].db)",
    )
    m = p.add_mutually_exclusive_group()
    m.add_argument(
        "--mlflow",
        nargs="?",
        const=True,
        default=None,
        metavar="URI",
        help="log every finished run to MLflow (params, tags, per-epoch metrics, test metrics, curves): to URI "
        "(sqlite:///PATH.db, http(s)://HOST:PORT, a database URL), or without one to "
        "sqlite:///<results>/mlflow.db; needs the extra: pip install -e '.[mlflow]' (default: the spec's "
        "`tracking:` section, else off)",
    )
    m.add_argument(
        "--no-mlflow", action="store_true", help="do not log to MLflow, whatever the spec's `tracking:` says"
    )
    p.add_argument(
        "--heartbeat",
        type=int,
        default=10,
        metavar="S",
        help="with --storage: seconds between a worker's heartbeats (default: 10)",
    )
    p.add_argument(
        "--grace-period",
        type=int,
        default=60,
        metavar="S",
        help="with --storage: seconds without a heartbeat after which a worker counts as dead and its run "
        "is queued again, to resume from its last epoch (default: 60)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="with --storage: times a dead worker's run is queued again (default: 2; a run that fails by "
        "itself is recorded as failed and not retried)",
    )


def _load(args: argparse.Namespace):  # -> (the group's spec, the seeds asked for, RunOptions, download, Tracker | None)
    """The spec placed in the group its runs belong to, how to run them, and where to log them (MLflow)."""
    from bench.runner import RunOptions, resolve_data_root
    from bench.spec import load_spec, place_in_group, resolve_spec_path, split_overrides
    from bench.train import resolve_device

    path = resolve_spec_path(args.spec)
    config_items, runtime = split_overrides(args.overrides)
    published = load_spec(path, args.profile)
    only = getattr(args, "variants", None)
    published.variant_names(only or [])
    asked = load_spec(path, args.profile, config_items, args.seeds, only)
    wanted = [v.name for v in published.variants if not only or v.name in only]
    left_out = [name for name in wanted if name not in {a.name for a in asked.variants}]
    if left_out:
        note(log, f"--set does not fit {', '.join(left_out)}: left out of this experiment's group")
    group = place_in_group(asked, published, getattr(args, "group", None))
    device = args.device or runtime.get("device")
    if device:
        resolve_device(device)  # a device this machine lacks is an error now, not after loading the data
    root, default_root = resolve_data_root(args.data_root or runtime.get("data_root"))
    log.debug(
        f"data root {root}{' (the default)' if default_root else ''}, results {Path(args.results).resolve()}, "
        f"device {device or 'train.device of each run'}"
    )
    _check_results_folder(Path(args.results))
    tracker = _tracker(args, group.mlflow, f"{path}: tracking.mlflow")
    if tracker:  # before --storage is opened (which creates Optuna's tables) and before MLflow creates its own
        tracker.check_own_database(args.storage)
    opts = RunOptions(
        root,
        device,
        runtime.get("threads"),
        not args.no_progress,
        runtime.get("channels_last"),
        runtime.get("compile"),
        _storage(args),
        after_run=(tracker,) if tracker else (),
    )
    return group, asked.seeds, opts, args.download or default_root, tracker


def _tracker(args: argparse.Namespace, spec_value: bool | str | None = None, spec_where: str = ""):  # -> Tracker | None
    """The MLflow tracker that --mlflow [URI] (else the spec's ``tracking.mlflow``) asks for; None when off.  Checks
    that mlflow is installed and that the URI is one it can write to, without connecting yet."""
    from bench.tracking import Tracker, mlflow_uri

    if getattr(args, "no_mlflow", False):
        return None
    given = args.mlflow is not None
    uri = mlflow_uri(args.mlflow if given else spec_value, args.results, "--mlflow" if given else spec_where)
    return Tracker.for_uri(uri, args.results) if uri else None


def _storage(args: argparse.Namespace, default_url: str = ""):  # -> StorageOptions | None
    """--storage (else ``default_url``; None when both are empty) with the heartbeat flags, checked by
    connecting to it now: a wrong URL is one error before any data is read."""
    from bench.storage import StorageOptions, open_storage

    if not (args.storage or default_url):
        return None
    opts = StorageOptions(args.storage or default_url, args.heartbeat, args.grace_period, args.retries)
    if args.storage:
        open_storage(opts)
    return opts


def _check_results_folder(path: Path) -> None:
    from bench.config import ConfigError

    if path.exists() and not path.is_dir():
        raise ConfigError(f"--results {path}: not a folder")


def cmd_run(args: argparse.Namespace) -> int:
    from bench import derived
    from bench.runner import RunsFailed, check_members, preflight, sigterm_as_ctrl_c, train_then_evaluate
    from bench.store import RunStore

    spec, seeds, opts, download, tracker = _load(args)  # --variants checked there
    runs = [r for r in spec.runs(args.variants) if r.seed in seeds]
    store = RunStore(args.results)
    store.check_owner(spec)
    todo = store.todo(runs)
    twins = [(r, twin) for r in todo if (twin := store.twin(r)) is not None]
    todo = [r for r in todo if all(r is not t for t, _ in twins)]
    # (run, source): evaluated from the source's best.pt, or trained as its source's best.pt is not here
    from_weights, without_weights = derived.plan(todo, spec.runs(), store, [r for r, _ in twins])
    _say_plan(spec, runs, todo + [r for r, _ in twins], len(seeds))
    if from_weights or without_weights:
        _say_derived(from_weights, without_weights, args.dry_run)
    if args.dry_run:
        if twins:
            _say_twins(store, twins, copied=False)
        if todo:
            _try_what_is_todo(spec, todo, opts, download)
        _dry_run(runs, todo + [r for r, _ in twins], store)
        return 0
    check_members(todo + [r for r, _ in twins], store)  # (a twin is copied before any ensemble is made)
    ensembles = [r for r in todo if r.members]  # they train nothing, nor do the runs evaluated from others' weights
    todo = [r for r in todo if not r.members]
    cache = preflight(spec, todo, opts, download) if todo else {}  # (a run evaluated from weights is checked too)
    todo = [r for r in todo if all(r is not d for d, _ in from_weights)]
    if tracker:  # the last check: connect, and make the group's parent run before workers start
        from bench.tracking import group_meta

        tracker.check([group_meta(spec)])
    _write_group(spec, store, args, opts)
    for run, twin in twins:
        store.copy_twin(run, twin)
    if twins:
        _say_twins(store, twins, copied=True)
    workers = _workers(spec, todo, opts, cache, args.workers)
    failed = None
    try:
        with sigterm_as_ctrl_c():  # Slurm's preemption ends like Ctrl-C: the run in hand is released at once
            train_then_evaluate(spec, todo, ensembles, args.results, opts, cache, workers, from_weights)
    except RunsFailed as e:
        failed = str(e).splitlines()
    except KeyboardInterrupt:
        _say_interrupted(todo + [r for r, _ in from_weights], store)
        return EXIT_INTERRUPTED
    if tracker:  # runs finished before (without --mlflow, or whose logging failed) are logged now
        _log_to_mlflow(tracker, spec, store, runs)
    if not args.no_summary:
        _write_summary(args.results, spec.group)
    return _say_failed(failed) if failed else 0


def _say_plan(spec: Spec, runs: list[Run], todo: list[Run], seeds: int) -> None:
    role = f"ad-hoc group {spec.group}" if spec.adhoc else f"published group {spec.group}"
    log.info(
        f"{spec.path}: {role}; {count(len({r.variant.name for r in runs}), 'variant')} x "
        f"{count(seeds, 'seed')} = {count(len(runs), 'run')}, {len(runs) - len(todo)} already done"
    )


def _say_twins(store: RunStore, twins: list[tuple[Run, Path]], copied: bool) -> None:
    """Name the runs that another group already finished with the same key: ``copied`` here, or (a dry run) to be."""
    note(
        log,
        "%s: the same config and seed, already finished in another group (%s): %s, not trained again",
        ", ".join(f"{r.variant.name} seed {r.seed}" for r, _ in twins),
        ", ".join(sorted({t.relative_to(store.root).parts[0] for _, t in twins})),
        "copied" if copied else "a real run copies them",
    )


def _say_derived(evaluated: list[tuple[Run, Run]], trained: list[tuple[Run, Run]], dry_run: bool) -> None:
    """Name the runs evaluated from another run's weights instead of trained (``bench/derived.py``), and those trained
    because that run's best.pt is not here."""
    from bench.derived import post_training_keys

    def pairs(runs: list[tuple[Run, Run]]) -> str:
        return ", ".join(f"{r.variant.name} seed {r.seed} from {s.variant.name} seed {s.seed}" for r, s in runs)

    if evaluated:
        note(
            log,
            f"{'to be ' if dry_run else ''}evaluated from another run's weights, not trained "
            f"({post_training_keys()} acts only after training): {pairs(evaluated)}",
        )
    if trained:
        note(
            log,
            f"trained although only {post_training_keys()} sets them apart, as the best.pt of the run they would be "
            f"evaluated from is not here (checkpoints are not in git): {pairs(trained)}",
        )


def _log_to_mlflow(tracker: Tracker, spec: Spec, store: RunStore, runs: list[Run]) -> None:
    logged = tracker.log_dirs([store.path(r) for r in runs if store.result(r) is not None])
    log.info(f"MLflow: {count(len(logged), 'run')} of {spec.group} in {_shown_uri(tracker.uri)}")


def _try_what_is_todo(spec: Spec, todo: list[Run], opts: RunOptions, download: bool) -> None:
    """A dry run trains nothing, but where the data is here it builds each variant still to train and runs it on two
    training images, as a real run does first: a config that cannot run stops the plan now, not hours into the grid.
    Without the data (a clone that plans from its records) it warns, builds nothing and still lists the runs."""
    from bench.runner import preflight
    from bench.tasks import TASKS
    from bench.tasks.base import DataError

    try:
        TASKS[spec.task].prepare(Path(opts.data_root), download=False)
    except DataError as e:
        if download:  # the default root: a real run fetches what it can (MNIST) first
            note(log, f"{first_line(e)} (a run without --dry-run first tries to fetch it there)")
        else:
            log.warning(f"{first_line(e)} (a run without --dry-run stops here)")
        return
    preflight(spec, [r for r in todo if not r.members], opts, test=False)


def _dry_run(runs: list[Run], todo: list[Run], store: RunStore) -> None:
    """Print each run (todo or done, its folder, key and change), and note the finished members to be re-trained."""
    from bench.runner import RETRAINED, members_to_retrain

    for run in runs:
        print(f"{'todo' if run in todo else 'done'}  {run.rel_dir}  key={run.key}  {run.variant.change}")
    for member, ensembles in members_to_retrain(runs, store):
        note(
            log,
            "%s seed %d is finished but its best.pt is not here (checkpoints are not in git): it will be "
            "re-trained from its record into %s for %s",
            member.variant.name,
            member.seed,
            store.results / RETRAINED,
            ", ".join(f"{e.variant.name} seed {e.seed}" for e in ensembles),
        )


def _write_group(spec: Spec, store: RunStore, args: argparse.Namespace, opts: RunOptions) -> None:
    """The group's definition: its whole scope, whatever subset this command trains; a data root given on the command
    line too, so that the summary's command for the group runs as recorded.
    (Only for a task that reads a data set of its own: MNIST and WARWICK are found wherever $BENCH_DATA says.)"""
    from bench.tasks import TASKS

    own_data = bool(TASKS[spec.task].data_keys)
    store.write_group(
        spec,
        **({"data_root": opts.data_root} if args.data_root and own_data else {}),
        **({"results": args.results} if Path(args.results) != Path("results") else {}),
    )


def _workers(spec: Spec, todo: list[Run], opts: RunOptions, cache: dict[str, Data], asked: int | None) -> int:
    """How many runs train at once: --workers, the spec's, or measured (and said so); never more than the runs."""
    from bench.workers import grid_workers

    workers = asked or spec.workers
    if workers is None and len(todo) > 1:
        workers, why = grid_workers(spec, todo, opts, cache)
        log.info(f"{count(workers, 'worker')} at once, measured ({why}); --workers N to choose")
    return min(workers or 1, max(1, len(todo)))


def _say_interrupted(todo: list[Run], store: RunStore) -> None:
    started = [
        f"{r.variant.name} seed {r.seed} from epoch {store.epochs_done(r) + 1}"
        for r in todo
        if store.result(r) is None and store.epochs_done(r)
    ]
    log.info("interrupted; run the same command to resume" + (f" ({'; '.join(started)})" if started else ""))


def _write_summary(results: str, group: str) -> None:
    from bench.summary import write_summary

    for path in write_summary(results, _command(), groups=[group]):
        log.info(f"wrote {path}")


def _say_failed(failed: list[str]) -> int:
    """Say which runs failed; the exit status 1."""
    log.error(
        f"{count(len(failed), 'run')} failed (recorded in their result.json; fix the cause and run the "
        f"same command to try them again):"
    )
    for line in failed:
        log.error(f"  {line}")
    return 1


def cmd_tune(args: argparse.Namespace) -> int:
    from bench.config import ConfigError
    from bench.runner import sigterm_as_ctrl_c
    from bench.spec import check_objectives
    from bench.tasks import TASKS
    from bench.tune import TrialsFailing, check_rung, make_rung, study_file, tune

    spec, seeds, opts, download, tracker = _load(args)
    if spec.search is None:
        raise ConfigError(f"{spec.path}: no 'search:' section; add one to tune this spec (see docs/tuning.md)")
    objectives = (
        check_objectives([o.strip() for o in args.objectives.split(",")], "--objectives")
        if args.objectives
        else spec.search["objectives"]
    )
    # Without --storage, the study's own SQLite file, with the same heartbeats (a killed tune's trial is retried).
    storage = opts.storage or _storage(args, f"sqlite:///{study_file(args.results, spec).resolve()}")
    if args.rung:  # before anything is trained: a name the spec cannot take, or a study without one best trial
        check_rung(spec, args.rung)
        if args.trial is None and len(objectives) > 1:
            raise ConfigError(
                f"--rung {args.rung}: a study of several objectives has no single best trial; add "
                f"--trial N with a trial of its Pareto front (see its table)"
            )
    if args.trial is not None:  # a trial of a study already run becomes a rung: nothing to train
        print(f"wrote {make_rung(spec, seeds[0], storage, objectives, args.rung, args.trial)} (variant {args.rung})")
        return 0
    if tracker:  # a server or database is reached now; a new SQLite file is made by the first trial, not before
        tracker.check_own_database(storage.url)
        tracker.check(create=False)
    try:
        with sigterm_as_ctrl_c():  # preemption ends like Ctrl-C: the trial is queued again
            best = tune(
                spec, seeds[0], args.results, opts, args.trials, args.timeout, download, storage, objectives=objectives
            )
    except KeyboardInterrupt as e:
        log.info(f"interrupted; run the same command to resume{f' ({e})' if str(e) else ''}")
        return EXIT_INTERRUPTED
    except TrialsFailing as e:
        log.error(str(e))
        return 1
    if tracker:  # trials finished before (without --mlflow, or whose logging failed) are logged now
        from bench.store import RunStore

        store = RunStore(args.results)
        for group in store.groups("study"):
            if store.read_group(group).extra.get("study") == best["study"]:
                n = tracker.log_group(args.results, group)
                log.info(f"MLflow: {count(n, 'trial')} of study {best['study']} in {_shown_uri(tracker.uri)}")
    if "front" in best:
        _print_front(best)
    elif best["value"] is None:
        print(
            f"no trial has completed yet ({best['trials']} finished, {best['pruned']} of them pruned, "
            f"{best['failed']} failed)"
        )
    else:
        metric = TASKS[spec.task].metrics[0]
        print(
            f"best {best['metric']}: {metric.text(best['value'], unit=True)} after {best['trials']} finished trials "
            f"({best['pruned']} pruned, {best['failed']} failed{_requeued(best['requeued'])}); "
            f"params: {best['params']}"
        )
    for reason, n in best["failures"].items():
        print(f"  failed {n}x: {reason}")
    for path in best["written"]:
        print(f"wrote {path}")
    if args.rung and best["value"] is not None:
        print(f"wrote {make_rung(spec, seeds[0], storage, objectives, args.rung, None)} (variant {args.rung})")
    return 0


def _print_front(best: dict[str, typing.Any]) -> None:
    """A multi-objective study's outcome: its Pareto table (the file's own text), or why there is none."""
    print(
        f"{best['trials']} finished trials ({best['failed']} failed{_requeued(best['requeued'])}) of "
        f"{', '.join(best['objectives'])}: "
        + (f"{len(best['front'])} on the Pareto front" if best["front"] else "none complete yet, so no Pareto front")
    )
    if best["front"]:
        print("\n".join(line for line in Path(best["written"][0]).read_text().splitlines() if line.startswith("|")))


def cmd_perf(args: argparse.Namespace) -> int:

    from bench.perf import run_perf
    from bench.runner import resolve_data_root
    from bench.summary import write_summary
    from bench.tasks import TASKS
    from bench.train import resolve_device

    device = resolve_device(args.device)
    root, _ = resolve_data_root(args.data_root)
    _check_results_folder(Path(args.results))
    tasks = list(dict.fromkeys(args.task or ["mnist", "warwick"]))
    for t in tasks:
        TASKS[t].prepare(Path(root), download=False)
    for path in run_perf(
        tasks,
        args.quick,
        args.results,
        root,
        device,
        args.threads or usable_cores(),
        args.seeds,
        args.compile,
        "python -m bench " + " ".join(sys.argv[1:]),
        args.grid,
    ):
        log.info(f"wrote {path}")
    if (Path(args.results) / "summary.md").exists():
        # the summary's link to perf.md (no table is rebuilt)
        for path in write_summary(args.results, groups=[], refresh_published=True):
            log.info(f"wrote {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from bench.config import ConfigError
    from bench.summary import write_summary

    results = Path(args.results)
    if not (results / "runs").is_dir() and not (results / "summary.md").is_file():
        raise ConfigError(f"--results {results}: no runs and no summary.md there; nothing to rebuild")
    written = write_summary(args.results)
    for path in written:
        log.info(f"wrote {path}")
    if not written:
        log.info(f"{results}: every table is what its stored runs give; no file changed")
    return 0


def cmd_rescore(args: argparse.Namespace) -> int:
    from bench.config import ConfigError
    from bench.rescore import rescore_group
    from bench.summary import write_summary

    group = _group_named(args.group, args.profile, Path(args.results))
    done = rescore_group(args.results, group, args.data_root)
    if not done:
        raise ConfigError(f"{group}: no finished runs under {Path(args.results) / 'runs' / group}")
    missing = [r.run for r in done if r.new is None]
    for path in write_summary(args.results, groups=[group]):
        log.info(f"wrote {path}")
    changed = sum(r.changed for r in done)
    print(f"{group}: {count(len(done) - len(missing), 'run')} rescored, {changed} with new metrics")
    if missing:  # checkpoints are not in git: only runs trained in this results folder have one
        log.error(
            f"{count(len(missing), 'run')} of {group} kept their old numbers: no best.pt here (checkpoints "
            f"are not in git: only the results folder that trained a run can rescore it): "
            + ", ".join(f"{r.variant} seed {r.seed}" for r in missing)
        )
        return 1
    return 0


def _group_named(name: str, profile: str | None, results: Path) -> str:
    """The group that ``name`` means: a group folder under ``results/runs``, else a spec's published group."""
    from bench.config import ConfigError
    from bench.spec import load_spec, resolve_spec_path
    from bench.store import RunStore

    store = RunStore(results)
    if profile is None and name in store.groups():
        return name
    try:
        group = load_spec(resolve_spec_path(name), profile).published_group
    except ConfigError as e:
        raise ConfigError(
            f"{name}: neither a group under {store.root} ({', '.join(store.groups()) or 'none'}) "
            f"nor a spec ({bench.log.first_line(e)})"
        ) from None
    if group not in store.groups():
        raise ConfigError(f"{name}: its group {group} has no runs under {store.root}")
    return group


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bench.reproduce import reproduce

    _check_results_folder(Path(args.results))
    rows = reproduce(
        args.results,
        args.group,
        args.variants,
        args.seeds,
        args.data_root,
        args.tolerance,
        args.device,
        not args.no_progress,
    )
    return 0 if all(r.ok for r in rows) else 1


def _command() -> str:
    """This command line for the summary's provenance, with a storage URL's password hidden."""
    from bench.storage import shown

    return shown("python -m bench " + " ".join(sys.argv[1:]))


def _shown_uri(uri: str) -> str:
    """A tracking URI for messages: its password hidden; for a SQLite file, how to browse it."""
    from bench.storage import shown

    return shown(uri) + (f" (browse: mlflow ui --backend-store-uri {uri})" if uri.startswith("sqlite:") else "")


def _requeued(n: int) -> str:
    return f", {n} requeued (stopped by Ctrl-C or a dead worker, then resumed)" if n else ""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    lead = next((i for i, a in enumerate(argv) if a not in bench.log.FLAGS), len(argv))  # -q/-v before the command
    bench.log.setup(bench.log.FLAGS[argv[lead - 1]] if lead else 0)  # an argument error is said through it too
    if argv[lead : lead + 1] == ["predict"]:  # exit codes: 0 all done, 1 some image failed or none found, 2 usage error
        # Imported here: the CLI is the only part of `bench` that reaches into `exporters`, and only for this
        # command (onnxruntime is not loaded for the others).
        from exporters.predict import main as predict_main

        return predict_main(argv[:lead] + argv[lead + 1 :])  # -q/-v before its name count as after it
    args = _parse_args(argv)
    bench.log.setup(args.verbosity)
    if (nice := honour_nice()) is not None:  # `nice -n 19` in a background session: after foreground work
        note(log, f"nice {nice} in a background session: its scheduling group (Linux autogroup) got nice {nice} too")
    handlers = {
        "run": cmd_run,
        "tune": cmd_tune,
        "summary": cmd_summary,
        "perf": cmd_perf,
        "rescore": cmd_rescore,
        "reproduce": cmd_reproduce,
    }
    # Imported after parsing: --help and --version answer without loading torch.
    from bench.config import ConfigError
    from bench.registry import UnknownName
    from bench.tasks.base import DataError

    try:
        return handlers[args.command](args)
    except (
        ConfigError,
        DataError,
        UnknownName,
    ) as e:  # UnknownName: a stored run's task or model that no longer imports
        # User errors: their message names the file and the key or file at fault, so a traceback would only hide it.
        for line in str(e).splitlines():  # one `error:` line per problem (a data check lists every broken file)
            log.error(line)
        return EXIT_USAGE
    except OSError as e:  # the machine's answer (permissions, a full disk, a file where a folder should be)
        log.error(str(e))
        return 1
    except KeyboardInterrupt:
        log.info("interrupted")
        return EXIT_INTERRUPTED
