"""Small spec builders and process helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]

# A budget that trains the report's CNN on 1,000 real MNIST images in a few seconds.
TINY_MNIST_BASE: dict[str, Any] = {
    "model": {"name": "mnist_cnn", "batch_norm": True, "dropout": 0.25, "widths": [8, 8, 16, 16, 16], "hidden": 32},
    "optim": {"name": "adam", "lr": 3.0e-3},
    "sched": {"name": "none"},
    "loss": {"name": "ce"},
    "train": {"epochs": 2, "batch_size": 64, "eval_batch_size": 2500, "threads": 2},
    "data": {"train_subset": 1000, "val_fraction": 0.02},  # 1,200 validation images
}


def write_spec(path: Path, **overrides: Any) -> Path:
    spec: dict[str, Any] = {
        "name": path.stem,
        "task": "mnist",
        "seeds": [0],
        "base": TINY_MNIST_BASE,
        "variants": [{"name": "a", "reported": 0.9}, {"name": "b", "set": {"optim.lr": 1.0e-3}}],
    }
    spec.update(overrides)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def train(spec: Any, results: Path, data_root: Path | str, runs: list[Any] | None = None) -> None:
    """Train ``spec``'s runs (all, or ``runs``) into ``results`` as ``bench run`` does, in this process."""
    from bench.runner import RunOptions, run_grid
    from bench.store import RunStore

    RunStore(results).write_group(spec)
    run_grid(spec, runs if runs is not None else spec.runs(), results, RunOptions(str(data_root), progress=False))


def masks(h: int, w: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w) bool mask with the given inclusive boxes (r0, r1, c0, c1) set."""
    m = np.zeros((h, w), bool)
    for r0, r1, c0, c1 in boxes:
        m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def bench_process(args: list[str], cwd: Path, **popen: Any) -> subprocess.Popen:
    """``python -m bench ARGS --no-progress`` started in ``cwd`` on this checkout's code, stdout and stderr together;
    ``popen``: further arguments of :class:`subprocess.Popen` (a process group of its own, say)."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench", *args, "--no-progress"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def finish(*procs: subprocess.Popen, timeout: float = 300) -> list[str]:
    """The outputs of ``procs``, each of which must end with exit status 0."""
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
    return outs


def wait_for(p: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """Wait until ``ready()`` while ``p`` still runs; fails (with its output) if ``p`` ends first or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not ready():
        time.sleep(0.05)
    assert p.poll() is None and ready(), p.communicate()[0]
