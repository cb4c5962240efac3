"""Model registry: ``create_model(name, **kwargs)`` builds any registered network.

Factories take ``in_channels`` and ``num_classes`` (supplied by the task) plus typed
keyword hyperparameters, which a spec may set and the validator checks (ranges included).
A new network is a factory in one of these modules (or a new one) plus a line below, or, without
editing the package, a factory of the user's own named by import path (``my_nets:build_net``) or
declared in the entry-point group ``bench.models`` (see ``bench/registry.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.models.classification import lean_cnn, mnist_cnn, mnist_resnet
from bench.models.segmentation import encdec, unet
from bench.registry import Registry

MODELS: Registry = Registry(
    "model",
    {
        "mnist_cnn": mnist_cnn,
        "mnist_resnet": mnist_resnet,
        "lean_cnn": lean_cnn,
        "encdec": encdec,
        "unet": unet,
    },
    group="bench.models",
)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    return MODELS.get_or_raise(name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of one image of shape ``x`` (1, C, H, W), as ``FlopCounterMode`` counts them:
    2 x the multiply-accumulates of the convolutions (transposed too) and matrix products; batch norm
    (folded into the convolutions in the export), activations and pooling are not counted.  The model is left in
    eval mode."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.eval()(x[:1])
    return int(counter.get_total_flops())
