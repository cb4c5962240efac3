"""Model registry: ``create_model(name, **kwargs)`` builds any registered network.

Factories take ``in_channels`` and ``num_classes`` (supplied by the task) plus typed
keyword hyperparameters, which a spec may set and the validator checks.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from bench.registry import Registry

MODELS: Registry = Registry("model")

from bench.models import classification, segmentation  # noqa: E402,F401  (register their models)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    return MODELS.get_or_raise(name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
