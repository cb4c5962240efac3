"""Every registered model runs forward and backward with the right output shape.

New models must add a row to EXAMPLES; the coverage test fails otherwise, so no model
enters the registry untested.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.config import ConfigError
from bench.models import MODELS, count_parameters, create_model

# name -> (small kwargs, input shape (N, C, H, W), expected output shape)
EXAMPLES = {
    "mnist_cnn": ({}, (3, 1, 28, 28), (3, 10)),
    "mnist_resnet": ({"width": 8}, (3, 1, 28, 28), (3, 10)),
    "lean_cnn": ({"widths": [4, 8], "hidden": 16}, (3, 1, 28, 28), (3, 10)),
    "encdec": ({"width": 4}, (2, 2, 32, 32), (2, 1, 32, 32)),
    "unet": ({"width": 4}, (2, 2, 32, 32), (2, 1, 32, 32)),
}


def test_every_registered_model_has_an_example():
    assert set(MODELS) == set(EXAMPLES)


class TestModelBase:
    """Forward, backward and train/eval behaviour shared by all models."""

    @pytest.fixture(params=sorted(EXAMPLES))
    def case(self, request):
        name = request.param
        kwargs, shape, out = EXAMPLES[name]
        torch.manual_seed(0)
        model = create_model(name, in_channels=shape[1], num_classes=out[1], **kwargs)
        return name, model, shape, out

    def test_forward_shape_and_finite(self, case):
        _, model, shape, out = case
        y = model(torch.randn(shape))
        assert y.shape == out and torch.isfinite(y).all()

    def test_backward_reaches_every_parameter(self, case):
        _, model, shape, _ = case
        model(torch.randn(shape)).square().mean().backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not missing

    def test_eval_is_deterministic(self, case):
        _, model, shape, _ = case
        model.eval()
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
        assert count_parameters(model) > 0


def test_report_cnn_switches():
    with_bn = create_model("mnist_cnn", batch_norm=True)
    without = create_model("mnist_cnn", batch_norm=False, dropout=0.0)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 5
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)) for m in without.modules())
    assert sum(isinstance(m, torch.nn.Conv2d) for m in with_bn.modules()) == 5
    assert sum(isinstance(m, torch.nn.Linear) for m in with_bn.modules()) == 2
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in with_bn.modules()) == 3
    with pytest.raises(ValueError, match="unknown init"):
        create_model("mnist_cnn", init="xavier")


def test_unknown_model_lists_choices():
    with pytest.raises(KeyError, match="unknown model 'mnist_cn'; valid choices \\(closest first\\): mnist_cnn"):
        create_model("mnist_cn")


def test_lean_cnn_does_the_anchor_s_work_and_takes_other_shapes():
    """The default is tuomaso/train_mnist_fast's network: 24 5x5 convs (28 -> 24, pooled to 12), 32 3x3 convs
    (12 -> 10, pooled to 5), 800 -> 256 -> 10: 345,600 + 691,200 + 204,800 + 2,560 multiply-adds per image."""
    model = create_model("lean_cnn")
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 1, 28, 28))
    assert counter.get_total_flops() == 2 * 1_244_160
    three = create_model(
        "lean_cnn", in_channels=3, num_classes=4, widths=[8, 8, 8], kernels=[3, 3, 3], image_size=32, batch_norm=True
    )
    assert three(torch.randn(2, 3, 32, 32)).shape == (2, 4)  # 32 -> 15 -> 6 -> 2
    with pytest.raises(ConfigError, match="model.kernels: .*one kernel size per conv width"):
        create_model("lean_cnn", widths=[8, 8, 8])
    with pytest.raises(ConfigError, match="model.widths: .*leave no pixels of a 28x28 image"):
        create_model("lean_cnn", widths=[8] * 4, kernels=[3] * 4)


def test_lean_cnn_strided_stages_skip_the_pool_and_three_quarters_of_the_work():
    """``strided=1``: the 24 5x5 convs stride 2 (28 -> 12 directly, 24 * 25 * 144 = 86,400 multiply-adds instead of
    345,600) and the rest is unchanged; with every stage strided, 32 -> 15 -> 7 -> 3 for 3x3 kernels."""
    model = create_model("lean_cnn", strided=1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.features[:2])
    with FlopCounterMode(display=False) as counter:
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert counter.get_total_flops() == 2 * 2 * (86_400 + 691_200 + 204_800 + 2_560)
    every = create_model("lean_cnn", in_channels=3, widths=[8, 8, 8], kernels=[3, 3, 3], image_size=32, strided=3)
    assert every.classifier[1].in_features == 8 * 3 * 3
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in every.modules())
    assert every(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ConfigError, match="at most 2 can be strided, got 3"):
        create_model("lean_cnn", strided=3)  # more strided stages than stages: said, not ignored
