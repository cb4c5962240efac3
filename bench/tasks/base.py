"""What a task (a data set and its metrics) provides to the rest of the harness.

The training loop, the summary, the exporters and ``predict`` know nothing about MNIST or
glands: everything task-specific sits behind :class:`Task` (data loading and its checks,
augmentation, evaluation, how the metrics are named and printed, the raw test images an
export is checked on, the preprocessing an exported model documents, the summary's
figures).  A new task is one module with a Task subclass plus a line in ``bench/tasks/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.config import FOLDER_KEYS, Config, ConfigError
from bench.inference import batched_outputs
from bench.metrics import Metric, accuracy


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


@dataclass
class DataInfo:
    """What a run's data looked like, saved with the run (config.json, best.pt): enough to rebuild
    its model and to prepare new inputs exactly as the training inputs were, without the data set.

    Normalization: ``x[k] = (pixel[channels[k]] / 255 - mean[k]) / std[k]`` for the image decoded
    with ``source_channels`` channels (1: greyscale, 3: RGB).
    """

    source: str  # the folder the data was read from
    channels: list[int]  # channels of the decoded image that feed the network, in order
    source_channels: int  # channels of the decoded image files
    mean: list[float]  # per kept channel, of pixel values in [0, 1], training split only
    std: list[float]
    image_size: list[int]  # [H, W] of the training images
    n_train: int
    n_val: int
    n_test: int
    classes: list[str] | None = None  # classification: class names, index = logit position
    val_names: list[str] = field(default_factory=list)  # files held out for validation, where files have names

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataInfo:
        """Read a saved description, including the layout of runs made before this class existed
        (``input_size`` a list for MNIST, ``{"train": [H, W], "test": ...}`` for WARWICK;
        ``val_images``; no ``source_channels`` for greyscale MNIST)."""
        d = dict(d)
        if "image_size" not in d:
            size = d.pop("input_size")
            d["image_size"] = size["train"] if isinstance(size, dict) else size
        if "val_images" in d:
            d["val_names"] = d.pop("val_images")
        d.setdefault("source_channels", 1)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class Data:
    train: Split
    val: Split
    test: Split | None  # None when loaded for tuning, which never reads the test split
    info: DataInfo


@dataclass
class ImageSet:
    """Decoded images of one split as a user's files would give them: ``images`` uint8
    (N, H, W, C_src); ``targets`` (N,) int64 class labels or (N, H, W) bool masks."""

    images: np.ndarray
    targets: np.ndarray
    names: list[str]


LossFn = Callable[[Tensor, Tensor], Tensor]
Figure = tuple[str, Path]  # (caption, PNG path)


class Task:
    """Base class; subclasses set the class attributes and implement the methods that raise."""

    name: str = ""
    kind: str = ""  # "classification" | "segmentation": the shape of the outputs (exporters rely on it)
    metrics: tuple[Metric, ...] = ()  # the first is the primary metric: it chooses best epoch, run and rung
    default_loss: str = ""
    losses: tuple[str, ...] = ()  # loss names that fit this task's outputs
    default_val_fraction: float = 0.1
    augmentations: tuple[str, ...] = ()  # AugmentCfg keys this task implements; others must stay off
    supports_tta: bool = False
    supports_postprocess: bool = False  # eval.postprocess: masks post-processed as chosen on validation
    data_keys: tuple[
        str, ...
    ] = ()  # the folder keys of DataCfg (config.FOLDER_KEYS) this task reads; others must stay unset

    @property
    def metric(self) -> str:
        """Key of the primary metric (``metrics[0]``, whose ``higher_is_better`` says which way is better)."""
        return self.metrics[0].key

    # ----------------------------------------------------------------------- configuration

    def check_config(self, cfg: Config, where: str) -> None:
        """Refuse settings this task would silently ignore (raises ConfigError)."""
        if cfg.loss["name"] not in self.losses:
            raise ConfigError(
                f"{where}.loss.name: {cfg.loss['name']!r} does not fit task {self.name!r}; "
                f"valid: {', '.join(self.losses)}"
            )
        default = type(cfg.augment)()
        for key in (f.name for f in dataclasses.fields(cfg.augment)):
            if key not in self.augmentations and getattr(cfg.augment, key) != getattr(default, key):
                raise ConfigError(
                    f"{where}.augment.{key}: task {self.name!r} does not implement it; "
                    f"supported: {', '.join(self.augmentations) or 'none'}"
                )
        if cfg.eval.tta and not self.supports_tta:
            raise ConfigError(f"{where}.eval.tta: task {self.name!r} has no test-time augmentation")
        if cfg.eval.border and self.kind != "segmentation":
            raise ConfigError(f"{where}.eval.border: task {self.name!r} takes fixed-size images; use 0")
        if cfg.eval.postprocess != "none" and not self.supports_postprocess:
            raise ConfigError(f"{where}.eval.postprocess: task {self.name!r} has no post-processing; use none")
        for key in FOLDER_KEYS:
            if key not in self.data_keys and getattr(cfg.data, key) is not None:
                raise ConfigError(
                    f"{where}.data.{key}: task {self.name!r} does not read it"
                    + (
                        f"; it reads {', '.join(self.data_keys)}"
                        if self.data_keys
                        else " (it is for the folder tasks image_folder and mask_folder)"
                    )
                )

    def for_config(self, cfg: Config) -> Task:
        """This task as it reads ``cfg``'s data: the same object, except for tasks whose file layout is
        configured (the folder tasks), which return a copy that knows ``cfg.data``, so that
        :meth:`raw_images` finds the run's files from the data root alone (exports, ``bench perf``)."""
        return self

    # ----------------------------------------------------------------------- data

    def prepare(self, root: Path, download: bool, test: bool = True) -> None:
        """Check the files under ``root`` before anything runs (DataError naming every broken file);
        fetch them first when ``download`` and the task knows where from.  ``test=False`` (tuning)
        neither checks nor reads the test split's files."""

    def load(self, cfg: Config, device: torch.device, test: bool = True) -> Data:
        """Train, validation and (unless ``test=False``: its files are never opened) test splits on ``device``."""
        raise NotImplementedError

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        """The ``split`` ("train" or "test") images as decoded files (exports are checked on them)."""
        raise NotImplementedError(f"task {self.name!r} cannot give its raw images, so its models cannot be exported")

    def model_kwargs(self, info: DataInfo) -> dict[str, Any]:
        """Arguments the task supplies to every model factory (``in_channels``, ``num_classes``)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- training and evaluation

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Augment a training batch on its device; returns (x, y) of the same shapes."""
        return x, y

    def train_score(self, logits: Tensor, y: Tensor) -> Tensor:
        """The primary metric on one training batch, a 0-dim tensor on the batch's device (the training
        loop sums it there and reads it once per epoch); for the learning curves only."""
        raise NotImplementedError

    def evaluate(
        self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *, final: bool
    ) -> dict[str, float]:
        """Metrics accumulated over the whole split: always ``loss`` and the primary metric;
        with ``final=True`` (the one test evaluation) every metric in :attr:`metrics`."""
        raise NotImplementedError

    def test_record(self, model: nn.Module, data: Data, cfg: Config, loss_fn: LossFn) -> dict[str, Any]:
        """What a run records of its best weights (``train.finish`` and ``bench rescore``): ``test``, every metric on
        the test split; a task that post-processes its masks (``eval.postprocess``) adds the setting it chose on
        validation (``postprocess``) and the test metrics before it (``test_raw``)."""
        return {"test": self.evaluate(model, data.test, cfg, loss_fn, final=True)}

    def score_outputs(self, logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
        """The primary metric of exported-model outputs (numpy logits of a whole :class:`ImageSet`)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------- deployment and reports

    def preprocessing(self, info: DataInfo, cfg: Config) -> dict[str, str]:
        """Metadata keys (strings) that tell a user's code how to turn an image file into the model's
        input and its output into an answer, beyond normalization (see ``exporters/metadata.py``)."""
        raise NotImplementedError

    def summary_figures(
        self, load: Callable[[], tuple[nn.Module, Config, Data]], out_prefix: Path, title: str
    ) -> Iterable[Figure]:
        """Figures of a finished run for the summary, written under ``out_prefix``; ``load()`` gives the
        run's model (best weights), config and data (CPU) and ``title`` names the run.  None by default."""
        return []


class ClassificationTask(Task):
    """What every image-classification task shares: accuracy as the metric, cross-entropy, class names
    in the data description.  A subclass sets ``name``, ``classes`` and implements ``load``, ``raw_images``
    and ``preprocessing``."""

    kind = "classification"
    metrics = (Metric("acc", "test accuracy", unit="%", scale=100.0, digits=2, short="test acc."),)
    default_loss = "ce"
    losses = ("ce",)
    classes: list[str] = []

    def model_kwargs(self, info: DataInfo) -> dict[str, Any]:
        return {"in_channels": len(info.channels), "num_classes": len(info.classes or self.classes)}

    def train_score(self, logits: Tensor, y: Tensor) -> Tensor:
        return accuracy(logits, y)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *, final: bool
    ) -> dict[str, float]:
        logits = batched_outputs(model, split.x, cfg.train.eval_batch_size)
        return {"loss": loss_fn(logits, split.y).item(), "acc": accuracy(logits, split.y).item()}

    def score_outputs(self, logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> float:
        return float((logits.argmax(1) == targets).mean())
