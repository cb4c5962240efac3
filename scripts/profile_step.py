"""Where the training step's time goes: ``torch.profiler`` over steps of `bench perf`'s fast rung of each task.

    python scripts/profile_step.py [--task mnist --task warwick] [--steps 40] [--threads N] [--top 12]

For each task, the fast rung's training step (the harness's own ``train_step`` with its augmentation and scheduler
step, on random batches of the training split, after 5 warm-up steps) runs ``--steps`` times under the profiler.
Printed: the machine line (CPU, threads, load), the self CPU time per step grouped by what it computes (convolutions
forward and backward, pooling, element-wise, optimizer, ...), and the ``--top`` operators.  Self times add up to
the step's CPU time; with several threads they are summed over threads.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench.perf import fast_rung, machine_line, rung_config
from bench.runner import resolve_data_root
from bench.spec import load_spec, resolve_spec_path
from bench.tasks import TASKS
from bench.train import setup, train_step

# Operator name fragments -> what the time is spent on; the first group that matches wins.
GROUPS = [
    ("optimizer", ("adam", "_fused", "foreach", "lerp", "addcdiv", "sqrt")),
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("convolution", "conv2d")),
    ("pooling (incl. zero-filling its input gradient)", ("max_pool", "fill_")),
    ("matmul (linear)", ("addmm", "mm", "linear")),
    ("batch norm", ("batch_norm",)),
    ("augmentation", ("grid_sample", "affine_grid", "bmm")),
    ("loss", ("cross_entropy", "nll", "log_softmax", "binary_cross")),
    ("dtype/layout copies", ("to_copy", "copy_", "_to_dtype", "contiguous", "clone")),
    (
        "element-wise (ReLU, dropout, ...)",
        ("relu", "threshold", "clamp", "dropout", "mul", "add", "bernoulli", "div", "sub", "where", "zero"),
    ),
]


def group(op: str) -> str:
    name = op.lower()
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "other")


def profile_task(task_name: str, root: str, threads: int, steps: int, top: int) -> None:
    spec = load_spec(resolve_spec_path(task_name))
    task, device, name = TASKS[spec.task], torch.device("cpu"), fast_rung(spec.task)
    cfg = rung_config(spec, name, 0, root, "cpu", threads)
    data = task.load(cfg, device)
    t = setup(cfg, task, data, device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        idx = torch.randint(0, len(data.train), (cfg.train.batch_size,), generator=gen)
        x, y = task.augment(data.train.x[idx], data.train.y[idx], cfg, t.aug_gen)
        train_step(t, x, y, cfg)
        t.scheduler.step()

    for _ in range(5):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ops)
    by: dict[str, float] = defaultdict(float)
    for e in ops:
        by[group(e.key)] += e.self_cpu_time_total
    print(
        f"\n## {spec.task}: `{name}`, {steps} steps of batch {cfg.train.batch_size}, {total / 1e3 / steps:.1f} ms of "
        f"CPU time per step\n\n{machine_line(device, threads)}\n"
    )
    print("| what | share | ms / step |\n|---|---:|---:|")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v / total:.1%} | {v / 1e3 / steps:.2f} |")
    print()
    print(ops.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=44))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["mnist", "warwick"], action="append", help="repeatable; default: both")
    p.add_argument("--steps", type=int, default=40, help="profiled steps per task (default: 40)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    p.add_argument("--top", type=int, default=12, help="operators listed (default: 12)")
    p.add_argument("--data-root", help="data folder (default: $BENCH_DATA, else ./data)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root, _ = resolve_data_root(args.data_root)
    for task in dict.fromkeys(args.task or ["mnist", "warwick"]):
        profile_task(task, root, args.threads, args.steps, args.top)


if __name__ == "__main__":
    main()
