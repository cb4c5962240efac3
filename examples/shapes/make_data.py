"""Write the small data sets the example specs train on: ``python examples/shapes/make_data.py [OUT]``.

``OUT`` (default ``examples/shapes/data``) gets

* ``classify/{train,test}/{circle,square,triangle}/NNN.png``: one shape per RGB image on a noisy background,
  of varied sizes (so the spec's ``data.image_size`` resizes them), for ``task: image_folder``;
* ``segment/images/NNN.png`` + ``segment/masks/NNN.png``: RGB images with a few shapes and their 0/255
  masks, one folder that ``data.test_fraction`` splits, for ``task: mask_folder``.

Everything is drawn from a seeded generator: the same files every time.  numpy and Pillow only.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle")


def draw_shape(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill: tuple[int, ...] | int) -> None:
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = rng.integers(0, 80, 3)
    noise = rng.integers(0, 40, (h, w, 3))
    return Image.fromarray((base + noise).clip(0, 255).astype(np.uint8))


def classification_image(rng: np.random.Generator, kind: str) -> Image.Image:
    w, h = int(rng.choice([32, 40])), int(rng.choice([32, 36]))  # varied sizes: the spec resizes them
    img = background(rng, w, h)
    r = rng.uniform(6, 10)
    cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
    draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, tuple(int(v) for v in rng.integers(150, 256, 3)))
    return img


def segmentation_pair(rng: np.random.Generator, size: int = 48) -> tuple[Image.Image, Image.Image]:
    img, mask = background(rng, size, size), Image.new("L", (size, size), 0)
    for _ in range(int(rng.integers(1, 4))):
        kind, r = str(rng.choice(CLASSES)), rng.uniform(5, 10)
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        draw_shape(ImageDraw.Draw(img), kind, cx, cy, r, tuple(int(v) for v in rng.integers(150, 256, 3)))
        draw_shape(ImageDraw.Draw(mask), kind, cx, cy, r, 255)
    return img, mask


def make(out: Path, n_train: int = 60, n_test: int = 20, n_seg: int = 40, seed: int = 0) -> None:
    """``n_train``/``n_test`` images per class, ``n_seg`` segmentation pairs, under ``out``."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for kind in CLASSES:
            folder = out / "classify" / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                classification_image(rng, kind).save(folder / f"{i:03d}.png")
    for sub in ("images", "masks"):
        (out / "segment" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_seg):
        img, mask = segmentation_pair(rng)
        img.save(out / "segment" / "images" / f"{i:03d}.png")
        mask.save(out / "segment" / "masks" / f"{i:03d}.png")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=str(Path(__file__).parent / "data"), help="output folder")
    p.add_argument("--per-class", type=int, default=60, help="training images per class (default 60; test: a third)")
    p.add_argument("--pairs", type=int, default=40, help="segmentation pairs (default 40)")
    args = p.parse_args(argv)
    make(Path(args.out), args.per_class, max(1, args.per_class // 3), args.pairs)
    print(f"wrote {Path(args.out) / 'classify'} and {Path(args.out) / 'segment'}")


if __name__ == "__main__":
    main()
