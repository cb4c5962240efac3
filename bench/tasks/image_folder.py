"""``image_folder``: classification of the user's own images, torchvision's ``ImageFolder`` layout.

Folder layout (``data.root``)::

    <class>/<image>                        one folder: data.test_fraction (default 0.2) of each class is
                                           drawn as the test split with data.split_seed
    train/<class>/<image>, test/<class>/<image>   the splits as given (test/ may lack a class, not add one)

Class names are the folder names, sorted; a class's images may sit in subfolders of its folder.  Files
with an image suffix (``folders.IMAGE_SUFFIXES``) are read, hidden files and others ignored.  Images are
decoded greyscale or RGB (``data.color``; unset: RGB when any training image is colour) and, with
``data.image_size``, padded to a square with their background and resized (bilinear), as ``bench predict``
prepares a new image; without it every image must already have the same size.

Before anything trains, every problem is collected into one DataError: no class folders, a class
without images, an unreadable file, a size that differs from the others.  A seeded share
(``data.val_fraction``, per class) of the training images is held out for validation; normalization
statistics come from the remaining training images only.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bench.augment import augment_batch
from bench.config import Config, ConfigError
from bench.tasks.base import ClassificationTask, Data, DataError, DataInfo, ImageSet, Split
from bench.tasks.folders import (
    MODES,
    check_test_fraction,
    data_folder,
    decode,
    is_image_file,
    normalize,
    pad_and_resize,
    seeded_split,
    split_folders,
    subset,
)

DEFAULT_TEST_FRACTION = 0.2


def image_size(cfg: Config) -> tuple[int, int] | None:
    s = cfg.data.image_size
    return None if s is None else (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))


def scan_classes(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Path], list[int], list[str]]:
    """(class names, image paths, their class indices, problems) of ``folder/<class>/...``; ``classes`` given
    (a test folder): its class folders must be among them."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems = []
    if not found:
        return (
            classes or [],
            [],
            [],
            [f"{folder}: no class folders: expected {folder}/<class>/<image> (e.g. {folder}/cat/001.png)"],
        )
    if classes is not None:
        problems += [
            f"{folder / c}: class {c!r} is not among the training classes ({', '.join(classes)})"
            for c in found
            if c not in classes
        ]
    names = classes if classes is not None else found
    paths, labels = [], []
    for c in found:
        files = sorted(
            p
            for p in (folder / c).rglob("*")
            if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not files:
            problems.append(f"{folder / c}: class {c!r} has no images (no file ending in .png, .jpg, ...)")
        elif c in names:
            paths += files
            labels += [names.index(c)] * len(files)
    return names, paths, labels, problems


class ImageFolderTask(ClassificationTask):
    name = "image_folder"
    default_val_fraction = 0.1
    augmentations = ("flips", "rotate", "translate", "scale", "elastic", "intensity")
    data_keys = ("image_size", "color", "test_fraction")
    data_cfg = None  # the DataCfg of a run (see for_config)

    def check_config(self, cfg: Config, where: str) -> None:
        super().check_config(cfg, where)
        s = cfg.data.image_size
        if isinstance(s, list) and len(s) != 2:
            raise ConfigError(f"{where}.data.image_size: expected [height, width] or one number, got {s}")
        if cfg.data.channels is not None:
            raise ConfigError(
                f"{where}.data.channels: image_folder feeds every channel; choose data.color: grey or rgb"
            )

    def for_config(self, cfg: Config) -> ImageFolderTask:
        task = copy.copy(self)
        task.data_cfg = cfg.data
        return task

    # ----------------------------------------------------------------------- files

    def files(
        self,
        cfg: Config,
        root: Path,
        test: bool = True,
    ) -> tuple[list[str], dict[str, tuple[list[Path], np.ndarray]], list[str]]:
        """(class names, {"train": (paths, labels), "test": ...}, problems of the layout) with the seeded test
        split drawn when the folder is one set (test files unread with ``test=False``)."""
        fraction = check_test_fraction(cfg, root, DEFAULT_TEST_FRACTION)
        given = split_folders(root)
        classes, paths, labels, problems = scan_classes(given[0] if given else root)
        out = {"train": (paths, np.array(labels, dtype=np.int64))}
        if given and test:
            _, tp, tl, more = scan_classes(given[1], classes)
            problems += more
            out["test"] = (tp, np.array(tl, dtype=np.int64))
        if fraction is not None and paths:
            keep, drawn = seeded_split(out["train"][1], fraction, cfg.data.split_seed + 2, "test")
            pick = lambda idx: ([paths[i] for i in idx], out["train"][1][idx])  # noqa: E731
            out = {"train": pick(keep), **({"test": pick(drawn)} if test else {})}
        if not paths or (test and not out["test"][0]):
            raise DataError("\n".join(problems or [f"{root}: no test images"]))
        return classes, out, problems

    def decode_all(
        self,
        cfg: Config,
        root: Path,
        split_paths: dict[str, list[Path]],
        problems: list[str],
    ) -> tuple[str, tuple[int, int], dict[str, np.ndarray]]:
        """(PIL mode, [H, W], {split: uint8 (N, H, W, C)}): every file decoded and resized, or one DataError
        naming the layout's ``problems``, every unreadable file and every file whose size differs (when no
        data.image_size resizes them)."""
        raw: dict[str, list[tuple[Path, np.ndarray]]] = {}
        problems = list(problems)
        for split, paths in split_paths.items():
            raw[split] = []
            for p in paths:
                try:
                    raw[split].append((p, decode(p, MODES[cfg.data.color] if cfg.data.color else None)))
                except DataError as e:
                    problems.append(str(e))
        size = image_size(cfg)
        if size is None and any(raw.values()):  # the most common size is the rule; every other file is named
            size = Counter(a.shape[:2] for pairs in raw.values() for _, a in pairs).most_common(1)[0][0]
            odd = [(p, a.shape) for pairs in raw.values() for p, a in pairs if a.shape[:2] != size]
            fix = "set data.image_size to resize them all"
            if len(odd) <= 10:
                problems += [
                    f"{p}: {w}x{h} pixels, the other images are {size[1]}x{size[0]}; {fix}" for p, (h, w, _) in odd
                ]
            else:  # a folder of varied sizes, not a few stray files: say so in one line
                sizes = Counter(f"{w}x{h}" for _, (h, w, _) in odd)
                problems.append(
                    f"{root}: {len(odd)} images are not {size[1]}x{size[0]} like the others "
                    f"({', '.join(f'{k}: {n}' for k, n in sizes.most_common())}; e.g. {odd[0][0]}); {fix}"
                )
        if problems:
            raise DataError("\n".join(problems))
        assert size is not None
        mode = (
            MODES[cfg.data.color]
            if cfg.data.color
            else ("RGB" if any(a.shape[2] == 3 for _, a in raw["train"]) else "L")
        )
        c = 3 if mode == "RGB" else 1

        def as_mode(a: np.ndarray) -> np.ndarray:  # a greyscale file in an RGB set, or (data.color: grey) the reverse
            if a.shape[2] == c:
                return a
            return np.repeat(a, 3, axis=2) if c == 3 else np.asarray(Image.fromarray(a).convert("L"))[:, :, None]

        out = {
            split: np.stack([pad_and_resize(as_mode(a), size) for _, a in pairs])
            if pairs
            else np.zeros((0, *size, c), np.uint8)
            for split, pairs in raw.items()
        }
        return mode, (int(size[0]), int(size[1])), out

    # ----------------------------------------------------------------------- the task

    def load(self, cfg: Config, device: torch.device, test: bool = True) -> Data:
        root = data_folder(cfg)
        classes, split_files, problems = self.files(cfg, root, test)
        tr_paths, tr_labels = split_files["train"]
        fit, va = seeded_split(tr_labels, cfg.data.val_fraction, cfg.data.split_seed, "validation")
        fit = subset(fit, cfg)
        mode, size, arrays = self.decode_all(cfg, root, {k: v[0] for k, v in split_files.items()}, problems)
        x_tr, mean, std = normalize(arrays["train"], arrays["train"][fit])
        rel = lambda ps, idx: [str(ps[i].relative_to(root)) for i in idx]  # noqa: E731

        def split(x: torch.Tensor, y: np.ndarray, names: list[str]) -> Split:
            return Split(x.to(device), torch.from_numpy(y).to(device), names)

        te = None
        if test:
            te_paths, te_labels = split_files["test"]
            x_te = normalize(arrays["test"], arrays["train"][fit])[0]
            te = split(x_te, te_labels, rel(te_paths, range(len(te_paths))))
        info = DataInfo(
            source=str(root),
            channels=list(range(3 if mode == "RGB" else 1)),
            source_channels=3 if mode == "RGB" else 1,
            mean=mean,
            std=std,
            image_size=list(size),
            n_train=len(fit),
            n_val=len(va),
            n_test=len(te) if te else 0,
            classes=classes,
            val_names=rel(tr_paths, va),
        )
        return Data(
            split(x_tr[fit], tr_labels[fit], rel(tr_paths, fit)),
            split(x_tr[va], tr_labels[va], rel(tr_paths, va)),
            te,
            info,
        )

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        """The split's images as ``bench predict`` prepares a file: decoded and resized (needs :meth:`for_config`)."""
        if self.data_cfg is None:
            raise ValueError("image_folder: raw_images needs the run's data settings (use TASKS[...].for_config(cfg))")
        cfg = Config(task=self.name, model={}, data=copy.copy(self.data_cfg))
        cfg.data.root = str(root)
        root = data_folder(cfg)
        _, split_files, problems = self.files(cfg, root, test=split == "test")
        paths, labels = split_files[split]
        _, _, arrays = self.decode_all(cfg, root, {"train": split_files["train"][0], split: paths}, problems)
        return ImageSet(arrays[split], labels, [str(p.relative_to(root)) for p in paths])

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """The batch's images (N, C, H, W) augmented on their device; the labels (N,) are unchanged."""
        a = cfg.augment
        if not any(getattr(a, k) for k in self.augmentations):
            return x, y
        return augment_batch(x, None, a, gen)[0], y

    def preprocessing(self, info: DataInfo, cfg: Config) -> dict[str, str]:
        # The training images were padded to a square with their background and resized, as the `resize`
        # policy of `bench predict` does; no inversion (unlike MNIST's light-on-dark digits).
        return {
            "color_mode": "RGB" if info.source_channels == 3 else "L",
            "resize_policy": "resize",
            "invert": "never",
            "resample": "bilinear",
            "classes": json.dumps(info.classes),
        }
