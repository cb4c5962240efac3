"""Command line: ``python -m bench {run,summary,...}``.

YAML specs set the defaults; flags override them (``--set optim.lr=0.01``), and the
resolved config is saved beside every run's results.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Ablation benchmark harness for CNNs.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train every (variant, seed) of a spec, then rebuild results/summary.md")
    r.add_argument("spec", help="ablation spec (YAML), e.g. ablations/mnist.yaml")
    r.add_argument("--profile", help="a profile of the spec, e.g. quick")
    r.add_argument("--seeds", type=int, nargs="+", help="override the spec's seeds")
    r.add_argument("--variants", nargs="+", help="train only these variants (others keep their stored results)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every variant, e.g. --set train.epochs=2 (repeatable)")
    r.add_argument("--data-root", help="data folder (default: $BENCH_DATA, else ./data)")
    r.add_argument("--results", default="results", help="results folder (default: results)")
    r.add_argument("--device", help="cpu, cuda, cuda:N (default: the spec's train.device, auto = CUDA if present)")
    r.add_argument("--dry-run", action="store_true", help="validate the spec and list the runs; train nothing")
    r.add_argument("--no-summary", action="store_true", help="do not rebuild results/summary.md afterwards")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--workers", type=int, default=None,
                   help="train this many runs at once, each in its own process with cores/workers threads (small "
                        "CPU models use 2 cores poorly, so 2 workers nearly double a CPU grid's throughput); "
                        "default: the profile's `workers`, else 1")

    t = sub.add_parser("tune", help="search hyperparameters of a spec's variant with Optuna (validation metric only)")
    t.add_argument("spec", help="a spec path, or a name under ablations/ (mnist, warwick)")
    t.add_argument("--profile", help="a profile of the spec (its budget applies to every trial)")
    t.add_argument("--trials", type=int, help="total trials of the study (default: the spec's search.trials)")
    t.add_argument("--timeout", type=float, help="stop starting new trials after this many seconds")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--data-root")
    t.add_argument("--results", default="results")
    t.add_argument("--device")
    t.add_argument("--no-progress", action="store_true")

    # Listed for --help only: bench/predict.py parses its own arguments.
    sub.add_parser("predict", add_help=False,
                   help="classify digits or segment glands in new images with an exported ONNX model "
                        "(python -m bench predict MODEL.onnx PATH... [--out DIR])")

    s = sub.add_parser("summary", help="rebuild results/summary.md from the stored runs, without training")
    s.add_argument("--results", default="results")
    s.add_argument("--groups", nargs="+", help="only these spec groups (folder names under results/runs)")
    return p.parse_args(argv)


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import LocalStore, run_spec
    from bench.spec import load_spec
    from bench.summary import write_summary

    spec = load_spec(args.spec, args.profile, args.overrides, args.seeds)
    if args.variants:
        from bench.config import ConfigError
        from bench.registry import unknown_name_message

        names = [v.name for v in spec.variants]
        for n in args.variants:
            if n not in names:
                raise ConfigError(f"--variants: {unknown_name_message('variant', n, names)}")
        spec.variants = [v for v in spec.variants if v.name in args.variants]
    runs = spec.runs()
    store = LocalStore(Path(args.results) / "runs")
    todo = store.remaining(runs)
    print(f"{spec.path}: {len(spec.variants)} variants x {len(spec.seeds)} seeds = {len(runs)} runs, "
          f"{len(runs) - len(todo)} already done", file=sys.stderr)
    if args.dry_run:
        for run in runs:
            print(f"{'done' if run not in todo else 'todo'}  {run.rel_dir}  key={run.key}  {run.variant.change}")
        return 0
    workers = args.workers or spec.workers
    if workers > 1 and todo:
        from bench.runner import check_data

        check_data(spec, args.data_root)  # broken data: one message from here, not one per worker
        run_workers(args, min(workers, len(todo)))
    else:
        run_spec(spec, args.results, args.data_root, args.device, progress=not args.no_progress)
    if not args.no_summary:
        path = write_summary(args.results, command="python -m bench " + " ".join(sys.argv[1:]))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def run_workers(args: argparse.Namespace, n: int) -> None:
    """Start ``n`` copies of this command with ``--workers 1``; they share the grid through
    the run store's per-run locks (see bench.runner.LocalStore.claim)."""
    import os
    import subprocess

    threads = max(1, (os.cpu_count() or 1) // n)
    child = [sys.executable, "-m", "bench", "run", args.spec, "--results", args.results, "--workers", "1",
             "--no-summary", "--no-progress"]
    for flag, value in (("--profile", args.profile), ("--data-root", args.data_root), ("--device", args.device)):
        child += [flag, value] if value else []
    child += ["--seeds", *map(str, args.seeds)] if args.seeds else []
    child += ["--variants", *args.variants] if args.variants else []
    for item in [*args.overrides, f"train.threads={threads}"]:
        child += ["--set", item]
    print(f"{n} workers x {threads} threads", file=sys.stderr)
    procs = [subprocess.Popen(child) for _ in range(n)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes})")


def cmd_tune(args: argparse.Namespace) -> int:
    from bench.spec import load_spec
    from bench.tune import resolve_spec_path, tune

    spec = load_spec(resolve_spec_path(args.spec), args.profile, args.overrides)
    best = tune(spec, args.results, args.data_root, args.device, args.trials, args.timeout, progress=not args.no_progress)
    print(f"best validation {best['metric']}: {best['value']:.4f} after {best['trials']} trials "
          f"({best['pruned']} pruned); params: {best['params']}")
    print(f"wrote {Path(args.results) / 'optuna' / (spec.group + '-best.yaml')}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from bench.summary import write_summary

    print(f"wrote {write_summary(args.results, groups=args.groups)}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:  # exit codes: 0 all done, 1 some image failed or none found, 2 usage error
        from exporters.predict import main as predict_main

        return predict_main(argv[1:])
    args = _parse_args(argv)
    handlers = {"run": cmd_run, "tune": cmd_tune, "summary": cmd_summary}
    try:
        return handlers[args.command](args)
    except ValueError as e:
        # Spec and data errors are user errors: their message names the file and the key or
        # file at fault, so a traceback would only hide it.  Anything else is a bug: re-raise.
        from bench.config import ConfigError
        from bench.tasks.base import DataError

        if isinstance(e, (ConfigError, DataError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
