"""`python -m bench predict`: preprocessing from metadata, odd sizes, tiling, failures reported by name,
MNIST-like digit centering, missing and empty inputs, output names that never collide."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path, PurePath

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from bench.config import Config
from bench.factories import build_model
from bench.store import LoadedRun
from bench.tasks import TASKS
from bench.tasks.base import DataInfo
from exporters.export import export_graph
from exporters.images import prepare_digit
from exporters.inputs import Input, output_names
from exporters.metadata import ModelMeta, metadata_for
from exporters.predict import build_parser, main, segment_logits
from exporters.runtime import session


def _run(task: str) -> LoadedRun:
    """A stand-in for a finished run of ``task``: an untrained small network and its data description."""
    if task == "mnist":
        cfg = Config(task="mnist", model={"name": "mnist_cnn", "widths": [4, 4, 8, 8, 8], "hidden": 16})
        info = DataInfo(
            source="-",
            channels=[0],
            source_channels=1,
            mean=[0.13],
            std=[0.31],
            image_size=[28, 28],
            n_train=1,
            n_val=1,
            n_test=1,
            classes=[str(i) for i in range(10)],
        )
    else:
        cfg = Config(task="warwick", model={"name": "encdec", "width": 4, "depth": 2})
        info = DataInfo(
            source="-",
            channels=[0, 1],
            source_channels=3,
            mean=[0.5, 0.4],
            std=[0.2, 0.25],
            image_size=[32, 32],
            n_train=1,
            n_val=1,
            n_test=1,
        )
    model = build_model(cfg, **TASKS[task].model_kwargs(info)).eval()
    return LoadedRun(Path("-"), model, cfg, TASKS[task], info, "0123abcd", None)


def _export(path: Path, task: str, policy: str | None = None) -> Path:
    """An untrained small network exported with bench metadata (no data or training needed).

    ``policy="mnist"``: the digit preprocessing of current exports (older files say ``resize``).
    """
    torch.manual_seed(0)
    run = _run(task)
    example = torch.randn(2, len(run.info.channels), 32 if task == "warwick" else 28, 32 if task == "warwick" else 28)
    proto = export_graph(run.model, example, run.task.kind == "segmentation")
    props = metadata_for(run, "runs/t/a/seed-0", "test")
    assert props["resize_policy"] == ("mnist" if task == "mnist" else "tile")  # what exports write now
    if task == "mnist" and policy != "mnist":
        props["resize_policy"] = "resize"  # as older exports did
        del props["ink_box"]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    found = {t: _export(d / f"{t}.onnx", t) for t in ("mnist", "warwick")}
    found["mnist-centered"] = _export(d / "mnist-centered.onnx", "mnist", policy="mnist")
    return found


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
    assert list(rows[0]) == ["file", "class", "probability"] and len(rows) == 4
    assert {Path(r["file"]).name for r in rows} == {"d0.png", "d1.png", "d2.png", "odd_inverted.png"}
    meta = ModelMeta.from_onnx(models["mnist"])
    sess = session(models["mnist"])
    for r in rows:
        assert r["class"] in meta.classes and 0.1 <= float(r["probability"]) <= 1
        if Path(r["file"]) in digits:  # same answer as the user's own ORT code on the metadata's preprocessing
            logits = sess.run(None, {"input": meta.normalize(digits[Path(r["file"])][None])})[0][0]
            assert r["class"] == meta.classes[int(logits.argmax())]


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
    code = main([str(models["warwick"]), str(src), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    for bad in ("stray.txt", "broken.png"):
        assert f"{bad}: " in err
    assert "5 images done, 2 failed" in err
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
    assert got.shape == (1, *shape[2:]) and np.allclose(got[0], x[0, 0], atol=1e-6)
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


def test_quiet_and_verbose_on_either_side_of_predict(models, tmp_path, capsys):
    from bench.cli import main as bench_main

    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    args = [str(models["mnist"]), str(img), "--out", str(tmp_path / "o")]
    assert bench_main(["predict", *args]) == 0 and "1 image done" in capsys.readouterr().err
    for argv in (["-q", "predict", *args], ["predict", *args, "-q"]):
        assert bench_main(argv) == 0 and capsys.readouterr().err == ""
    assert bench_main(["predict", *args, "-v"]) == 0 and "1 image done" in capsys.readouterr().err


# --------------------------------------------------------------------------- inputs, exit codes, output names


def test_missing_path_is_a_usage_error_before_anything_is_done(models, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    out = tmp_path / "o"
    for model in (models["mnist"], models["warwick"]):
        code = main([str(model), str(img), str(tmp_path / "typo"), str(tmp_path / "gone.png"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "no such file or directory" in err
        assert str(tmp_path / "typo") in err and str(tmp_path / "gone.png") in err
        assert not out.exists()  # not even the good image was processed


def test_empty_folders_say_no_images_found(models, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    nested = tmp_path / "nested"
    (nested / "a" / "b").mkdir(parents=True)
    (nested / ".hidden.png").write_bytes(b"")  # hidden files are not looked at
    out = tmp_path / "o"
    for model in (models["mnist"], models["warwick"]):
        assert main([str(model), str(empty), str(nested), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert "no images found" in err and str(empty) in err and str(nested) in err
        assert not out.exists()


def test_help_documents_every_option(capsys):
    parser = build_parser()
    assert all(a.help for a in parser._actions)
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(opt in text for opt in ("MODEL", "PATH", "--out", "exit status"))


def test_output_names_mirror_folders_and_never_collide(models, tmp_path, capsys):
    rng = np.random.default_rng(2)

    def image(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 255, (12, 10, 3)).astype(np.uint8)
        Image.fromarray(img).save(path)
        return path

    src = tmp_path / "slides"
    for rel in ("a.png", "a.jpg", "b.png", "scan.png", "sub/b.png", "sub/c.png", "sub/deeper/c.tif"):
        image(src / rel)
    (src / "scan.txt").write_text("notes: not an image, so scan.png keeps its plain name")
    x, y = image(tmp_path / "x" / "d.png"), image(tmp_path / "y" / "d.png")  # same name, two folders
    out = tmp_path / "out"
    code = main([str(models["warwick"]), str(src), str(x), str(y), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "scan.txt: not an image file" in err  # the text file, reported as before
    expected = {
        src / "a.png": "a.png",
        src / "a.jpg": "a.jpg",
        src / "b.png": "b",
        src / "scan.png": "scan",
        src / "sub/b.png": "sub/b",
        src / "sub/c.png": "sub/c",
        src / "sub/deeper/c.tif": "sub/deeper/c",
        x: "d.png-1",
        y: "d.png-2",
    }
    rows = {Path(r["file"]): r for r in _rows(out / "predictions.csv")}
    assert set(rows) == set(expected)
    for path, name in expected.items():
        assert rows[path]["mask"] == f"{name}_mask.png" and rows[path]["overlay"] == f"{name}_overlay.png"
        assert np.asarray(Image.open(out / rows[path]["mask"])).shape == (12, 10)
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(written) == 2 * len(expected)  # nothing overwritten
    # the clash that needed numbers is explained, naming each input and its output
    assert f"{x} -> d.png-1_mask.png" in err and f"{y} -> d.png-2_mask.png" in err


def test_output_name_rule():
    def names(*rels: str) -> list[str | None]:
        return output_names([Input(Path("in") / r, PurePath(r)) for r in rels])[0]

    assert names("a.png", "b.png", "s/a.png") == ["a", "b", "s/a"]  # another folder: no clash
    assert names("a.png", "a.jpg") == ["a.png", "a.jpg"]
    assert names("A.png", "a.png") == ["A.png-1", "a.png-2"]  # same file on a case-insensitive file system
    # numbers skip names already taken by another image of the folder
    got, notes = output_names(
        [Input(Path(p), PurePath("a.png")) for p in ("x/a.png", "y/a.png")]
        + [Input(Path("z/a.png-1.jpg"), PurePath("a.png-1.jpg"))]
    )
    assert got == ["a.png-2", "a.png-3", "a.png-1"] and len(notes) == 1 and "x/a.png -> a.png-2_mask.png" in notes[0]
    assert output_names([None, Input(Path("a.png"), PurePath("a.png"))])[0] == [None, "a"]


# --------------------------------------------------------------------------- MNIST-like preprocessing


def _mnist_test_digits(root: Path, n: int) -> np.ndarray:
    """The first ``n`` MNIST test images, (n, 28, 28) uint8 light on dark, straight from the idx file."""
    raw = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    if raw.is_file():
        data = raw.read_bytes()
    elif raw.with_suffix(".gz").is_file():
        data = gzip.decompress(raw.with_suffix(".gz").read_bytes())
    else:
        pytest.skip(f"{raw} not found")
    return np.frombuffer(data, np.uint8, offset=16)[: n * 784].reshape(n, 28, 28)


def _meta(policy: str) -> ModelMeta:
    """Digit metadata as the exporter writes it, with the given resize policy (no model needed)."""
    props = metadata_for(_run("mnist"), "runs/t", "test")
    if policy != "mnist":
        props["resize_policy"] = "resize"
        del props["ink_box"]
    return ModelMeta.from_props(props)


def _center_of_mass(img: np.ndarray) -> np.ndarray:
    """(row, col) intensity-weighted center of mass of (H, W) ``img``."""
    w = img.astype(np.float64)
    return np.array([(w.sum(1) * np.arange(w.shape[0])).sum(), (w.sum(0) * np.arange(w.shape[1])).sum()]) / w.sum()


def _on_canvas(digit: np.ndarray, scale: int, shape: tuple[int, int], at: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8: ``digit`` (28, 28) scaled up ``scale`` times, dark on a white canvas of ``shape`` at ``at``."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    canvas = np.full(shape, 255, np.uint8)
    canvas[at[0] : at[0] + big.shape[0], at[1] : at[1] + big.shape[1]] = 255 - big
    return canvas


def test_mnist_policy_recovers_real_digits_drawn_large_off_center(data_root):
    digits = _mnist_test_digits(data_root, 20)
    rng = np.random.default_rng(3)
    new, old = _meta("mnist"), _meta("resize")
    corr_new, corr_old = [], []
    for k, d in enumerate(digits):
        shape = [(300, 400), (400, 300), (500, 260)][k % 3]
        scale = int(rng.integers(4, 9))
        at = (int(rng.integers(0, shape[0] - 28 * scale)), int(rng.integers(0, shape[1] - 28 * scale)))
        canvas = _on_canvas(d, scale, shape, at)
        got = prepare_digit(canvas, new)
        assert got.shape == (28, 28) and got.dtype == np.uint8
        assert np.abs(_center_of_mass(got) - 14).max() <= 1, k  # LeCun: center of mass at the center
        corr_new.append(np.corrcoef(got.ravel(), d.ravel())[0, 1])
        corr_old.append(np.corrcoef(prepare_digit(canvas, old).ravel(), d.ravel())[0, 1])
    assert sum(c > 0.8 for c in corr_new) >= 17 and np.median(corr_new) > 0.9, np.round(corr_new, 2)
    assert np.median(corr_old) < 0.5  # the `resize` policy (older files) is unchanged: a small digit, off-center
    # an MNIST digit itself is already what the network saw: (almost) untouched
    assert all(np.corrcoef(prepare_digit(255 - d, new).ravel(), d.ravel())[0, 1] > 0.99 for d in digits)


def test_mnist_policy_drawn_strokes_noise_and_specks():
    from PIL import ImageDraw

    # a "7": tall and narrow, drawn dark grey on light-grey paper, in the corner of a wide canvas
    im = Image.new("L", (600, 300), 215)
    draw = ImageDraw.Draw(im)
    draw.line([(40, 40), (140, 40), (80, 240)], fill=40, width=14)
    canvas = np.asarray(im).astype(np.float64)
    canvas += np.random.default_rng(4).normal(0, 6, canvas.shape)  # scanner noise
    canvas[280:283, 560:563] = 40  # a speck of dust far away: must not stretch the box
    canvas = canvas.clip(0, 255).astype(np.uint8)
    got = prepare_digit(canvas, _meta("mnist"))
    rows, cols = np.nonzero(got > 0.3 * got.max())
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert 19 <= height <= 21 and 9 <= width <= 13  # longer side 20, aspect ratio (114 x 214 px of ink) kept
    assert np.abs(_center_of_mass(got) - 14).max() <= 1
    assert got.max() >= 250 and np.median(got[got < 0.3 * got.max()]) == 0  # full-contrast strokes on black


@pytest.mark.parametrize("level", [255, 0, 128])
def test_mnist_policy_blank_image_still_gets_an_answer(models, tmp_path, capsys, level):
    blank = np.full((300, 400), level, np.uint8)
    got = prepare_digit(blank, _meta("mnist"))
    assert got.shape == (28, 28) and got.dtype == np.uint8
    Image.fromarray(blank).save(tmp_path / "blank.png")
    assert main([str(models["mnist-centered"]), str(tmp_path / "blank.png"), "--out", str(tmp_path / "o")]) == 0
    assert _rows(tmp_path / "o" / "predictions.csv")[0]["class"] in [str(i) for i in range(10)]
    assert "blank.png: no ink found (a blank image?)" in capsys.readouterr().err  # not a silent "1" at p=0.999


def test_a_file_reached_twice_is_predicted_once(models, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for p in (tmp_path / "d" / "a.png", tmp_path / "d" / "sub" / "b.png"):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(p)
    out = tmp_path / "o"
    args = [str(tmp_path / "d"), str(tmp_path / "d" / "sub"), str(tmp_path / "d" / "a.png"), "--out", str(out)]
    assert main([str(models["mnist"]), *args]) == 0
    assert sorted(Path(r["file"]).name for r in _rows(out / "predictions.csv")) == ["a.png", "b.png"]


def test_mnist_policy_end_to_end_and_bad_metadata(models, tmp_path, capsys):
    canvas = np.full((300, 400), 255, np.uint8)
    canvas[50:250, 250:290] = 0  # a "1", far right
    Image.fromarray(canvas).save(tmp_path / "one.png")
    assert main([str(models["mnist-centered"]), str(tmp_path / "one.png"), "--out", str(tmp_path / "o")]) == 0
    row = _rows(tmp_path / "o" / "predictions.csv")[0]
    meta = ModelMeta.from_onnx(models["mnist-centered"])
    x = meta.normalize(prepare_digit(canvas, meta)[None])
    logits = session(models["mnist-centered"]).run(None, {"input": x})[0][0]
    assert row["class"] == str(int(logits.argmax()))  # the CSV answers for the centered digit
    for key, value, message in (
        ("ink_box", "big", "ink_box"),
        ("ink_box", "40", "ink_box"),
        ("resize_policy", "warp", "resize_policy 'warp'"),
    ):
        proto = onnx.load(str(models["mnist-centered"]))
        for p in proto.metadata_props:
            if p.key == key:
                p.value = value
        onnx.save(proto, str(tmp_path / "bad.onnx"))
        capsys.readouterr()
        assert main([str(tmp_path / "bad.onnx"), str(tmp_path / "one.png"), "--out", str(tmp_path / "o2")]) == 2
        assert message in capsys.readouterr().err


def test_a_colour_picture_given_to_a_digit_model_is_said(models, data_root, tmp_path, capsys):
    """A gland image (colour) still gets its row from an MNIST model, with a warning; a digit saved as RGB does not."""
    gland = data_root / "WARWICK" / "Test" / "image_01.png"
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 220
    Image.fromarray(digit).convert("RGB").save(tmp_path / "digit_rgb.png")
    code = main([str(models["mnist"]), str(gland), str(tmp_path / "digit_rgb.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0 and len(_rows(tmp_path / "o" / "predictions.csv")) == 2
    assert f"{gland}: a colour image, and this model reads greyscale digits" in err
    assert "digit_rgb.png: a colour" not in err
