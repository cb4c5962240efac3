"""Separating touching glands: the contour target, the instance labelling, the object metrics on instance
labels, the TTA of the contour channel, the config checks of the `+contours` rung, and the post-processing of
the instances (contour threshold, min_area, fill_holes) chosen on validation, exported and applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bench import metrics as M
from bench.augment import dihedral, dihedral_tta
from bench.config import Config, ConfigError, EvalCfg
from bench.instances import CONTOUR_THRESHOLDS, instances_from_logits, label_instances
from bench.losses import LOSSES, contour_target
from bench.models import MODELS
from bench.postprocess import PostProcess
from bench.tasks import TASKS
from bench.tasks.base import Data, DataInfo, Split


def _two_squares() -> np.ndarray:
    """(12, 20) bool: two 6x6 glands one background column apart (columns 2-7 and 9-14, rows 3-8)."""
    m = np.zeros((12, 20), bool)
    m[3:9, 2:8] = True
    m[3:9, 9:15] = True
    return m


def test_contour_target_is_the_band_around_each_gland_and_fills_the_gap():
    m = _two_squares()
    band = contour_target(torch.from_numpy(m).float()[None, None], width=1)[0, 0].numpy().astype(bool)
    assert band[3:9, 8].all()  # the background column between the glands is all contour
    assert band[3:9, 7].all() and band[3:9, 9].all()  # and so are the glands' own edge pixels beside it
    assert not band[5:7, 4:6].any() and not band[5:7, 11:13].any()  # gland centres are not
    assert not band[0, :].any() and band[2, 2:15].all()  # one pixel outside the glands, none further
    # no edge at the image border: a gland touching it has no contour there
    full = torch.ones(1, 1, 6, 6)
    assert contour_target(full).sum() == 0


def test_touching_squares_are_two_instances_one_component():
    fg = np.where(_two_squares(), 0.9, 0.1)
    fg[3:9, 8] = 0.9  # the network's foreground merges the two glands ...
    contour = contour_target(torch.from_numpy(_two_squares()).float()[None, None])[0, 0].numpy() * 0.8 + 0.1
    assert M.label_objects(fg > 0.5)[1] == 1  # ... so connected components see one gland
    labels = label_instances(fg, contour)
    assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1, 2}
    assert ((labels > 0) == (fg > 0.5)).all()  # the instances cover exactly the foreground
    assert (labels[3:9, 2:8] == labels[5, 4]).all() and (labels[3:9, 9:15] == labels[5, 12]).all()
    assert labels[5, 4] != labels[5, 12]
    # the object metrics count the instances: both glands found, where the merged blob finds one
    target = _two_squares()
    assert M.object_f1_counts(fg > 0.5, target) == (1, 0, 1)
    assert M.object_f1_counts(labels, target) == (2, 0, 0)
    assert M.object_scores(labels, target)[0] == 1.0
    # the same through the batch form on logits (channel 0 foreground, 1 contour)
    logits = np.log(np.stack([fg, contour]) / (1 - np.stack([fg, contour])))[None]
    assert (instances_from_logits(logits) == labels).all()


def test_foreground_without_a_core_keeps_its_own_label():
    fg = np.zeros((8, 8))
    fg[1:3, 1:3] = 0.9  # all contour: no core
    fg[4:8, 4:8] = 0.9
    contour = np.zeros((8, 8))
    contour[1:3, 1:3] = 0.9
    labels = label_instances(fg, contour)
    assert len(np.unique(labels[1:3, 1:3])) == 1 and labels[1, 1] > 0
    assert labels[1, 1] != labels[5, 5] and ((labels > 0) == (fg > 0.5)).all()


def test_objects_of_label_image_renumbers_and_mask_path_is_unchanged():
    lab = np.array([[0, 7, 7], [3, 0, 7], [3, 3, 0]])
    out, n = M.objects_of(lab)
    assert n == 2 and set(np.unique(out)) == {0, 1, 2} and ((out > 0) == (lab > 0)).all()
    assert M.objects_of(lab > 0)[1] == 1  # a bool mask: one 8-connected component
    assert M.objects_of(np.full((2, 2), 5))[1] == 1  # no background at all


def test_segmentation_report_counts_instances_only_for_object_metrics():
    target = torch.from_numpy(_two_squares())[None]
    merged = target.clone()
    merged[0, 3:9, 8] = True
    inst = np.where(target[0].numpy(), 1, 0)
    inst[3:9, 9:15] = 2
    inst[3:9, 8] = 1  # the gap pixels join the left gland
    plain = M.segmentation_report(merged, target)
    split = M.segmentation_report(merged, target, inst[None])
    assert plain["obj_f1"] == pytest.approx(2 / 3) and split["obj_f1"] == 1.0
    assert split["dice"] == plain["dice"] and split["iou_pooled"] == plain["iou_pooled"]


def test_tta_maps_the_contour_channel_back_with_each_transform():
    """A net whose contour channel marks its input's left column: after TTA each transform's mark is mapped back
    to where that column lies in the original image, so the average is the left column in every transform's own
    frame, i.e. the 4 sides and their mirror images (never a mix-up with the foreground channel)."""

    class LeftColumn(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fg = torch.full_like(x[:, :1], 3.0)
            contour = torch.full_like(x[:, :1], -30.0)
            contour[..., 0] = 30.0
            return torch.cat([fg, contour], 1)

    x = torch.randn(1, 2, 6, 6)
    p = dihedral_tta(LeftColumn(), x)
    assert p.shape == (1, 2, 6, 6)
    assert torch.allclose(p[:, 0], torch.sigmoid(torch.tensor(3.0)).expand(1, 6, 6))
    expected = sum(dihedral_inverse_mark(e) for e in range(8)) / 8
    assert torch.allclose(p[0, 1], expected, atol=1e-6)
    assert p[0, 1, 0, 0] == pytest.approx(4 / 8)  # a corner lies on two sides, each seen by 2 of the 8 transforms
    assert p[0, 1, 2, 2] == pytest.approx(0.0, abs=1e-6)


def dihedral_inverse_mark(e: int) -> torch.Tensor:
    """Where transform ``e``'s left column lies in the original 6x6 frame (1 there, 0 elsewhere)."""
    idx = torch.arange(36.0).view(6, 6)
    left = dihedral(idx, e)[:, 0]  # the original positions that transform e puts in its left column
    return torch.isin(idx, left).float()


def test_contour_loss_trains_both_channels_and_config_pairs_them():
    y = torch.from_numpy(_two_squares()).float()[None, None]
    loss = LOSSES["contour_bce"](contour_weight=2.0)
    logits = torch.zeros(1, 2, 12, 20, requires_grad=True)
    loss(logits, y).backward()
    assert logits.grad[:, 0].abs().sum() > 0 and logits.grad[:, 1].abs().sum() > 0
    # the contour term is weighted: a perfect foreground leaves 2 x BCE of the contour channel
    perfect = torch.cat([(y * 2 - 1) * 50, torch.zeros_like(y)], 1)
    assert float(loss(perfect, y)) == pytest.approx(2 * np.log(2), rel=1e-4)
    net = MODELS["unet"](in_channels=2, num_classes=1, width=4, depth=2, contours=True)
    assert net(torch.randn(1, 2, 16, 16)).shape == (1, 2, 16, 16)
    task = TASKS["warwick"]
    with pytest.raises(ConfigError, match="contour_bce needs model.contours"):
        task.check_config(Config(task="warwick", model={"name": "unet"}, loss={"name": "contour_bce"}), "v")
    with pytest.raises(ConfigError, match="does not train model.contours"):
        task.check_config(Config(task="warwick", model={"name": "unet", "contours": True}, loss={"name": "bce"}), "v")
    task.check_config(
        Config(
            task="warwick",
            model={"name": "unet", "contours": True},
            loss={"name": "contour_bce"},
            eval=EvalCfg(postprocess="obj_f1_pooled"),
        ),
        "v",
    )


def test_instance_post_processing_fills_each_glands_holes_and_removes_small_glands():
    lab = np.zeros((12, 20), np.int32)
    lab[0:5, 0:5] = 3  # a 5x5 gland with a 1-px hole: 24 px, 25 filled
    lab[2, 2] = 0
    lab[0:5, 5:8] = 7  # touching it: 15 px
    lab[10:12, 10:12] = 9  # a 4-px speck
    lab[7:10, 14:20] = 4  # two glands that together enclose a background pixel neither encloses alone
    lab[8, 17:20] = 5
    lab[7, 17:20] = 5
    lab[9, 17:20] = 5
    lab[8, 16] = 0
    out = PostProcess(0, True).instances(lab)
    assert out[2, 2] == out[0, 0] and out[8, 16] == 0  # its own hole joins the gland; the shared gap stays background
    assert out.dtype == np.int32 and set(np.unique(out)) == {0, 1, 2, 3, 4, 5}  # renumbered without gaps, in order
    small = PostProcess(5, False).instances(lab)
    assert (small[10:12, 10:12] == 0).all() and small.max() == 4 and ((small > 0) == ((lab > 0) & (lab != 9))).all()
    # filled first: the 24-px gland survives a threshold of 25 only with its hole filled
    assert PostProcess(25, True).instances(lab)[0, 0] > 0 and PostProcess(25, False).instances(lab)[0, 0] == 0
    assert (PostProcess().instances(np.stack([lab, lab]))[1] == PostProcess().instances(lab)).all()  # batches


def _touching(speck: bool) -> tuple[np.ndarray, np.ndarray]:
    """(logits (2, 12, 20): the foreground merges _two_squares through the gap column, whose contour probability is
    only 0.45, so the default contour threshold 0.5 keeps one gland where 0.4 cuts two; the true mask (12, 20)),
    with a spurious 2x2 speck when ``speck``."""
    fg = np.where(_two_squares(), 0.9, 0.1)
    fg[3:9, 8] = 0.9
    if speck:
        fg[10:12, 17:19] = 0.9
    contour = np.full((12, 20), 0.1)
    contour[3:9, 8] = 0.45
    p = np.stack([fg, contour])
    return np.log(p / (1 - p)).astype(np.float32), _two_squares()


def _contour_data() -> Data:
    """Validation with the speck, test without; the inputs are the logits (an identity model)."""

    def split(speck: bool) -> Split:
        x, y = _touching(speck)
        return Split(torch.from_numpy(x[None]), torch.from_numpy(y[None, None].astype(np.float32)), [])

    return Data(
        split(True),
        split(True),
        split(False),
        DataInfo(
            source="-",
            channels=[0, 1],
            source_channels=2,
            mean=[0.0, 0.0],
            std=[1.0, 1.0],
            image_size=[12, 20],
            n_train=1,
            n_val=1,
            n_test=1,
        ),
    )


def test_the_contour_threshold_and_the_gland_post_processing_are_chosen_on_validation():
    cfg = Config(
        task="warwick",
        model={"name": "unet", "contours": True},
        loss={"name": "contour_bce"},
        eval=EvalCfg(postprocess="obj_f1_pooled"),
    )
    rec = TASKS["warwick"].test_record(nn.Identity(), _contour_data(), cfg, lambda logits, y: torch.zeros(()))
    # validation: at 0.5 one merged gland and the speck (TP 1, FP 1, FN 1: F1 0.5); 0.4 separates the glands (0.3 too,
    # but later in CONTOUR_THRESHOLDS) and the least threshold above the speck's 4 px removes it
    assert CONTOUR_THRESHOLDS[0] == 0.5 and CONTOUR_THRESHOLDS.index(0.4) < CONTOUR_THRESHOLDS.index(0.3)
    assert rec["postprocess"] == {
        "min_area": 16,
        "fill_holes": False,
        "contour_threshold": 0.4,
        "chosen_by": "obj_f1_pooled",
        "val": 1.0,
        "val_raw": 0.5,
    }
    # test (no speck): before, the merged gland finds one of two (F1 2/3); after, both
    assert rec["test_raw"]["obj_f1_pooled"] == pytest.approx(2 / 3) and rec["test"]["obj_f1_pooled"] == 1.0
    assert rec["test"]["dice"] == rec["test_raw"]["dice"]  # the gap pixels still belong to a gland
    # the metadata's thresholds and post-processing give the same instances, and masks that are their union
    from exporters.metadata import ModelMeta

    meta = ModelMeta(
        task="warwick",
        kind="segmentation",
        input_name="input",
        output_name="logits",
        color_mode="RGB",
        channels=[0, 1],
        pixel_divisor=255.0,
        mean=np.zeros(2, np.float32),
        std=np.ones(2, np.float32),
        image_size=(12, 20),
        resize_policy="tile",
        postprocess=PostProcess(16, False),
        contour_threshold=0.4,
    )
    logits = np.stack([_touching(True)[0], _touching(False)[0]])
    mask, labels = meta.segment(logits)
    assert (
        labels.max(axis=(1, 2)).tolist() == [2, 2] and (mask == (labels > 0)).all() and not mask[0, 10:12, 17:19].any()
    )
    want, _ = TASKS["warwick"].segmented(torch.sigmoid(torch.from_numpy(logits)), cfg, PostProcess(16, False), 0.4)
    assert (torch.from_numpy(mask) == want).all()


def test_contour_model_exports_both_channels_and_predict_writes_instances(tmp_path, make_warwick):
    """Round trip of a tiny trained contour model with its post-processing chosen on validation: the graph returns
    both channels, the metadata carries the chosen instance parameters, parity computes the pixel and object
    metrics from ONNX Runtime outputs + metadata alone and they match the run's reported ones, and `bench predict`
    writes the same instances as a 16-bit PNG, and their union as the mask."""
    import csv
    import json

    from PIL import Image

    from bench.spec import load_spec
    from exporters import onnx as ox
    from exporters.metadata import ModelMeta
    from exporters.parity import TOLERANCE
    from exporters.predict import main
    from exporters.report import _parity_note
    from exporters.runtime import session
    from tests.helpers import train, write_spec

    base = {
        "model": {"name": "unet", "width": 4, "depth": 2, "dropout": 0.0, "contours": True},
        "optim": {"name": "adam", "lr": 1.0e-2},
        "loss": {"name": "contour_bce"},
        "train": {"epochs": 2, "batch_size": 4, "threads": 2},  # no TTA: its export is 8x slower (tested above)
        "eval": {"postprocess": "obj_f1_pooled"},
    }
    root = make_warwick(tmp_path / "data" / "WARWICK", n_train=8, n_test=3).parent
    res = tmp_path / "results"
    train(load_spec(write_spec(tmp_path / "tc.yaml", task="warwick", base=base, variants=[{"name": "a"}])), res, root)
    ex = ox.export_run(res / "runs/tc/a/seed-0", tmp_path / "onnx", str(root), res)
    meta = ModelMeta.from_onnx(ex.path)
    chosen = json.loads((res / "runs/tc/a/seed-0/result.json").read_text())["postprocess"]
    assert meta.raw["instances"] == "contours" and meta.contour_threshold == chosen["contour_threshold"]
    assert meta.postprocess == PostProcess(chosen["min_area"], chosen["fill_holes"])
    assert meta.raw["output_shape"] == '["batch", 2, "height", "width"]'
    logits = session(ex.path).run(None, {"input": ex.inputs})[0]
    assert logits.shape == (3, 2, 32, 32)
    objects = ex.record["parity"]["objects_ort"]
    reported = ex.record["run_test"]
    for key in ("dice", "obj_f1", "obj_dice", "obj_f1_pooled", "obj_dice_pooled"):
        assert abs(objects[key] - reported[key]) <= TOLERANCE["max_dice_diff"], key
    assert abs(objects["obj_hausdorff_pooled"] - reported["obj_hausdorff_pooled"]) <= 1e-2
    assert abs(ex.record["parity"]["metric_ort"] - reported["dice"]) <= TOLERANCE["max_dice_diff"]
    words = _parity_note(ex.record)  # the deployment page states the glands' pooled F1 and the chosen setting
    assert f"pooled object F1 ORT {objects['obj_f1_pooled']:.4f}" in words
    assert f"contour threshold {meta.raw['contour_threshold']}) under {chosen['min_area']} px removed" in words
    assert objects["tp"] + objects["fn"] == sum(int(M.label_objects(t)[1]) for t in ex.test.targets)
    img = tmp_path / "one.png"
    Image.fromarray(ex.test.images[0]).save(img)
    assert main([str(ex.path), str(img), "--out", str(tmp_path / "pred")]) == 0
    with Image.open(tmp_path / "pred" / "one_instances.png") as im:
        labels = np.asarray(im)
    assert im.mode.startswith("I") and (labels == meta.instances(logits[:1])[0]).all()
    row = next(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    assert row["instances"] == "one_instances.png" and int(row["glands"]) == labels.max()
    with Image.open(tmp_path / "pred" / "one_mask.png") as im:
        assert ((np.asarray(im) > 0) == (labels > 0)).all()


def test_tiled_prediction_keeps_the_contour_channel():
    """Large images are tiled: both output channels are reassembled, each from its own tiles."""
    from exporters.metadata import ModelMeta
    from exporters.predict import segment_logits

    class TwoChannels:  # a stand-in session: 'logits' are the input's two channels
        def run(self, outputs, feed):
            return [feed["input"][:, :2].copy()]

    meta = ModelMeta(
        task="warwick",
        kind="segmentation",
        input_name="input",
        output_name="logits",
        color_mode="RGB",
        channels=[0, 1],
        pixel_divisor=255.0,
        mean=np.zeros(2, np.float32),
        std=np.ones(2, np.float32),
        image_size=(32, 32),
        resize_policy="tile",
        tile_size=(32, 32),
        tile_overlap=8,
        min_size=4,
        contour_threshold=0.5,
    )
    x = np.random.default_rng(0).standard_normal((1, 2, 70, 45)).astype(np.float32)
    got = segment_logits(TwoChannels(), meta, x)
    assert got.shape == (2, 70, 45) and np.allclose(got, x[0], atol=1e-6)
