"""Binary segmentation models: the report's encoder-decoder and a small U-Net.

Both map images ``(N, in_channels, H, W)`` to per-pixel logits ``(N, num_classes, H, W)``
(``num_classes=1`` for binary masks: apply a sigmoid for probabilities; with ``contours`` one more
channel after them, the gland-contour logit).  A U-Net with ``deep_supervision`` returns, in training mode only, a
list: those logits, then the logits of one auxiliary head per coarser decoder level, upsampled to ``(H, W)``
(:func:`bench.losses.deep_supervision` weighs them); in eval mode (validation, test, export) it returns exactly the
tensor it returns without.  Both accept any
``H, W``: inputs whose sides are not divisible by ``2**depth`` are reflect-padded up to
the next multiple inside ``forward`` and the logits are cropped back, so user images of
odd sizes work without resizing.

Default widths are chosen for a 2-core CPU (speeds: results/perf.md): one epoch
over 68 images of 128x128 (forward + backward) takes about a second.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.config import PosInt, UnitFloat


def _conv(cin: int, cout: int, batch_norm: bool, stride: int = 1) -> list[nn.Module]:
    """3x3 conv (+ BN) + ReLU; the conv has no bias when BN follows (BN's shift replaces it)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _deconv(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    """2x2 stride-2 transposed conv (+ BN) + ReLU: doubles H and W exactly."""
    layers: list[nn.Module] = [nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


def _init(model: nn.Module) -> None:
    """Kaiming-normal init for the ReLU convs (the report's choice), zero biases."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _PadToMultiple(nn.Module):
    """Base: optional per-image input standardization; reflect-pad the input to a multiple of
    ``self.multiple`` and crop the output back."""

    multiple: int = 1
    input_norm: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor | list[Tensor]:
        x = self.input_norm(x)
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            # reflect needs pad < side; fall back to replicate for tiny images
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.body(x)
        return [o[..., :h, :w] for o in out] if isinstance(out, list) else out[..., :h, :w]

    def body(self, x: Tensor) -> Tensor | list[Tensor]:
        raise NotImplementedError


class EncDec(_PadToMultiple):
    """Conv/deconv encoder-decoder without skip connections (the report's model).

    Encoder: a 3x3 conv at full resolution, then ``depth`` stages of [3x3 stride-2 conv,
    3x3 conv] doubling the channels.  Dropout at the bottleneck.  Decoder: ``depth``
    stages of [2x2 stride-2 ConvTranspose2d, 3x3 conv] halving the channels.  A 1x1 conv
    gives the logits.  With ``batch_norm`` a BatchNorm2d follows every conv and deconv.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_norm: bool,
        dropout: float,
        width: int,
        depth: int,
        input_norm: bool = False,
    ):
        super().__init__()
        self.multiple = 2**depth
        if input_norm:  # each image and channel to mean 0, std 1: removes stain-intensity shifts
            self.input_norm = nn.InstanceNorm2d(in_channels)
        enc: list[nn.Module] = _conv(in_channels, width, batch_norm)
        c = width
        for _ in range(depth):
            enc += _conv(c, 2 * c, batch_norm, stride=2) + _conv(2 * c, 2 * c, batch_norm)
            c *= 2
        dec: list[nn.Module] = [nn.Dropout2d(dropout)] if dropout > 0 else []
        for _ in range(depth):
            dec += _deconv(c, c // 2, batch_norm) + _conv(c // 2, c // 2, batch_norm)
            c //= 2
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.head = nn.Conv2d(c, num_classes, 1)
        _init(self)

    def body(self, x: Tensor) -> Tensor:
        return self.head(self.decoder(self.encoder(x)))


class UNet(_PadToMultiple):
    """U-Net (Ronneberger et al. 2015) with same-padding convs, so output size = input size.

    Level ``i`` (0..depth) has ``width * 2**i`` channels and two 3x3 convs; the encoder
    downsamples by 2x2 max pooling, the decoder upsamples by 2x2 stride-2 ConvTranspose2d
    and concatenates the encoder features of the same level (the skip connection).
    Dropout is applied at the bottleneck only.  ``deep_supervision`` adds a 1x1 head to each decoder level but the
    last (full resolution), finest first, whose logits training upsamples and scores too (Lee et al. 2015; nnU-Net).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        batch_norm: bool,
        dropout: float,
        width: int,
        depth: int,
        input_norm: bool = False,
        deep_supervision: bool = False,
    ):
        super().__init__()
        self.multiple = 2**depth
        if input_norm:  # each image and channel to mean 0, std 1: removes stain-intensity shifts
            self.input_norm = nn.InstanceNorm2d(in_channels)
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(nn.Sequential(*_conv(cin, c, batch_norm), *_conv(c, c, batch_norm)))
            cin = c
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.Sequential(*_deconv(2 * c, c, batch_norm)))
            self.fuse.append(nn.Sequential(*_conv(2 * c, c, batch_norm), *_conv(c, c, batch_norm)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        _init(self)
        # built after the network is initialised, so that its weights are those of a U-Net without them (same seed)
        self.aux = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in chans[1:-1]) if deep_supervision else None
        if self.aux is not None:
            _init(self.aux)

    def body(self, x: Tensor) -> Tensor | list[Tensor]:
        """(N, C, H, W) with H, W multiples of 2**depth -> logits (N, K, H, W); in training with deep supervision,
        [those, then one (N, K, H, W) per auxiliary head, from the level at H/2 down to H/2**(depth-1)]."""
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        x = self.drop(skips.pop())
        levels = []  # decoder features, coarsest first
        for up, fuse in zip(self.up, self.fuse, strict=True):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
            levels.append(x)
        out = self.head(x)
        if self.aux is None or not self.training:
            return out
        size = out.shape[-2:]
        return [out] + [
            F.interpolate(head(f), size=size, mode="bilinear", align_corners=False)
            for head, f in zip(self.aux, reversed(levels[:-1]), strict=True)
        ]


def encdec(
    in_channels: int = 2,
    num_classes: int = 1,
    *,
    batch_norm: bool = False,
    dropout: UnitFloat = 0.25,
    width: PosInt = 16,
    depth: PosInt = 3,
    input_norm: bool = False,
    contours: bool = False,
) -> nn.Module:
    """The report's conv/deconv encoder-decoder (no skips); any H, W (padded to a multiple of 2**depth).

    ``width``: channels at full resolution (doubled per level); ``depth``: number of stride-2
    stages; ``input_norm``: standardize each input image per channel first; ``contours``: one more output
    channel, the gland-contour logit (``bench.instances``, trained by the ``contour_bce`` loss).
    """
    return EncDec(in_channels, num_classes + contours, batch_norm, dropout, width, depth, input_norm)


def unet(
    in_channels: int = 2,
    num_classes: int = 1,
    *,
    batch_norm: bool = True,
    dropout: UnitFloat = 0.25,
    width: PosInt = 16,
    depth: PosInt = 3,
    input_norm: bool = False,
    contours: bool = False,
    deep_supervision: bool = False,
) -> nn.Module:
    """U-Net with ``depth`` poolings and base width ``width``; any H, W (padded to a multiple of 2**depth).

    ``input_norm``: standardize each input image per channel first (robust to stain shifts); ``contours``: one
    more output channel, the gland-contour logit (``bench.instances``, trained by the ``contour_bce`` loss);
    ``deep_supervision``: auxiliary heads at the coarser decoder levels, trained with the same loss and used in
    training only (:class:`UNet`).
    """
    return UNet(in_channels, num_classes + contours, batch_norm, dropout, width, depth, input_norm, deep_supervision)
