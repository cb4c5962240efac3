"""MNIST digit classification: 60k training images (a seeded share held out for
validation) and the 10k test set, normalized once and kept as tensors on the device.

The files are the four IDX files of ``<root>/MNIST/raw`` (torchvision's layout), each either
uncompressed or as distributed (``.gz``).  They are read and checked here (magic number, shape,
length, labels 0-9) rather than by torchvision, so that a truncated or wrong file is named with
what is wrong before anything trains, and so that nothing is downloaded unless asked for.
"""

from __future__ import annotations

import gzip
import json
import logging
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.augment import augment_batch
from bench.config import Config, ConfigError
from bench.log import first_line
from bench.tasks.base import ClassificationTask, Data, DataError, DataInfo, ImageSet, Split

log = logging.getLogger(__name__)

# file stem -> expected shape (the IDX header must say exactly this)
FILES = {
    "train-images-idx3-ubyte": (60000, 28, 28),
    "train-labels-idx1-ubyte": (60000,),
    "t10k-images-idx3-ubyte": (10000, 28, 28),
    "t10k-labels-idx1-ubyte": (10000,),
}


def raw_folder(root: str | Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _find(raw: Path, stem: str) -> Path | None:
    """The uncompressed file if present, else the ``.gz`` one, else None."""
    for p in (raw / stem, raw / f"{stem}.gz"):
        if p.is_file():
            return p
    return None


def read_idx(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as a uint8 array of ``shape``;
    DataError saying what is wrong with the file otherwise."""
    try:
        blob = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: not a complete gzip file ({type(e).__name__}: {e})") from None
    ndim = len(shape)
    if len(blob) < 4 or blob[:3] != b"\0\0\x08" or blob[3] != ndim:
        raise DataError(
            f"{path}: not an IDX file of {ndim}-d unsigned bytes (header {blob[:4].hex() or 'empty'}, "
            f"expected 000008{ndim:02x})"
        )
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims != shape:
        raise DataError(f"{path}: holds an array of shape {dims}, expected {shape}")
    need = 4 + 4 * ndim + int(np.prod(shape))
    if len(blob) != need:
        raise DataError(f"{path}: {len(blob):,} bytes, expected {need:,} (truncated or not an MNIST file)")
    return np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def check_files(root: str | Path, test: bool = True) -> dict[str, np.ndarray]:
    """Read and check the four files (the two training files with ``test=False``); one DataError naming
    every missing or broken file."""
    raw = raw_folder(root)
    arrays, problems, missing = {}, [], []
    for stem, shape in _needed(test).items():
        path = _find(raw, stem)
        if path is None:
            missing.append(stem)
            continue
        try:
            arrays[stem] = read_idx(path, shape)
        except DataError as e:
            problems.append(str(e))
    for stem, arr in arrays.items():
        if "labels" in stem and arr.max(initial=0) > 9:
            problems.append(f"{_find(raw, stem)}: labels must be 0-9, found {int(arr.max())}")
    if missing:
        problems.insert(0, f"{raw}: missing {', '.join(f'{s}[.gz]' for s in missing)}")
    if problems:
        raise DataError("\n".join(problems))
    return arrays


def _needed(test: bool) -> dict[str, tuple[int, ...]]:
    return FILES if test else {k: v for k, v in FILES.items() if not k.startswith("t10k")}


def load_mnist_arrays(root: str | Path, test: bool = True) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(train_x uint8 (60000, 28, 28), train_y int64 (60000,), test_x (10000, 28, 28), test_y) from
    ``root/MNIST/raw``, checked (never downloads: see :meth:`MnistTask.prepare`); the test pair is
    None, its files unread, with ``test=False``."""
    a = check_files(root, test)
    t = lambda k: torch.from_numpy(a[k].copy()) if k in a else None  # noqa: E731  (frombuffer arrays are read-only)
    sy = t("t10k-labels-idx1-ubyte")
    return (
        t("train-images-idx3-ubyte"),
        t("train-labels-idx1-ubyte").long(),
        t("t10k-images-idx3-ubyte"),
        sy.long() if sy is not None else None,
    )


def _download(root: Path) -> None:
    """Fetch the four files into ``root/MNIST/raw`` with torchvision (its mirrors and checksums); a DataError,
    and no empty folders left behind, when that fails (no network, a proxy, a read-only root)."""
    from torchvision.datasets import MNIST  # only to download: reading is done here

    made = [p for p in (root, root / "MNIST", raw_folder(root)) if not p.exists()]
    log.info(f"downloading MNIST into {raw_folder(root)} ...")
    try:
        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    except Exception as e:  # urllib, OSError, torchvision's "Error downloading" RuntimeError: all mean "not here"
        for p in reversed(made):
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise DataError(
            f"could not download MNIST into {raw_folder(root)} ({type(e).__name__}: "
            f"{first_line(e, empty='no reason given')}); fetch the four files by hand, "
            f"or point --data-root (or $BENCH_DATA) at a copy"
        ) from None


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random (train, val) partition of ``range(n)``; depends only on ``seed``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


class MnistTask(ClassificationTask):
    name = "mnist"
    default_val_fraction = 0.1
    augmentations = ("rotate", "translate", "scale", "elastic")  # digits are not flip-invariant (6/9, 2/5)
    classes = [str(i) for i in range(10)]

    def check_config(self, cfg: Config, where: str) -> None:
        super().check_config(cfg, where)
        if cfg.data.channels not in (None, [0]):
            raise ConfigError(f"{where}.data.channels: MNIST images have one channel; leave it unset (or [0])")

    def prepare(self, root: Path, download: bool, test: bool = True) -> None:
        """Check the four files; with ``download`` fetch the missing ones first (torchvision's mirrors)."""
        raw = raw_folder(root)
        if download and any(_find(raw, s) is None for s in _needed(test)):
            _download(Path(root))
        try:
            check_files(root, test)
        except DataError as e:
            if not any(_find(raw, s) for s in FILES):
                raise DataError(
                    f"no MNIST files under {raw}: point --data-root (or $BENCH_DATA) at a folder that holds "
                    f"MNIST/raw, or add --download to fetch them into {raw}"
                ) from None
            raise e

    def load(self, cfg: Config, device: torch.device, test: bool = True) -> Data:
        assert cfg.data.root is not None, "resolve the data root before loading"
        tx, ty, sx, sy = load_mnist_arrays(cfg.data.root, test)
        tr, va = split_indices(len(tx), cfg.data.val_fraction, cfg.data.split_seed)
        if cfg.data.train_subset is not None:
            if cfg.data.train_subset > len(tr):
                raise ConfigError(
                    f"data.train_subset: {cfg.data.train_subset} is more than the {len(tr)} training images "
                    f"left after the validation split"
                )
            # A subset is a prefix of a seeded permutation, so it is the same for every run.
            keep = torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.data.split_seed + 1))
            tr = tr[keep[: cfg.data.train_subset]].sort().values
        x_train = tx[tr].float().div_(255)
        # Normalization statistics from the training images only.
        mean, std = x_train.mean().item(), x_train.std().item()

        def prep(x: Tensor) -> Tensor:  # uint8 (N,28,28) -> normalized float (N,1,28,28) on device
            return ((x.float() / 255 - mean) / std).unsqueeze(1).to(device)

        info = DataInfo(
            source=str(raw_folder(cfg.data.root)),
            channels=[0],
            source_channels=1,
            mean=[mean],
            std=[std],
            image_size=[28, 28],
            n_train=len(tr),
            n_val=len(va),
            n_test=len(sx) if test else 0,
            classes=self.classes,
        )
        return Data(
            train=Split(prep(tx[tr]), ty[tr].to(device)),
            val=Split(prep(tx[va]), ty[va].to(device)),
            test=Split(prep(sx), sy.to(device)) if test else None,
            info=info,
        )

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        tx, ty, sx, sy = load_mnist_arrays(root)
        x, y = (sx, sy) if split == "test" else (tx, ty)
        return ImageSet(x.numpy()[..., None], y.numpy(), [f"{split}/{i}" for i in range(len(x))])

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        a = cfg.augment
        if not (a.rotate or a.translate or a.scale or a.elastic):
            return x, y
        x, _ = augment_batch(x, None, a, gen)
        return x, y

    def preprocessing(self, info: DataInfo, cfg: Config) -> dict[str, str]:
        # How MNIST itself was made (LeCun et al.): the digit's bounding box scaled into a 20x20 box keeping
        # its aspect ratio, then placed in 28x28 with its centre of mass at the centre.  A plain resize of a
        # digit drawn small on a large canvas gives a dot, which the network reads as a 1.
        return {
            "color_mode": "L",
            "resize_policy": "mnist",
            "ink_box": "20",
            "invert": "auto",
            "resample": "lanczos",
            "classes": json.dumps(info.classes or self.classes),
        }
