"""Loss functions: small pure functions plus the ``LOSSES`` registry of factories.

A factory takes typed keyword hyperparameters (checked against a spec like model kwargs)
and returns ``loss(logits, target) -> scalar``.  Shapes:

* classification (``ce``): logits (N, K) float, target (N,) int64 class indices;
* binary segmentation (``bce``, ``dice``, ``dice_bce``): logits (N, 1, H, W) float,
  target (N, 1, H, W) float in {0, 1} (soft targets in [0, 1] work too);
* gland instances (``contour_bce``): logits (N, 2, H, W) (foreground, contour), target (N, 1, H, W)
  {0, 1} masks; the contour target is computed from the (augmented) mask on the fly.

The functions take ``reduction`` = "mean" | "sum" | "none" in the style of
segmentation_models_pytorch; "none" keeps one value per sample (per pixel for BCE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.config import NonNegFloat, PosFloat, PosInt, UnitFloat
from bench.registry import Registry

LossFn = Callable[[Tensor, Tensor], Tensor]
LOSSES: Registry = Registry("loss")


def _reduce(x: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"unknown reduction {reduction!r}; valid: mean, sum, none")


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy. logits (N, K), target (N,) int64 -> scalar, or (N,) with "none"."""
    return _reduce(F.cross_entropy(logits, target, reduction="none", label_smoothing=label_smoothing), reduction)


def binary_cross_entropy(logits: Tensor, target: Tensor, pos_weight: float = 1.0, reduction: str = "mean") -> Tensor:
    """Per-pixel sigmoid BCE on logits (numerically stable).

    logits, target: (N, 1, H, W) (any equal shapes) -> scalar, or the input shape with "none".
    ``pos_weight`` multiplies the loss of foreground pixels (> 1 favours recall).
    """
    pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), pos_weight=pw, reduction="none")
    return _reduce(loss, reduction)


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0, reduction: str = "mean") -> Tensor:
    """Soft Dice loss ``1 - (2 sum(p g) + s) / (sum p + sum g + s)`` per sample, p = sigmoid(logits).

    logits, target: (N, 1, H, W) -> scalar, or (N,) with "none".  Computed per image so
    small glands count as much as large ones; ``smooth`` keeps empty-empty images at loss 0.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    dice = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return _reduce(1 - dice, reduction)


@LOSSES.register()
def ce(*, label_smoothing: UnitFloat = 0.0) -> LossFn:
    """Cross-entropy for classification (logits (N, K), target (N,) int64)."""
    return lambda logits, target: cross_entropy(logits, target, label_smoothing)


@LOSSES.register()
def bce(*, pos_weight: PosFloat = 1.0) -> LossFn:
    """Pixel-wise binary cross-entropy on logits (N, 1, H, W)."""
    return lambda logits, target: binary_cross_entropy(logits, target, pos_weight)


@LOSSES.register()
def dice(*, smooth: NonNegFloat = 1.0) -> LossFn:
    """Soft Dice loss, mean over images."""
    return lambda logits, target: soft_dice_loss(logits, target, smooth)


@LOSSES.register()
def dice_bce(*, dice_weight: NonNegFloat = 1.0, bce_weight: NonNegFloat = 1.0) -> LossFn:
    """``dice_weight * soft Dice + bce_weight * BCE``: BCE gives dense gradients early,
    Dice optimises the overlap metric directly and is insensitive to class balance."""
    return lambda logits, target: (
        dice_weight * soft_dice_loss(logits, target) + bce_weight * binary_cross_entropy(logits, target)
    )


def contour_target(mask: Tensor, width: int = 1) -> Tensor:
    """The boundary band of a mask's objects: (N, 1, H, W) {0, 1} float -> same shape, 1 within ``width``
    pixels (3x3 steps) of a foreground/background edge, on both sides of it; the image border is no edge.

    In a binary mask every object's boundary is such an edge, so this is the band around each connected
    component, and the background gap between two glands that nearly touch is all band: the contour that
    separates them (DCAN, Chen et al. 2016).  Computed from the augmented mask, so it stays aligned.
    """
    k = 2 * width + 1
    dilated = F.max_pool2d(mask, k, stride=1, padding=width)  # padding counts as -inf: no edge at the border
    eroded = -F.max_pool2d(-mask, k, stride=1, padding=width)
    return dilated - eroded


@LOSSES.register()
def contour_bce(*, contour_weight: NonNegFloat = 1.0, width: PosInt = 1, dice_weight: NonNegFloat = 0.0) -> LossFn:
    """Foreground BCE (+ ``dice_weight`` x soft Dice) on channel 0 plus ``contour_weight`` x BCE of channel 1
    against :func:`contour_target` (band half-width ``width`` pixels): a network that separates touching
    glands (``model.contours``; instance labels by ``bench.instances``)."""

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        fg, contour = logits[:, :1], logits[:, 1:2]
        out = binary_cross_entropy(fg, target) + contour_weight * binary_cross_entropy(
            contour, contour_target(target.to(logits.dtype), width)
        )
        return out + dice_weight * soft_dice_loss(fg, target) if dice_weight else out

    return loss


def deep_supervision(loss_fn: LossFn, outputs: list[Tensor], target: Tensor) -> Tensor:
    """``loss_fn`` of a deeply supervised network's training outputs, weighed 1, 1/2, 1/4, ... (the full-resolution
    logits first, then the auxiliary heads from fine to coarse) and normalised to sum 1, as nnU-Net does.

    outputs: logits of equal shapes (N, K, H, W), each as ``loss_fn`` takes them; target as ``loss_fn`` takes it."""
    weights = [0.5**i for i in range(len(outputs))]
    return sum(w * loss_fn(o, target) for w, o in zip(weights, outputs, strict=True)) / sum(weights)
