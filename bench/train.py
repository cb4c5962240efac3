"""The one training loop every experiment uses.

``fit`` trains one (variant, seed) run in its folder and can be killed at any moment:
after each epoch it saves ``last.pt`` (model, optimizer, scheduler, every random
generator, early-stopping state, best weights, history) atomically, and a restart
continues from there to the same result an uninterrupted run gives.  Only validation
data chooses the best epoch; the test split is evaluated once, at the end.
"""
from __future__ import annotations

import csv
import io
import os
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench import files
from bench.config import Config
from bench.losses import LOSSES
from bench.models import count_parameters, create_model
from bench.optim import OPTIMIZERS, SCHEDULERS
from bench.tasks.base import Data, LossFn, Split, Task

HISTORY_KEYS = ["epoch", "train_loss", "train_metric", "val_loss", "val_metric", "lr", "epoch_time"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # warn_only=False: a non-deterministic op in deterministic mode is an error, not a surprise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast on CUDA when ``train.amp``; a no-op context on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda")


def build_model(cfg: Config, task: Task, data_info: dict[str, Any] | Data) -> nn.Module:
    kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    return create_model(cfg.model["name"], **task.model_kwargs(data_info), **kwargs)


def build_loss(cfg: Config) -> LossFn:
    return LOSSES.get_or_raise(cfg.loss["name"])(**{k: v for k, v in cfg.loss.items() if k != "name"})


def build_optimizer(cfg: Config, model: nn.Module, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    opt = OPTIMIZERS.get_or_raise(cfg.optim["name"])(model.parameters(), **{k: v for k, v in cfg.optim.items() if k != "name"})
    sched = SCHEDULERS.get_or_raise(cfg.sched["name"])(
        opt, cfg.train.epochs, steps_per_epoch, **{k: v for k, v in cfg.sched.items() if k != "name"}
    )
    return opt, sched


@torch.no_grad()
def batched_logits(model: nn.Module, x: Tensor, cfg: Config, fn: Callable[[nn.Module, Tensor], Tensor] | None = None) -> Tensor:
    """Model outputs for all of ``x`` (N, ...) in eval mode, in chunks of ``train.eval_batch_size``; float32."""
    model.eval()
    fn = fn or (lambda m, b: m(b))
    outs = []
    with autocast(cfg, x.device):
        for i in range(0, len(x), cfg.train.eval_batch_size):
            outs.append(fn(model, x[i : i + cfg.train.eval_batch_size]).float())
    return torch.cat(outs)


def train_one_epoch(model: nn.Module, split: Split, task: Task, cfg: Config, loss_fn: LossFn,
                    optimizer: torch.optim.Optimizer, scheduler: Any, order_gen: torch.Generator,
                    aug_gen: torch.Generator) -> dict[str, float]:
    """One pass over a seeded permutation of the training split, drawn by index on the device."""
    model.train()
    device = split.x.device
    n, bs = len(split), cfg.train.batch_size
    perm = torch.randperm(n, generator=order_gen).to(device)
    # Drop a last batch of one sample: batch norm cannot train on it.
    stop = n - 1 if n % bs == 1 and n > 1 else n
    tot_loss = tot_score = 0.0
    seen = 0
    for i in range(0, stop, bs):
        idx = perm[i : i + bs]
        x, y = task.augment(split.x[idx], split.y[idx], cfg, aug_gen)
        with autocast(cfg, device):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        k = len(idx)
        tot_loss += loss.item() * k
        tot_score += task.train_score(logits.detach().float(), y) * k
        seen += k
    return {"train_loss": tot_loss / seen, "train_metric": tot_score / seen}


def steps_per_epoch(n: int, batch_size: int) -> int:
    stop = n - 1 if n % batch_size == 1 and n > 1 else n
    return -(-stop // batch_size)


def write_history(path: Any, history: list[dict[str, float]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_KEYS)
    w.writeheader()
    w.writerows(history)
    files.write_text(path, buf.getvalue())


def fit(run_dir: Any, cfg: Config, task: Task, data: Data, device: torch.device, key: str,
        meta: dict[str, Any] | None = None, progress: bool = True,
        on_epoch: Callable[[int, float], None] | None = None, test: bool = True) -> dict[str, Any]:
    """Train (or resume) one run in ``run_dir``; returns the final result dict.

    ``on_epoch(epoch, val_metric)`` is called after each epoch (a tuner prunes by raising
    from it); ``test=False`` never touches the test split (``result["test"]`` is empty).

    Files: config.json (resolved config + data info + key), metrics.csv (one row per
    epoch), last.pt (resume state, removed when done), best.pt (state_dict + config),
    curves.png.  The caller records result.json (see ``bench.runner``).
    """
    from pathlib import Path

    from bench.plots import plot_run_curves

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_dict = cfg.to_dict()
    files.write_json(run_dir / "config.json", {"key": key, **(meta or {}), "config": cfg_dict, "data_info": data.info})

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.seed, cfg.train.deterministic)
    model = build_model(cfg, task, data).to(device)
    loss_fn = build_loss(cfg)
    spe = steps_per_epoch(len(data.train), cfg.train.batch_size)
    optimizer, scheduler = build_optimizer(cfg, model, spe)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    state: dict[str, Any] = {"epoch": 0, "best_metric": -float("inf"), "best_epoch": 0, "bad_epochs": 0,
                             "best_state": None, "history": [], "train_time": 0.0}
    last = run_dir / "last.pt"
    if last.exists():
        # Load on the CPU: RNG states must be CPU ByteTensors (map_location=cuda broke every resume on
        # an H200: "RNG state must be a torch.ByteTensor"); load_state_dict moves weights and optimizer
        # state to the parameters' device itself.
        ck = torch.load(last, map_location="cpu", weights_only=True)
        if ck.get("key") == key:
            model.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            order_gen.set_state(ck["order_gen"])
            aug_gen.set_state(ck["aug_gen"])
            torch.set_rng_state(ck["torch_rng"])
            if device.type == "cuda" and ck.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(ck["cuda_rng"], device)
            state = ck["state"]

    stopped_early = state["epoch"] >= cfg.train.epochs or (
        cfg.train.patience is not None and state["bad_epochs"] >= cfg.train.patience)
    bar = tqdm(total=cfg.train.epochs, initial=state["epoch"], desc=str(meta.get("name", "run") if meta else "run"),
               leave=False, disable=not progress, unit="ep")
    while not stopped_early and state["epoch"] < cfg.train.epochs:
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tr = train_one_epoch(model, data.train, task, cfg, loss_fn, optimizer, scheduler, order_gen, aug_gen)
        val = task.evaluate(model, data.val, cfg, loss_fn, final=False)
        dt = time.perf_counter() - t0
        state["epoch"] += 1
        state["train_time"] += dt
        if val[task.metric] > state["best_metric"]:
            state.update(best_metric=val[task.metric], best_epoch=state["epoch"], bad_epochs=0,
                         best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        state["history"].append({"epoch": state["epoch"], **tr, "val_loss": val["loss"], "val_metric": val[task.metric],
                                 "lr": lr, "epoch_time": dt})
        write_history(run_dir / "metrics.csv", state["history"])
        files.torch_save(last, {
            "key": key, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "order_gen": order_gen.get_state(), "aug_gen": aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": state,
        })
        bar.update(1)
        bar.set_postfix(val=f"{val[task.metric]:.4f}", best=f"{state['best_metric']:.4f}")
        if on_epoch is not None:
            on_epoch(state["epoch"], val[task.metric])
        if cfg.train.patience is not None and state["bad_epochs"] >= cfg.train.patience:
            stopped_early = True
    bar.close()

    model.load_state_dict(state["best_state"])
    files.torch_save(run_dir / "best.pt", {"state_dict": model.state_dict(), "config": cfg_dict,
                                         "data_info": data.info, "key": key, "epoch": state["best_epoch"]})
    t0 = time.perf_counter()
    test_metrics = task.evaluate(model, data.test, cfg, loss_fn, final=True) if test else {}
    test_time = time.perf_counter() - t0
    plot_run_curves(run_dir / "metrics.csv", run_dir / "curves.png", task.metric_label)
    return {
        "key": key, **(meta or {}),
        "test": test_metrics,
        "val_best": state["best_metric"], "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
        "stopped_early": state["epoch"] < cfg.train.epochs,
        "train_time_s": state["train_time"], "test_time_s": test_time,
        "params": count_parameters(model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__, "commit": files.git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    import platform

    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
