"""The one training loop every experiment uses.

``fit`` trains one (variant, seed) run in its folder and can be killed at any moment:
after each epoch it saves ``last.pt`` (model, optimizer, scheduler, every random
generator, early-stopping state, best weights, history) atomically, and a restart
continues from there to the same result an uninterrupted run gives.  Only validation
data chooses the best epoch; the test split is evaluated once, at the end.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from bench import files, usable_cores
from bench.config import Config, ConfigError
from bench.factories import build_loss, build_model, build_optimizer
from bench.inference import EVAL_PRECISION
from bench.log import count, note
from bench.losses import deep_supervision
from bench.models import count_parameters
from bench.plots import plot_run_curves
from bench.spec import DEVICE_RE
from bench.tasks.base import Data, LossFn, Metric, Split, Task

log = logging.getLogger(__name__)

# One row per epoch in metrics.csv.  epoch_time: training and validation of that epoch;
# train_seconds: training steps only, summed from the first epoch (what time-to-target reads).
HISTORY_KEYS = ["epoch", "train_loss", "train_metric", "val_loss", "val_metric", "lr", "epoch_time", "train_seconds"]


def resolve_device(name: str, where: str = "--device") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine:
    a ConfigError with one clear line when it cannot be used."""
    if not DEVICE_RE.fullmatch(name):
        raise ConfigError(f"{where} {name}: not a device; valid: auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(f"{where} {name}: {why} on this machine (torch {torch.__version__}); use --device cpu")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= n:
            raise ConfigError(
                f"{where} {name}: this machine has {count(n, 'CUDA device')}: "
                + ", ".join(f"cuda:{i}" for i in range(n))
            )
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, core count and widest matrix unit, e.g. ``CPU: AMD EPYC (2 cores, AVX2)``:
    one model name covers CPUs of different kinds (bf16 speed and rounding differ between AVX2, AVX512-BF16 and AMX),
    and a grid continued on another machine must show both."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = _cpu_info()
    n = usable_cores()
    return f"CPU: {model} ({n} core{'' if n == 1 else 's'}, {_matrix_unit(flags)})"


@functools.cache
def _cpu_info() -> tuple[str, frozenset[str]]:
    """(the CPU's model name, its /proc/cpuinfo flags): the first core's lines name the model before its flags."""
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def _matrix_unit(flags: set[str] | frozenset[str]) -> str:
    """The widest unit of /proc/cpuinfo's ``flags`` that training uses; torch's own name for it without them."""
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"), ("avx2", "AVX2")):
        if flag in flags:
            return name
    return torch.backends.cpu.get_cpu_capability()


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): only then is bf16 autocast faster than fp32
    (measured 1.4x on the report's CNN and 1.4-1.7x on the U-Net on a 2-core AMD EPYC, results/perf.md)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_enabled(cfg: Config, device: torch.device) -> bool:
    """``train.amp`` where bf16 pays: on CUDA, and on CPUs with native bf16."""
    return cfg.train.amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))


@functools.cache
def _say_fp32() -> None:
    """Once per process: the same run key trains in fp32 here and in bf16 on a CPU with native bf16, so its numbers
    (and speed) differ by machine; the record's train_precision and machine line say which."""
    note(
        log,
        "train.amp: this CPU has no native bf16 (%s): training in fp32, slower than and not bitwise the bf16 runs "
        "of a CPU with AVX512-BF16 or AMX",
        _matrix_unit(_cpu_info()[1]),
    )


def train_precision(cfg: Config, device: torch.device) -> str:
    """What a run's training steps compute in: ``bf16 autocast`` or ``fp32`` (recorded with its result).
    Evaluation is always :data:`bench.inference.EVAL_PRECISION`."""
    return "bf16 autocast" if amp_enabled(cfg, device) else "fp32"


def autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast where :func:`amp_enabled`; a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(cfg, device))


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # warn_only=False: a non-deterministic op in deterministic mode is an error, not a surprise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def images_per_epoch(n: int, batch_size: int) -> int:
    """Training images of an epoch over ``n``: all but a last batch of one sample (batch norm cannot train on it)."""
    return n - 1 if n % batch_size == 1 and n > 1 else n


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-images_per_epoch(n, batch_size) // batch_size)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's weights and buffers, unchanged by further training."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Trainer:
    """What one run trains: the network, its loss, optimizer and scheduler, and the two random
    generators (batch order on the CPU, augmentation on the device) that a resume must restore.
    ``forward`` is the network's training forward pass: the network itself, or its compiled form
    (``train.compile``); weights and checkpoints always go through ``model``.  ``ema`` (``train.ema``) is the moving
    average of ``model``'s weights and buffers, updated after every optimizer step; :attr:`evaluated` is what
    validation scores and the best epoch keeps: the average when there is one, else ``model``."""

    model: nn.Module
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: Any
    order_gen: torch.Generator
    aug_gen: torch.Generator
    forward: Callable[[Tensor], Tensor | list[Tensor]]
    ema: AveragedModel | None = None

    @property
    def evaluated(self) -> nn.Module:
        return self.model if self.ema is None else self.ema.module


def setup(cfg: Config, task: Task, data: Data, device: torch.device) -> Trainer:
    """Seed everything, then build the run's objects (always in this order: it fixes the initial weights)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg, **task.model_kwargs(data.info)).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg)
    optimizer, scheduler = build_optimizer(cfg, model, steps_per_epoch(len(data.train), cfg.train.batch_size))
    forward = model if cfg.train.compile == "none" else torch.compile(model, mode=cfg.train.compile)
    # use_buffers: batch norm's running statistics are averaged too, so they match the averaged weights
    ema = (
        None
        if cfg.train.ema is None
        else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema), use_buffers=True)
    )
    return Trainer(
        model,
        loss_fn,
        optimizer,
        scheduler,
        torch.Generator().manual_seed(cfg.seed),
        torch.Generator(device=device).manual_seed(cfg.seed + 1),
        forward,
        ema,
    )


def new_state(task: Task) -> dict[str, Any]:
    """Progress of a run: epochs done, early-stopping bookkeeping, best weights, history, and time:
    ``train_time`` counts training and validation, ``train_seconds`` the training steps alone."""
    return {
        "epoch": 0,
        "best_metric": task.metrics[0].worst,
        "best_epoch": 0,
        "bad_epochs": 0,
        "best_state": None,
        "history": [],
        "train_time": 0.0,
        "train_seconds": 0.0,
    }


def restore(last: Path, t: Trainer, key: str, device: torch.device) -> dict[str, Any] | None:
    """Load ``last.pt`` into ``t`` and return its progress; None when there is none for this config key."""
    if not last.exists():
        return None
    # Load on the CPU: RNG states must be CPU ByteTensors (map_location=cuda broke every resume on
    # an H200: "RNG state must be a torch.ByteTensor"); load_state_dict moves weights and optimizer
    # state to the parameters' device itself.
    ck = torch.load(last, map_location="cpu", weights_only=True)
    if ck.get("key") != key:
        return None
    t.model.load_state_dict(ck["model"])
    if t.ema is not None:
        t.ema.load_state_dict(ck["ema"])
    t.optimizer.load_state_dict(ck["optimizer"])
    t.scheduler.load_state_dict(ck["scheduler"])
    t.order_gen.set_state(ck["order_gen"])
    t.aug_gen.set_state(ck["aug_gen"])
    torch.set_rng_state(ck["torch_rng"])
    if device.type == "cuda" and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"], device)
    return ck["state"]


def save_progress(last: Path, t: Trainer, state: dict[str, Any], key: str, device: torch.device) -> None:
    """Everything :func:`restore` needs, written atomically after every epoch."""
    files.torch_save(
        last,
        {
            "key": key,
            "model": t.model.state_dict(),
            "ema": None if t.ema is None else t.ema.state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "order_gen": t.order_gen.get_state(),
            "aug_gen": t.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": state,
        },
    )


def train_step(t: Trainer, x: Tensor, y: Tensor, cfg: Config) -> tuple[Tensor, Tensor]:
    """One optimizer step on the batch ``x`` (N, C, H, W), ``y``; returns the (loss, logits), detached.
    The scheduler is the caller's (per step in training, not at all when only timing steps)."""
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    with autocast(cfg, x.device):
        logits = t.forward(x.contiguous(memory_format=layout))
        if isinstance(logits, list):  # deep supervision (model.deep_supervision): the logits, then auxiliary ones
            loss = deep_supervision(t.loss_fn, [o.float() for o in logits], y)
            logits = logits[0]
        else:
            loss = t.loss_fn(logits.float(), y)
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    if t.ema is not None:
        t.ema.update_parameters(t.model)
    return loss.detach(), logits.detach()


def train_one_epoch(t: Trainer, split: Split, task: Task, cfg: Config) -> dict[str, float]:
    """One pass over a seeded permutation of the training split, drawn by index on the device.

    The loss and score are summed on the device and read once, at the end: a ``.item()`` per
    step would make the CPU wait for the GPU after every batch."""
    t.model.train()
    device = split.x.device
    n, bs = len(split), cfg.train.batch_size
    perm = torch.randperm(n, generator=t.order_gen).to(device)
    stop = images_per_epoch(n, bs)
    tot_loss = torch.zeros((), dtype=torch.float64, device=device)
    tot_score = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, stop, bs):
        idx = perm[i : i + bs]
        x, y = task.augment(split.x[idx], split.y[idx], cfg, t.aug_gen)
        loss, logits = train_step(t, x, y, cfg)
        t.scheduler.step()
        tot_loss += loss * len(idx)
        tot_score += task.train_score(logits.float(), y) * len(idx)
    return {"train_loss": tot_loss.item() / stop, "train_metric": tot_score.item() / stop}


class Diverged(RuntimeError):
    """The training loss stopped being a finite number."""


def run_epoch(t: Trainer, data: Data, task: Task, cfg: Config, state: dict[str, Any]) -> dict[str, float]:
    """Train one epoch, score it on validation, update ``state`` (best weights, patience); its history row."""
    t0 = time.perf_counter()
    lr = t.optimizer.param_groups[0]["lr"]
    tr = train_one_epoch(t, data.train, task, cfg)  # returns after the device has finished (it reads the loss)
    t1 = time.perf_counter()
    if not math.isfinite(tr["train_loss"]):  # every later epoch would be NaN too, and "best" would be epoch 1
        raise Diverged(
            f"epoch {state['epoch'] + 1}: the training loss is {tr['train_loss']} (diverged; a lower "
            f"optim.lr or gradient clipping may help)"
        )
    val = task.evaluate(t.evaluated, data.val, cfg, t.loss_fn, final=False)
    dt = time.perf_counter() - t0
    state["epoch"] += 1
    state["train_time"] += dt
    state["train_seconds"] = state.get("train_seconds", 0.0) + (t1 - t0)  # last.pt files of older runs lack it
    if task.metrics[0].better(val[task.metric], state["best_metric"]):
        state.update(
            best_metric=val[task.metric], best_epoch=state["epoch"], bad_epochs=0, best_state=snapshot(t.evaluated)
        )
    else:
        state["bad_epochs"] += 1
    row = {
        "epoch": state["epoch"],
        **tr,
        "val_loss": val["loss"],
        "val_metric": val[task.metric],
        "lr": lr,
        "epoch_time": dt,
        "train_seconds": state["train_seconds"],
    }
    state["history"].append(row)
    return row


def time_to_target(
    history: list[dict[str, Any]], target: float, metric: Metric | None = None
) -> tuple[int, float] | None:
    """(first epoch whose validation metric reaches ``target`` (is at least as good, by ``metric``'s direction;
    higher is better without one), training seconds until the end of that
    epoch) from a run's history rows (``metrics.csv``); None when no epoch reaches it.  Seconds count
    the training steps only (``train_seconds``); histories written before that column existed give
    the sum of whole epochs (``epoch_time``: training and validation)."""
    spent = 0.0
    for row in history:
        spent += float(row["epoch_time"])
        seconds = float(row["train_seconds"]) if row.get("train_seconds") not in (None, "") else spent
        value = float(row["val_metric"])
        if metric.reaches(value, target) if metric else value >= target:
            return int(row["epoch"]), seconds
    return None


def stopped_by_patience(state: dict[str, Any], cfg: Config) -> bool:
    return cfg.train.patience is not None and state["bad_epochs"] >= cfg.train.patience


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    files.write_csv(path, HISTORY_KEYS, history)


def fit(
    run_dir: str | Path,
    cfg: Config,
    task: Task,
    data: Data,
    device: torch.device,
    key: str,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    on_epoch: Callable[[int, float], None] | None = None,
    test: bool = True,
) -> dict[str, Any]:
    """Train (or resume) one run in ``run_dir``; returns the final result dict.

    ``on_epoch(epoch, val_metric)`` is called after each epoch (a tuner prunes by raising
    from it); ``test=False`` never touches the test split (``result["test"]`` is empty).

    Files: config.json (resolved config + data info + key), metrics.csv (one row per
    epoch), last.pt (resume state; the run store removes it once the result is recorded),
    best.pt (state_dict + config), curves.png.  The caller records result.json.
    """
    run_dir, meta = Path(run_dir), meta or {}
    name = str(meta.get("name", run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(
        run_dir / "config.json", {"key": key, **meta, "config": cfg.to_dict(), "data_info": data.info.to_dict()}
    )
    t = setup(cfg, task, data, device)
    if cfg.train.amp and device.type == "cpu" and not cpu_has_bf16():
        _say_fp32()
    state = restore(run_dir / "last.pt", t, key, device) or new_state(task)
    if state["epoch"]:
        log.info(f"resuming {name} from epoch {state['epoch'] + 1} ({state['epoch']} of {cfg.train.epochs} done)")
    bar = tqdm(total=cfg.train.epochs, initial=state["epoch"], desc=name, leave=False, disable=not progress, unit="ep")
    while state["epoch"] < cfg.train.epochs and not stopped_by_patience(state, cfg):
        row = run_epoch(t, data, task, cfg, state)
        write_history(run_dir / "metrics.csv", state["history"])
        save_progress(run_dir / "last.pt", t, state, key, device)
        bar.update(1)
        bar.set_postfix(val=f"{row['val_metric']:.4f}", best=f"{state['best_metric']:.4f}")
        if on_epoch is not None:
            on_epoch(state["epoch"], row["val_metric"])
    bar.close()
    return finish(run_dir, t, state, cfg, task, data, device, key, meta, test)


def finish(
    run_dir: Path,
    t: Trainer,
    state: dict[str, Any],
    cfg: Config,
    task: Task,
    data: Data,
    device: torch.device,
    key: str,
    meta: dict[str, Any],
    test: bool,
) -> dict[str, Any]:
    """Save the best epoch's weights (with ``train.ema`` their average), evaluate them once on the test split, draw
    the curves; the result."""
    t.model.load_state_dict(state["best_state"])
    files.torch_save(
        run_dir / "best.pt",
        {
            "state_dict": t.model.state_dict(),
            "config": cfg.to_dict(),
            "data_info": data.info.to_dict(),
            "key": key,
            "epoch": state["best_epoch"],
        },
    )
    t0 = time.perf_counter()
    scored = task.test_record(t.model, data, cfg, t.loss_fn) if test else {"test": {}}
    test_time = time.perf_counter() - t0
    plot_run_curves(run_dir / "metrics.csv", run_dir / "curves.png", task.metrics[0])
    return {
        "key": key,
        **meta,
        **scored,  # test (and with eval.postprocess: postprocess, test_raw)
        "val_best": state["best_metric"],
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "stopped_early": state["epoch"] < cfg.train.epochs,  # early stopping ended it before its last epoch
        "train_time_s": state["train_time"],
        "test_time_s": test_time,
        "train_seconds": state.get("train_seconds", state["train_time"]),  # training steps alone (older last.pt: all)
        "params": count_parameters(t.model),
        "device": str(device),
        "device_name": device_name(device),
        "train_precision": train_precision(cfg, device),
        "eval_precision": EVAL_PRECISION,
        "torch": torch.__version__,
        "commit": files.git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
