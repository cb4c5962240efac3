"""Classification CNNs for 28x28 digits.

``mnist_cnn`` is the student report's network: 5 convolutions with max pooling, two
fully connected layers, switchable batch norm, dropout and Kaiming init.  ``mnist_resnet``
is a small residual network used by the rungs that go beyond the report.  ``lean_cnn`` is a
network designed for time to accuracy (``lean`` rung of ``ablations/mnist.yaml``).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from bench.config import ConfigError, NonNegInt, PosInt, UnitFloat


def init_weights(model: nn.Module, init: str) -> None:
    """``kaiming``: He-normal for ReLU nets (fan_out for convs, as torchvision does);
    ``default``: keep PyTorch's own initialisation."""
    if init == "default":
        return
    if init != "kaiming":
        raise ValueError(f"unknown init {init!r}; valid: kaiming, default")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(
                m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in", nonlinearity="relu"
            )
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv_block(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    # With batch norm the conv bias is redundant (BN's shift replaces it).
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class MnistCNN(nn.Module):
    """5 conv layers with max pooling after the 1st, 3rd and 5th, then FC -> FC.

    Pooling early keeps the two widest convolutions at 14x14 and 7x7, which halves the
    cost on a CPU against pooling after the 2nd and 4th, at no loss of accuracy we could see.

    x: (N, C, 28, 28) -> logits (N, num_classes).
    """

    def __init__(
        self, in_channels: int, num_classes: int, widths: list[int], hidden: int, batch_norm: bool, dropout: float
    ):
        super().__init__()
        if len(widths) != 5:
            raise ValueError(f"mnist_cnn needs 5 conv widths, got {widths}")
        layers: list[nn.Module] = []
        cin = in_channels
        for i, w in enumerate(widths):
            layers += conv_block(cin, w, batch_norm)
            if i in (0, 2, 4):  # 28 -> 14 -> 7 -> 3
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        head: list[nn.Module] = [nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin * 3 * 3, hidden, bias=not batch_norm)]
        if batch_norm:
            head.append(nn.BatchNorm1d(hidden))
        head += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def mnist_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    widths: list[PosInt] = [16, 32, 32, 64, 64],  # noqa: B006  (read-only default)
    hidden: PosInt = 128,
    batch_norm: bool = True,
    dropout: UnitFloat = 0.25,
    init: Literal["kaiming", "default"] = "kaiming",
) -> nn.Module:
    """The report's MNIST CNN. ``widths``: channels of the 5 conv layers."""
    model = MnistCNN(in_channels, num_classes, list(widths), hidden, batch_norm, dropout)
    init_weights(model, init)
    return model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN-ReLU with an identity (or 1x1 projected) shortcut. (N,cin,H,W) -> (N,cout,H/s,W/s)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.short(x))


def mnist_resnet(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    width: PosInt = 32,
    dropout: UnitFloat = 0.1,
    init: Literal["kaiming", "default"] = "kaiming",
) -> nn.Module:
    """A small ResNet: stem conv, 3 stages of one BasicBlock (strides 1, 2, 2), global pool, FC.

    x: (N, C, H, W) -> logits (N, num_classes); any H, W >= 8.
    """
    w = width
    model = nn.Sequential(
        nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(inplace=True),
        BasicBlock(w, w, 1),
        BasicBlock(w, 2 * w, 2),
        BasicBlock(2 * w, 4 * w, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * w, num_classes),
    )
    init_weights(model, init)
    return model


class LeanCNN(nn.Module):
    """Unpadded conv-maxpool-(BN)-ReLU stages, then FC -> ReLU -> FC: x (N, C, H, W) -> logits (N, num_classes).

    Each stage shrinks the image to ``(side - kernel + 1) // 2``; the default two stages take 28 -> 12 -> 5.  The
    first ``strided`` stages convolve with stride 2 instead of pooling, ``(side - kernel) // 2 + 1``: the same
    sides for odd kernels on even sides (28 -> 12 for 5x5), a quarter of the convolution's work and no pooling.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: list[int],
        kernels: list[int],
        hidden: int,
        batch_norm: bool,
        dropout: float,
        image_size: int,
        strided: int = 0,
    ):
        super().__init__()
        if len(widths) != len(kernels):
            raise ConfigError(
                f"model.kernels: lean_cnn needs one kernel size per conv width, got widths {widths}, kernels {kernels}"
            )
        if strided > len(widths):
            raise ConfigError(
                f"model.strided: lean_cnn has {len(widths)} stages (model.widths), so at most {len(widths)} "
                f"can be strided, got {strided}"
            )
        layers: list[nn.Module] = []
        cin, side = in_channels, image_size
        for i, (w, k) in enumerate(zip(widths, kernels, strict=True)):
            side = (side - k + 1) // 2 if i >= strided else (side - k) // 2 + 1
            if side < 1:
                raise ConfigError(
                    f"model.widths: lean_cnn's {len(widths)} stages with kernels {kernels} leave no "
                    f"pixels of a {image_size}x{image_size} image (model.image_size)"
                )
            if i < strided:
                # A first convolution with one input channel runs at a quarter of oneDNN's speed on the next one,
                # and its max-pool's gradient is a full-size zero fill: striding it made the lean rung's training
                # step 1.6x faster (fp32, 2-core AVX2 CPU) at the same accuracy (ablations/mnist.yaml).
                layers.append(nn.Conv2d(cin, w, k, stride=2, bias=not batch_norm))
            else:
                # Pooling before the ReLU: the same function (max and ReLU commute) with the ReLU on a quarter of the
                # values; measured 1.26x faster for that pair's forward and backward (bf16, channels-last, 2-core CPU).
                layers += [nn.Conv2d(cin, w, k, bias=not batch_norm), nn.MaxPool2d(2)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(cin * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def lean_cnn(
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    widths: list[PosInt] = [24, 32],  # noqa: B006  (read-only default)
    kernels: list[PosInt] = [5, 3],  # noqa: B006  (read-only default)
    hidden: PosInt = 256,
    batch_norm: bool = False,
    dropout: UnitFloat = 0.0,
    init: Literal["kaiming", "default"] = "default",
    image_size: PosInt = 28,
    strided: NonNegInt = 0,
) -> nn.Module:
    """A small CNN for time to accuracy on 28x28 digits: by default 24 5x5 and 32 3x3 convolutions, each followed
    by 2x2 max pooling, and a 256-unit hidden layer, ~1.2 M multiply-adds per image (a fifth of ``mnist_cnn``'s),
    after tuomaso/train_mnist_fast, which reaches 99 % test in one epoch with it.  ``image_size``: the input's
    side (the hidden layer's input size depends on it).  ``strided``: how many leading stages downsample with a
    stride-2 convolution instead of a max-pool (the ``lean`` rung strides the first: ~1.0 M multiply-adds)."""
    model = LeanCNN(
        in_channels, num_classes, list(widths), list(kernels), hidden, batch_norm, dropout, image_size, strided
    )
    init_weights(model, init)
    return model
