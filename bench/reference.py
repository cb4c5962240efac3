"""The report's recipes written the way a textbook writes them: the plain reference `bench perf` times.

Nothing here uses the harness's machinery: a torchvision dataset (MNIST) or a ``Dataset`` that
decodes PNG files on every access (WARWICK), a ``DataLoader`` with ``shuffle=True``, the
network in its default memory layout, and a ``loss.item()`` after every step, as in
pytorch/examples.  The recipe (network, Adam's learning rate, StepLR, batch size, epochs) is read
from the spec's rung for the report's best number, and the network and the metric's definition
come from the harness's registry and ``bench.metrics``, so that the comparison is about the loop
and the data path, not about a different model or recipe.  Timing counts the training loop (the DataLoader's per-batch
work included, since a textbook loop pays it on every step) and leaves out building the datasets
and the validation passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import datasets, transforms

from bench.config import Config, ConfigError
from bench.factories import build_model
from bench.metrics import accuracy, dice_per_image


@dataclass
class ReferenceResult:
    """What the reference loop did: its steps, and one row per finished epoch."""

    steps: int = 0
    images: int = 0
    train_seconds: float = 0.0  # training loop only (data loading per batch included), summed
    steps_per_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # epoch, val_metric, train_seconds

    @property
    def seconds_per_epoch(self) -> float:
        return self.train_seconds / self.steps * self.steps_per_epoch if self.steps else float("nan")


class WarwickPngs(Dataset):
    """WARWICK image/label pairs read from their PNG files on every access (no cache), as tensors:
    image (3, H, W) in [0, 1], mask (1, H, W) in {0, 1}."""

    def __init__(self, folder: Path):
        self.images = sorted(folder.glob("image_*.png"))
        self.to_tensor = transforms.ToTensor()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        path = self.images[i]
        image = self.to_tensor(Image.open(path).convert("RGB"))
        label = Image.open(path.with_name(path.name.replace("image_", "label_"))).convert("L")
        return image, torch.from_numpy((np.asarray(label) > 127).astype(np.float32))[None]


def datasets_for(task: str, root: str | Path) -> tuple[Dataset, Dataset, Dataset]:
    """(train, validation, test) datasets as a textbook builds them: a seeded random_split of the training set."""
    if task == "mnist":
        tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        full = datasets.MNIST(str(root), train=True, download=False, transform=tf)
        test = datasets.MNIST(str(root), train=False, download=False, transform=tf)
        train, val = random_split(full, [55000, 5000], generator=torch.Generator().manual_seed(0))
        return train, val, test
    folder = Path(root) / "WARWICK"
    full = WarwickPngs(folder / "Train")
    n_val = round(len(full) * 0.15)
    train, val = random_split(full, [len(full) - n_val, n_val], generator=torch.Generator().manual_seed(0))
    return train, val, WarwickPngs(folder / "Test")


def score(task: str, model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Accuracy, or mean per-image pixel Dice at probability 0.5, over the whole loader."""
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x.to(device))
            y = y.to(device)
            if task == "mnist":
                total += accuracy(out, y).item() * len(y)
            else:
                total += dice_per_image(out[:, 0] > 0, y[:, 0] > 0.5).sum().item()
            n += len(y)
    model.train()
    return total / n


def check_recipe(cfg: Config) -> None:
    """The textbook loop knows the report's recipe only: Adam, StepLR or none, cross-entropy or BCE, no augmentation."""
    problems = []
    if cfg.optim["name"] != "adam" or set(cfg.optim) - {"name", "lr"}:
        problems.append(f"optim {cfg.optim} (plain Adam with an lr only)")
    if cfg.sched["name"] not in ("step", "none"):
        problems.append(f"sched {cfg.sched['name']!r} (step or none)")
    if cfg.augment != type(cfg.augment)() or cfg.eval.tta or set(cfg.loss) - {"name"}:
        problems.append("augmentation, TTA or loss options")
    if cfg.model.get("deep_supervision"):
        problems.append("model.deep_supervision (one output only)")
    if problems:
        raise ConfigError("the reference loop runs the report's recipe only; this rung has " + "; ".join(problems))


def train_reference(
    task: str,
    cfg: Config,
    device: torch.device,
    *,
    target: float | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    data: tuple[Dataset, Dataset, Dataset] | None = None,
) -> ReferenceResult:
    """Train ``cfg`` (the report's recipe) for ``task`` with a textbook loop until the validation metric reaches
    ``target``, ``max_epochs`` (default: the recipe's ``train.epochs``) or ``max_steps`` training steps."""
    check_recipe(cfg)
    torch.manual_seed(cfg.seed)
    train_set, val_set, _ = data or datasets_for(task, cfg.data.root)
    train_loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=256)
    in_channels, classes = (1, 10) if task == "mnist" else (3, 1)
    model = build_model(cfg, in_channels=in_channels, num_classes=classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim["lr"])
    sched = cfg.sched
    scheduler = (
        torch.optim.lr_scheduler.StepLR(optimizer, step_size=sched["step_size"], gamma=sched["gamma"])
        if sched["name"] == "step"
        else None
    )
    loss_fn = nn.CrossEntropyLoss() if task == "mnist" else nn.BCEWithLogitsLoss()
    out = ReferenceResult(steps_per_epoch=len(train_loader))
    for epoch in range(1, (max_epochs or cfg.train.epochs) + 1):
        model.train()
        running_loss = 0.0
        t0 = time.perf_counter()
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            out.steps += 1
            out.images += len(x)
            if max_steps is not None and out.steps >= max_steps:
                break
        out.train_seconds += time.perf_counter() - t0
        if max_steps is not None and out.steps >= max_steps:
            return out
        if scheduler is not None:
            scheduler.step()
        val = score(task, model, val_loader, device)
        out.history.append(
            {
                "epoch": epoch,
                "val_metric": val,
                "train_seconds": out.train_seconds,
                "train_loss": running_loss / len(train_loader),
            }
        )
        if target is not None and val >= target:
            break
    return out
