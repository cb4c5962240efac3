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


def test_deep_supervision_adds_training_outputs_only():
    from bench.losses import LOSSES, deep_supervision

    torch.manual_seed(0)
    plain = MODELS["unet"](in_channels=2, num_classes=1, width=4, depth=3, contours=True)
    torch.manual_seed(0)
    deep = MODELS["unet"](in_channels=2, num_classes=1, width=4, depth=3, contours=True, deep_supervision=True)
    # the same network (same initial weights) plus one 1x1 head at each decoder level but the last
    assert [m.in_channels for m in deep.aux] == [8, 16]
    extra = sum(p.numel() for p in deep.aux.parameters())
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in plain.parameters()) + extra
    x, y = torch.randn(2, 2, 37, 51), (torch.rand(2, 1, 37, 51) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(deep.eval()(x), plain.eval()(x))  # eval (validation, test, export): today's output
    outs = deep.train()(x)
    assert isinstance(outs, list) and [o.shape for o in outs] == [(2, 2, 37, 51)] * 3
    loss_fn = LOSSES["contour_bce"]()
    loss = deep_supervision(loss_fn, outs, y)
    # weights 1, 1/2, 1/4 normalised: a weighted mean of the three losses
    parts = [loss_fn(o, y) for o in outs]
    assert torch.allclose(loss, (parts[0] + parts[1] / 2 + parts[2] / 4) / 1.75)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in deep.aux.parameters())


def test_a_deep_supervision_export_has_the_one_output_of_the_plain_network():
    from exporters.export import export_graph

    torch.manual_seed(0)
    plain = MODELS["unet"](in_channels=2, num_classes=1, width=4, depth=2)
    torch.manual_seed(0)
    deep = MODELS["unet"](in_channels=2, num_classes=1, width=4, depth=2, deep_supervision=True)
    deep.train()  # the export puts it in eval mode itself
    example = torch.randn(1, 2, 16, 16)
    graphs = [export_graph(m, example, segmentation=True).graph for m in (plain, deep)]
    assert [len(g.output) for g in graphs] == [1, 1]
    assert len(graphs[1].initializer) == len(graphs[0].initializer)  # the auxiliary heads are not in the graph


def test_with_border_scores_the_mirrored_input_and_crops_exactly_back():
    from bench.inference import with_border

    x = torch.arange(2 * 6 * 7, dtype=torch.float32).reshape(1, 2, 6, 7)
    # a pixelwise forward must come back unchanged: an off-by-one crop would return mirrored pixels
    assert torch.equal(with_border(lambda t: t * 2, x, 3), x * 2)
    assert torch.equal(with_border(lambda t: t + 1, x, 0), x + 1)
    # a forward that sees its neighbours: at the edge it sees the mirror image, not zeros
    blur = nn.Conv2d(2, 1, 3, padding=1, bias=False)
    nn.init.ones_(blur.weight)
    with torch.no_grad():
        out, plain = with_border(blur, x, 2), blur(x)
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = nn.functional.conv2d(padded, blur.weight)
    assert out.shape == (1, 1, 6, 7)
    assert torch.allclose(out, expected) and not torch.allclose(out[..., 0, :], plain[..., 0, :])
    assert torch.allclose(out[..., 2:-2, 2:-2], plain[..., 2:-2, 2:-2])  # the interior is the plain forward's
    with pytest.raises(RuntimeError):  # as wide as the image: nothing to mirror (the task refuses it on loading)
        with_border(lambda t: t, x, 6)
