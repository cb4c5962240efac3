"""``mask_folder``: binary segmentation of the user's own images, paired with masks by a naming rule.

Folder layout (``data.root``): either ``train/`` and ``test/`` subfolders (any case: WARWICK's
``Train``/``Test`` too), each holding pairs, or one folder of pairs of which a seeded share
(``data.test_fraction``, default 0.2, drawn with ``data.split_seed``) is the test split.  Within a folder
the naming rule pairs an image with its mask:

    data.images: "images/*"      data.masks: "masks/*"         (the default) images/01.jpg + masks/01.png
    data.images: "image_*.png"   data.masks: "label_*.png"     WARWICK's rule
    data.images: "*.bmp"         data.masks: "*_anno.bmp"      GlaS's: train_1.bmp + train_1_anno.bmp

A pattern is a path relative to the folder whose file name holds one ``*``, the pair's id; with nothing after
the ``*`` any image file matches by its stem. A file the masks rule names is never an image. Masks are
single-channel with values 0/255 or 0/1 (foreground: non-zero). Everything WARWICK checks is checked before
anything trains (:mod:`bench.tasks.warwick`: every unpaired, unreadable, mis-sized or non-binary file named in
one error); so are the channels, the validation split (``data.val_fraction`` of the training pairs), the
statistics (training images only), the metrics, augmentations, TTA and ``bench predict`` (any image size runs,
large ones tiled): this task is WARWICK with a configurable layout.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from bench.config import Config, ConfigError
from bench.tasks.base import DataError, ImageSet
from bench.tasks.folders import MODES, check_test_fraction, data_folder, seeded_split, split_folders
from bench.tasks.warwick import Pairs, WarwickTask, read_pairs

DEFAULT_IMAGES, DEFAULT_MASKS = "images/*", "masks/*"
DEFAULT_TEST_FRACTION = 0.2


def _check_pattern(value: str | None, where: str) -> None:
    if value is None:
        return
    name = value.rpartition("/")[2]
    if value.count("*") != 1 or "*" not in name or value.startswith("/") or ".." in value.split("/") or "\\" in value:
        raise ConfigError(
            f"{where}: {value!r} must be a path relative to the data folder whose file name holds one * "
            f"(the pair's id), e.g. 'images/*' or 'image_*.png'"
        )


class MaskFolderTask(WarwickTask):
    name = "mask_folder"
    default_val_fraction = 0.15
    data_keys = ("color", "test_fraction", "images", "masks")
    data_cfg = None  # the DataCfg of a run (see for_config)

    def check_config(self, cfg: Config, where: str) -> None:
        super().check_config(cfg, where)
        for key in ("images", "masks"):
            _check_pattern(getattr(cfg.data, key), f"{where}.data.{key}")
        if (cfg.data.images or DEFAULT_IMAGES) == (cfg.data.masks or DEFAULT_MASKS):
            raise ConfigError(
                f"{where}.data.masks: the same pattern as data.images; masks need a folder or a name of their own"
            )

    def for_config(self, cfg: Config) -> MaskFolderTask:
        task = copy.copy(self)
        task.data_cfg = cfg.data
        return task

    def prepare(self, root: Path, download: bool, test: bool = True) -> None:
        """Nothing here: the files are read and checked by :meth:`load`, which knows the spec's data settings
        (the runner loads every data configuration before anything trains or is written)."""

    def _pairs(self, cfg: Config, folder: Path) -> Pairs:
        return read_pairs(
            folder,
            cfg.data.images or DEFAULT_IMAGES,
            cfg.data.masks or DEFAULT_MASKS,
            ones=True,
            mode=MODES[cfg.data.color] if cfg.data.color else None,
        )

    def read_splits(self, cfg: Config, test: bool = True) -> tuple[Path, Pairs, Pairs | None, tuple[str, str]]:
        root = data_folder(cfg)
        fraction = check_test_fraction(cfg, root, DEFAULT_TEST_FRACTION)
        given = split_folders(root)
        if given is not None:
            read, problems = [], []
            for folder in given if test else given[:1]:  # both checked before failing: every broken file in one message
                try:
                    read.append(self._pairs(cfg, folder))
                except DataError as e:
                    problems.append(str(e))
            if problems:
                raise DataError("\n".join(problems))
            return root, read[0], read[1] if test else None, (f"{given[0].name}/", f"{given[1].name}/")
        names, images, masks = self._pairs(cfg, root)
        keep, drawn = seeded_split(np.zeros(len(names)), fraction, cfg.data.split_seed + 2, "test")
        pick = lambda idx: ([names[i] for i in idx], images[idx], masks[idx])  # noqa: E731
        return root, pick(keep), pick(drawn) if test else None, ("", "")

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        if self.data_cfg is None:
            raise ValueError("mask_folder: raw_images needs the run's data settings (use TASKS[...].for_config(cfg))")
        cfg = Config(task=self.name, model={}, data=copy.copy(self.data_cfg))
        cfg.data.root = str(root)
        _, train, test, _ = self.read_splits(cfg, test=split == "test")
        names, images, masks = test if split == "test" else train
        return ImageSet(images, masks, names)
