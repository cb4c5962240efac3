"""WARWICK gland segmentation (the course subset of Warwick-QU / GlaS).

Folder layout (``cfg.data.root/WARWICK`` if it exists, else ``cfg.data.root`` itself)::

    Train/image_<id>.png  Train/label_<id>.png   (85 pairs in WARWICK)
    Test/image_<id>.png   Test/label_<id>.png    (60 pairs)

Images are RGB (or greyscale) PNGs, labels single-channel PNGs with values in {0, 255}
(255 = gland).  Any image size works as long as it is the same for every image *within
a folder* (a split is one tensor; the models are fully convolutional and pad internally,
so Train and Test sizes may differ).  Other files in the folders are ignored.

Everything is checked before any training: each image has its label and vice versa,
sizes agree, labels are binary, files are readable images; otherwise
:class:`~bench.tasks.base.DataError` names the offending file.

A fixed share (``data.val_fraction``, drawn with ``data.split_seed``) of the training
images is held out for validation (best epoch, early stopping, best rung); normalization
statistics come from the remaining training images only.  The test split is only
evaluated once per run.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.config import Config, ConfigError
from bench.metrics import dice_per_image, segmentation_report
from bench.tasks.base import Data, DataError, LossFn, Split, Task

__all__ = ["WarwickTask", "DataError", "find_folder", "read_pairs"]

_PAIR_RE = re.compile(r"^(image|label)_(.+)\.png$")
# Largest number of pixels per evaluation forward pass: keeps memory bounded for big images.
_EVAL_PIXELS = 1 << 22


# --------------------------------------------------------------------------- reading files


def find_folder(root: str | Path) -> Path:
    """``root/WARWICK`` if it is a folder, else ``root`` when it holds Train/ and Test/."""
    root = Path(root)
    for cand in (root / "WARWICK", root):
        if (cand / "Train").is_dir() and (cand / "Test").is_dir():
            return cand
    raise DataError(f"{root}: no WARWICK data: expected {root / 'WARWICK'}/{{Train,Test}}/ or {root}/{{Train,Test}}/")


def _read_image(path: Path) -> np.ndarray:
    """(H, W, C) uint8 array of an image file (C = 3 for colour, 1 for greyscale)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            if im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])  # drop alpha
            elif im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # any decoder failure is a data error about this one file
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_label(path: Path) -> np.ndarray:
    """(H, W) bool gland mask of a label file whose values are in {0, 255}."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.asarray(im, dtype=bool)
            arr = np.asarray(im.convert("L") if im.mode == "P" else im)
    except Exception as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        if arr.shape[2] > 1 and not (arr == arr[:, :, :1]).all():
            raise DataError(f"{path}: label must be single-channel (greyscale), got {arr.shape[2]} different channels")
        arr = arr[:, :, 0]
    values = np.unique(arr)
    if not set(values.tolist()) <= {0, 255}:
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise DataError(f"{path}: label is not binary: values must be 0 or 255, found {shown}")
    return arr == 255


def read_pairs(folder: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read every ``image_<id>.png`` / ``label_<id>.png`` pair of ``folder``, sorted by id.

    Returns (image file names, images uint8 (N, H, W, C), masks bool (N, H, W)).
    Raises one DataError listing every problem of the folder, one line per file (unpaired,
    unreadable, mis-sized or non-binary), or saying the folder has no pairs, so a user fixes
    a broken copy in one pass rather than one file per run.
    """
    files: dict[str, dict[str, Path]] = {"image": {}, "label": {}}
    for p in sorted(folder.iterdir()):
        m = _PAIR_RE.match(p.name)
        if m and p.is_file():
            files[m.group(1)][m.group(2)] = p
    problems: list[str] = []
    for kind, other in (("image", "label"), ("label", "image")):
        for key in sorted(set(files[kind]) - set(files[other])):
            problems.append(f"{folder / f'{other}_{key}.png'}: missing (needed for {files[kind][key]})")
    ids = sorted(set(files["image"]) & set(files["label"]), key=lambda k: (len(k), k))  # image_2 before image_10
    if not ids and not problems:
        raise DataError(f"{folder}: no image_<id>.png / label_<id>.png pairs found")
    images, masks, names = [], [], []
    for key in ids:
        try:
            img, lab = _read_image(files["image"][key]), _read_label(files["label"][key])
        except DataError as e:
            problems.append(str(e))
            continue
        if img.shape[:2] != lab.shape:
            problems.append(f"{files['label'][key]}: size {lab.shape[1]}x{lab.shape[0]} differs from its image "
                            f"{files['image'][key].name} ({img.shape[1]}x{img.shape[0]})")
        elif images and img.shape != images[0].shape:
            (h, w, c), (h0, w0, c0) = img.shape, images[0].shape
            problems.append(f"{files['image'][key]}: {w}x{h} with {c} channels differs from {names[0]} "
                            f"({w0}x{h0} with {c0}); all images of a folder must share one size")
        else:
            images.append(img)
            masks.append(lab)
            names.append(files["image"][key].name)
    if problems:
        raise DataError("\n".join(problems))
    return names, np.stack(images), np.stack(masks)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, val) index arrays of ``range(n)``, determined by ``seed`` only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def display_images(x: Tensor, info: dict[str, Any]) -> np.ndarray:
    """Undo the normalization for display: x (N, C, H, W) -> uint8 RGB (N, H, W, 3).

    Kept channel ``k`` goes back to its original position ``info["channels"][k]``; dropped
    channels are black (WARWICK's blue is zero anyway).  A greyscale source is repeated.
    """
    mean = torch.tensor(info["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(info["std"]).view(1, -1, 1, 1)
    raw = (x.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().numpy()
    n, _, h, w = raw.shape
    out = np.zeros((n, h, w, 3), dtype=np.uint8)
    if info.get("source_channels", 3) == 1:
        return np.repeat(raw[:, :1].transpose(0, 2, 3, 1), 3, axis=3)
    for k, c in enumerate(info["channels"]):
        if c < 3:
            out[..., c] = raw[:, k]
    return out


# --------------------------------------------------------------------------- the task


class WarwickTask(Task):
    name = "warwick"
    kind = "segmentation"
    metric = "dice"
    metric_label = "pixel Dice"
    report_metrics = ("dice", "dice_pooled", "iou", "obj_f1", "obj_dice", "obj_hausdorff")
    lower_is_better = ("obj_hausdorff",)
    default_loss = "bce"
    default_val_fraction = 0.15  # 13 of the 85 training images

    def load(self, cfg: Config, device: torch.device) -> Data:
        assert cfg.data.root is not None, "resolve the data root before loading"
        folder = find_folder(cfg.data.root)
        read, problems = {}, []
        for sub in ("Train", "Test"):  # check both before failing: every broken file in one message
            try:
                read[sub] = read_pairs(folder / sub)
            except DataError as e:
                problems.append(str(e))
        if problems:
            raise DataError("\n".join(problems))
        (tr_names, tr_img, tr_mask), (te_names, te_img, te_mask) = read["Train"], read["Test"]
        n_src = tr_img.shape[3]
        if te_img.shape[3] != n_src:
            raise DataError(f"{folder / 'Test'}: images have {te_img.shape[3]} channels, Train/ has {n_src}")

        if cfg.data.channels is not None:
            channels = list(cfg.data.channels)
            bad = [c for c in channels if not 0 <= c < n_src]
            if bad or not channels:
                raise ConfigError(f"data.channels: {channels} invalid for {n_src}-channel images in {folder}")
        else:
            # Default: every channel that holds data (WARWICK's blue channel is all zero -> [0, 1]).
            channels = [c for c in range(n_src) if tr_img[..., c].any()] or [0]

        val_fraction = cfg.data.val_fraction if cfg.data.val_fraction is not None else self.default_val_fraction
        tr, va = split_train_val(len(tr_names), val_fraction, cfg.data.split_seed)
        if cfg.data.train_subset is not None:
            if cfg.data.train_subset < 1:
                raise ConfigError(f"data.train_subset: must be >= 1, got {cfg.data.train_subset}")
            # A prefix of a seeded permutation: the same subset for every run and rung.
            keep = torch.randperm(len(tr), generator=torch.Generator().manual_seed(cfg.data.split_seed + 1)).numpy()
            tr = np.sort(tr[keep[: cfg.data.train_subset]])

        x_all = torch.from_numpy(tr_img[..., channels]).permute(0, 3, 1, 2).float().div_(255)
        x_fit = x_all[torch.from_numpy(tr)]
        # Per-channel statistics of the training images only (not validation, not test).
        mean = x_fit.mean(dim=(0, 2, 3))
        std = x_fit.std(dim=(0, 2, 3)).clamp(min=1e-6)

        def prep(img: np.ndarray, mask: np.ndarray, names: list[str]) -> Split:
            x = torch.from_numpy(img[..., channels]).permute(0, 3, 1, 2).float().div_(255)
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
            y = torch.from_numpy(mask).unsqueeze(1).float()
            return Split(x.contiguous().to(device), y.to(device), names)

        def pick(idx: np.ndarray) -> Split:
            return prep(tr_img[idx], tr_mask[idx], [f"Train/{tr_names[i]}" for i in idx])

        info: dict[str, Any] = {
            "source": str(folder),
            "source_channels": int(n_src),
            "channels": channels,
            "mean": mean.tolist(),  # of pixel values scaled to [0, 1], per kept channel
            "std": std.tolist(),
            "input_size": {"train": list(tr_img.shape[1:3]), "test": list(te_img.shape[1:3])},
            "n_train": len(tr), "n_val": len(va), "n_test": len(te_names),
            "val_images": [tr_names[i] for i in va],
        }
        return Data(pick(tr), pick(va), prep(te_img, te_mask, [f"Test/{n}" for n in te_names]), info)

    def model_kwargs(self, data: Data | dict[str, Any]) -> dict[str, Any]:
        info = data.info if isinstance(data, Data) else data
        return {"in_channels": len(info["channels"]), "num_classes": 1}

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        a = cfg.augment
        if not (a.flips or a.rotate or a.translate or a.scale or a.elastic or a.intensity):
            return x, y
        from bench.augment import augment_batch

        x, y2 = augment_batch(x, y, a, gen)
        return x, y2 if y2 is not None else y

    def train_score(self, logits: Tensor, y: Tensor) -> float:
        return float(dice_per_image(logits > 0, y > 0.5).mean())

    # ----------------------------------------------------------------------- prediction

    @torch.no_grad()
    def _batched(self, model: nn.Module, split: Split, cfg: Config,
                 fn: Callable[[nn.Module, Tensor], Tensor]) -> Tensor:
        """``fn(model, batch)`` over the split in eval mode, batched by ``train.eval_batch_size``
        and at most ~4M pixels per pass (bounded memory for large images); float32."""
        from bench.train import autocast

        was_training = model.training
        model.eval()
        h, w = split.x.shape[-2:]
        bs = max(1, min(cfg.train.eval_batch_size, _EVAL_PIXELS // (h * w)))
        with autocast(cfg, split.x.device):
            outs = [fn(model, split.x[i : i + bs]).float() for i in range(0, len(split), bs)]
        model.train(was_training)
        return torch.cat(outs)

    def predict_proba(self, model: nn.Module, split: Split, cfg: Config, tta: bool | None = None) -> Tensor:
        """Foreground probabilities (N, 1, H, W) float32; ``tta`` (default ``cfg.eval.tta``)
        averages the probabilities of the 8 dihedral transforms."""
        from bench.augment import dihedral_tta

        if cfg.eval.tta if tta is None else tta:
            return self._batched(model, split, cfg, dihedral_tta)
        return torch.sigmoid(self._batched(model, split, cfg, lambda m, b: m(b)))

    def predict_masks(self, model: nn.Module, split: Split, cfg: Config, tta: bool | None = None) -> Tensor:
        """Binary masks (N, H, W) bool: probability > ``cfg.eval.threshold``."""
        return self.predict_proba(model, split, cfg, tta)[:, 0] > cfg.eval.threshold

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *,
                 final: bool) -> dict[str, float]:
        """``loss`` (on the plain forward pass) and ``dice``; with ``final`` every report metric.

        Both honour ``cfg.eval.tta`` and ``cfg.eval.threshold``: validation scores an epoch the
        way the test is scored, so the best epoch and the best rung are chosen by the same rule
        that is reported (TTA costs 8 forward passes of the small validation split per epoch).
        """
        logits = self._batched(model, split, cfg, lambda m, b: m(b))
        loss = float(loss_fn(logits, split.y))
        probs = self.predict_proba(model, split, cfg, tta=True) if cfg.eval.tta else torch.sigmoid(logits)
        pred, target = probs[:, 0] > cfg.eval.threshold, split.y[:, 0] > 0.5
        if not final:
            return {"loss": loss, "dice": float(dice_per_image(pred, target).mean())}
        return {"loss": loss, **segmentation_report(pred, target)}

    # ----------------------------------------------------------------------- figures

    def summary_figures(self, run_dir: Path, out_prefix: Path) -> Iterable[tuple[str, Path]]:
        """Best / median / worst test images of a finished run with gland outlines.

        Rebuilds the run's model from ``best.pt`` and its data from ``config.json``; returns
        nothing (with a note on stderr) when the data or checkpoint is no longer there.
        """
        from bench import files
        from bench.seg_figures import draw_outlines
        from bench.spec import config_from_dict
        from bench.train import build_model

        try:
            meta = files.read_json(run_dir / "config.json")
            cfg = config_from_dict(meta["config"], where=str(run_dir / "config.json"))
            data = self.load(cfg, torch.device("cpu"))
            model = build_model(cfg, self, data)
            model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["state_dict"])
        except (OSError, ValueError, KeyError) as e:
            print(f"note: no segmentation figure for {run_dir}: {e}", file=sys.stderr)
            return []
        pred = self.predict_masks(model, data.test, cfg)
        gt = data.test.y[:, 0] > 0.5
        dice = dice_per_image(pred, gt).numpy()
        png = out_prefix.with_name(out_prefix.name + "-outlines.png")
        draw_outlines(display_images(data.test.x, data.info), gt.numpy(), pred.numpy(), data.test.names, dice, png)
        caption = (f"Test images of the best run ({run_dir.parent.name}, {run_dir.name}): ground-truth (white) and "
                   f"predicted (blue) gland outlines for the best, median and worst pixel Dice "
                   f"(mean {dice.mean():.3f}{', with TTA' if cfg.eval.tta else ''}).")
        return [(caption, png)]
