"""``python -m bench perf``: how fast the harness reaches the report's numbers, against a textbook loop.

For each task, on the device it runs on, in one process:

1. **Time to quality.** The task's fast rung (:data:`FAST_RUNG`) trains on each seed through its
   whole recipe, one validation pass per epoch, toward the spec's ``target`` (the report's best
   number); for MNIST, the rung of a stretch target (:data:`STRETCH`) does the same toward it.
   The first epoch whose validation metric reaches the target is recorded, and its weights are
   scored once on the test split afterwards; so are
   the weights validation chooses at the end of the recipe (its best epoch), whose test score is
   the one that counts: on WARWICK's 13 validation images a target reached on validation is often
   not reached on test.  Seconds count training steps only (data loading and validation are left out).
2. **Throughput.** Training images per second of those runs, and the training FLOPs they did
   (counted by ``FlopCounterMode`` on one step) per second, as a share of what a large dense
   matmul reaches on the same device and threads (utilization).
3. **The reference.** The report's recipe in a textbook loop (``bench/reference.py``).  The full
   mode trains it to the target; ``--quick`` times a fixed number of its steps and extrapolates to
   the epochs the same recipe needs, measured by training that recipe in the harness loop (same
   network, optimizer, schedule and batch size: only the loop and data path differ).
4. **The speed choices**: channels-last on and off, bf16 autocast on and off (where it is on), a host sync per step
   or once per epoch, and (``--compile``) ``torch.compile``, each timed on the fast recipe's step, best of 3 rounds.
5. **The grid** (on a GPU, or with ``--grid``): one epoch of every run of the full spec, one run
   after another and then with several workers at once.

Results go to ``results/perf.md`` and ``results/perf.csv`` (sections of other tasks and modes are
kept), and ``results/summary.md`` links to them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import files, usable_cores
from bench.config import Config, ConfigError
from bench.factories import build_loss, build_model
from bench.log import count, first_line
from bench.reference import datasets_for, train_reference
from bench.runner import RunOptions, load_data, run_grid, run_workers
from bench.spec import Spec, load_spec, resolve_spec_path
from bench.store import RunStore
from bench.tasks import TASKS
from bench.tasks.base import Data, Task
from bench.train import (
    amp_enabled,
    device_name,
    images_per_epoch,
    new_state,
    run_epoch,
    setup,
    snapshot,
    train_precision,
    train_step,
)
from bench.workers import grid_workers

log = logging.getLogger(__name__)

# The rung `bench perf` times per task: the recipe that reaches the report's number fastest (others: "fast").
# MNIST: lean-strided reaches 99.2 % on test in about 0.6 of lean's time, by a thinner margin (ablations/mnist.yaml).
FAST_RUNG = {"mnist": "lean-strided"}


def fast_rung(task: str) -> str:
    """The name of the rung `bench perf` times for ``task``."""
    return FAST_RUNG.get(task, "fast")


# A target beyond the report's, per task, and the rung timed toward it (the fast rung's short recipe cannot reach it).
STRETCH: dict[str, tuple[float, str]] = {"mnist": (0.995, "lean-long")}
QUICK_STEPS = {"mnist": 120, "warwick": 10}  # reference steps timed by --quick
QUICK_PROXY_EPOCHS = {"mnist": 12, "warwick": 100}  # most epochs --quick trains the report's recipe in the harness


# --------------------------------------------------------------------------- measuring pieces


def training_flops(model: torch.nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one training step's forward and backward pass on the batch ``x`` (N, C, H, W), counted by
    ``FlopCounterMode`` (convolutions, matmuls; element-wise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of repeated ``n x n`` dense matmuls: the device's practical peak for ``dtype`` at the current threads."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up (kernel selection, caches)
    count, t0 = 0, time.perf_counter()
    while True:
        a @ b
        count += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * n**3 * count / (time.perf_counter() - t0)


def step_rate(
    cfg: Config, task: Task, data: Data, device: torch.device, *, sync_per_step: bool = False, seconds: float = 2.0
) -> tuple[float, float]:
    """(training images per second, seconds of the first step) of the training loop's step on ``cfg``'s batches
    of ``data`` (channels-last, compile and autocast as ``cfg`` says), reading the loss after every step when
    ``sync_per_step`` (as a textbook loop's ``loss.item()`` does) instead of once every 8 steps."""
    t = setup(cfg, task, data, device)
    bs, n = cfg.train.batch_size, len(data.train)
    total = torch.zeros((), device=device)
    first, images, i, t0 = None, 0, 0, time.perf_counter()
    while True:
        idx = torch.arange(i, i + bs, device=device) % n
        i += bs
        x, y = task.augment(data.train.x[idx], data.train.y[idx], cfg, t.aug_gen)
        loss, _ = train_step(t, x, y, cfg)
        if sync_per_step:
            loss.item()
        total += loss
        if first is None:  # compilation and warm-up happen here
            total.item()
            first, t0 = time.perf_counter() - t0, time.perf_counter()
            continue
        images += bs
        if images % (8 * bs) == 0:
            total.item()
            if time.perf_counter() - t0 >= seconds:
                return images / (time.perf_counter() - t0), first


@dataclass
class SeedRun:
    """One seed of a recipe trained towards its targets."""

    seed: int
    hits: dict[float, tuple[int, float, float]] = field(default_factory=dict)  # target -> (epoch, train s, test)
    epochs: int = 0
    images: int = 0
    train_seconds: float = 0.0
    best_epoch: int = 0  # by validation, over every epoch trained
    test: float | None = None  # of the best epoch's weights, when the recipe ran through all its epochs


def train_to_targets(
    cfg: Config, task: Task, data: Data, device: torch.device, targets: list[float], to_the_end: bool = False
) -> SeedRun:
    """Train ``cfg`` epoch by epoch until the validation metric has reached every target, or through all its
    ``train.epochs`` when ``to_the_end``; the weights of the first epoch reaching each target (and, when every
    epoch was trained, those of the best epoch) are scored once on the test split afterwards."""
    t = setup(cfg, task, data, device)
    state, snapshots = new_state(task), {}
    out = SeedRun(cfg.seed)
    while state["epoch"] < cfg.train.epochs and (to_the_end or len(snapshots) < len(targets)):
        row = run_epoch(t, data, task, cfg, state)
        for target in targets:
            if target not in snapshots and task.metrics[0].reaches(row["val_metric"], target):
                snapshots[target] = (row["epoch"], row["train_seconds"], snapshot(t.evaluated))
    out.epochs, out.train_seconds, out.best_epoch = state["epoch"], state["train_seconds"], state["best_epoch"]
    out.images = out.epochs * images_per_epoch(len(data.train), cfg.train.batch_size)

    def test_of(weights: dict[str, torch.Tensor]) -> float:
        t.model.load_state_dict(weights)
        return task.evaluate(t.model, data.test, cfg, t.loss_fn, final=False)[task.metric]

    for target, (epoch, seconds, weights) in snapshots.items():
        out.hits[target] = (epoch, seconds, test_of(weights))
    if state["epoch"] == cfg.train.epochs:
        out.test = test_of(state["best_state"])
    return out


@dataclass
class Leg:
    """A rung trained on every seed toward one target."""

    rung: str
    epochs: int  # of its recipe
    target: float
    runs: list[SeedRun]


# --------------------------------------------------------------------------- one task


@dataclass
class TaskPerf:
    """Everything measured for one task: rows for perf.csv and the markdown section."""

    task: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def rung_config(spec: Spec, name: str, seed: int, root: str, device: str, threads: int) -> Config:
    """The config of ``spec``'s variant ``name`` for ``seed``, set to run here."""
    variants = {v.name: v for v in spec.variants}
    if name not in variants:
        raise ConfigError(f"{spec.path}: `bench perf` needs a variant named {name!r}; it has {', '.join(variants)}")
    cfg = variants[name].config.copy(seed=seed)
    cfg.data.root, cfg.train.device, cfg.train.threads = root, device, threads
    return cfg


def report_rung(spec: Spec) -> str:
    """The rung carrying the report's best number (its final recipe)."""
    reported = [v for v in spec.variants if v.reported is not None]
    if not reported:
        raise ConfigError(
            f"{spec.path}: no variant has a `reported` number, so there is no report recipe to compare with"
        )
    return max(reported, key=lambda v: v.reported).name


def _say(text: str) -> None:
    """A progress line of a measurement that takes minutes, with the time it started."""
    log.info(f"{time.strftime('%H:%M:%S')} perf {text}")


@dataclass
class Reference:
    """The report's recipe in the textbook loop: its time to the target (or to its budget) and its speed."""

    rung: str
    seconds: float  # to the target, else through ``budget`` epochs
    epochs: int | None  # the first epoch reaching the target; None: not within ``budget``
    budget: int
    source: str  # how ``seconds`` was obtained
    rate: float  # textbook loop, training images/s
    harness_rate: float | None = None  # the same recipe in the harness loop (--quick), images/s


def measure_reference(
    spec: Spec, task: Task, cfg: Config, quick: bool, device: torch.device, cache: dict[str, Data]
) -> Reference:
    """Train (full mode) or time and extrapolate (``quick``) the report's recipe ``cfg`` in the textbook loop."""
    name = report_rung(spec)
    _say(f"{spec.task}: reference ({name} in a textbook loop) ...")
    data = datasets_for(spec.task, cfg.data.root)
    if not quick:
        ref = train_reference(spec.task, cfg, device, target=spec.target, data=data)
        hit = next((h for h in ref.history if h["val_metric"] >= spec.target), None)
        return Reference(
            name,
            hit["train_seconds"] if hit else ref.train_seconds,
            hit and hit["epoch"],
            len(ref.history),
            f"the textbook loop trained to the target (at most {count(cfg.train.epochs, 'epoch')})",
            ref.images / ref.train_seconds,
        )
    ref = train_reference(spec.task, cfg, device, max_steps=QUICK_STEPS[spec.task], data=data)
    _say(f"{spec.task}: epochs the report's recipe needs ({name} in the harness loop) ...")
    proxy_cfg = cfg.copy()
    proxy_cfg.train.epochs, proxy_cfg.train.patience = min(cfg.train.epochs, QUICK_PROXY_EPOCHS[spec.task]), None
    proxy = train_to_targets(proxy_cfg, task, load_data(cache, task, proxy_cfg, device), device, [spec.target])
    epochs = proxy.hits[spec.target][0] if spec.target in proxy.hits else None
    source = (
        f"the epochs {name} needs, measured by training it in the harness loop (same network, optimizer, "
        f"schedule and batch size; at most {count(proxy_cfg.train.epochs, 'epoch')}), times the textbook loop's seconds "
        f"per epoch from {ref.steps} timed steps"
    )
    return Reference(
        name,
        ref.seconds_per_epoch * (epochs or proxy.epochs),
        epochs,
        proxy.epochs,
        source,
        ref.images / ref.train_seconds,
        proxy.images / proxy.train_seconds,
    )


def measure_task(
    task_name: str,
    quick: bool,
    root: str,
    device: torch.device,
    threads: int,
    seeds: list[int],
    compile_too: bool,
    grid: bool = False,
) -> TaskPerf:
    """Every measurement of one task (see the module docstring), as markdown lines and perf.csv rows."""
    spec = load_spec(resolve_spec_path(task_name))
    task = TASKS[spec.task]
    if spec.target is None:
        raise ConfigError(f"{spec.path}: no `target` (the report's best number) to time")
    mode = "quick" if quick else "full"
    fast = fast_rung(spec.task)
    load_before = os.getloadavg()[0]
    cache: dict[str, Data] = {}
    plan = [(fast, spec.target)]
    if spec.task in STRETCH:
        stretch, rung = STRETCH[spec.task]
        plan.append((rung, stretch))
    legs = []
    for rung, target in plan:
        runs = []
        for seed in seeds:  # 1. time to quality
            cfg = rung_config(spec, rung, seed, root, str(device), threads)
            _say(f"{spec.task}: {rung} seed {seed} ...")
            # Through the whole recipe: the test score of the weights validation chooses at its end counts too.
            runs.append(train_to_targets(cfg, task, load_data(cache, task, cfg, device), device, [target], True))
        legs.append(Leg(rung, cfg.train.epochs, target, runs))
    runs = legs[0].runs
    fast_cfg = rung_config(spec, fast, seeds[0], root, str(device), threads)
    fast_data = load_data(cache, task, fast_cfg, device)
    ref_cfg = rung_config(spec, report_rung(spec), seeds[0], root, str(device), threads)
    ref = measure_reference(spec, task, ref_cfg, quick, device, cache)  # 3. the reference
    dtype = torch.bfloat16 if amp_enabled(fast_cfg, device) else torch.float32  # 2. throughput
    peaks = {d: matmul_flops_per_s(device, d, seconds=0.5) for d in {dtype, torch.float32}}
    flops = {
        fast: _flops_per_image(fast_cfg, task, fast_data, device),
        ref.rung: _flops_per_image(ref_cfg, task, load_data(cache, task, ref_cfg, device), device),
    }
    choices = _choices(fast_cfg, task, fast_data, device, compile_too)  # 4. the speed choices
    out = TaskPerf(spec.task)
    for lines, rows in (
        _quality_table(spec, task, legs, ref, quick),
        _throughput_table(fast, runs, ref, flops, peaks, dtype),
        _choices_table(fast, choices),
    ):
        out.lines += lines
        out.rows += [{"task": spec.task, "mode": mode, **r} for r in rows]
    if grid:  # 5. the grid on one device, sequential vs concurrent
        _say(f"{spec.task}: one epoch of every run of the full grid, sequential then concurrent ...")
        lines, rows = grid_speedup(spec.path, root, device, None)
        out.lines += lines
        out.rows += [{**r, "mode": mode} for r in rows]
    out.lines += [
        f"Load average (1 min) of this machine ({usable_cores()} cores): {load_before:.2f} before this task, "
        f"{os.getloadavg()[0]:.2f} after; above the core count, other work shared the cores and every "
        f"time above is slower than on an idle machine.",
        "",
    ]
    return out


QUALITY_HEAD = [
    "target",
    "recipe",
    "seeds reaching it",
    "epoch (mean)",
    "train s: mean (range)",
    "test of those weights",
    "× reference",
]


def _quality_table(
    spec: Spec, task: Task, legs: list[Leg], ref: Reference, quick: bool
) -> tuple[list[str], list[dict[str, Any]]]:
    """Time to quality: for each leg (the fast rung toward the spec's target, a stretch rung toward its own), a row for
    its target on validation and one for the end of its recipe (the test score that counts); then the reference's
    row; and their records for perf.csv.  Only the spec's target has a reference time (× reference)."""
    fmt = functools.partial(task.metrics[0].text, unit=True)
    lower = "" if ref.epochs else " (at least)"  # the reference never reached it: the ratio is a lower bound
    table, rows = [], []
    for leg in legs:
        ref_seconds = ref.seconds if leg.target == spec.target else None
        table += [
            _target_row(leg.rung, leg.runs, leg.target, ref_seconds, lower, fmt),
            _recipe_end_row(leg.rung, leg.epochs, leg.runs, leg.target, ref_seconds, lower, fmt),
        ]
        rows += [_hit_record(leg.rung, r, leg.target) for r in leg.runs]
        rows += [
            {
                "what": "recipe_end",
                "recipe": leg.rung,
                "seed": r.seed,
                "target": leg.target,
                "epoch": r.best_epoch,
                "train_seconds": r.train_seconds,
                "test": r.test,
                "images_per_s": r.images / r.train_seconds,
            }
            for r in leg.runs
        ]
    table.append(_reference_row(ref, spec.target, quick, fmt))
    rows.append(
        {
            "what": "time_to_target",
            "recipe": f"reference:{ref.rung}",
            "target": spec.target,
            "epoch": ref.epochs,
            "train_seconds": ref.seconds,
            "images_per_s": ref.rate,
        }
    )
    note = (
        f"Reference: {ref.source}. × reference = reference seconds / harness seconds"
        + ("; the reference did not reach the target, so the ratios are lower bounds" if not ref.epochs else "")
        + "."
    )
    return [files.markdown_table(QUALITY_HEAD, table), "", note, ""], rows


def _target_row(
    rung: str, runs: list[SeedRun], target: float, ref_seconds: float | None, lower: str, fmt: Callable[[float], str]
) -> list[str]:
    """A target on validation: the seeds of the timed rung that reached it, their mean epoch and seconds, the test
    score of those weights, and (``ref_seconds``: the spec's target) how many times faster than the reference."""
    hits = [r.hits[target] for r in runs if target in r.hits]
    secs = [h[1] for h in hits]
    return [
        f"{fmt(target)} on validation",
        f"`{rung}` (harness)",
        f"{len(hits)} of {len(runs)}",
        _mean_cell([h[0] for h in hits]),
        _seconds_cell(secs),
        ", ".join(fmt(h[2]) for h in hits) or "–",
        _ratio_cell(ref_seconds, secs, lower),
    ]


def _recipe_end_row(
    rung: str,
    epochs: int,
    runs: list[SeedRun],
    target: float,
    ref_seconds: float | None,
    lower: str,
    fmt: Callable[[float], str],
) -> list[str]:
    """The timed rung trained to the end of its recipe, scored at its best validation epoch: seeds at the target on
    test, mean best epoch, seconds, test scores, and how many times faster than the reference."""
    end = [r.train_seconds for r in runs]
    return [
        f"{fmt(target)} on test",
        f"`{rung}` to its end ({count(epochs, 'epoch')}, best validation epoch)",
        f"{sum(r.test >= target for r in runs)} of {len(runs)}",
        _mean_cell([r.best_epoch for r in runs]),
        _seconds_cell(end),
        ", ".join(fmt(r.test) for r in runs),
        _ratio_cell(ref_seconds, end, lower),
    ]


def _reference_row(ref: Reference, target: float, quick: bool, fmt: Callable[[float], str]) -> list[str]:
    """The report's recipe in the textbook loop: the epoch it reached the target (or its budget) and its seconds."""
    seconds = f"{ref.seconds:.0f}"
    if quick:
        seconds += " (extrapolated)"
    if not ref.epochs:
        seconds += f", {count(ref.budget, 'epoch')}"
    return [
        f"{fmt(target)} on validation",
        f"`{ref.rung}` (textbook loop)",
        f"{int(bool(ref.epochs))} of 1",
        f"{ref.epochs}" if ref.epochs else f"not in {ref.budget}",
        seconds,
        "–",
        "1.0×",
    ]


def _mean_cell(values: list[float]) -> str:
    return f"{sum(values) / len(values):.1f}" if values else "–"


def _seconds_cell(secs: list[float]) -> str:
    """``41.2 (39.0–43.1)``: mean and range of the seeds' seconds; ``not reached`` without any."""
    return f"{sum(secs) / len(secs):.1f} ({min(secs):.1f}–{max(secs):.1f})" if secs else "not reached"


def _ratio_cell(ref_seconds: float | None, secs: list[float], lower: str) -> str:
    """``12.3×``: the reference's seconds over the mean of ``secs`` (empty without a reference time or seconds)."""
    return f"{ref_seconds / (sum(secs) / len(secs)):.1f}×{lower}" if ref_seconds is not None and secs else ""


def _hit_record(rung: str, run: SeedRun, target: float) -> dict[str, Any]:
    """perf.csv's record of one seed and target: its epoch, seconds and test score there (empty when not reached)."""
    epoch, seconds, test = run.hits.get(target, (None, None, None))
    return {
        "what": "time_to_target",
        "recipe": rung,
        "seed": run.seed,
        "target": target,
        "epoch": epoch,
        "train_seconds": seconds,
        "test": test,
        "images_per_s": run.images / run.train_seconds,
    }


def _throughput_table(
    fast: str,
    runs: list[SeedRun],
    ref: Reference,
    flops: dict[str, float],
    peaks: dict[torch.dtype, float],
    dtype: torch.dtype,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Images/s and FLOP/s of each loop, against the matmul peak of the precision it computes in."""
    fast_rate = sum(r.images for r in runs) / sum(r.train_seconds for r in runs)
    entries = [("harness", fast, fast_rate, dtype)]
    if ref.harness_rate:
        entries.append(("harness", ref.rung, ref.harness_rate, dtype))
    entries.append(("textbook", ref.rung, ref.rate, torch.float32))
    table = [
        [
            loop,
            f"`{recipe}`",
            _dtype_name(d),
            f"{rate:,.0f}",
            f"{flops[recipe] / 1e9:.4f}",
            f"{rate * flops[recipe] / 1e9:.1f}",
            f"{rate * flops[recipe] / peaks[d]:.1%}",
        ]
        for loop, recipe, rate, d in entries
    ]
    rows = [
        {
            "what": f"throughput_{loop}",
            "recipe": recipe,
            "images_per_s": rate,
            "gflop_per_image": flops[recipe] / 1e9,
            "matmul_gflops": peaks[d] / 1e9,
        }
        for loop, recipe, rate, d in entries
    ]
    peak_text = ", ".join(f"{p / 1e9:,.0f} GFLOP/s in {_dtype_name(d)}" for d, p in peaks.items())
    same = (
        f" Same recipe, harness loop / textbook loop: {ref.harness_rate / ref.rate:.1f}× the images per second."
        if ref.harness_rate
        else ""
    )
    head = [
        "loop",
        "recipe",
        "precision",
        "images/s",
        "training GFLOP / image",
        "achieved GFLOP/s",
        "utilization of matmul peak",
    ]
    return [
        files.markdown_table(head, table, ["left", "left", "left", "right", "right", "right", "right"]),
        "",
        f"Matmul peak: {peak_text} (2048×2048 matmuls, same device and threads). FLOPs per image: "
        f"`FlopCounterMode` on one training step (forward and backward) divided by the batch.{same}",
        "",
    ], rows


def _choices_table(fast: str, choices: list[tuple[str, float, float]]) -> tuple[list[str], list[dict[str, Any]]]:
    table = [[c, f"{r:,.0f}", f"{r / choices[0][1]:.2f}×", f"{f:.2f}"] for c, r, f in choices]
    rows = [{"what": "choice", "recipe": c, "images_per_s": r, "first_step_s": f} for c, r, f in choices]
    head = [f"speed choice (the `{fast}` rung's training step)", "images/s", "vs default", "first step s"]
    return [files.markdown_table(head, table, ["left", "right", "right", "right"]), ""], rows


def _flops_per_image(cfg: Config, task: Task, data: Data, device: torch.device) -> float:
    model = build_model(cfg, **task.model_kwargs(data.info)).to(device)
    bs = min(cfg.train.batch_size, len(data.train))
    x, y = task.augment(data.train.x[:bs], data.train.y[:bs], cfg, torch.Generator(device=device).manual_seed(0))
    return training_flops(model, build_loss(cfg), x, y) / bs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _choices(
    cfg: Config, task: Task, data: Data, device: torch.device, compile_too: bool, rounds: int = 3
) -> list[tuple[str, float, float]]:
    """(choice, images/s, seconds to the first step) for the default training step and one change at a time.

    The choices are timed in ``rounds`` alternating rounds of 1 s each and each keeps its fastest round: on a
    shared machine one 1-second measurement of the default twice was 1.23x apart, more than most choices change.
    The first step's seconds are the first round's (later rounds find caches and compiled code warm)."""

    def variant(**changes: Any) -> Config:
        c = cfg.copy()
        for k, v in changes.items():
            setattr(c.train, k, v)
        return c

    precision = train_precision(cfg, device)
    trials = [
        (f"default (channels-last, {precision}, one sync per epoch)", variant(), False),
        ("contiguous (NCHW) layout", variant(channels_last=False), False),
        *([("fp32 (no bf16 autocast)", variant(amp=False), False)] if precision != "fp32" else []),
        ("a .item() sync after every step", variant(), True),
    ]
    if compile_too:
        trials.append(("torch.compile", variant(compile="default"), False))
        if device.type == "cuda":
            trials.append(("torch.compile + CUDA graphs", variant(compile="reduce-overhead"), False))
    rates: dict[str, float] = {}
    firsts: dict[str, float] = {}
    for _ in range(rounds):
        for name, c, sync in trials:
            if name in rates and math.isnan(rates[name]):
                continue  # a compile that failed once fails again
            try:
                rate, first = step_rate(c, task, data, device, sync_per_step=sync, seconds=1.0)
            except Exception as e:  # torch.compile needs a working C++ (CPU) or Triton (GPU) toolchain
                if c.train.compile == "none":
                    raise
                log.info(f"perf: {name} failed ({type(e).__name__}: {first_line(e, empty='')})")
                rate, first = float("nan"), float("nan")
            rates[name] = rate if math.isnan(rate) else max(rate, rates.get(name, 0.0))
            firsts.setdefault(name, first)
    return [(name, rates[name], firsts[name]) for name, _, _ in trials]


def grid_speedup(
    spec_path: str | Path, root: str, device: torch.device, workers: int | None
) -> tuple[list[str], list[dict]]:
    """One epoch of every run of the task's full spec, trained one after another and then by several workers
    at once (``workers``, else as many as ``bench run`` would choose), each into a scratch results folder;
    wall times include each worker's start-up and data loading, as a real grid pays them."""
    spec = load_spec(spec_path, None, ["train.epochs=1", "train.patience=null"])
    runs = [r for r in spec.runs() if not r.members]  # what trains (seed ensembles train nothing)
    opts = RunOptions(root, str(device), progress=False)
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequential", "concurrent"):
            store = RunStore(Path(tmp) / mode)
            store.write_group(spec)
            t0 = time.perf_counter()
            if mode == "sequential":
                run_grid(spec, runs, store.results, opts)
            else:
                n = workers or grid_workers(spec, runs, opts, {})[0]
                run_workers(spec, runs, store.results, opts, n)
            walls[mode] = time.perf_counter() - t0
    lines = [
        f"Grid: one epoch of each of the {len(runs)} runs of the full `{spec.name}` spec on this device: "
        f"{walls['sequential']:.0f} s one after another, {walls['concurrent']:.0f} s with {n} workers at once "
        f"({walls['sequential'] / walls['concurrent']:.1f}× faster).",
        "",
    ]
    rows = [
        {
            "task": spec.task,
            "what": f"grid_{m}",
            "recipe": f"{len(runs)} runs x 1 epoch",
            "workers": n if m == "concurrent" else 1,
            "train_seconds": w,
        }
        for m, w in walls.items()
    ]
    return lines, rows


# --------------------------------------------------------------------------- files


def machine_line(device: torch.device, threads: int) -> str:
    return (
        f"{device_name(device)}; {threads} threads; torch {torch.__version__}; Python {platform.python_version()}"
        f"; load average before: {os.getloadavg()[0]:.2f}"
    )


def write_perf(results: Path, parts: list[TaskPerf], quick: bool, header: list[str]) -> tuple[Path, Path]:
    """Replace this mode's sections of results/perf.md and its rows of perf.csv; keep the others."""
    md, csv_path = results / "perf.md", results / "perf.csv"
    mode = "--quick" if quick else "full"
    name = lambda head: head  # noqa: E731  (a section is named by its heading text)
    sections = files.read_markdown_sections(md, 2, name)
    for part in parts:
        sections[f"{part.task} ({mode})"] = (
            "\n".join([f"## {part.task} ({mode})", "", *header, "", *part.lines]).rstrip() + "\n"
        )
    intro = [
        "# Speed",
        "",
        "Written by `python -m bench perf` (see `bench/perf.py` for what each number is). "
        "Timings on shared machines are noisy: compare the ratios measured in one run.",
        "",
    ]
    files.write_text(md, "\n".join(intro + [sections[k] for k in sorted(sections)]))
    done = {(p.task, "quick" if quick else "full") for p in parts}
    keep = [r for r in files.read_csv(csv_path) if (r["task"], r["mode"]) not in done]
    keys = [
        "task",
        "mode",
        "what",
        "recipe",
        "seed",
        "target",
        "epoch",
        "train_seconds",
        "test",
        "images_per_s",
        "gflop_per_image",
        "matmul_gflops",
        "first_step_s",
        "workers",
    ]
    files.write_csv(csv_path, keys, keep + [r for p in parts for r in p.rows], extra="ignore")
    return md, csv_path


def run_perf(
    tasks: list[str],
    quick: bool,
    results: str | Path,
    root: str,
    device: torch.device,
    threads: int,
    seeds: list[int],
    compile_too: bool,
    command: str,
    grid: bool | None = None,
) -> tuple[Path, Path]:
    """Measure ``tasks`` and write perf.md / perf.csv; ``grid`` (default: on a GPU) adds the grid's wall time
    sequential vs concurrent."""
    grid = device.type == "cuda" if grid is None else grid
    torch.set_num_threads(threads)
    header = [
        f"- command: `{command}`",
        f"- machine: {machine_line(device, threads)}",
        f"- commit: {files.git_commit()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
    ]
    parts = [measure_task(t, quick, root, device, threads, seeds, compile_too, grid) for t in tasks]
    return write_perf(Path(results), parts, quick, header)
