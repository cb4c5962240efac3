"""Loss functions: small pure functions plus the ``LOSSES`` registry of factories.

A factory takes typed keyword hyperparameters (checked against a spec like model kwargs)
and returns ``loss(logits, target) -> scalar``.  Shapes:

* classification (``ce``): logits (N, K) float, target (N,) int64 class indices;
* binary segmentation (``bce``, ``dice``, ``dice_bce``): logits (N, 1, H, W) float,
  target (N, 1, H, W) float in {0, 1} (soft targets in [0, 1] work too).

The functions take ``reduction`` = "mean" | "sum" | "none" in the style of
segmentation_models_pytorch; "none" keeps one value per sample (per pixel for BCE).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.config import NonNegFloat, PosFloat, UnitFloat
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
    return lambda logits, target: dice_weight * soft_dice_loss(logits, target) + bce_weight * binary_cross_entropy(
        logits, target
    )
