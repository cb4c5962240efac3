"""A network of the user's own, built by a spec through its import path (``examples.shapes.nets:tiny_cnn``).

The contract every model factory follows: it takes ``in_channels`` and ``num_classes`` as keyword
arguments (the task supplies them from the data: 1 or 3 channels, the number of class folders; 1 output
channel for binary segmentation) and returns an ``nn.Module`` mapping (N, in_channels, H, W) float
inputs to logits, (N, num_classes) for classification or (N, 1, H, W) for segmentation.  Its other
keyword arguments are what the spec's ``model:`` section may set; their annotations (with ``Annotated``
ranges from ``bench.config`` if you like) are checked like the built-in networks'.
"""
from __future__ import annotations

from torch import nn

from bench.config import PosInt, UnitFloat  # optional: Annotated ranges, checked before anything trains


def tiny_cnn(in_channels: int, num_classes: int, *, width: PosInt = 8, batch_norm: bool = False,
             dropout: UnitFloat = 0.0) -> nn.Module:
    """Two 3x3 conv blocks (``width``, ``2 * width`` channels), each halving the size, then global average
    pooling and a linear layer: (N, in_channels, H, W) -> (N, num_classes), any H, W >= 4."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if batch_norm else []), nn.ReLU(),
                nn.MaxPool2d(2)]

    return nn.Sequential(*block(in_channels, width), *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(dropout), nn.Linear(2 * width, num_classes))
