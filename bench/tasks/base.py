"""What a task (data set + metric) provides to the generic training loop.

The loop in ``bench/train.py`` knows nothing about MNIST or glands: it draws batches
by index from :class:`Split` tensors that already live on the training device, calls
``task.augment`` and the loss, and asks ``task.evaluate`` for metrics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bench.config import Config


class DataError(ValueError):
    """Input data is missing or malformed; the message names the offending file."""


@dataclass
class Split:
    """One split held as tensors on the training device.

    x: (N, C, H, W) float32, already normalized.
    y: (N,) int64 class labels, or (N, 1, H, W) float32 masks with values {0, 1}.
    names: optional per-sample names (file names), same order as x.
    """

    x: Tensor
    y: Tensor
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device), self.names)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    info: dict[str, Any]  # recorded in the run's config: channels, mean/std, sizes, source path


LossFn = Callable[[Tensor, Tensor], Tensor]


class Task:
    """Base class; subclasses set the class attributes and implement ``load`` and ``evaluate``."""

    name: str = ""
    kind: str = ""  # "classification" | "segmentation"
    metric: str = ""  # primary metric key; higher is better; chooses the best epoch/run on validation
    metric_label: str = ""  # how the summary names it ("test accuracy", "pixel Dice")
    report_metrics: tuple[str, ...] = ()  # further test metrics shown in the summary
    lower_is_better: tuple[str, ...] = ()  # those of report_metrics where smaller is better
    default_loss: str = ""
    default_val_fraction: float = 0.1

    def load(self, cfg: Config, device: torch.device) -> Data:
        raise NotImplementedError

    def model_kwargs(self, data: Data | dict[str, Any]) -> dict[str, Any]:
        """Arguments the task supplies to every model factory (in_channels, num_classes),
        from the loaded data or from its ``info`` dict saved with a checkpoint."""
        raise NotImplementedError

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Augment a training batch on its device; returns (x, y) of the same shapes."""
        return x, y

    def train_score(self, logits: Tensor, y: Tensor) -> float:
        """The primary metric on one training batch (for the learning curves only)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *, final: bool) -> dict[str, float]:
        """Metrics accumulated over the whole split: always ``loss`` and ``self.metric``;
        with ``final=True`` (the one test evaluation) also every key in ``report_metrics``."""
        raise NotImplementedError
