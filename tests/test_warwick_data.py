"""WARWICK loading: the real data, and broken copies rejected with the file's name before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.config import Config, ConfigError
from bench.factories import build_model
from bench.losses import LOSSES
from bench.metrics import dice_per_image
from bench.models import MODELS
from bench.tasks.base import DataError, DataInfo
from bench.tasks.warwick import WarwickTask

TASK = WarwickTask()
CPU = torch.device("cpu")


def config(root: Path, **data: object) -> Config:
    cfg = Config(task="warwick", model={"name": "unet", "width": 4, "depth": 2})
    cfg.data.root = str(root)
    cfg.data.val_fraction = TASK.default_val_fraction
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


# ----------------------------------------------------------------------------- the real data


def test_real_data_loads(data_root: Path):
    data = TASK.load(config(data_root), CPU)
    assert (len(data.train), len(data.val), len(data.test)) == (72, 13, 60)
    assert data.train.x.shape == (72, 2, 128, 128)  # blue (all zero) dropped by default
    assert data.test.y.shape == (60, 1, 128, 128)
    assert set(data.train.y.unique().tolist()) == {0.0, 1.0}
    info = data.info
    assert info.channels == [0, 1] and info.source_channels == 3 and info.image_size == [128, 128]
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info  # recorded in config.json and best.pt
    # normalized with training statistics: mean ~0, std ~1 on train (README: R/G mean 61.5/105.5 of 255)
    assert data.train.x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert info.mean[0] * 255 == pytest.approx(61.5, abs=3)
    assert len(info.val_names) == 13 and not set(info.val_names) & {Path(n).name for n in data.train.names}


def test_split_depends_on_split_seed_only(data_root: Path):
    a = TASK.load(config(data_root), CPU).info.val_names
    assert TASK.load(config(data_root), CPU).info.val_names == a
    assert TASK.load(config(data_root, split_seed=1), CPU).info.val_names != a
    sub = TASK.load(config(data_root, train_subset=10), CPU)
    assert len(sub.train) == 10 and sub.info.val_names == a
    with pytest.raises(ConfigError, match="data.train_subset: 73 is more than the 72 training images"):
        TASK.load(config(data_root, train_subset=73), CPU)


def test_runs_saved_before_data_info_existed_still_load():
    old_warwick = {
        "source": "/d/WARWICK",
        "source_channels": 3,
        "channels": [0, 1],
        "mean": [0.2, 0.4],
        "std": [0.1, 0.1],
        "input_size": {"train": [128, 128], "test": [128, 128]},
        "n_train": 72,
        "n_val": 13,
        "n_test": 60,
        "val_images": ["image_01.png"],
    }
    info = DataInfo.from_dict(old_warwick)
    assert info.image_size == [128, 128] and info.val_names == ["image_01.png"] and info.classes is None
    old_mnist = {
        "source": "/d/MNIST/raw",
        "channels": [0],
        "mean": [0.13],
        "std": [0.31],
        "input_size": [28, 28],
        "classes": [str(i) for i in range(10)],
        "n_train": 24000,
        "n_val": 5000,
        "n_test": 10000,
    }
    info = DataInfo.from_dict(old_mnist)
    assert info.image_size == [28, 28] and info.source_channels == 1 and len(info.classes) == 10


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_layouts_sizes_and_channels(tmp_path: Path, make_warwick):
    # root/WARWICK/{Train,Test} and root/{Train,Test} both work; non-square, non-multiple-of-8 sizes work
    make_warwick(tmp_path / "a" / "WARWICK", size=(36, 52))
    make_warwick(tmp_path / "b", size=(36, 52))
    for root in (tmp_path / "a", tmp_path / "b"):
        data = TASK.load(config(root, channels=[0]), CPU)
        assert data.train.x.shape[1:] == (1, 36, 52) and data.info.channels == [0]
        model = MODELS["unet"](**TASK.model_kwargs(data.info), width=4, depth=3)
        cfg = config(root)
        cfg.eval.tta = True
        out = TASK.evaluate(model, data.test, cfg, LOSSES["bce"](), final=True)
        assert {m.key for m in TASK.metrics} <= set(out) and "loss" in out
        assert TASK.predict_masks(model, data.test, cfg).shape == (3, 36, 52)


def test_a_border_the_images_cannot_mirror_is_refused_on_loading(tmp_path: Path, make_warwick):
    make_warwick(tmp_path / "WARWICK", size=(36, 52))
    cfg = config(tmp_path)
    cfg.eval.border = 35  # the most a 36-pixel side can mirror
    assert TASK.load(cfg, CPU).test.x.shape[-2:] == (36, 52)
    cfg.eval.border = 36
    with pytest.raises(ConfigError, match="eval.border: 36 pixels cannot be mirrored .* 36 pixels .* use at most 35"):
        TASK.load(cfg, CPU)


def test_evaluate_keys_and_augment(synthetic_warwick: Path):
    cfg = config(synthetic_warwick.parent)
    data = TASK.load(cfg, CPU)
    model = MODELS["encdec"](**TASK.model_kwargs(data.info), width=4, depth=2)
    val = TASK.evaluate(model, data.val, cfg, LOSSES["bce"](), final=False)
    assert set(val) == {"loss", "dice"}
    # with eval.tta the validation Dice (which picks the best epoch and rung) is the TTA Dice that is reported
    cfg.eval.tta = True
    tta_val = TASK.evaluate(model, data.val, cfg, LOSSES["bce"](), final=False)
    gt = data.val.y[:, 0] > 0.5
    assert tta_val["dice"] == pytest.approx(float(dice_per_image(TASK.predict_masks(model, data.val, cfg), gt).mean()))
    assert tta_val["loss"] == pytest.approx(val["loss"])  # the loss stays the plain forward pass
    cfg.eval.tta = False
    cfg.augment.flips, cfg.augment.elastic = True, 2.0
    x, y = TASK.augment(data.train.x, data.train.y, cfg, torch.Generator().manual_seed(0))
    assert x.shape == data.train.x.shape and y.shape == data.train.y.shape


# ----------------------------------------------------------------------------- broken data


def _break_missing_label(d: Path) -> str:
    (d / "Train" / "label_03.png").unlink()
    return "label_03.png"


def _break_missing_image(d: Path) -> str:
    (d / "Test" / "image_02.png").unlink()
    return "image_02.png"


def _break_truncated_image(d: Path) -> str:
    p = d / "Train" / "image_02.png"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    return "image_02.png"


def _break_non_binary_label(d: Path) -> str:
    p = d / "Train" / "label_04.png"
    lab = np.asarray(Image.open(p)).copy()
    lab[0, 0] = 128
    Image.fromarray(lab).save(p)
    return "label_04.png"


def _break_not_an_image(d: Path) -> str:
    (d / "Train" / "image_xx.png").write_text("this is not a PNG")
    shutil.copy(d / "Train" / "label_01.png", d / "Train" / "label_xx.png")
    return "image_xx.png"


def _break_size_mismatch(d: Path) -> str:
    p = d / "Test" / "label_01.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(p)
    return "label_01.png"


def _break_mixed_sizes(d: Path) -> str:
    from conftest import write_warwick  # the tests folder is on sys.path under pytest

    write_warwick(d / "other", n_train=1, n_test=0, size=(40, 40))
    for kind in ("image", "label"):
        shutil.move(d / "other" / "Train" / f"{kind}_01.png", d / "Train" / f"{kind}_99.png")
    return "image_99.png"


BREAKS = [
    _break_missing_label,
    _break_missing_image,
    _break_truncated_image,
    _break_non_binary_label,
    _break_not_an_image,
    _break_size_mismatch,
    _break_mixed_sizes,
]


@pytest.mark.parametrize("breaker", BREAKS, ids=[b.__name__.removeprefix("_break_") for b in BREAKS])
def test_broken_data_is_rejected_with_the_file_name(synthetic_warwick: Path, breaker):
    name = breaker(synthetic_warwick)
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        TASK.load(config(synthetic_warwick.parent), CPU)


def test_every_broken_file_is_named_in_one_error(synthetic_warwick: Path):
    # the three breaks at once, across Train and Test: one run reports all of them
    missing = _break_missing_label(synthetic_warwick)
    non_binary = _break_non_binary_label(synthetic_warwick)
    p = synthetic_warwick / "Test" / "image_03.png"
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        TASK.load(config(synthetic_warwick.parent), CPU)
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any(f"Train/{missing}: missing" in x for x in lines)
    assert any(f"Train/{non_binary}: label is not binary" in x for x in lines)
    assert any("Test/image_03.png: not a readable image" in x for x in lines)


def test_missing_folder_is_a_data_error(tmp_path: Path):
    with pytest.raises(DataError, match="no WARWICK data"):
        TASK.load(config(tmp_path), CPU)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_reports_broken_data_before_training(synthetic_warwick: Path, tmp_path: Path, capfd, workers):
    from bench.cli import main

    name = _break_truncated_image(synthetic_warwick)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        "task: warwick\nseeds: [0, 1]\nbase:\n  model: {name: unet, width: 4, depth: 2}\n"
        "  train: {epochs: 1, batch_size: 4}\nvariants:\n  - name: only\n"
    )
    results = tmp_path / "results"
    rc = main(
        [
            "run",
            str(spec),
            "--data-root",
            str(synthetic_warwick.parent),
            "--results",
            str(results),
            "--no-progress",
            "--no-summary",
            "--workers",
            workers,
        ]
    )
    err = capfd.readouterr().err
    assert rc == 2 and err.count(name) == 1 and "Traceback" not in err  # once, also with two workers
    assert not list(results.rglob("metrics.csv"))  # no epoch was trained


# ----------------------------------------------------------------------------- figures


def test_summary_figure_of_a_model(synthetic_warwick: Path, tmp_path: Path):
    cfg = config(synthetic_warwick.parent)
    data = TASK.load(cfg, CPU)
    model = build_model(cfg, **TASK.model_kwargs(data.info))
    figs = list(TASK.summary_figures(lambda: (model, cfg, data), tmp_path / "figures" / "g", "v, seed-0"))
    assert len(figs) == 1
    caption, png = figs[0]
    assert Path(png).stat().st_size > 1000 and "outlines" in Path(png).name and "Dice" in caption
    assert "(v, seed-0)" in caption
