"""ONNX export: graph checks, metadata, parity on the test set, `best` selection, latency CSV, INT8."""

from __future__ import annotations

import copy
import csv
import inspect
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from bench.models import MODELS
from bench.spec import load_spec, place_in_group
from bench.store import RunStore
from exporters import benchmark as bm
from exporters import export, report
from exporters import onnx as ox
from exporters.metadata import KEYS, ModelMeta
from exporters.parity import TOLERANCE
from exporters.runtime import session
from tests.helpers import TINY_MNIST_BASE, train, write_spec

WARWICK_BASE = {
    "model": {"name": "encdec", "batch_norm": True, "dropout": 0.0, "width": 4, "depth": 2},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "loss": {"name": "bce"},
    "train": {"epochs": 1, "batch_size": 4, "threads": 2},
}
if "input_norm" in inspect.signature(MODELS["encdec"]).parameters:  # per-image standardization inside the graph
    WARWICK_BASE["model"]["input_norm"] = True


MNIST_BASE = copy.deepcopy(TINY_MNIST_BASE)
MNIST_BASE["train"]["epochs"] = 1
MNIST_BASE["data"]["train_subset"] = 500


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root, make_warwick) -> dict[str, Path]:
    """Finished runs: a tiny MNIST one on real data, a tiny WARWICK one on synthetic 32x32 data."""
    tmp = tmp_path_factory.mktemp("onnx")
    res = tmp / "results"
    spec = write_spec(tmp / "tm.yaml", base=MNIST_BASE, variants=[{"name": "a"}])
    train(load_spec(spec), res, data_root)
    wroot = make_warwick(tmp / "wdata" / "WARWICK", n_train=8, n_test=3).parent
    spec = write_spec(tmp / "tw.yaml", task="warwick", base=WARWICK_BASE, variants=[{"name": "a"}])
    train(load_spec(spec), res, wroot)
    return {
        "results": res,
        "mnist": res / "runs/tm/a/seed-0",
        "warwick": res / "runs/tw/a/seed-0",
        "mnist_data": data_root,
        "warwick_data": wroot,
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def mnist_export(runs, tmp_path_factory) -> ox.Exported:
    return ox.export_run(
        runs["mnist"], tmp_path_factory.mktemp("out") / "onnx", str(runs["mnist_data"]), runs["results"]
    )


def test_mnist_export_checks_metadata_parity_and_dynamic_batch(runs, mnist_export):
    ex = mnist_export
    model = onnx.load(str(ex.path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    props = {p.key: p.value for p in model.metadata_props}
    result = json.loads((runs["mnist"] / "result.json").read_text())
    assert (
        props["task"] == "mnist" and props["source_run"] == "runs/tm/a/seed-0" and props["config_hash"] == result["key"]
    )
    assert json.loads(props["classes"]) == [str(i) for i in range(10)]
    assert json.loads(props["input_shape"]) == ["batch", 1, 28, 28]
    assert set(props) <= set(KEYS)
    info = json.loads((runs["mnist"] / "config.json").read_text())["data_info"]
    assert json.loads(props["mean"]) == pytest.approx(info["mean"]) and json.loads(props["std"]) == pytest.approx(
        info["std"]
    )

    assert props["resize_policy"] == "mnist" and props["ink_box"] == "20"  # digits are prepared as MNIST was made
    par = ex.record["parity"]
    assert par["n"] == 10000 and par["agreement"] >= TOLERANCE["min_agreement"]
    assert par["max_abs_logit_diff"] <= 1e-3 * max(1, par["logit_scale"])
    # A user's own ORT code (metadata normalization on the raw test images) reproduces the run's test accuracy
    # exactly: evaluation runs in fp32, as the graph does.
    assert par["metric_ort"] == result["test"]["acc"]
    assert json.loads(ex.record_path.read_text())["sha256"] == ex.record["sha256"]
    assert not list(ex.path.parent.glob(".*"))  # no temp files left

    sess = session(ex.path)
    for n in (1, 7):
        x = ex.inputs[:n]
        out = sess.run(None, {"input": x})[0]
        with torch.inference_mode():
            ref = ex.model(torch.from_numpy(x)).numpy()
        assert out.shape == (n, 10) and np.abs(out - ref).max() < 1e-3


def test_reported_metric_is_the_fp32_graphs_when_training_in_bf16(tmp_path, data_root, monkeypatch):
    """bf16 autocast trains the run (forced on, as on a CPU with AMX or AVX512-BF16), yet validation and test run
    in fp32: the exported graph's accuracy on the raw test images equals the reported one, image for image."""
    import bench.train

    monkeypatch.setattr(bench.train, "cpu_has_bf16", lambda: True)
    res = tmp_path / "results"
    train(load_spec(write_spec(tmp_path / "bf.yaml", base=MNIST_BASE, variants=[{"name": "a"}])), res, data_root)
    result = json.loads((res / "runs/bf/a/seed-0/result.json").read_text())
    assert (result["train_precision"], result["eval_precision"]) == ("bf16 autocast", "fp32")
    ex = ox.export_run(res / "runs/bf/a/seed-0", tmp_path / "onnx", str(data_root), res)
    assert ex.record["parity"]["metric_ort"] == result["test"]["acc"]


def test_warwick_export_has_dynamic_height_and_width(runs, tmp_path):
    ex = ox.export_run(runs["warwick"], tmp_path / "onnx", str(runs["warwick_data"]), runs["results"])
    meta = ModelMeta.from_onnx(ex.path)
    assert meta.kind == "segmentation" and meta.threshold == 0.5 and meta.resize_policy == "tile"
    assert meta.channels == [0, 1] and meta.tile_size == (32, 32) and meta.min_size == 4
    par = ex.record["parity"]
    assert par["n"] == 3 and abs(par["metric_diff"]) <= TOLERANCE["max_dice_diff"]
    sess = session(ex.path)
    rng = np.random.default_rng(0)
    for shape in [(7, 2, 32, 32), (1, 2, 20, 27), (2, 2, 45, 33)]:
        x = rng.standard_normal(shape).astype(np.float32)
        out = sess.run(None, {"input": x})[0]
        with torch.inference_mode():
            ref = ex.model(torch.from_numpy(x)).numpy()
        assert out.shape == (shape[0], 1, *shape[2:]) and np.abs(out - ref).max() < 1e-3 * max(1, np.abs(ref).max())


def test_a_bordered_run_exports_its_border_and_the_graph_reproduces_its_metric(runs, tmp_path):
    """eval.border: the run's own evaluation and its exported graph both mirror the border; parity holds."""
    base = copy.deepcopy(WARWICK_BASE)
    base["eval"] = {"border": 5}
    spec = write_spec(tmp_path / "tb.yaml", task="warwick", base=base, variants=[{"name": "b"}])
    train(load_spec(spec), tmp_path / "results", runs["warwick_data"])
    run_dir = tmp_path / "results/runs/tb/b/seed-0"
    ex = ox.export_run(run_dir, tmp_path / "onnx", str(runs["warwick_data"]), tmp_path / "results")
    meta = ModelMeta.from_onnx(ex.path)
    assert ex.record["metadata"]["border"] == "5" and meta.min_size == 6  # reflecting 5 pixels needs 6
    par = ex.record["parity"]
    assert par["metric_ort"] == pytest.approx(ex.record["run_test"]["dice"], abs=TOLERANCE["max_dice_diff"])
    x = np.random.default_rng(1).standard_normal((1, 2, 20, 27)).astype(np.float32)
    out = session(ex.path).run(None, {"input": x})[0]
    with torch.inference_mode():
        net = ex.run.model.eval()
        bordered = torch.from_numpy(out)
        plain = net(torch.from_numpy(x))
        mirrored = net(torch.nn.functional.pad(torch.from_numpy(x), (5, 5, 5, 5), mode="reflect"))[..., 5:-5, 5:-5]
    assert torch.allclose(bordered, mirrored, atol=1e-4) and not torch.allclose(bordered, plain, atol=1e-3)


def test_broken_export_fails_parity_and_leaves_no_file(runs, tmp_path, monkeypatch, capsys):
    real = export.export_graph

    def broken(model, example, segmentation, tta=False, border=0):  # perturb the largest weight tensor of the graph
        proto = real(model, example, segmentation, tta, border)
        init = max(proto.graph.initializer, key=lambda t: np.prod(t.dims))
        w = onnx.numpy_helper.to_array(init).copy()
        init.CopyFrom(onnx.numpy_helper.from_array(w + 0.5 * np.abs(w).max(), init.name))
        return proto

    monkeypatch.setattr(export, "export_graph", broken)
    out = tmp_path / "res" / "onnx"
    code = ox.main(
        [str(runs["mnist"]), "--out", str(out), "--data-root", str(runs["mnist_data"]), "--no-bench", "--no-summary"]
    )
    err = capsys.readouterr().err
    assert (
        code == 1 and "ONNX Runtime disagrees with PyTorch on the 10000 test images" in err and "no file written" in err
    )
    assert not out.exists()  # neither the file nor its temp file, nor the folder the export created


def _fake_run(src: Path, dst: Path, val: float, test: float, params: int | None = None, key: str | None = None) -> None:
    shutil.copytree(src, dst)
    res = json.loads((dst / "result.json").read_text())
    res.update(
        val_best=val, test={"acc": test}, **({"params": params} if params else {}), **({"key": key} if key else {})
    )
    (dst / "result.json").write_text(json.dumps(res))
    if key:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, "key": key}))


def test_best_is_chosen_by_validation_among_published_runs(runs, tmp_path, capsys):
    res = tmp_path / "results"
    variants = ["high-val", "high-test", "tie-bigger", "superseded", "unfinished", "a-tie-worse-rung"]
    path = write_spec(tmp_path / "g.yaml", base=MNIST_BASE, variants=[{"name": v} for v in variants], seeds=[0, 1])
    RunStore(res).write_group(load_spec(path))  # every variant has tm's config, so tm's run is current in each
    g = res / "runs" / "g"
    _fake_run(runs["mnist"], g / "high-val" / "seed-0", val=0.95, test=0.50)
    _fake_run(runs["mnist"], g / "high-test" / "seed-0", val=0.90, test=0.99)
    _fake_run(runs["mnist"], g / "tie-bigger" / "seed-0", val=0.95, test=0.99, params=10**9)
    _fake_run(runs["mnist"], g / "superseded" / "seed-0.superseded-abc", val=0.99, test=0.99)
    _fake_run(runs["mnist"], g / "unfinished" / "seed-0", val=0.99, test=0.99)
    (g / "unfinished" / "seed-0" / "result.json").unlink()
    # the same validation metric and size as high-val, a folder first in alphabetical order, but a worse rung mean
    _fake_run(runs["mnist"], g / "a-tie-worse-rung" / "seed-0", val=0.95, test=0.99)
    key1 = next(r.key for r in load_spec(path).runs(["a-tie-worse-rung"]) if r.seed == 1)
    _fake_run(runs["mnist"], g / "a-tie-worse-rung" / "seed-1", val=0.80, test=0.99, key=key1)
    # an ad-hoc experiment (a --set override) with the best validation score of all
    adhoc = place_in_group(load_spec(path, overrides=["optim.lr=0.01"]), load_spec(path))
    RunStore(res).write_group(adhoc)
    _fake_run(
        runs["mnist"], res / "runs" / adhoc.group / "high-val" / "seed-0", val=0.999, test=0.3, key=adhoc.runs()[0].key
    )
    cands = ox.finished_runs(res)
    assert len(cands) == 5 and ox.pick_best(cands, "warwick") is None
    assert ox.pick_best(cands, "mnist").run_dir == g / "high-val" / "seed-0"  # not the ad-hoc run
    assert ox.pick_best(ox.finished_runs(res, [adhoc.group]), "mnist").val == 0.999  # only when asked for

    code = ox.main(
        ["best", "--results", str(res), "--task", "mnist", "--data-root", str(runs["mnist_data"]), "--no-bench"]
    )
    assert code == 0
    rec = json.loads((res / "onnx" / "mnist.json").read_text())
    assert rec["source_run"] == "runs/g/high-val/seed-0" and rec["val_best"] == 0.95
    assert re.search(r"\| mnist +\| ORT CPU fp32 +\|", (res / "deployment.md").read_text())
    assert "## Deployment (ONNX Runtime)" in (res / "summary.md").read_text()  # the summary embeds the table
    # a later `best` re-embeds its new table in the existing summary (it once left the first one there)
    summary = res / "summary.md"
    summary.write_text(
        summary.read_text().split("## Deployment (ONNX Runtime)")[0] + "## Deployment (ONNX Runtime)\n\nSTALE\n"
    )
    assert (
        ox.main(
            ["best", "--results", str(res), "--task", "mnist", "--data-root", str(runs["mnist_data"]), "--no-bench"]
        )
        == 0
    )
    assert "STALE" not in summary.read_text() and (res / "deployment.md").read_text().strip() in summary.read_text()
    # exporting anything else (a chosen run, an ad-hoc group) never replaces the shipped model or its table
    shipped = [(res / f).read_bytes() for f in ("onnx/mnist.onnx", "deployment.md", "summary.md")]
    adhoc_run = res / "runs" / adhoc.group / "high-val" / "seed-0"
    assert ox.main([str(adhoc_run), "--data-root", str(runs["mnist_data"]), "--no-bench"]) == 0
    assert (
        ox.main(
            [
                "best",
                "--results",
                str(res),
                "--groups",
                adhoc.group,
                "--data-root",
                str(runs["mnist_data"]),
                "--no-bench",
            ]
        )
        == 0
    )
    assert [(res / f).read_bytes() for f in ("onnx/mnist.onnx", "deployment.md", "summary.md")] == shipped
    assert (res / "onnx-adhoc" / "mnist.onnx").exists() and "high-val" in (
        res / "onnx-adhoc" / "deployment.md"
    ).read_text()
    assert json.loads((res / "onnx" / "mnist.json").read_text())["flops_per_image"] > 0  # counted without --bench too
    assert ox.main(["best", "--results", str(res), "--task", "warwick"]) == 2
    assert "no finished warwick runs in the published groups" in capsys.readouterr().err
    assert ox.main(["best", "--results", str(res), "--groups", "nope"]) == 2
    assert "--groups nope: no such group" in capsys.readouterr().err


def test_latency_csv_int8_and_deployment_table(mnist_export, tmp_path, monkeypatch):
    monkeypatch.setitem(bm.LARGE_BATCH, "classification", 32)
    entry = bm.add_int8(mnist_export)
    assert entry is not None and (mnist_export.path.parent / entry["onnx"]).exists()
    assert ModelMeta.from_onnx(mnist_export.path.parent / entry["onnx"]).raw["precision"] == "int8"
    assert abs(entry["metric_change"]) < 0.3 and entry["agreement"] > 0.5  # a 1-epoch model: plumbing, not quality
    rows = bm.benchmark_export(mnist_export, repeats=5)
    other = [dict(r, model="other") for r in rows]
    csv_path = report.update_latency_csv(tmp_path / "latency.csv", rows + other)
    report.update_latency_csv(csv_path, [r for r in rows if r["precision"] == "fp32"])  # int8 rows are now stale
    assert sorted(r["precision"] for r in report.read_latency_csv(csv_path) if r["model"] == "mnist") == ["fp32"] * 4
    report.update_latency_csv(csv_path, rows)  # replaces every mnist row, keeps the other model's
    with csv_path.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == report.CSV_COLUMNS and len(got) == 12 and sum(r["model"] == "other" for r in got) == 6
    got = [r for r in got if r["model"] == "mnist"]  # (ORT fp32, ORT int8, PyTorch) x (batch 1, 32)
    assert {(r["engine"], r["precision"], r["batch"]) for r in got} == {
        (e, p, b)
        for e, p in [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("pytorch", "fp32")]
        for b in ("1", "32")
    }
    for r in got:
        assert 0 < float(r["p50_ms"]) <= float(r["p90_ms"]) <= float(r["p99_ms"]) and int(r["repeats"]) == 5
        assert int(r["flops_per_image"]) > 0 and int(r["threads"]) >= 1 and r["metric"] == "acc"
    # a task exported elsewhere (no record in this onnx folder) keeps its subsection verbatim
    kept = "### warwick\n\n| warwick | ORT CUDA fp32 | 1 | 2 M | dice 0.9000 | 0.1 / 0.2 | 9.00× | – | – |\n"
    (tmp_path / "deployment.md").write_text(
        "## Deployment (ONNX Runtime)\n\nold intro\n\n" + kept + "\n### mnist\n\nan old mnist table\n"
    )
    md = report.write_deployment_md(tmp_path, mnist_export.path.parent).read_text()
    assert re.search(r"\| mnist +\| ORT CPU int8 +\|", md) and re.search(r"\| mnist +\| PyTorch eager CPU fp32 +\|", md)
    assert "INT8 `mnist.int8.onnx`" in md and "|:-----" in md and "---:|" in md  # text left, numbers right
    assert kept in md and "an old mnist table" not in md and "old intro" not in md
    assert md.index("### mnist") < md.index("### warwick") and md.count("### mnist") == 1


def test_flops_of_a_known_network():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    assert bm.count_flops(net, torch.zeros(1, 1, 8, 8)) == 2 * (4 * 8 * 8 * 9 + 256 * 10)


def test_best_retrains_a_run_whose_checkpoint_is_not_here(runs, tmp_path, capsys):
    """Records come from git, checkpoints do not: `best` trains the chosen run again from its record (once), says so,
    and ships that; on the machine and thread count that made the record, the rerun is identical."""
    res = tmp_path / "results"
    shutil.copytree(runs["results"] / "runs" / "tm", res / "runs" / "tm")
    run_dir = res / "runs" / "tm" / "a" / "seed-0"
    for f in run_dir.iterdir():  # what a clone has: the records
        if f.name not in ("config.json", "result.json", "metrics.csv"):
            f.unlink()
    args = [
        "best",
        "--results",
        str(res),
        "--task",
        "mnist",
        "--data-root",
        str(runs["mnist_data"]),
        "--no-bench",
        "--no-summary",
    ]
    assert ox.main(args) == 2  # hours of training on a real clone: not without being asked
    err = capsys.readouterr().err
    assert "error: no best.pt here" in err and f"{run_dir} (" in err and "Add --retrain" in err
    assert not (res / "retrained").exists()
    args.append("--retrain")
    assert ox.main(args) == 0
    err = capsys.readouterr().err
    assert "note: --retrain: training 1 run again" in err
    assert "has no best.pt (checkpoints are not in git): re-training it" in err and "identical to" in err
    rec = json.loads((res / "onnx" / "mnist.json").read_text())
    assert rec["source_run"] == "retrained/runs/tm/a/seed-0"
    recorded = json.loads((run_dir / "result.json").read_text())["test"]["acc"]
    assert rec["parity"]["metric_ort"] == recorded and not (run_dir / "best.pt").exists()  # the record is untouched
    assert ox.main(args) == 0 and "re-training" not in capsys.readouterr().err  # the checkpoint is kept for next time
    # a run folder named on the command line is found the same way (the re-trained copy, kept from above)
    assert ox.main([str(run_dir), "--out", str(tmp_path / "one"), "--no-bench", "--no-summary"]) == 0
    err = capsys.readouterr().err
    assert "re-training" not in err and "wrote " in err and (tmp_path / "one" / "mnist.onnx").exists()
    (run_dir / "result.json").unlink()
    assert ox.main([str(run_dir), "--no-bench"]) == 2
    assert "not a run folder (no best.pt, no result.json)" in capsys.readouterr().err


def test_ctrl_c_during_an_export_is_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C (during --retrain's training, say) ends with the line `bench run` prints, not a traceback."""

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ox, "choose_runs", interrupted)
    assert ox.main(["best", "--no-bench"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "interrupted; run the same command to go on (a run being trained again resumes from its last epoch)"
    ]
