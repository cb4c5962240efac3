"""Model outputs over a whole split, the one way training, evaluation and figures compute them, always in fp32.

The bf16 autocast of the training steps is :func:`bench.train.autocast`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Forward = Callable[[nn.Module, Tensor], Tensor]


# Validation (which epoch is best), test, TTA and figures all run in fp32 on every device: a reported
# number is then what the exported fp32 ONNX graph gives, and does not depend on the CPU's bf16 support
# (bf16 rounding differs between AMX and AVX512-BF16; 4 of 10,000 MNIST images flipped between them).
EVAL_PRECISION = "fp32"


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


def with_border(forward: Callable[[Tensor], Tensor], x: Tensor, border: int) -> Tensor:
    """``forward`` of ``x`` (N, C, H, W) reflect-padded by ``border`` pixels on every side, its output (N, K, H + 2b,
    W + 2b) cropped back to (N, K, H, W): a dense prediction whose edge pixels see mirrored context (``eval.border``).
    ``border`` 0: ``forward(x)``.  Reflection needs ``border`` < H, W, as in the exported graph (a task refuses a larger
    ``eval.border`` when it loads its images)."""
    if border <= 0:
        return forward(x)
    h, w = x.shape[-2:]
    pad = F.pad(x, (border, border, border, border), mode="reflect")
    return forward(pad)[..., border : border + h, border : border + w]
