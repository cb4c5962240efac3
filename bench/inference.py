"""Model outputs over a whole split, the one way training, evaluation and figures compute them."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.config import Config

Forward = Callable[[nn.Module, Tensor], Tensor]


def autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast on CUDA when ``train.amp``; a no-op context on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda")


@torch.no_grad()
def batched_outputs(model: nn.Module, x: Tensor, cfg: Config, batch: int, fn: Forward | None = None) -> Tensor:
    """``fn(model, chunk)`` (default: ``model(chunk)``) over all of ``x`` (N, ...) in chunks of
    ``batch``, in eval mode; float32, concatenated along the first axis.  The model's train/eval
    mode is restored afterwards."""
    was_training = model.training
    model.eval()
    fn = fn or (lambda m, b: m(b))
    with autocast(cfg, x.device):
        outs = [fn(model, x[i : i + batch]).float() for i in range(0, len(x), batch)]
    model.train(was_training)
    return torch.cat(outs)
