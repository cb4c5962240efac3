"""MNIST digit classification: 60k training images (a seeded share held out for
validation) and the 10k test set, normalized once and kept as tensors on the device."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.config import Config
from bench.metrics import accuracy
from bench.tasks.base import Data, LossFn, Split, Task


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random (train, val) partition of ``range(n)``; depends only on ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def load_mnist_arrays(root: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train_x uint8 (60000,28,28), train_y int64, test_x, test_y) from ``root/MNIST/raw``.

    Downloads only when the files are missing (torchvision checks before fetching).
    """
    from torchvision.datasets import MNIST

    root = Path(root)
    raw = root / "MNIST" / "raw"
    have = raw.is_dir() and any(raw.glob("train-images-idx3-ubyte*"))
    train = MNIST(str(root), train=True, download=not have)
    test = MNIST(str(root), train=False, download=not have)
    return train.data, train.targets.long(), test.data, test.targets.long()


class MnistTask(Task):
    name = "mnist"
    kind = "classification"
    metric = "acc"
    metric_label = "test accuracy"
    report_metrics = ("acc",)
    default_loss = "ce"
    default_val_fraction = 0.1
    classes = [str(i) for i in range(10)]

    def load(self, cfg: Config, device: torch.device) -> Data:
        assert cfg.data.root is not None, "resolve the data root before loading"
        tx, ty, sx, sy = load_mnist_arrays(cfg.data.root)
        tr, va = split_indices(len(tx), cfg.data.val_fraction, cfg.data.split_seed)
        if cfg.data.train_subset is not None:
            # A subset is a prefix of a seeded permutation, so it is the same for every run.
            keep = torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.data.split_seed + 1))
            tr = tr[keep[: cfg.data.train_subset]].sort().values
        x_train = tx[tr].float().div_(255)
        # Normalization statistics from the training images only.
        mean, std = x_train.mean().item(), x_train.std().item()

        def prep(x: Tensor) -> Tensor:  # uint8 (N,28,28) -> normalized float (N,1,28,28) on device
            return ((x.float() / 255 - mean) / std).unsqueeze(1).to(device)

        info: dict[str, Any] = {
            "source": str(Path(cfg.data.root) / "MNIST" / "raw"),
            "channels": [0], "mean": [mean], "std": [std], "input_size": [28, 28], "classes": self.classes,
            "n_train": len(tr), "n_val": len(va), "n_test": len(sx),
        }
        return Data(
            train=Split(prep(tx[tr]), ty[tr].to(device)),
            val=Split(prep(tx[va]), ty[va].to(device)),
            test=Split(prep(sx), sy.to(device)),
            info=info,
        )

    def model_kwargs(self, data: Data | dict[str, Any]) -> dict[str, Any]:
        return {"in_channels": 1, "num_classes": 10}

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        a = cfg.augment
        if not (a.rotate or a.translate or a.scale or a.elastic):
            return x, y
        from bench.augment import augment_batch

        x, _ = augment_batch(x, None, a, gen)
        return x, y

    def train_score(self, logits: Tensor, y: Tensor) -> float:
        return accuracy(logits, y).item()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *, final: bool) -> dict[str, float]:
        from bench.train import batched_logits

        logits = batched_logits(model, split.x, cfg)
        return {"loss": loss_fn(logits, split.y).item(), "acc": accuracy(logits, split.y).item()}
