"""Load a finished run back: its model with the best weights, its config and its results."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import files
from bench.config import Config
from bench.tasks.base import Task


@dataclass
class LoadedRun:
    run_dir: Path
    model: nn.Module  # best weights, eval mode, on the CPU
    config: Config
    task: Task
    data_info: dict[str, Any]  # channels, mean/std, input size, classes ... (see the task's load)
    key: str
    result: dict[str, Any] | None  # result.json, None while the run is unfinished


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the model of ``run_dir`` from best.pt (loaded with ``weights_only=True``)."""
    from bench.spec import config_from_dict
    from bench.tasks import TASKS
    from bench.train import build_model

    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    if not best.exists():
        raise FileNotFoundError(f"{run_dir}: no best.pt (is this a finished run folder?)")
    ck = torch.load(best, map_location="cpu", weights_only=True)
    cfg = config_from_dict(ck["config"], where=str(best))
    task = TASKS[cfg.task]
    model = build_model(cfg, task, ck["data_info"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    res = run_dir / "result.json"
    return LoadedRun(run_dir, model, cfg, task, ck["data_info"], ck["key"], files.read_json(res) if res.exists() else None)
