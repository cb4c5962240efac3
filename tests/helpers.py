"""Small spec builders shared by the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

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
