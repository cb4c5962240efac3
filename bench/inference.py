"""Model outputs over a whole split, the one way training, evaluation and figures compute them."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bench.config import Config

Forward = Callable[[nn.Module, Tensor], Tensor]


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


def precision(cfg: Config, device: torch.device) -> str:
    """What a run's training steps compute in: ``bf16 autocast`` or ``fp32`` (recorded with its result).
    Evaluation is always :data:`EVAL_PRECISION`."""
    return "bf16 autocast" if amp_enabled(cfg, device) else "fp32"


# Validation (which epoch is best), test, TTA and figures all run in fp32 on every device: a reported
# number is then what the exported fp32 ONNX graph gives, and does not depend on the CPU's bf16 support
# (bf16 rounding differs between AMX and AVX512-BF16; 4 of 10,000 MNIST images flipped between them).
EVAL_PRECISION = "fp32"


def autocast(cfg: Config, device: torch.device) -> Any:
    """bf16 autocast where :func:`amp_enabled`; a no-op context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp_enabled(cfg, device))


@torch.no_grad()
def batched_outputs(model: nn.Module, x: Tensor, batch: int, fn: Forward | None = None) -> Tensor:
    """``fn(model, chunk)`` (default: ``model(chunk)``) over all of ``x`` (N, ...) in chunks of
    ``batch``, in eval mode and in fp32 (never autocast, see :data:`EVAL_PRECISION`), concatenated along
    the first axis.  The model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    fn = fn or (lambda m, b: m(b))
    with torch.autocast(x.device.type, enabled=False):  # fp32 even inside a caller's autocast region
        outs = [fn(model, x[i : i + batch]).float() for i in range(0, len(x), batch)]
    model.train(was_training)
    return torch.cat(outs)
