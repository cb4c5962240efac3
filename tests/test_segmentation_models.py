"""Segmentation models: shapes for any image size, switchable batch norm, typed factory signatures."""
from __future__ import annotations

import inspect
import typing

import pytest
import torch
from torch import nn

from bench.models import MODELS


@pytest.mark.parametrize("name", ["encdec", "unet"])
@pytest.mark.parametrize("size", [(32, 32), (24, 40), (37, 51), (5, 7)])
def test_logits_have_the_input_size(name: str, size: tuple[int, int]):
    # 37x51 and 5x7 are not multiples of 2**depth: the model pads internally and crops back
    model = MODELS[name](in_channels=2, num_classes=1, width=4, depth=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 2, *size))
    assert out.shape == (2, 1, *size)


@pytest.mark.parametrize("name", ["encdec", "unet"])
def test_batch_norm_switch_and_training_step(name: str):
    with_bn = MODELS[name](batch_norm=True, width=4, depth=2)
    without = MODELS[name](batch_norm=False, width=4, depth=2)
    assert any(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without.modules())
    if name == "encdec":  # BN after every conv and deconv
        convs = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in with_bn.modules())
        bns = sum(isinstance(m, nn.BatchNorm2d) for m in with_bn.modules())
        assert bns == convs - 1  # all but the final 1x1 logits conv
    x, y = torch.randn(4, 2, 16, 16), (torch.rand(4, 1, 16, 16) > 0.5).float()
    loss = nn.functional.binary_cross_entropy_with_logits(with_bn(x), y)
    loss.backward()
    assert all(p.grad is not None for p in with_bn.parameters())


@pytest.mark.parametrize("name", ["encdec", "unet"])
def test_factory_keywords_are_typed_with_defaults(name: str):
    fn = MODELS[name]
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        assert p.default is not inspect.Parameter.empty, p.name
        assert hints[p.name] in (int, float, bool, str), p.name
