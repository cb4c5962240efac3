"""Which Optuna sampler a small multi-objective study should use: TPE or NSGA-II, measured.

    PYTHONPATH=. python scripts/mo_sampler.py [--trials 12] [--seeds 0 100 200] [--data-root DIR]

Runs ``bench tune`` (in this process, each in a fresh temporary results folder) on a tiny MNIST spec (2 epochs on
1,000 images) over a shape-and-optimizer space, with objectives validation accuracy and FLOPs per image (a cost that
does not depend on the machine's load, so the comparison measures the samplers, not the noise), once per sampler and
seed; prints the hypervolume of each study's Pareto front after every few trials (accuracy times the share of the
space's largest FLOPs left unspent: 1.0 would be 100 % at no cost), mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml

import bench.tune
from bench.cli import main as bench_main
from bench.factories import build_model
from bench.models import count_flops
from bench.spec import load_spec

WIDTHS = [[4, 4, 8, 8, 8], [8, 8, 16, 16, 16], [16, 16, 32, 32, 32], [16, 32, 32, 64, 64]]
SPEC = {
    "name": "mo-sampler",
    "task": "mnist",
    "seeds": [0],
    "base": {
        "model": {"name": "mnist_cnn", "batch_norm": True, "dropout": 0.1, "widths": WIDTHS[1], "hidden": 64},
        "optim": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01},
        "sched": {"name": "onecycle"},
        "loss": {"name": "ce"},
        "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 2500, "threads": 1},
        "data": {"train_subset": 1000, "val_fraction": 0.02},
    },
    "variants": [{"name": "a"}],
    "search": {
        "variant": "a",
        "objectives": ["val_metric", "flops"],
        "space": {
            "optim.lr": {"low": 3.0e-4, "high": 3.0e-2, "log": True},
            "model.widths": {"choices": WIDTHS},
            "model.hidden": {"low": 32, "high": 256, "step": 32},
            "train.batch_size": {"choices": [32, 64, 128]},
        },
    },
}
SAMPLERS = {
    "TPE (Optuna's defaults: 10 random trials first)": lambda s, _: optuna.samplers.TPESampler(
        seed=s, constant_liar=True
    ),
    "TPE, 4 random trials first": lambda s, _: optuna.samplers.TPESampler(
        seed=s, n_startup_trials=4, constant_liar=True
    ),
    "NSGA-II, population 4": lambda s, _: optuna.samplers.NSGAIISampler(seed=s, population_size=4),
}


def hypervolume(points: list[tuple[float, float]], most_flops: float) -> float:
    """Area that the (accuracy, flops) points dominate above accuracy 0 and below ``most_flops`` (flops scaled to 1)."""
    area, best = 0.0, 0.0
    pts = sorted((f / most_flops, a) for a, f in points)
    for (c, a), nxt in zip(pts, [p[0] for p in pts[1:]] + [1.0], strict=True):
        best = max(best, a)
        area += best * (nxt - c)
    return area


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 100, 200])  # far apart: trial k samples with seed+k
    p.add_argument("--data-root", default=None)
    args = p.parse_args()
    checkpoints = sorted({max(1, args.trials // 3), 2 * args.trials // 3, args.trials})
    hv: dict[str, list[list[float]]] = {name: [] for name in SAMPLERS}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mo-sampler.yaml"
        path.write_text(yaml.safe_dump(SPEC, sort_keys=False))
        cfg = load_spec(path).variants[0].config
        biggest = cfg.copy(model={**cfg.model, "widths": WIDTHS[-1], "hidden": 256})
        most = count_flops(build_model(biggest, in_channels=1, num_classes=10), torch.zeros(1, 1, 28, 28))
        for name, make in SAMPLERS.items():
            for seed in args.seeds:
                res = Path(tmp) / f"r-{len(hv[name])}-{seed}-{abs(hash(name))}"
                bench.tune.sampler = make  # the one thing that differs between the studies (bench's own: the 2nd)
                argv = [
                    "tune",
                    str(path),
                    "--results",
                    str(res),
                    "--no-progress",
                    "--trials",
                    str(args.trials),
                    "--seeds",
                    str(seed),
                ] + (["--data-root", args.data_root] if args.data_root else [])
                if bench_main(argv) != 0:
                    return 1
                db = f"sqlite:///{res / 'optuna' / 'mo-sampler.db'}"
                (study_name,) = optuna.get_all_study_names(db)
                trials = sorted(
                    optuna.load_study(study_name=study_name, storage=db).get_trials(
                        states=(optuna.trial.TrialState.COMPLETE,)
                    ),
                    key=lambda t: t.number,
                )
                hv[name].append([hypervolume([tuple(t.values) for t in trials[:k]], most) for k in checkpoints])
                print(f"{name}, seed {seed}: hypervolume {hv[name][-1]}", file=sys.stderr, flush=True)
    print(
        f"hypervolume of the Pareto front (validation accuracy x share of the largest FLOPs left; mean +- sd over "
        f"seeds {args.seeds}), {time.time() - t0:.0f} s:"
    )
    print("| sampler | " + " | ".join(f"after {k} trials" for k in checkpoints) + " |")
    print("|---|" + "---:|" * len(checkpoints))
    for name, runs in hv.items():
        cells = [
            f"{statistics.mean(c):.4f} +- {statistics.stdev(c) if len(c) > 1 else 0:.4f}"
            for c in zip(*runs, strict=True)
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
