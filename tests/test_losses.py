"""Loss functions: values against hand computations and torch references, shapes, registry."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch
import torch.nn.functional as F

from bench import losses as L


def test_registry_names_and_typed_keyword_factories():
    assert {"ce", "bce", "dice", "dice_bce"} <= set(L.LOSSES)
    for name, factory in L.LOSSES.items():
        hints = typing.get_type_hints(factory)
        for p in inspect.signature(factory).parameters.values():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
            assert hints[p.name] in (int, float, bool, str), (name, p.name)


def test_bce_matches_torch_and_pos_weight_scales_foreground():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 5, 5), (torch.rand(2, 1, 5, 5) > 0.5).float()
    ref = F.binary_cross_entropy_with_logits(logits, target)
    assert L.LOSSES["bce"]()(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    ones = torch.ones_like(target)  # all foreground: pos_weight multiplies every pixel's loss
    assert L.LOSSES["bce"](pos_weight=2.0)(logits, ones).item() == pytest.approx(
        2 * L.LOSSES["bce"]()(logits, ones).item(), rel=1e-6
    )
    assert L.binary_cross_entropy(logits, target, reduction="none").shape == logits.shape
    assert L.binary_cross_entropy(logits, target, reduction="sum").item() == pytest.approx(ref.item() * 50, rel=1e-5)


def test_soft_dice_hand_value():
    # logits 0 -> p = 0.5 on all 16 pixels; target has 4 foreground pixels; smooth 1:
    # dice = (2 * 0.5 * 4 + 1) / (0.5 * 16 + 4 + 1) = 5 / 13 -> loss 8 / 13
    logits = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[0, 0, 0] = 1
    assert L.soft_dice_loss(logits, target).item() == pytest.approx(8 / 13)


def test_soft_dice_extremes_and_per_image_reduction():
    target = torch.zeros(2, 1, 8, 8)
    target[0, :, 2:6, 2:6] = 1  # image 1 stays empty
    perfect = (target * 2 - 1) * 50  # +50 inside, -50 outside
    per_image = L.soft_dice_loss(perfect, target, reduction="none")
    assert per_image.shape == (2,)
    assert per_image.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # empty-empty: 0 thanks to smooth
    assert L.soft_dice_loss(-perfect, target, smooth=0.0, reduction="none")[0].item() == pytest.approx(1.0)


def test_dice_bce_is_the_weighted_sum_and_has_gradients():
    torch.manual_seed(1)
    logits = torch.randn(3, 1, 6, 6, requires_grad=True)
    target = (torch.rand(3, 1, 6, 6) > 0.4).float()
    combo = L.LOSSES["dice_bce"](dice_weight=0.5, bce_weight=2.0)(logits, target)
    expected = 0.5 * L.soft_dice_loss(logits, target) + 2.0 * L.binary_cross_entropy(logits, target)
    assert combo.item() == pytest.approx(expected.item(), rel=1e-6)
    combo.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert L.LOSSES["dice"]()(logits, target).dim() == 0


def test_cross_entropy_with_label_smoothing():
    logits, target = torch.randn(4, 10), torch.tensor([0, 3, 9, 1])
    ref = F.cross_entropy(logits, target, label_smoothing=0.1)
    assert L.LOSSES["ce"](label_smoothing=0.1)(logits, target).item() == pytest.approx(ref.item(), rel=1e-6)
    assert L.cross_entropy(logits, target, reduction="none").shape == (4,)
    with pytest.raises(ValueError, match="reduction"):
        L.cross_entropy(logits, target, reduction="avg")
