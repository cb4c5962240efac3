"""A task written the way a user adds one: this module plus one registration line (``TASKS["squares"] = SquaresTask()``).

Classification of 16x16 greyscale images by which half holds a bright square; the images are drawn
from a seeded generator, so the task needs no files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bench.config import Config
from bench.tasks.base import ClassificationTask, Data, DataInfo, ImageSet, Metric, Split

SIZE = 16


def draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 16, 16), labels int64 (n,)): 0 = square on the left, 1 = on the right."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, SIZE, SIZE)).astype(np.uint8)
    y = rng.integers(0, 2, n)
    for i in range(n):
        r, c = rng.integers(0, SIZE - 4), rng.integers(0, SIZE // 2 - 4) + (SIZE // 2) * y[i]
        x[i, r : r + 4, c : c + 4] = 220
    return x, y


class SquaresTask(ClassificationTask):
    name = "squares"
    metrics = (Metric("acc", "test accuracy", unit="%", scale=100.0, digits=1),)
    classes = ["left", "right"]

    def load(self, cfg: Config, device: torch.device, test: bool = True) -> Data:
        train, test = self.raw_images("", "train"), self.raw_images("", "test")
        n_val = round(len(train.targets) * cfg.data.val_fraction)
        mean, std = float(train.images[n_val:].mean() / 255), float(train.images[n_val:].std() / 255)

        def split(images: np.ndarray, targets: np.ndarray) -> Split:
            x = (torch.from_numpy(images[..., 0]).float() / 255 - mean) / std
            return Split(x.unsqueeze(1).to(device), torch.from_numpy(targets).to(device))

        info = DataInfo(
            source="generated",
            channels=[0],
            source_channels=1,
            mean=[mean],
            std=[std],
            image_size=[SIZE, SIZE],
            n_train=len(train.targets) - n_val,
            n_val=n_val,
            n_test=len(test.targets),
            classes=self.classes,
        )
        return Data(
            split(train.images[n_val:], train.targets[n_val:]),
            split(train.images[:n_val], train.targets[:n_val]),
            split(test.images, test.targets),
            info,
        )

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        x, y = draw(400 if split == "train" else 200, seed=0 if split == "train" else 1)
        return ImageSet(x[..., None], y, [f"{split}/{i}" for i in range(len(x))])

    def preprocessing(self, info: DataInfo, cfg: Config) -> dict[str, str]:
        return {
            "color_mode": "L",
            "resize_policy": "resize",
            "invert": "never",
            "resample": "bilinear",
            "classes": json.dumps(self.classes),
        }


class SquaresErrorTask(SquaresTask):
    """The same task scored by its error rate, a metric where lower is better (like a loss)."""

    name = "squares_error"
    metrics = (Metric("err", "test error", unit="%", scale=100.0, digits=1, higher_is_better=False),)

    def train_score(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 1 - super().train_score(logits, y)

    def evaluate(self, model, split, cfg, loss_fn, *, final):
        scores = super().evaluate(model, split, cfg, loss_fn, final=final)
        return {"loss": scores["loss"], "err": 1 - scores["acc"]}

    def score_outputs(self, logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
        return 1 - super().score_outputs(logits, targets, threshold)
