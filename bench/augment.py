"""Batched, on-device data augmentation and dihedral test-time augmentation.

``augment_batch`` transforms a batch of images and (optionally) their masks together,
on the batch's device, drawing every random number from the given ``torch.Generator``
(so a resumed run replays the same augmentations).  Steps, each switched by an
:class:`~bench.config.AugmentCfg` field:

1. ``flips``: a random element of the dihedral group D4 per sample (identity, 3
   rotations by 90 degrees, 4 reflections), applied exactly with ``rot90``/``flip``.
   Non-square images use the 4 elements that keep the shape (identity, flips, rot 180).
2. ``rotate`` / ``translate`` / ``scale`` / ``elastic``: one sampling grid per sample
   (affine part from ``affine_grid``, plus a smooth random displacement field), applied
   with a single ``grid_sample`` per batch.  Images are sampled bilinearly; masks are
   sampled bilinearly and re-thresholded at 0.5 (smoother outlines than nearest).
   Outside the image: reflection for segmentation (tissue continues), border
   replication for classification (``y is None``: the constant background).
3. ``intensity``: contrast and brightness jitter per sample and channel, on the image only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import AugmentCfg

ELASTIC_SPACING = 16  # pixels between the random control points of the elastic field


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> Tensor:
    """(n,) uniform draws from ``gen`` (on the generator's own device), moved to ``device``."""
    return (torch.rand(n, generator=gen, device=gen.device) * (hi - lo) + lo).to(device)


def dihedral(x: Tensor, e: int) -> Tensor:
    """Apply D4 element ``e`` in 0..7 to the last two dims: optional horizontal flip, then rot90 ``e % 4`` times."""
    if e >= 4:
        x = x.flip(-1)
    return torch.rot90(x, e % 4, dims=(-2, -1))


def dihedral_inverse(x: Tensor, e: int) -> Tensor:
    """Undo :func:`dihedral` with the same ``e``."""
    x = torch.rot90(x, -(e % 4), dims=(-2, -1))
    return x.flip(-1) if e >= 4 else x


def dihedral_elements(h: int, w: int) -> list[int]:
    """The D4 elements that keep an (h, w) image's shape: all 8 when square, else 0, 2, 4, 6."""
    return list(range(8)) if h == w else [0, 2, 4, 6]


def _random_dihedral(x: Tensor, y: Tensor | None, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    elements = torch.tensor(dihedral_elements(*x.shape[-2:]))
    pick = elements[torch.randint(len(elements), (x.shape[0],), generator=gen, device=gen.device).cpu()]
    x = x.clone()
    y = None if y is None else y.clone()
    for e in pick.unique().tolist():
        idx = (pick == e).nonzero().squeeze(1).to(x.device)
        x[idx] = dihedral(x[idx], e)
        if y is not None:
            y[idx] = dihedral(y[idx], e)
    return x, y


def _sampling_grid(shape: torch.Size, cfg: AugmentCfg, gen: torch.Generator, device: torch.device) -> Tensor:
    """(N, H, W, 2) normalized sampling grid: random rotation/scale/shift plus elastic field."""
    n, _, h, w = shape
    angle = _uniform(gen, n, -cfg.rotate, cfg.rotate, device) * (math.pi / 180)
    zoom = _uniform(gen, n, 1 - cfg.scale, 1 + cfg.scale, device)
    shift = torch.stack([_uniform(gen, n, -cfg.translate, cfg.translate, device) for _ in range(2)], 1) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # rotate in pixel space: normalized coords are (x*2/W, y*2/H), so conjugate R by diag(2/W, 2/H)
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), shift[:, 0]], 1),
            torch.stack([sin * (w / h), cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if cfg.elastic > 0:
        ch, cw = max(2, round(h / ELASTIC_SPACING) + 1), max(2, round(w / ELASTIC_SPACING) + 1)
        coarse = torch.rand(n, 2, ch, cw, generator=gen, device=gen.device).to(device) * 2 - 1
        field = F.interpolate(coarse * cfg.elastic, size=(h, w), mode="bicubic", align_corners=True)
        scale = torch.tensor([2 / w, 2 / h], device=device)  # pixels -> normalized units (x, y)
        grid = grid + field.permute(0, 2, 3, 1) * scale
    return grid


def augment_batch(x: Tensor, y: Tensor | None, cfg: AugmentCfg, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Augment a batch on its device.

    x: (N, C, H, W) float images (normalized).  y: (N, 1, H, W) float {0, 1} masks moved
    with the images, or None (classification: labels are unaffected).  Returns new
    tensors of the same shapes; the inputs are not modified.  All randomness comes from
    ``gen`` (any device; draws are moved to ``x.device``).
    """
    if cfg.flips:
        x, y = _random_dihedral(x, y, gen)
    if cfg.rotate or cfg.translate or cfg.scale or cfg.elastic:
        grid = _sampling_grid(x.shape, cfg, gen, x.device).to(x.dtype)
        pad = "border" if y is None else "reflection"
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode=pad, align_corners=False)
        if y is not None:
            y = (F.grid_sample(y.to(x.dtype), grid, mode="bilinear", padding_mode=pad, align_corners=False) > 0.5).to(
                y.dtype
            )
    if cfg.intensity:
        # Per sample and channel: stain strength varies per dye, so each channel gets its own
        # contrast factor and brightness shift (in units of the data's std: inputs are normalized).
        n, c = x.shape[:2]
        contrast = _uniform(gen, n * c, 1 - cfg.intensity, 1 + cfg.intensity, x.device).view(n, c, 1, 1)
        brightness = _uniform(gen, n * c, -cfg.intensity, cfg.intensity, x.device).view(n, c, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * contrast + mean + brightness
    return x, y


@torch.no_grad()
def dihedral_tta(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    activation: Callable[[Tensor], Tensor] | None = torch.sigmoid,
) -> Tensor:
    """Test-time augmentation over the dihedral group.

    x: (N, C, H, W).  Runs ``model`` on each of the 8 D4 transforms of ``x`` (identity, 3
    rotations by 90 degrees, 4 reflections), applies ``activation`` (sigmoid -> probabilities;
    None -> raw logits), maps each output back with the inverse transform and returns their mean
    in that order: (N, K, H, W).  For dense outputs of fully convolutional networks (segmentation):
    a rotated non-square image is a (W, H) input whose output is rotated back.  The exported TTA
    graph (``exporters.export.DihedralTTA``) is this function, traced.
    """
    total = None
    for e in range(8):
        out = model(dihedral(x, e))
        out = activation(out) if activation is not None else out
        out = dihedral_inverse(out.float(), e)
        total = out if total is None else total + out
    return total / 8
