"""Folder data sets (image_folder, mask_folder) on small folders made here, their bad inputs, and a
network and a task of the user's own by import path or entry point."""

from __future__ import annotations

import csv
import importlib.metadata
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main as bench
from bench.config import ConfigError
from bench.factories import check_section
from bench.models import MODELS
from bench.spec import load_spec
from bench.tasks import TASKS
from bench.tasks.base import DataError
from bench.tasks.folders import pad_and_resize
from examples.shapes.make_data import make
from exporters.images import pad_and_resize as predict_pad_and_resize
from exporters.onnx import main as export
from tests.helpers import write_spec

CPU = torch.device("cpu")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "shapes"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """classify/{train,test}/{circle,square,triangle}/ (8 + 3 per class, 32-40 pixels) and segment/{images,masks}/ (8)."""
    out = tmp_path_factory.mktemp("shapes")
    make(out, n_train=8, n_test=3, n_seg=8)
    return out


def config(task: str, root: Path, **data):
    spec = {"model": {"name": "unet" if task == "mask_folder" else "mnist_cnn"}, "data": {"root": str(root), **data}}
    from bench.spec import build_config

    return build_config(task, spec, "test")


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- image_folder


def test_image_folder_reads_classes_splits_and_training_statistics(shapes: Path):
    cfg = config("image_folder", shapes / "classify", image_size=[24, 20])
    data = TASKS["image_folder"].load(cfg, CPU)
    info = data.info
    assert info.classes == ["circle", "square", "triangle"]  # the folder names, sorted
    assert info.image_size == [24, 20] and data.train.x.shape[1:] == (3, 24, 20) and info.source_channels == 3
    assert (info.n_train + info.n_val, info.n_test) == (24, 9) and info.n_val == 3  # 10 % of each class of 8: 1
    assert set(data.val.names).isdisjoint(data.train.names) and all(n.startswith("train/") for n in data.val.names)
    assert all(n.startswith("test/") for n in data.test.names)
    # normalized with the training split's statistics: mean 0, std 1 over the training images only
    assert data.train.x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (data.train.x.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
    assert sorted(data.test.y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3


def test_image_folder_splits_one_folder_by_a_seeded_fraction(shapes: Path, tmp_path: Path):
    root = tmp_path / "one"
    for c in ("circle", "square", "triangle"):  # train/ and test/ merged into one folder of classes, saved greyscale
        (root / c).mkdir(parents=True)
        for i, p in enumerate(sorted((shapes / "classify").glob(f"*/{c}/*.png"))):
            Image.open(p).convert("L").save(root / c / f"{i}.png")
    cfg = config("image_folder", root, image_size=32, test_fraction=0.25)
    a = TASKS["image_folder"].load(cfg, CPU)
    assert a.info.source_channels == 1 and a.train.x.shape[1] == 1  # greyscale files: greyscale input
    assert (
        a.info.n_test == 9 and sorted(a.test.y.tolist()) == [0] * 3 + [1] * 3 + [2] * 3
    )  # a quarter of each class of 11
    assert TASKS["image_folder"].load(cfg, CPU).test.names == a.test.names  # seeded: the same split every time
    other = TASKS["image_folder"].load(
        config("image_folder", root, image_size=32, test_fraction=0.25, split_seed=1), CPU
    )
    assert other.test.names != a.test.names
    rgb = TASKS["image_folder"].load(config("image_folder", root, image_size=32, test_fraction=0.25, color="rgb"), CPU)
    assert rgb.train.x.shape[1] == 3
    with pytest.raises(ConfigError, match="data.test_fraction: .* has train/ and test/ folders"):
        TASKS["image_folder"].load(config("image_folder", shapes / "classify", image_size=32, test_fraction=0.2), CPU)


def _no_classes(root: Path) -> str:
    for d in (root / "train").iterdir():
        shutil.rmtree(d)
    return f"{root / 'train'}: no class folders"


def _class_without_images(root: Path) -> str:
    (root / "train" / "hexagon").mkdir()
    (root / "train" / "hexagon" / "notes.txt").write_text("no images here")
    return f"{root / 'train' / 'hexagon'}: class 'hexagon' has no images"


def _unreadable(root: Path) -> str:
    p = root / "test" / "square" / "001.png"
    p.write_bytes(p.read_bytes()[:60])
    return f"{p}: not a readable image"


def _mixed_sizes(root: Path) -> str:
    p = root / "train" / "circle" / "003.png"
    Image.new("RGB", (17, 13)).save(p)
    return f"{p}: 17x13 pixels, the other images are"


IMAGE_FOLDER_BREAKS = [_no_classes, _class_without_images, _unreadable, _mixed_sizes]


@pytest.mark.parametrize("breaker", IMAGE_FOLDER_BREAKS, ids=[b.__name__.strip("_") for b in IMAGE_FOLDER_BREAKS])
def test_a_broken_image_folder_is_one_error_naming_the_file(shapes: Path, tmp_path: Path, breaker):
    root = copy(shapes / "classify", tmp_path / "c")
    for p in root.rglob("*.png"):  # one size, so that without data.image_size only the broken file differs
        Image.open(p).resize((32, 32)).save(p)
    expected = breaker(root)
    with pytest.raises(DataError) as err:
        TASKS["image_folder"].load(config("image_folder", root), CPU)
    assert expected in str(err.value)


def test_every_broken_file_of_an_image_folder_is_named_in_one_error(shapes: Path, tmp_path: Path):
    root = copy(shapes / "classify", tmp_path / "c")
    expected = [_class_without_images(root), _unreadable(root)]
    with pytest.raises(DataError) as err:
        TASKS["image_folder"].load(config("image_folder", root, image_size=32), CPU)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and all(any(e in line for line in lines) for e in expected)


def test_training_images_are_resized_as_predict_resizes_a_new_image():
    rng = np.random.default_rng(0)
    for shape in [(30, 50, 3), (50, 30, 1), (28, 28, 3)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = pad_and_resize(img, (28, 28))
        theirs = predict_pad_and_resize(img[..., 0] if shape[2] == 1 else img, (28, 28))
        assert np.array_equal(ours, theirs if theirs.ndim == 3 else theirs[..., None])


# --------------------------------------------------------------------------- mask_folder


def test_mask_folder_pairs_by_the_naming_rule(shapes: Path, tmp_path: Path):
    cfg = config("mask_folder", shapes / "segment", test_fraction=0.25)  # images/* + masks/*, the default rule
    data = TASKS["mask_folder"].load(cfg, CPU)
    assert (data.info.n_train + data.info.n_val, data.info.n_test) == (6, 2)
    assert data.train.y.shape[1:] == (1, 48, 48) and set(data.train.y.unique().tolist()) <= {0.0, 1.0}
    assert all(n.startswith("images/") for n in data.test.names)
    # WARWICK's rule in train/ and test/ folders, masks of 0/1
    root = tmp_path / "w"
    for split, ids in (("Train", range(6)), ("Test", range(6, 8))):
        (root / split).mkdir(parents=True)
        for i in ids:
            shutil.copy(shapes / "segment" / "images" / f"{i:03d}.png", root / split / f"image_{i}.png")
            m = np.asarray(Image.open(shapes / "segment" / "masks" / f"{i:03d}.png")) // 255
            Image.fromarray(m.astype(np.uint8)).save(root / split / f"label_{i}.png")
    w = TASKS["mask_folder"].load(config("mask_folder", root, images="image_*.png", masks="label_*.png"), CPU)
    assert w.test.names == ["Test/image_6.png", "Test/image_7.png"] and w.info.n_test == 2
    truth = np.stack([np.asarray(Image.open(shapes / "segment" / "masks" / f"{i:03d}.png")) > 0 for i in (6, 7)])
    assert torch.equal(w.test.y[:, 0] > 0.5, torch.from_numpy(truth))  # 0/1 masks read as 0/255 ones are


def test_every_broken_pair_of_a_mask_folder_is_named_in_one_error(shapes: Path, tmp_path: Path):
    root = copy(shapes / "segment", tmp_path / "s")
    (root / "masks" / "001.png").unlink()
    Image.new("L", (48, 48), 128).save(root / "masks" / "002.png")
    (root / "images" / "003.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        TASKS["mask_folder"].load(config("mask_folder", root), CPU)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any(f"{root / 'masks' / '001'}.*: missing (needed for {root / 'images' / '001.png'})" in x for x in lines)
    assert any(f"{root / 'masks' / '002.png'}: label is not binary" in x for x in lines)
    assert any(f"{root / 'images' / '003.png'}: not a readable image" in x for x in lines)


def test_a_naming_rule_that_matches_nothing_is_one_line(shapes: Path, tmp_path: Path):
    root = copy(shapes / "segment", tmp_path / "s")
    with pytest.raises(DataError) as err:
        TASKS["mask_folder"].load(config("mask_folder", root, images="imgs/*"), CPU)  # a typo in the rule
    assert str(err.value) == (
        f"{root}: the images rule 'imgs/*' matches no file (while the other side has 8); "
        "check data.images and the folder"
    )
    shutil.rmtree(root / "masks")
    (root / "masks").mkdir()
    with pytest.raises(DataError) as err:
        TASKS["mask_folder"].load(config("mask_folder", root), CPU)
    assert len(str(err.value).splitlines()) == 1 and "the masks rule 'masks/*' matches no file" in str(err.value)


def _glas(folder: Path, stem: str, n: int, seed: int) -> None:
    """``n`` GlaS-style pairs in ``folder``: ``<stem>_<k>.bmp`` (RGB) beside ``<stem>_<k>_anno.bmp`` (0/255)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, n + 1):
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(folder / f"{stem}_{k}.bmp")
        mask = np.zeros((12, 16), np.uint8)
        mask[2 : 4 + k, 3:9] = 255
        Image.fromarray(mask).save(folder / f"{stem}_{k}_anno.bmp")


def test_glas_as_distributed_an_annotation_beside_its_image_is_never_an_image(tmp_path: Path):
    """GlaS: train_1.bmp beside train_1_anno.bmp; "*.bmp" matches the annotations too, which are masks only."""
    root = tmp_path / "glas"
    _glas(root / "train", "train", 5, 0)
    _glas(root / "test", "testA", 3, 1)
    _glas(root / "test", "testB", 2, 2)  # test A and B as one test split
    (root / "train" / "Grade.csv").write_text("name,grade\n")  # other files are left alone
    data = TASKS["mask_folder"].load(config("mask_folder", root, images="*.bmp", masks="*_anno.bmp"), CPU)
    assert data.info.n_train + data.info.n_val == 5
    assert data.test.names == [f"test/testA_{k}.bmp" for k in (1, 2, 3)] + [f"test/testB_{k}.bmp" for k in (1, 2)]
    truth = np.stack(
        [
            np.asarray(Image.open(root / "test" / n.replace("test/", "").replace(".bmp", "_anno.bmp"))) > 0
            for n in data.test.names
        ]
    )
    assert torch.equal(data.test.y[:, 0] > 0.5, torch.from_numpy(truth))
    # test A alone: its files linked into a test/ folder of its own
    alone = tmp_path / "glas_a"
    (alone / "test").mkdir(parents=True)
    (alone / "train").symlink_to(root / "train")
    for f in sorted((root / "test").glob("testA_*")):
        (alone / "test" / f.name).symlink_to(f)
    a = TASKS["mask_folder"].load(config("mask_folder", alone, images="*.bmp", masks="*_anno.bmp"), CPU)
    assert a.test.names == [f"test/testA_{k}.bmp" for k in (1, 2, 3)]
    # wrong inputs stay one line each
    (root / "train" / "train_2_anno.bmp").unlink()
    with pytest.raises(DataError) as err:
        TASKS["mask_folder"].load(config("mask_folder", root, images="*.bmp", masks="*_anno.bmp"), CPU)
    assert (
        str(err.value)
        == f"{root / 'train' / 'train_2_anno.bmp'}: missing (needed for {root / 'train' / 'train_2.bmp'})"
    )
    with pytest.raises(DataError) as err:
        TASKS["mask_folder"].load(config("mask_folder", alone, images="*_anno.bmp", masks="*.bmp"), CPU)
    assert str(err.value).splitlines() == [
        f"{alone / 'train'}: the images rule '*_anno.bmp' matches only files the masks rule '*.bmp' names (a mask is "
        "never an image); check data.images and data.masks",
        f"{alone / 'test'}: the images rule '*_anno.bmp' matches only files the masks rule '*.bmp' names (a mask is "
        "never an image); check data.images and data.masks",
    ]


# --------------------------------------------------------------------------- spec checks


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"task": "image_folder", "base.model": {"name": "no_such_module:net"}},
            "base.model.name: import path 'no_such_module:net': cannot import 'no_such_module'",
        ),
        (
            {"task": "image_folder", "base.model": {"name": "examples.shapes.nets:nope"}},
            "base.model.name: import path 'examples.shapes.nets:nope': module 'examples.shapes.nets' .* has no attribute 'nope'",
        ),
        ({"task": "image_folder", "base.model": {"name": "examples.shapes.make_data:CLASSES"}}, "is not callable"),
        (
            {"task": "image_folder", "base.model": {"name": "examples.shapes.nets:tiny_cnn", "depth": 3}},
            "base.model: unknown key 'depth'; valid keys \\(closest first\\): ",
        ),
        (
            {"task": "image_folder", "base.model": {"name": "examples.shapes.nets:tiny_cnn", "width": 0}},
            "base.model.width: must be >= 1, got 0",
        ),
        (
            {"task": "image_folder", "base.model": {"name": "examples.shapes.make_data:background"}},
            "must take the keyword arguments in_channels, num_classes",
        ),
        (
            {"task": "examples.shapes.nets:tiny_cnn"},
            "task: import path .*tiny_cnn is not a bench.tasks.base.Task subclass",
        ),
        ({"task": "mnist", "base.data": {"image_size": 28}}, "base.data.image_size: task 'mnist' does not read it"),
        (
            {"task": "image_folder", "base.data": {"images": "images/*"}},
            "base.data.images: task 'image_folder' does not read it",
        ),
        (
            {"task": "image_folder", "base.data": {"color": "cmyk"}},
            "base.data.color: expected 'grey' or 'rgb' or null, got str 'cmyk'",
        ),
        (
            {"task": "mask_folder", "base.model": {"name": "unet"}, "base.data": {"masks": "masks/*/x"}},
            "base.data.masks: 'masks/\\*/x' must be a path relative to the data folder whose file name holds one \\*",
        ),
    ],
)
def test_a_wrong_user_piece_is_one_error_naming_the_key(tmp_path: Path, change, message):
    base = {"model": {"name": "mnist_cnn"}, "data": {}}
    spec: dict = {"task": "mnist"}
    for key, value in change.items():
        if key.startswith("base."):
            base[key.removeprefix("base.")] = value
        else:
            spec[key] = value
    path = write_spec(tmp_path / "s.yaml", base=base, **spec)
    with pytest.raises(ConfigError, match=message):
        load_spec(path)


def test_a_network_declared_as_an_entry_point_is_found_by_name(monkeypatch):
    ep = importlib.metadata.EntryPoint(name="shapes_cnn", value="examples.shapes.nets:tiny_cnn", group="bench.models")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda **kw: [ep] if kw.get("group") == "bench.models" else real(**kw)
    )
    try:
        assert check_section("model", {"name": "shapes_cnn", "width": 4}, "base.model") == {
            "name": "shapes_cnn",
            "width": 4,
        }
        assert "shapes_cnn" in MODELS.names()
        with pytest.raises(
            ConfigError, match="unknown model 'shapes_cn'; valid choices \\(closest first\\): shapes_cnn"
        ):
            check_section("model", {"name": "shapes_cn"}, "base.model")
        assert "shapes_cnn" not in MODELS  # the dict lists the registered names only
    finally:
        MODELS.found.pop("shapes_cnn", None)


# --------------------------------------------------------------------------- end to end


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_the_examples_run_export_and_predict(shapes: Path, tmp_path: Path):
    """The example specs, 1 epoch: a network of the user's own by import path on image_folder, unet on
    mask_folder, a task class of the user's own; then export and predict of the classifier."""
    res = tmp_path / "results"
    common = ["--results", str(res), "--no-progress", "--workers", "1", "--profile", "test", "--variants", "+bn"]
    assert bench(["run", str(EXAMPLES / "classify.yaml"), "--data-root", str(shapes / "classify"), *common]) == 0
    common[-1] = "unet"
    assert bench(["run", str(EXAMPLES / "segment.yaml"), "--data-root", str(shapes / "segment"), *common]) == 0
    common[-1] = "tiny"
    assert bench(["run", str(EXAMPLES / "custom_task.yaml"), "--data-root", str(shapes / "classify"), *common]) == 0
    summary = (res / "summary.md").read_text()
    assert all(f"## {g}" in summary for g in ("shapes-classify@test", "shapes-segment@test", "shapes-custom@test"))

    run = res / "runs" / "shapes-classify@test" / "+bn" / "seed-0"
    assert export([str(run), "--results", str(res), "--data-root", str(shapes / "classify"), "--no-bench"]) == 0
    model = res / "onnx-adhoc" / "image_folder.onnx"
    out = tmp_path / "pred"
    new = tmp_path / "new.jpg"
    Image.open(shapes / "classify" / "test" / "square" / "000.png").resize((60, 45)).save(
        new
    )  # another size and format
    assert (
        bench(["predict", str(model), str(new), str(shapes / "classify" / "test" / "circle"), "--out", str(out)]) == 0
    )
    rows = _rows(out / "predictions.csv")
    assert len(rows) == 4 and {r["class"] for r in rows} <= {"circle", "square", "triangle"}


def test_broken_data_stops_the_command_before_anything_is_written(shapes: Path, tmp_path: Path, capfd):
    root = copy(shapes / "segment", tmp_path / "s")
    Image.new("L", (48, 48), 7).save(root / "masks" / "005.png")
    res = tmp_path / "results"
    rc = bench(
        [
            "run",
            str(EXAMPLES / "segment.yaml"),
            "--data-root",
            str(root),
            "--results",
            str(res),
            "--no-progress",
            "--profile",
            "test",
        ]
    )
    err = capfd.readouterr().err
    assert rc == 2 and f"error: {root / 'masks' / '005.png'}: label is not binary" in err
    assert not res.exists()


def test_image_folder_augments_the_images_it_says_it_does(shapes: Path):
    task = TASKS["image_folder"]
    cfg = config("image_folder", shapes / "classify", image_size=32)
    data = task.load(cfg, CPU)
    x, y = data.train.x[:8], data.train.y[:8]
    for key in task.augmentations:
        on = config("image_folder", shapes / "classify", image_size=32)
        setattr(on.augment, key, True if key == "flips" else 0.2)
        ax, ay = task.augment(x, y, on, torch.Generator().manual_seed(0))
        assert ax.shape == x.shape and torch.equal(ay, y) and not torch.equal(ax, x), key
    assert task.augment(x, y, cfg, torch.Generator())[0] is x


def test_mask_folder_with_warwicks_rule_reads_warwick_as_the_warwick_task_does(data_root: Path):
    """WARWICK is mask_folder with its naming rule: the same tensors, names, split and statistics."""
    folder = data_root / "WARWICK"
    ours = TASKS["mask_folder"].load(config("mask_folder", folder, images="image_*.png", masks="label_*.png"), CPU)
    cfg = config("warwick", data_root)
    theirs = TASKS["warwick"].load(cfg, CPU)
    for split in ("train", "val", "test"):
        a, b = getattr(ours, split), getattr(theirs, split)
        assert a.names == b.names and torch.equal(a.x, b.x) and torch.equal(a.y, b.y), split
    assert ours.info.to_dict() == {**theirs.info.to_dict(), "source": str(folder)}


def test_a_bad_image_is_a_data_error_and_a_bug_while_decoding_keeps_its_traceback(tmp_path, monkeypatch):
    """PIL's own errors (unrecognized, truncated) name the file; anything else raised while decoding is a bug and
    is not reported as a bad image."""
    import PIL.Image

    from bench.tasks import warwick
    from bench.tasks.folders import decode
    from exporters import inputs as predict

    good, cut, text = tmp_path / "good.png", tmp_path / "cut.png", tmp_path / "text.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    cut.write_bytes(good.read_bytes()[:200])
    text.write_text("not an image")
    for path in (cut, text):
        with pytest.raises(DataError, match=f"{path}: not a readable image"):
            decode(path, None)
        with pytest.raises(DataError, match=f"{path}: not a readable image"):
            warwick._read_image(path)
        with pytest.raises(predict.ImageError, match="not a"):
            predict.read_image(path, "RGB")
    assert not predict.opens_as_image(text) and predict.opens_as_image(good)

    def bug(*args, **kwargs):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(PIL.Image, "open", bug)
    for call in (
        lambda: decode(good, None),
        lambda: warwick._read_image(good),
        lambda: warwick._read_label(good),
        lambda: predict.read_image(good, "RGB"),
        lambda: predict.opens_as_image(good),
    ):
        with pytest.raises(TypeError, match="a bug of ours"):
            call()
