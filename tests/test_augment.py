"""Augmentation: images and masks move together, TTA inverts exactly, randomness comes from the generator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.augment import augment_batch, dihedral, dihedral_elements, dihedral_inverse, dihedral_tta
from bench.config import AugmentCfg

GEOMETRIC = AugmentCfg(flips=True, rotate=30.0, translate=0.1, scale=0.15, elastic=4.0)


def batch(n: int = 6, h: int = 32, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose channel 0 *is* the mask (so we can check they stay aligned) plus a noise channel."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, 1, h // 4, w // 4, generator=g) > 0.5).float()
    y = nn.functional.interpolate(y, size=(h, w), mode="nearest")
    x = torch.cat([y.clone(), torch.randn(n, 1, h, w, generator=g)], 1)
    return x, y


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("cfg", [AugmentCfg(flips=True), AugmentCfg(rotate=45.0), GEOMETRIC])
def test_mask_moves_with_image(cfg: AugmentCfg):
    x, y = batch()
    x2, y2 = augment_batch(x, y, cfg, gen(0))
    assert x2.shape == x.shape and y2.shape == y.shape
    # the same grid and the same 0.5 threshold applied to the image's mask channel give the mask
    assert torch.equal((x2[:, :1] > 0.5).float(), y2)
    assert set(y2.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(x2, x)  # something happened
    assert torch.equal(x, batch()[0])  # the inputs were not modified in place


def test_flips_are_exact_dihedral_elements():
    x, y = batch(n=16)
    x2, y2 = augment_batch(x, y, AugmentCfg(flips=True), gen(3))
    used = set()
    for i in range(len(x)):
        hits = [e for e in range(8) if torch.equal(dihedral(x[i], e), x2[i])]
        assert hits, f"sample {i} is not a dihedral transform of its input"
        assert any(torch.equal(dihedral(y[i], e), y2[i]) for e in hits)
        used.add(hits[0])
    assert len(used) > 1


def test_non_square_images_keep_their_shape():
    x, y = batch(n=8, h=16, w=24)
    assert dihedral_elements(16, 24) == [0, 2, 4, 6]
    x2, y2 = augment_batch(x, y, GEOMETRIC, gen(0))
    assert x2.shape == x.shape and y2.shape == y.shape


def test_generator_determinism():
    x, y = batch()
    cfg = AugmentCfg(flips=True, rotate=20.0, elastic=3.0, intensity=0.2)
    a = augment_batch(x, y, cfg, gen(7))
    b = augment_batch(x, y, cfg, gen(7))
    c = augment_batch(x, y, cfg, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # the global RNG is not used: reseeding it changes nothing
    torch.manual_seed(123)
    d = augment_batch(x, y, cfg, gen(7))
    assert torch.equal(a[0], d[0])


def test_intensity_changes_image_only_and_classification_case():
    x, y = batch()
    x2, y2 = augment_batch(x, y, AugmentCfg(intensity=0.3), gen(0))
    assert torch.equal(y2, y) and not torch.equal(x2, x)
    x3, y3 = augment_batch(x, None, AugmentCfg(rotate=15.0, translate=0.1, scale=0.1), gen(0))
    assert y3 is None and x3.shape == x.shape
    x4, _ = augment_batch(x, y, AugmentCfg(), gen(0))  # everything off: unchanged
    assert torch.equal(x4, x)


def test_dihedral_inverse_roundtrip():
    x = torch.randn(2, 3, 5, 5)
    for e in range(8):
        assert torch.equal(dihedral_inverse(dihedral(x, e), e), x)
    assert len({tuple(dihedral(x, e).flatten().tolist()) for e in range(8)}) == 8


def test_tta_of_identity_returns_input_and_of_equivariant_model_returns_model():
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(dihedral_tta(nn.Identity(), x, activation=None), x)
    conv = nn.Conv2d(1, 1, 1)  # a 1x1 conv commutes with every flip and rotation
    assert torch.allclose(dihedral_tta(conv, x), torch.sigmoid(conv(x)), atol=1e-6)
    x_rect = torch.randn(2, 1, 6, 10)
    assert torch.allclose(dihedral_tta(nn.Identity(), x_rect, activation=None), x_rect)
    # a model that is not equivariant gets averaged: TTA of "shift right by one" differs from it
    shift = lambda t: torch.roll(t, 1, dims=-1)  # noqa: E731
    assert not torch.allclose(dihedral_tta(shift, x, activation=None), shift(x))
