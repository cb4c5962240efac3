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

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from bench import instances as inst
from bench.augment import augment_batch, dihedral_tta
from bench.config import Config, ConfigError
from bench.files import IMAGE_ERRORS
from bench.inference import Forward, batched_outputs, with_border
from bench.metrics import dice_per_image, object_f1_pooled, segmentation_report
from bench.postprocess import PostProcess, choose
from bench.seg_figures import draw_outlines
from bench.tasks.base import Data, DataError, DataInfo, Figure, ImageSet, LossFn, Metric, Split, Task
from bench.tasks.folders import IMAGE_SUFFIXES

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


def _read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """(H, W, C) uint8 array of an image file (C = 3 for colour, 1 for greyscale; ``mode`` ``L`` or ``RGB``:
    converted to it)."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            if im.mode in ("RGBA", "LA"):
                im = im.convert(im.mode[:-1])  # drop alpha
            elif im.mode not in ("RGB", "L"):
                im = im.convert("RGB")
            if mode is not None and im.mode != mode:
                im = im.convert(mode)
            arr = np.asarray(im, dtype=np.uint8)
    except IMAGE_ERRORS as e:  # any decoder failure is a data error about this one file
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _read_label(path: Path, ones: bool = False) -> np.ndarray:
    """(H, W) bool gland mask of a label file whose values are in {0, 255} (or, with ``ones``, in {0, 1})."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                return np.asarray(im, dtype=bool)
            arr = np.asarray(im.convert("L") if im.mode == "P" else im)
    except IMAGE_ERRORS as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        if arr.shape[2] > 1 and not (arr == arr[:, :, :1]).all():
            raise DataError(f"{path}: label must be single-channel (greyscale), got {arr.shape[2]} different channels")
        arr = arr[:, :, 0]
    values = np.unique(arr)
    if not (set(values.tolist()) <= {0, 255} or (ones and set(values.tolist()) <= {0, 1})):
        shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise DataError(
            f"{path}: label is not binary: values must be 0 or 255{' (or 0 or 1)' if ones else ''}, found {shown}"
        )
    return arr > 0


def named_files(folder: Path, pattern: str) -> list[tuple[str, Path]]:
    """(id, file) of every file of ``folder`` that ``pattern`` names, sorted by file: a path relative to ``folder``
    whose file name holds one ``*``, the pair's id (``label_*.png``, ``masks/*``).  A name with nothing after
    the ``*`` matches any image file by its stem (``masks/*``: ``masks/01.png``, id ``01``), so images and
    masks may have different formats."""
    sub, _, name = pattern.rpartition("/")
    d = folder / sub if sub else folder
    prefix, _, suffix = name.partition("*")
    out = []
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        if not p.is_file() or p.name.startswith("."):
            continue
        n = p.name if suffix else p.stem
        if suffix and not n.endswith(suffix) or not suffix and p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        n = n[: len(n) - len(suffix)] if suffix else n
        if n.startswith(prefix) and len(n) > len(prefix):
            out.append((n[len(prefix) :], p))
    return out


def match_files(folder: Path, pattern: str, skip: frozenset[Path] = frozenset()) -> tuple[dict[str, Path], list[str]]:
    """({id: file}, problems) of the files of ``folder`` that ``pattern`` names (:func:`named_files`), but those
    in ``skip``; two files with the same id are a problem."""
    out: dict[str, Path] = {}
    problems = []
    for key, p in named_files(folder, pattern):
        if p in skip:
            continue
        if key in out:
            problems.append(f"{p}: same id {key!r} as {out[key].name}; keep one file per id")
        else:
            out[key] = p
    return out, problems


def read_pairs(
    folder: Path, images: str = "image_*.png", masks: str = "label_*.png", ones: bool = False, mode: str | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Read every image / mask pair of ``folder`` (``images`` and ``masks``: see :func:`match_files`; WARWICK's
    ``image_<id>.png`` / ``label_<id>.png`` by default), sorted by id; ``ones``: masks of 0/1 are binary too;
    ``mode`` (``L`` or ``RGB``): images converted to it.

    Returns (image file names relative to ``folder``, images uint8 (N, H, W, C), masks bool (N, H, W)).
    Raises one DataError listing every problem of the folder, one line per file (unpaired,
    unreadable, mis-sized or non-binary), or saying the folder has no pairs, so a user fixes
    a broken copy in one pass rather than one file per run.
    """
    files: dict[str, dict[str, Path]] = {}
    problems: list[str] = []
    # a file the masks rule names is never an image (GlaS: train_1.bmp beside train_1_anno.bmp, read with
    # images "*.bmp" and masks "*_anno.bmp")
    is_mask = frozenset(p for _, p in named_files(folder, masks))
    for kind, pattern in (("image", images), ("label", masks)):
        files[kind], dup = match_files(folder, pattern, is_mask if kind == "image" else frozenset())
        problems += dup
    for kind, pattern in (("image", images), ("label", masks)):
        if not files[kind] and files["label" if kind == "image" else "image"]:  # one line, not one per partner
            what = "images" if kind == "image" else "masks"
            if kind == "image" and named_files(folder, images):
                raise DataError(
                    f"{folder}: the images rule {images!r} matches only files the masks rule {masks!r} "
                    f"names (a mask is never an image); check data.images and data.masks"
                )
            raise DataError(
                f"{folder}: the {what} rule {pattern!r} matches no file (while the other side has "
                f"{len(files['label' if kind == 'image' else 'image'])}); check data.{what} and the folder"
            )
    for kind, other, pattern in (("image", "label", masks), ("label", "image", images)):
        for key in sorted(set(files[kind]) - set(files[other])):
            partner = pattern.replace("*", key) + ("" if pattern.partition("*")[2] else ".*")
            problems.append(f"{folder / partner}: missing (needed for {files[kind][key]})")
    ids = sorted(set(files["image"]) & set(files["label"]), key=lambda k: (len(k), k))  # image_2 before image_10
    if not ids and not problems:
        raise DataError(f"{folder}: no {images.replace('*', '<id>')} / {masks.replace('*', '<id>')} pairs found")
    images_, masks_, names = [], [], []
    for key in ids:
        try:
            img, lab = _read_image(files["image"][key], mode), _read_label(files["label"][key], ones)
        except DataError as e:
            problems.append(str(e))
            continue
        if img.shape[:2] != lab.shape:
            problems.append(
                f"{files['label'][key]}: size {lab.shape[1]}x{lab.shape[0]} differs from its image "
                f"{files['image'][key].name} ({img.shape[1]}x{img.shape[0]})"
            )
        elif images_ and img.shape != images_[0].shape:
            (h, w, c), (h0, w0, c0) = img.shape, images_[0].shape
            what = "size" if (h, w) != (h0, w0) else "number of channels"
            problems.append(
                f"{files['image'][key]}: {w}x{h} with {c} channels differs from {names[0]} "
                f"({w0}x{h0} with {c0}); all images of a folder must share one {what}"
            )
        else:
            images_.append(img)
            masks_.append(lab)
            names.append(str(files["image"][key].relative_to(folder)))
    if problems:
        raise DataError("\n".join(problems))
    return names, np.stack(images_), np.stack(masks_)


def split_train_val(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed (train, val) index arrays of ``range(n)``, determined by ``seed`` only."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def display_images(x: Tensor, info: DataInfo) -> np.ndarray:
    """Undo the normalization for display: x (N, C, H, W) -> uint8 RGB (N, H, W, 3).

    Kept channel ``k`` goes back to its original position ``info.channels[k]``; dropped
    channels are black (WARWICK's blue is zero anyway).  A greyscale source is repeated.
    """
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    raw = (x.detach().float().cpu() * std + mean).clamp(0, 1).mul(255).round().byte().numpy()
    n, _, h, w = raw.shape
    out = np.zeros((n, h, w, 3), dtype=np.uint8)
    if info.source_channels == 1:
        return np.repeat(raw[:, :1].transpose(0, 2, 3, 1), 3, axis=3)
    for k, c in enumerate(info.channels):
        if c < 3:
            out[..., c] = raw[:, k]
    return out


# --------------------------------------------------------------------------- the task


Pairs = tuple[list[str], np.ndarray, np.ndarray]  # (image names, images uint8 (N, H, W, C), masks bool (N, H, W))


def read_both(root: str | Path, test: bool = True) -> tuple[Path, dict[str, Pairs]]:
    """(the data folder, {"Train": pairs, "Test": pairs}); one DataError naming every broken file of both
    (``test=False``: Train only, Test/ is not opened)."""
    folder = find_folder(root)
    read, problems = {}, []
    for sub in ("Train", "Test") if test else ("Train",):  # check both before failing: every broken file in one message
        try:
            read[sub] = read_pairs(folder / sub)
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise DataError("\n".join(problems))
    return folder, read


class WarwickTask(Task):
    name = "warwick"
    kind = "segmentation"
    metrics = (
        Metric("dice", "pixel Dice", digits=4),  # mean over images of each image's Dice (the report's number)
        Metric("dice_pooled", "dice_pooled"),  # TP/FP/FN summed over the split first
        Metric("iou", "iou"),
        Metric("obj_f1", "obj_f1"),  # GlaS object metrics, mean over images of each image's value
        Metric("obj_dice", "obj_dice"),
        Metric("obj_hausdorff", "obj_hausdorff", digits=2, higher_is_better=False, high=float("inf")),  # pixels
        # the same pooled over all objects of the split, as the GlaS contest computes them (bench/metrics.py)
        Metric("obj_f1_pooled", "obj_f1_pooled"),
        Metric("obj_dice_pooled", "obj_dice_pooled"),
        Metric("obj_hausdorff_pooled", "obj_hausdorff_pooled", digits=2, higher_is_better=False, high=float("inf")),
    )
    default_loss = "bce"
    losses = ("bce", "dice", "dice_bce", "contour_bce")  # contour_bce: with model.contours
    default_val_fraction = 0.15  # 13 of the 85 training images
    augmentations = ("flips", "rotate", "translate", "scale", "elastic", "intensity")
    supports_tta = True
    supports_postprocess = True

    def check_config(self, cfg: Config, where: str) -> None:
        super().check_config(cfg, where)
        contours, contour_loss = bool(cfg.model.get("contours")), cfg.loss["name"] == "contour_bce"
        # one without the other would train a channel on nothing, or fail at the first batch
        if contours and not contour_loss:
            raise ConfigError(
                f"{where}.loss.name: {cfg.loss['name']!r} does not train model.contours' output; use contour_bce"
            )
        if contour_loss and not contours:
            raise ConfigError(f"{where}.loss.name: contour_bce needs model.contours: true")

    def prepare(self, root: Path, download: bool, test: bool = True) -> None:
        read_both(root, test)  # there is no public mirror to fetch from: the files must be there

    def read_splits(self, cfg: Config, test: bool = True) -> tuple[Path, Pairs, Pairs | None, tuple[str, str]]:
        """(the data folder, the training pairs, the test pairs (None with ``test=False``), the prefixes that
        make their names relative to the folder); one DataError naming every broken file of both."""
        assert cfg.data.root is not None, "resolve the data root before loading"
        folder, read = read_both(cfg.data.root, test)
        return folder, read["Train"], read.get("Test"), ("Train/", "Test/")

    def load(self, cfg: Config, device: torch.device, test: bool = True) -> Data:
        folder, train, test_pairs, (tr_prefix, te_prefix) = self.read_splits(cfg, test)
        (tr_names, tr_img, tr_mask), (te_names, te_img, te_mask) = train, test_pairs or ([], None, None)
        n_src = tr_img.shape[3]
        if test and te_img.shape[3] != n_src:
            raise DataError(f"{folder / te_prefix}: images have {te_img.shape[3]} channels, {tr_prefix} has {n_src}")
        side = min(tr_img.shape[1:3]) if not test else min(*tr_img.shape[1:3], *te_img.shape[1:3])
        if cfg.eval.border >= side:  # reflection mirrors pixels that exist: at most side - 1 of them
            raise ConfigError(
                f"eval.border: {cfg.eval.border} pixels cannot be mirrored around images of {side} pixels "
                f"(their smallest side in {folder}); use at most {side - 1}"
            )

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
            if cfg.data.train_subset > len(tr):
                raise ConfigError(
                    f"data.train_subset: {cfg.data.train_subset} is more than the {len(tr)} training images "
                    f"left after the validation split"
                )
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
            return prep(tr_img[idx], tr_mask[idx], [f"{tr_prefix}{tr_names[i]}" for i in idx])

        info = DataInfo(
            source=str(folder),
            channels=channels,
            source_channels=int(n_src),
            mean=mean.tolist(),
            std=std.tolist(),
            image_size=list(tr_img.shape[1:3]),
            n_train=len(tr),
            n_val=len(va),
            n_test=len(te_names),
            val_names=[tr_names[i] for i in va],
        )
        return Data(
            pick(tr), pick(va), prep(te_img, te_mask, [f"{te_prefix}{n}" for n in te_names]) if test else None, info
        )

    def raw_images(self, root: str | Path, split: str) -> ImageSet:
        names, images, masks = read_pairs(find_folder(root) / ("Test" if split == "test" else "Train"))
        return ImageSet(images, masks, names)

    def model_kwargs(self, info: DataInfo) -> dict[str, Any]:
        return {"in_channels": len(info.channels), "num_classes": 1}

    def augment(self, x: Tensor, y: Tensor, cfg: Config, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        a = cfg.augment
        if not (a.flips or a.rotate or a.translate or a.scale or a.elastic or a.intensity):
            return x, y
        x, y2 = augment_batch(x, y, a, gen)
        return x, y2 if y2 is not None else y

    def train_score(self, logits: Tensor, y: Tensor) -> Tensor:
        return dice_per_image(logits[:, :1] > 0, y > 0.5).mean()

    # ----------------------------------------------------------------------- prediction

    def _batched(self, model: nn.Module, split: Split, cfg: Config, fn: Forward) -> Tensor:
        """``fn(model, batch)`` over the split in eval mode (on the input padded by ``eval.border``, cropped back),
        batched by ``train.eval_batch_size`` and at most ~4M pixels per pass (bounded memory for large images);
        float32."""
        b = cfg.eval.border
        h, w = split.x.shape[-2] + 2 * b, split.x.shape[-1] + 2 * b
        per_pass = max(1, min(cfg.train.eval_batch_size, _EVAL_PIXELS // (h * w)))
        return batched_outputs(model, split.x, per_pass, lambda m, x: with_border(lambda t: fn(m, t), x, b))

    def predict_proba(self, model: nn.Module, split: Split, cfg: Config, tta: bool | None = None) -> Tensor:
        """Foreground probabilities (N, 1, H, W) float32 (N, 2, H, W with ``model.contours``: foreground,
        contour); ``tta`` (default ``cfg.eval.tta``) averages the probabilities of the 8 dihedral transforms
        (each channel mapped back with the inverse transform)."""
        if cfg.eval.tta if tta is None else tta:
            return self._batched(model, split, cfg, dihedral_tta)
        return torch.sigmoid(self._batched(model, split, cfg, lambda m, b: m(b)))

    def predict_masks(self, model: nn.Module, split: Split, cfg: Config, tta: bool | None = None) -> Tensor:
        """Binary masks (N, H, W) bool: probability > ``cfg.eval.threshold``."""
        return self.predict_proba(model, split, cfg, tta)[:, 0] > cfg.eval.threshold

    def _predicted(self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn) -> tuple[float, Tensor, Tensor]:
        """(the loss of the plain forward pass, the probabilities (N, K, H, W) as scored (``predict_proba``), true
        masks (N, H, W) bool) of a split."""
        logits = self._batched(model, split, cfg, lambda m, b: m(b))
        loss = float(loss_fn(logits, split.y))
        probs = self.predict_proba(model, split, cfg, tta=True) if cfg.eval.tta else torch.sigmoid(logits)
        return loss, probs, split.y[:, 0] > 0.5

    @staticmethod
    def segmented(
        probs: Tensor, cfg: Config, post: PostProcess | None = None, contour_threshold: float = inst.CONTOUR_THRESHOLD
    ) -> tuple[Tensor, np.ndarray | None]:
        """(predicted masks (N, H, W) bool, and for a model with a contour output its gland instances (N, H, W) int,
        else None) of probabilities (N, K, H, W), post-processed by ``post``.  A contour model's mask is the union of
        its instances (``bench.instances``, at ``contour_threshold``)."""
        post = post or PostProcess()
        if probs.shape[1] == 1:
            masks = probs[:, 0] > cfg.eval.threshold
            return (masks, None) if post == PostProcess() else (torch.from_numpy(post(masks.cpu().numpy())), None)
        p = probs.cpu().numpy()
        labels = post.instances(
            np.stack([inst.label_instances(q[0], q[1], cfg.eval.threshold, contour_threshold) for q in p])
        )
        return torch.from_numpy(labels > 0), labels

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, split: Split, cfg: Config, loss_fn: LossFn, *, final: bool
    ) -> dict[str, float]:
        """``loss`` (on the plain forward pass) and ``dice``; with ``final`` every report metric.

        Both honour ``cfg.eval.tta`` and ``cfg.eval.threshold``: validation scores an epoch the
        way the test is scored, so the best epoch and the best rung are chosen by the same rule
        that is reported (TTA costs 8 forward passes of the small validation split per epoch).
        A model with a contour output (``model.contours``) is scored on its own gland instances
        (``bench.instances``) by the object metrics; the pixel metrics read its foreground channel.
        """
        loss, probs, target = self._predicted(model, split, cfg, loss_fn)
        if not final:
            return {"loss": loss, "dice": float(dice_per_image(probs[:, 0] > cfg.eval.threshold, target).mean())}
        pred, instances = self.segmented(probs, cfg)
        return {"loss": loss, **segmentation_report(pred, target, instances)}

    @torch.no_grad()
    def test_record(self, model: nn.Module, data: Data, cfg: Config, loss_fn: LossFn) -> dict[str, Any]:
        """With ``eval.postprocess``: the post-processing chosen on validation, and the test metrics with it
        (``test``) and without it (``test_raw``), from one prediction of the test split.  A contour model's choice
        includes its contour threshold; without post-processing it is :data:`bench.instances.CONTOUR_THRESHOLD`."""
        if cfg.eval.postprocess == "none":
            return super().test_record(model, data, cfg, loss_fn)
        post, chosen = self.choose_postprocess(model, data.val, cfg)
        contour_threshold = chosen.get("contour_threshold", inst.CONTOUR_THRESHOLD)
        loss, probs, target = self._predicted(model, data.test, cfg, loss_fn)
        pred, instances = self.segmented(probs, cfg)
        raw = {"loss": loss, **segmentation_report(pred, target, instances)}
        if post == PostProcess() and contour_threshold == inst.CONTOUR_THRESHOLD:
            return {"test": raw, "test_raw": raw, "postprocess": chosen}
        pred, instances = self.segmented(probs, cfg, post, contour_threshold)
        done = segmentation_report(pred, target, instances)
        return {"test": {"loss": loss, **done}, "test_raw": raw, "postprocess": chosen}

    @torch.no_grad()
    def choose_postprocess(self, model: nn.Module, val: Split, cfg: Config) -> tuple[PostProcess, dict[str, Any]]:
        """(the post-processing best on the validation split by ``cfg.eval.postprocess``, what the record says of
        it: ``min_area``, ``fill_holes``, for a contour model ``contour_threshold``, ``chosen_by``, and its validation
        score ``val`` against ``val_raw``).  A contour model's instances are post-processed (and scored: pooled object
        F1 on the instances, pixel Dice on their union), each contour threshold of
        :data:`bench.instances.CONTOUR_THRESHOLDS` with each setting (:func:`bench.instances.choose`)."""
        probs = self.predict_proba(model, val, cfg).cpu().numpy()
        target = (val.y[:, 0] > 0.5).cpu().numpy()
        by = cfg.eval.postprocess
        if by == "dice":

            def score(m: np.ndarray) -> float:  # a mask, or instance labels (their union)
                return float(dice_per_image(torch.from_numpy(m > 0), torch.from_numpy(target)).mean())
        else:

            def score(m: np.ndarray) -> float:
                return object_f1_pooled(m, target)

        if probs.shape[1] > 1:
            t, post, best, raw = inst.choose(probs, score, cfg.eval.threshold)
            return post, {**post.to_dict(), "contour_threshold": t, "chosen_by": by, "val": best, "val_raw": raw}
        post, best, raw = choose(probs[:, 0] > cfg.eval.threshold, score)
        return post, {**post.to_dict(), "chosen_by": by, "val": best, "val_raw": raw}

    # ----------------------------------------------------------------------- figures

    def score_outputs(
        self, logits: np.ndarray, targets: np.ndarray, threshold: float = 0.5, post: PostProcess | None = None
    ) -> float:
        """Mean per-image pixel Dice of (N, 1, H, W) logits against (N, H, W) masks, the masks post-processed by
        ``post`` (an exported model's metadata says which)."""
        masks = (torch.sigmoid(torch.from_numpy(logits[:, 0])) > threshold).numpy()
        return float(dice_per_image(torch.from_numpy((post or PostProcess())(masks)), torch.from_numpy(targets)).mean())

    def preprocessing(self, info: DataInfo, cfg: Config) -> dict[str, str]:
        # Any image size runs as is (the graph pads to a multiple of 2**depth); larger images are tiled
        # at the training size with a quarter of overlap, so memory stays bounded.
        size = [int(s) for s in info.image_size]
        return {
            "color_mode": "L" if info.source_channels == 1 else "RGB",
            "resize_policy": "tile",
            "tile_size": json.dumps(size),
            "tile_overlap": str(max(0, min(size) // 4)),
            "invert": "never",
            "threshold": repr(float(cfg.eval.threshold)),
        }

    # ----------------------------------------------------------------------- figures

    def summary_figures(
        self, load: Callable[[], tuple[nn.Module, Config, Data]], out_prefix: Path, title: str
    ) -> Iterable[Figure]:
        """Best / median / worst test images of a finished run with gland outlines."""
        model, cfg, data = load()
        pred = self.predict_masks(model, data.test, cfg)
        gt = data.test.y[:, 0] > 0.5
        dice = dice_per_image(pred, gt).numpy()
        png = out_prefix.with_name(out_prefix.name + "-outlines.png")
        draw_outlines(display_images(data.test.x, data.info), gt.numpy(), pred.numpy(), data.test.names, dice, png)
        caption = (
            f"Test images of the best run ({title}): ground-truth (white) and "
            f"predicted (blue) gland outlines for the best, median and worst pixel Dice "
            f"(mean {dice.mean():.3f}{', with TTA' if cfg.eval.tta else ''})."
        )
        return [(caption, png)]
