"""`python -m bench predict`: preprocessing from metadata, odd sizes, tiling, failures reported by name."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bench.models import create_model
from exporters.metadata import ModelMeta, build_metadata
from exporters.onnx import export_graph
from exporters.predict import main, prepare_digit, segment_logits
from exporters.runtime import session


def _export(path: Path, task: str) -> Path:
    """An untrained small network exported with bench metadata (no data or training needed)."""
    torch.manual_seed(0)
    if task == "mnist":
        model = create_model("mnist_cnn", in_channels=1, num_classes=10, widths=[4, 4, 8, 8, 8], hidden=16)
        info = {"channels": [0], "mean": [0.13], "std": [0.31], "input_size": [28, 28]}
        kind, example, classes = "classification", torch.randn(2, 1, 28, 28), [str(i) for i in range(10)]
    else:
        model = create_model("encdec", in_channels=2, num_classes=1, width=4, depth=2)
        info = {"channels": [0, 1], "source_channels": 3, "mean": [0.5, 0.4], "std": [0.2, 0.25],
                "input_size": {"train": [32, 32], "test": [32, 32]}}
        kind, example, classes = "segmentation", torch.randn(2, 2, 32, 32), None
    model.eval()
    proto = export_graph(model, example, kind == "segmentation")
    props = build_metadata(task, kind, info, {"eval": {"threshold": 0.5}}, None, "0123abcd", "runs/t/a/seed-0", "test",
                           min_size=int(getattr(model, "multiple", 1)), classes=classes)
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    return {t: _export(d / f"{t}.onnx", t) for t in ("mnist", "warwick")}


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_mnist_folder_with_stray_text_and_odd_sized_image(models, tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "digits"
    (src / "sub").mkdir(parents=True)
    digits = {}
    for k in range(3):
        img = np.zeros((28, 28), np.uint8)
        img[6:22, 10 + k : 14 + k] = rng.integers(150, 255, (16, 4))
        p = src / ("sub" if k == 2 else "") / f"d{k}.png"
        Image.fromarray(img).save(p)
        digits[p] = img
    dark_on_light = np.full((64, 50), 255, np.uint8)
    dark_on_light[10:54, 20:30] = 0
    Image.fromarray(dark_on_light).save(src / "odd_inverted.png")
    (src / "notes.txt").write_text("not an image")
    (src / ".DS_Store").write_bytes(b"\0\1")  # hidden: skipped
    out = tmp_path / "out"
    code = main([str(models["mnist"]), str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"{src / 'notes.txt'}: not an image file" in err and ".DS_Store" not in err
    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["file", "digit", "probability"] and len(rows) == 4
    assert {Path(r["file"]).name for r in rows} == {"d0.png", "d1.png", "d2.png", "odd_inverted.png"}
    meta = ModelMeta.from_onnx(models["mnist"])
    sess = session(models["mnist"])
    for r in rows:
        assert r["digit"] in meta.classes and 0.1 <= float(r["probability"]) <= 1
        if Path(r["file"]) in digits:  # same answer as the user's own ORT code on the metadata's preprocessing
            logits = sess.run(None, {"input": meta.normalize(digits[Path(r["file"])][None])})[0][0]
            assert r["digit"] == meta.classes[int(logits.argmax())]


def test_digit_preprocessing_inverts_light_backgrounds_and_resizes(models):
    meta = ModelMeta.from_onnx(models["mnist"])
    img = np.full((64, 50), 250, np.uint8)
    img[10:54, 20:30] = 5
    out = prepare_digit(img, meta)
    assert out.shape == (28, 28) and out[0].mean() < 10 and out[14, 14] > 200  # light digit on a dark background
    mnist_like = np.zeros((28, 28), np.uint8)
    mnist_like[5:20, 12:15] = 255
    assert (prepare_digit(mnist_like, meta) == mnist_like).all()  # already MNIST-like: untouched


def test_warwick_odd_sizes_large_images_and_stray_file(models, tmp_path, capsys):
    rng = np.random.default_rng(1)
    src = tmp_path / "glands"
    src.mkdir()
    sizes = {"same.png": (32, 32), "odd.png": (20, 27), "large.png": (90, 70), "tiny.png": (3, 5)}
    for name, (h, w) in sizes.items():
        img = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        img[..., 2] = 0
        Image.fromarray(img).save(src / name)
    Image.fromarray(rng.integers(0, 255, (40, 40)).astype(np.uint8)).save(src / "grey.png")
    sizes["grey.png"] = (40, 40)
    (src / "stray.txt").write_text("hello")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = main([str(models["warwick"]), str(src), str(tmp_path / "missing.png"), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    for bad in ("stray.txt", "broken.png", "missing.png"):
        assert f"{bad}: " in err
    assert "5 image(s) done, 3 failed" in err
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 5 and list(rows[0]) == ["file", "mask", "overlay", "foreground_fraction"]
    for name, (h, w) in sizes.items():
        stem = Path(name).stem
        mask = np.asarray(Image.open(out / f"{stem}_mask.png"))
        over = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255} and over.shape == (h, w, 3)
    # an image no larger than a tile: the same mask as one ORT call on the metadata's preprocessing
    meta = ModelMeta.from_onnx(models["warwick"])
    img = np.asarray(Image.open(src / "odd.png").convert("RGB"))
    logits = session(models["warwick"]).run(None, {"input": meta.normalize(img[None])})[0][0, 0]
    assert (np.asarray(Image.open(out / "odd_mask.png")) == 255 * (1 / (1 + np.exp(-logits)) > 0.5)).all()


class _Identity:
    """A stand-in session whose 'logits' are the input's first channel: tiling must reassemble them exactly."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, outputs, feed):
        x = feed["input"]
        self.shapes.append(x.shape)
        return [x[:, :1].copy()]


@pytest.mark.parametrize("shape", [(1, 2, 90, 70), (1, 2, 32, 200), (1, 2, 3, 2), (1, 2, 32, 32)])
def test_tiles_reassemble_the_whole_image(models, shape):
    meta = ModelMeta.from_onnx(models["warwick"])
    assert meta.tile_size == (32, 32) and meta.tile_overlap == 8 and meta.min_size == 4
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    fake = _Identity()
    got = segment_logits(fake, meta, x)
    assert got.shape == shape[2:] and np.allclose(got, x[0, 0], atol=1e-6)
    assert all(s[2] <= 32 and s[3] <= 32 and min(s[2:]) >= min(4, 32) for s in fake.shapes)


def test_exit_codes(models, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    assert main([str(models["mnist"]), str(img), "--out", str(tmp_path / "o")]) == 0
    assert _rows(tmp_path / "o" / "predictions.csv")[0]["file"] == str(img)
    not_model = tmp_path / "m.onnx"
    not_model.write_text("text")
    assert main([str(not_model), str(img)]) == 2
    bare = tmp_path / "bare.onnx"
    proto = onnx.load(str(models["mnist"]))
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    assert main([str(bare), str(img)]) == 2
    assert "metadata key 'task' missing" in capsys.readouterr().err
    assert main([str(models["mnist"])]) == 2  # no PATH
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(models["mnist"]), str(empty), "--out", str(tmp_path / "o2")]) == 1  # nothing to predict
