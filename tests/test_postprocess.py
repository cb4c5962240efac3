"""Post-processing chosen on validation (eval.postprocess): the two operations, the choice made on the validation
split only, the record, the exported metadata, `bench predict` and parity applying it, and `bench rescore` bringing
a record without the pooled object metrics up to date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

from bench.cli import main
from bench.config import Config, ConfigError, EvalCfg
from bench.postprocess import PostProcess, candidates, choose, remove_small
from bench.spec import load_spec
from bench.tables import CHOSEN
from bench.tasks import TASKS
from bench.tasks.base import Data, DataInfo, Split
from exporters import onnx as ox
from exporters import predict
from exporters.metadata import ModelMeta
from exporters.parity import TOLERANCE
from tests.helpers import masks, train, write_spec

WARWICK = TASKS["warwick"]


def test_remove_small_objects_and_fill_holes():
    # a 5x5 ring (16 px, a 3x3 hole of 9 px) and a 2x2 speck (4 px); the corner pixel (9, 9) touches the speck
    # diagonally, so with 8-connectivity the speck is one object of 5 px
    m = masks(12, 12, (0, 4, 0, 4), (8, 9, 8, 9))
    m[1:4, 1:4] = False
    m[10, 10] = True
    assert remove_small(m, 6).sum() == 16 and remove_small(m, 5).sum() == 21 and remove_small(m, 0) is m
    assert PostProcess(0, True)(m).sum() == 16 + 9 + 5  # the hole filled, nothing removed
    # holes are filled first: the filled ring (25 px) survives a threshold of 20 that the ring alone (16) would not
    assert PostProcess(20, True)(m).sum() == 25 and PostProcess(20, False)(m).sum() == 0
    # a batch (N, H, W) is processed image by image; no post-processing returns the masks as they are
    both = np.stack([m, m])
    assert (PostProcess(6)(both) == remove_small(m, 6)).all()
    assert PostProcess()(both) is both
    assert candidates()[0] == PostProcess() and len(set(candidates())) == len(candidates())


def test_choose_keeps_the_least_change_on_ties():
    m = np.stack([masks(20, 20, (0, 9, 0, 9), (15, 16, 15, 16))])  # a 100-px object and a 4-px speck
    # score: minus the foreground pixels that are not the big object's -> every threshold above 4 and up to 100 ties
    post, best, raw = choose(m, lambda x: -float(x.sum() - 100 * x[:, 0, 0].sum()))
    assert post == PostProcess(16, False) and best == 0.0 and raw == -4.0
    # nothing helps: no post-processing
    assert choose(m, lambda x: 1.0)[0] == PostProcess()


def _split(logit_masks: np.ndarray, targets: np.ndarray) -> Split:
    """A split whose inputs are the logits themselves (+8 inside ``logit_masks``, -8 outside), for an identity model."""
    x = torch.from_numpy(np.where(logit_masks, 8.0, -8.0)[:, None].astype(np.float32))
    return Split(x, torch.from_numpy(targets[:, None].astype(np.float32)), [])


@pytest.mark.parametrize("by", ["obj_f1_pooled", "dice"])
def test_the_choice_is_made_on_validation_and_the_test_reports_it(by):
    # validation: a 10x10 gland predicted right, plus a 3x3 spurious speck: any threshold above 9 px removes the
    # speck (object F1 2/3 -> 1, Dice 200/209 -> 1); the least of them, 16, is chosen
    val_g = masks(40, 40, (5, 14, 5, 14))
    val_p = masks(40, 40, (5, 14, 5, 14), (30, 32, 30, 32))
    # test: a 3x3 gland predicted exactly: the test itself would prefer no post-processing (16 removes the gland)
    test_g = masks(40, 40, (20, 22, 20, 22))
    data = Data(
        _split(val_p[None], val_g[None]),
        _split(val_p[None], val_g[None]),
        _split(test_g[None], test_g[None]),
        DataInfo(
            source="-",
            channels=[0],
            source_channels=1,
            mean=[0.0],
            std=[1.0],
            image_size=[40, 40],
            n_train=1,
            n_val=1,
            n_test=1,
        ),
    )
    cfg = Config(task="warwick", model={"name": "encdec"}, eval=EvalCfg(postprocess=by))
    rec = WARWICK.test_record(nn.Identity(), data, cfg, nn.BCEWithLogitsLoss())
    assert rec["postprocess"] == {
        "min_area": 16,
        "fill_holes": False,
        "chosen_by": by,
        "val": 1.0,
        "val_raw": pytest.approx(2 / 3 if by == "obj_f1_pooled" else 200 / 209),
    }
    # the test split is reported with the validation's choice (the gland removed), and before it (perfect)
    assert rec["test_raw"]["obj_f1_pooled"] == 1.0 and rec["test_raw"]["dice"] == 1.0
    assert rec["test"]["obj_f1_pooled"] == 0.0 and rec["test"]["dice"] == 0.0
    # without eval.postprocess: the test metrics alone, as before the key existed
    assert WARWICK.test_record(nn.Identity(), data, cfg.copy(eval=EvalCfg()), nn.BCEWithLogitsLoss()).keys() == {"test"}


def test_postprocess_is_refused_where_a_task_has_none():
    cfg = Config(task="mnist", model={"name": "mnist_cnn"}, loss={"name": "ce"}, eval=EvalCfg(postprocess="dice"))
    with pytest.raises(ConfigError, match="eval.postprocess: task 'mnist' has no post-processing"):
        TASKS["mnist"].check_config(cfg, "variants[0]")


def test_metadata_round_trip_and_masks():
    props = {
        "task": "warwick",
        "kind": "segmentation",
        "input_name": "input",
        "output_name": "logits",
        "color_mode": "RGB",
        "channels": "[0, 1]",
        "pixel_divisor": "255",
        "mean": "[0.5, 0.5]",
        "std": "[0.2, 0.2]",
        "image_size": "[32, 32]",
        "resize_policy": "tile",
        "threshold": "0.5",
        "min_area": "6",
        "fill_holes": "true",
    }
    meta = ModelMeta.from_props(props)
    assert meta.postprocess == PostProcess(6, True)
    m = masks(12, 12, (0, 4, 0, 4), (8, 9, 8, 9))
    m[2, 2] = False
    logits = np.where(m, 3.0, -3.0)[None]
    assert (meta.masks(logits) == PostProcess(6, True)(m[None])).all() and meta.masks(logits)[0, 2, 2]
    # an export written before the keys existed: no post-processing
    old = ModelMeta.from_props({k: v for k, v in props.items() if k not in ("min_area", "fill_holes")})
    assert old.postprocess == PostProcess() and (old.masks(logits) == m[None]).all()


BASE = {
    "model": {"name": "encdec", "batch_norm": True, "dropout": 0.0, "width": 4, "depth": 2},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "loss": {"name": "bce"},
    "train": {"epochs": 2, "batch_size": 4, "threads": 2},
    "eval": {"postprocess": "obj_f1_pooled"},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, make_warwick) -> dict[str, Path]:
    """A finished tiny WARWICK run with eval.postprocess on synthetic 48x48 data."""
    tmp = tmp_path_factory.mktemp("post")
    root = make_warwick(tmp / "data" / "WARWICK", n_train=8, n_test=3, size=(48, 48)).parent
    train(
        load_spec(write_spec(tmp / "pp.yaml", task="warwick", base=BASE, variants=[{"name": "a"}])),
        tmp / "results",
        root,
    )
    return {"results": tmp / "results", "run": tmp / "results/runs/pp/a/seed-0", "data": root, "tmp": tmp}


def test_the_record_holds_the_choice_and_both_test_metrics(run):
    r = json.loads((run["run"] / "result.json").read_text())
    post = r["postprocess"]
    assert post["chosen_by"] == "obj_f1_pooled" and post["min_area"] in (0, 16, 32, 64, 128, 256, 512)
    assert post["val"] >= post["val_raw"]  # never worse on validation than no post-processing
    assert {"obj_f1_pooled", "obj_dice_pooled", "obj_hausdorff_pooled"} <= r["test"].keys() <= r["test_raw"].keys()


def test_export_carries_the_choice_and_reproduces_the_reported_metrics(run, tmp_path):
    result = json.loads((run["run"] / "result.json").read_text())
    ex = ox.export_run(run["run"], tmp_path / "onnx", str(run["data"]), run["results"])
    meta = ModelMeta.from_onnx(ex.path)
    assert meta.postprocess == PostProcess(result["postprocess"]["min_area"], result["postprocess"]["fill_holes"])
    par = ex.record["parity"]
    # the shipped pipeline (ONNX Runtime, threshold and post-processing from the metadata) against the run's numbers
    assert par["metric_ort"] == pytest.approx(result["test"]["dice"], abs=TOLERANCE["max_dice_diff"])
    assert par["obj_f1_pooled_ort"] == pytest.approx(result["test"]["obj_f1_pooled"], abs=1e-9)


def test_predict_applies_the_metadatas_postprocessing(run, tmp_path):
    ex = ox.export_run(run["run"], tmp_path / "onnx", str(run["data"]), run["results"])
    img = run["data"] / "WARWICK/Test/image_01.png"
    fractions = {}
    for min_area in ("0", str(48 * 48 + 1)):  # nothing removed; every object removed (none can be that large)
        proto = onnx.load(str(ex.path))
        props = {p.key: p.value for p in proto.metadata_props}
        onnx.helper.set_model_props(proto, {**props, "min_area": min_area, "fill_holes": "false"})
        onnx.save(proto, str(tmp_path / f"m{min_area}.onnx"))
        out = tmp_path / f"out{min_area}"
        assert predict.main([str(tmp_path / f"m{min_area}.onnx"), str(img), "--out", str(out)]) == 0
        mask = np.asarray(Image.open(out / "image_01_mask.png")) > 0
        sess, meta = predict.load_model(tmp_path / f"m{min_area}.onnx")
        expected = meta.masks(predict.segment_logits(sess, meta, meta.normalize(np.asarray(Image.open(img))[None])))
        assert (mask == expected).all()
        fractions[min_area] = mask.mean()
    assert fractions["0"] > 0 and fractions[str(48 * 48 + 1)] == 0


def test_rescore_adds_the_pooled_metrics_and_the_choice_to_an_older_record(run, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(run["results"], results)
    path = results / "runs/pp/a/seed-0/result.json"
    true = json.loads(path.read_text())
    old = {k: v for k, v in true.items() if k not in ("postprocess", "test_raw")}
    old["test"] = {
        k: v for k, v in true["test_raw"].items() if not k.endswith("_pooled") or k.startswith(("dice", "iou"))
    }
    path.write_text(json.dumps(old))  # as a run recorded before the pooled metrics and the post-processing
    assert main(["rescore", "pp", "--results", str(results), "--data-root", str(run["data"])]) == 0
    new = json.loads(path.read_text())
    assert new["test"] == pytest.approx(true["test"]) and new["test_raw"] == pytest.approx(true["test_raw"])
    assert new["postprocess"] == true["postprocess"]
    assert new["history"][-1]["test"] == old["test"] and "obj_f1_pooled" not in new["history"][-1]["test"]


def test_the_summary_shows_the_choice_and_its_paired_effect():
    from bench.records import GroupRecord, RunRecord, VariantRecord
    from bench.tables import postprocess_table

    meta = GroupRecord("w", "w", "warwick", [VariantRecord("a", "a"), VariantRecord("b", "b", parent="a")])

    def rec(seed: int, raw: tuple[float, float], post: tuple[float, float], chosen: dict) -> RunRecord:
        return RunRecord(
            f"k{seed}",
            seed=seed,
            test={"dice": post[0], "obj_f1_pooled": post[1]},
            test_raw={"dice": raw[0], "obj_f1_pooled": raw[1]},
            postprocess={**chosen, "chosen_by": "obj_f1_pooled"},
        )

    results = {
        "a": [RunRecord("k", seed=0, test={"dice": 0.8})],  # no post-processing: no row
        "b": [
            rec(0, (0.80, 0.5), (0.81, 0.7), {"min_area": 16, "fill_holes": False}),
            rec(1, (0.82, 0.6), (0.82, 0.7), {"min_area": 64, "fill_holes": True}),
        ],
    }
    table = postprocess_table(meta, results, WARWICK.metrics)
    (row,) = table.rows
    cells = dict(zip(table.headers, row, strict=True))
    assert cells["variant"] == "b" and cells[CHOSEN] == "16, 64 filled"
    # pixel Dice (the primary metric): 0.81 -> 0.815, paired changes +0.01 and 0: mean +0.005, t = 1 on 1 df, p = 0.5
    assert cells["pixel Dice before → after"] == "0.8100 → 0.8150" and cells["Δ pixel Dice (p)"] == "+0.0050 (p=0.500)"
    # pooled object F1 (the metric that chose): changes +0.2 and +0.1: mean +0.15, t = 3 on 1 df, p = 0.205
    assert (
        cells["obj_f1_pooled before → after"] == "0.550 → 0.700" and cells["Δ obj_f1_pooled (p)"] == "+0.150 (p=0.205)"
    )
    # a contour model's choice includes its contour threshold
    results["b"][1].postprocess["contour_threshold"] = 0.2
    (row,) = postprocess_table(meta, results, WARWICK.metrics).rows
    assert dict(zip(table.headers, row, strict=True))[CHOSEN] == "16, 64 filled c0.2"
