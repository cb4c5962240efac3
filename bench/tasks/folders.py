"""What the folder tasks (``image_folder``, ``mask_folder``) share: finding the split folders, decoding
images the way ``bench predict`` does, resizing, and seeded splits.

Every reader here collects problems instead of stopping at the first one, so a broken copy of a
data set is reported in one :class:`~bench.tasks.base.DataError` naming every file at fault.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bench import files
from bench.config import Config, ConfigError
from bench.tasks.base import DataError

# Files taken as images (others in a data folder, e.g. a README or a .csv, are left alone).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
MODES = {"grey": "L", "rgb": "RGB"}


def data_folder(cfg: Config) -> Path:
    """The folder ``data.root`` names (resolved by the runner from the spec, ``--data-root`` or ``$BENCH_DATA``)."""
    assert cfg.data.root is not None, "resolve the data root before loading"
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root, --data-root or $BENCH_DATA names the data set's folder)")
    return root


def split_folders(root: Path) -> tuple[Path, Path] | None:
    """(train, test) subfolders of ``root`` when it has both (``train``/``test`` in any case, e.g. WARWICK's
    ``Train``/``Test``), else None: the whole folder is one set that is split by ``data.test_fraction``."""
    subs = {p.name.lower(): p for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    return (subs["train"], subs["test"]) if "train" in subs and "test" in subs else None


def check_test_fraction(cfg: Config, root: Path, default: float) -> float | None:
    """The test share to draw (None: ``root`` has train/ and test/ folders, which give the test split)."""
    if split_folders(root) is not None:
        if cfg.data.test_fraction is not None:
            raise ConfigError(
                f"data.test_fraction: {root} has train/ and test/ folders, which are the splits; "
                f"leave it unset (or remove them to split one folder)"
            )
        return None
    return cfg.data.test_fraction if cfg.data.test_fraction is not None else default


def is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def decode(path: Path, mode: str | None) -> np.ndarray:
    """(H, W, C) uint8 of an image file, decoded as ``bench predict`` decodes it (transparency composited on
    white, then PIL's conversion to ``mode``, ``L`` or ``RGB``); ``mode=None`` keeps greyscale files
    greyscale (C = 1) and makes every other file RGB (C = 3).  DataError naming the file otherwise."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            grey = im.mode in ("L", "1", "I", "I;16", "F") or (im.mode == "LA")
            arr = np.asarray(im.convert(mode or ("L" if grey else "RGB")), dtype=np.uint8)
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image (unrecognized format)") from None
    except files.IMAGE_ERRORS as e:  # truncated or corrupt file, decoder error
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise DataError(f"{path}: empty image")
    return arr[:, :, None] if arr.ndim == 2 else arr


def _border(img: np.ndarray) -> np.ndarray:
    """(2H + 2W, C) the outermost row and column on each side of (H, W, C) ``img``."""
    return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])


def pad_and_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) uint8 -> (size[0], size[1], C): padded to a square with the background (each channel's border
    median, so the content keeps its aspect ratio) and resized bilinearly; as is when already that size.
    The same as ``bench predict``'s ``resize`` policy (``exporters/images.py``), so new images meet the
    network as the training images did (a test checks the two agree)."""
    h, w, c = img.shape
    th, tw = size
    if (h, w) == (th, tw):
        return img
    side = max(h, w)
    if h != w:
        bg = np.median(_border(img), axis=0).astype(np.uint8)
        sq = np.empty((side, side, c), np.uint8)
        sq[...] = bg
        sq[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = img
        img = sq
    out = Image.fromarray(img[..., 0] if c == 1 else img).resize((tw, th), Image.Resampling.BILINEAR)
    arr = np.asarray(out)
    return arr[:, :, None] if arr.ndim == 2 else arr


def seeded_split(groups: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, drawn) sorted index arrays of ``range(len(groups))``: ``fraction`` of each group's members
    (classes; all zeros for one group) drawn at random with ``seed``, at least one when the group has two
    or more, never all of a group.  Depends only on the labels and ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    kept, drawn = [], []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[torch.randperm(len(idx), generator=gen).numpy()]
        n = min(len(idx) - 1, max(1 if len(idx) > 1 else 0, round(len(idx) * fraction)))
        drawn.append(idx[:n])
        kept.append(idx[n:])
    k, d = np.sort(np.concatenate(kept)), np.sort(np.concatenate(drawn))
    if not len(d):
        raise DataError(f"too few images to draw a {what} split: {len(groups)} in all")
    return k, d


def subset(idx: np.ndarray, cfg: Config) -> np.ndarray:
    """``data.train_subset`` of the training indices: a prefix of a seeded permutation, the same for every run."""
    n = cfg.data.train_subset
    if n is None:
        return idx
    if n > len(idx):
        raise ConfigError(
            f"data.train_subset: {n} is more than the {len(idx)} training images left after the validation split"
        )
    keep = torch.randperm(len(idx), generator=torch.Generator().manual_seed(cfg.data.split_seed + 1)).numpy()
    return np.sort(idx[keep[:n]])


def normalize(x: np.ndarray, fit: np.ndarray) -> tuple[torch.Tensor, list[float], list[float]]:
    """(normalized (N, C, H, W) float32 of uint8 (N, H, W, C) ``x``, mean, std): per-channel statistics of
    pixel values in [0, 1] of the training images ``fit`` only."""
    f = torch.from_numpy(fit).permute(0, 3, 1, 2).float().div_(255)
    mean, std = f.mean(dim=(0, 2, 3)), f.std(dim=(0, 2, 3)).clamp(min=1e-6)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255)
    return ((t - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).contiguous(), mean.tolist(), std.tolist()
