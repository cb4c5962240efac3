"""How many runs of a grid to train at once when neither ``--workers`` nor the profile says.

Small networks use a machine poorly one at a time: on a 2-core CPU one run rarely keeps both
cores busy, and on a big GPU one small run leaves most of it idle.  The answer is measured here,
not guessed:

* CPU: a few training steps of the grid's first run are timed with every split of the cores into
  ``workers x threads`` (each worker in its own Python thread, so that they compete for the
  cores, caches and memory bandwidth as worker processes would), and the split with the most
  training images per second wins.
* CUDA: one training step gives a run's peak GPU memory; as many runs as fit in 90 % of the free
  memory (each also pays for its own CUDA context), at most one per CPU core and one per run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from bench import files, usable_cores
from bench.config import Config
from bench.runner import RunOptions, load_data, runtime_config
from bench.spec import Run, Spec
from bench.tasks import TASKS
from bench.tasks.base import Data, Task
from bench.train import resolve_device, setup, train_step

CUDA_CONTEXT_BYTES = 600 << 20  # what each extra process spends on its CUDA context and kernels (typical, not measured)


def _step_fn(cfg: Config, task: Task, data: Data, device: torch.device) -> Callable[[], int]:
    """A closure doing one training step of ``cfg`` (the training loop's own) on a fixed batch of ``data``."""
    t = setup(cfg, task, data, device)
    bs = max(2, min(cfg.train.batch_size, len(data.train)))  # batch norm cannot train on one sample
    x, y = data.train.x[:bs].to(device), data.train.y[:bs].to(device)

    def step() -> int:
        train_step(t, x, y, cfg)
        return len(x)

    return step


def cpu_throughput(
    cfg: Config, task: Task, data: Data, workers: int, threads: int, seconds: float = 1.5, warmup: int = 3
) -> float:
    """Training images per second of ``workers`` concurrent loops of ``threads`` threads each: images of the
    steps finished within about ``seconds`` after ``warmup`` steps per loop, over the time the last of them ended."""
    images, ended = [0] * workers, [0.0] * workers
    ready, stop = threading.Barrier(workers + 1), threading.Event()

    def loop(i: int) -> None:
        step = _step_fn(cfg, task, data, torch.device("cpu"))
        torch.set_num_threads(threads)  # per thread (OpenMP's count is a per-thread setting), after setup's own
        for _ in range(warmup):  # kernel selection and caches for this shape
            step()
        ready.wait()
        while not stop.is_set():
            images[i] += step()
            ended[i] = time.perf_counter()

    before = torch.get_num_threads()
    pool = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(workers)]
    for t in pool:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    torch.set_num_threads(before)
    return sum(images) / (max(ended) - t0)


def choose_cpu_workers(cfg: Config, task: Task, data: Data, n_runs: int, cores: int | None = None) -> tuple[int, str]:
    """(workers, the measurements that chose it) among the splits of ``cores`` into workers x threads."""
    cores = cores or usable_cores()
    splits = [(w, cores // w) for w in range(1, min(cores, n_runs) + 1) if cores % w == 0]
    if len(splits) == 1:
        return 1, "one run or one core"
    rate = {w: cpu_throughput(cfg, task, data, w, t) for w, t in splits}
    best = max(rate, key=rate.get)
    return best, ", ".join(f"{w}x{t} threads {rate[w]:,.0f} img/s" for w, t in splits)


def choose_cuda_workers(cfg: Config, task: Task, data: Data, device: torch.device, n_runs: int) -> tuple[int, str]:
    """(workers, why) from one training step's peak memory and the GPU's free memory."""
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _step_fn(cfg, task, data, device)()
    torch.cuda.synchronize(device)
    data_bytes = sum(s.x.nbytes + s.y.nbytes for s in (data.train, data.val, data.test) if s is not None)
    per_run = torch.cuda.max_memory_allocated(device) - base + data_bytes + CUDA_CONTEXT_BYTES
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    # Workers are spread over every GPU of the machine (bench.runner.gpu_slots) unless a device index was named.
    gpus = torch.cuda.device_count() if device.index is None else 1
    n = cuda_workers(free, per_run, n_runs, usable_cores(), gpus)
    return n, (
        f"{free / 2**30:.1f} GiB free, about {per_run / 2**30:.2f} GiB per run" + (f", {gpus} GPUs" if gpus > 1 else "")
    )


def cuda_workers(free: int, per_run: int, n_runs: int, cores: int, gpus: int = 1) -> int:
    """Runs that fit in 90 % of ``free`` bytes (of one GPU) at ``per_run`` each, on each of ``gpus`` GPUs; at most
    one per core and one per run."""
    return max(1, min(n_runs, cores, gpus * (int(0.9 * free) // max(1, per_run))))


def choose_workers(
    cfg: Config, task: Task, data: Data, device: torch.device, n_runs: int, cores: int | None = None
) -> tuple[int, str]:
    """Workers for a grid of ``n_runs`` runs like ``cfg`` on ``device`` (``data`` on the CPU), and why; on the CPU,
    over ``cores`` cores (default: all)."""
    if n_runs <= 1:
        return 1, "one run"
    if device.type == "cuda":
        return choose_cuda_workers(cfg, task, data, device, n_runs)
    return choose_cpu_workers(cfg, task, data, n_runs, cores)


def grid_workers(spec: Spec, todo: list[Run], opts: RunOptions, cache: dict[str, Data]) -> tuple[int, str]:
    """:func:`choose_workers` for the runs ``todo`` of ``spec``, timed on its first run (the preflight's
    CPU copy of the data in ``cache`` is reused)."""
    cfg = runtime_config(todo[0], opts)
    task = TASKS[spec.task]
    data = load_data(cache, task, cfg, torch.device("cpu"))
    # Over the cores no other bench process of this machine trains with now (bench.files.hold_cores): two commands
    # started together each find all of them free, and their trainers then take turns at the cores.
    total = usable_cores()
    free = min(files.free_cores(), total)
    workers, why = choose_workers(
        cfg, task, data, resolve_device(cfg.train.device, "train.device"), len(todo), max(1, free)
    )
    return workers, why + (f"; {free} of {total} cores free" if free < total else "")
