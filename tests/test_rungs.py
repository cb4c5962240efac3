"""Every rung's deployment cost: the TTA graph, `exporters.onnx rungs`, the Pareto front, the readable table."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.augment import dihedral_tta
from bench.cli import main as bench
from bench.pareto import pareto_front
from bench.records import RunRecord
from bench.spec import LABEL_MAX, load_spec, short_label
from bench.store import RunStore, StoredRun
from bench.tables import MAX_TABLE_WIDTH, group_tables
from exporters import export
from exporters import onnx as ox
from exporters.metadata import ModelMeta
from exporters.runtime import run_batched, session
from tests.helpers import TINY_MNIST_BASE, train, write_spec

SEG_BASE = {
    "model": {"name": "unet", "batch_norm": True, "dropout": 0.0, "width": 4, "depth": 2},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "loss": {"name": "bce"},
    "train": {"epochs": 2, "batch_size": 4, "threads": 2, "amp": False},  # fp32: the run's own number is exact
    "eval": {"tta": True},
}
MNIST_BASE = copy.deepcopy(TINY_MNIST_BASE)
MNIST_BASE["train"]["epochs"] = 1
MNIST_BASE["data"]["train_subset"] = 500


@pytest.fixture(scope="module")
def seg(tmp_path_factory, make_warwick) -> dict[str, Path]:
    """A tiny U-Net trained with TTA on synthetic 32x32 glands; its test Dice used TTA."""
    tmp = tmp_path_factory.mktemp("tta")
    root = make_warwick(tmp / "data" / "WARWICK", n_train=8, n_test=4).parent
    spec = load_spec(write_spec(tmp / "seg.yaml", task="warwick", base=SEG_BASE, variants=[{"name": "tta"}]))
    train(spec, tmp / "results", root)
    return {"results": tmp / "results", "run": tmp / "results/runs/seg/tta/seed-0", "data": root}


def test_tta_graph_reproduces_the_harness_tta_evaluation(seg, tmp_path):
    ex = export.export_run(seg["run"], tmp_path / "onnx", str(seg["data"]), seg["results"])  # auto: the run used TTA
    assert ex.tta and ex.record["tta"] and ModelMeta.from_onnx(ex.path).raw["tta"] == "true"
    par = ex.record["parity"]
    assert par["tta"] and par["max_abs_prob_diff"] <= 1e-4
    # the file's Dice is the run's reported (TTA) Dice, through plain ORT code and the metadata alone
    result = json.loads((seg["run"] / "result.json").read_text())
    logits = run_batched(session(ex.path), ex.inputs, 2)
    dice = ex.run.task.score_outputs(logits, ex.test.targets, ex.meta.threshold)
    assert dice == pytest.approx(result["test"]["dice"], abs=1e-4) and dice == pytest.approx(
        par["metric_torch"], abs=1e-6
    )
    # sigmoid(output) is the harness's own TTA probability, also on a non-square input the graph was not traced on
    x = np.random.default_rng(0).standard_normal((2, 2, 24, 40)).astype(np.float32)
    out = session(ex.path).run(None, {"input": x})[0]
    with torch.inference_mode():
        ref = dihedral_tta(ex.run.model.eval(), torch.from_numpy(x)).numpy()
    assert out.shape == (2, 1, 24, 40) and np.abs(1 / (1 + np.exp(-out)) - ref).max() < 1e-4
    # one forward pass when asked: another graph, another (non-TTA) number, one eighth of the FLOPs
    plain = export.export_run(seg["run"], tmp_path / "plain", str(seg["data"]), seg["results"], tta=False)
    assert not plain.tta and ModelMeta.from_onnx(plain.path).raw["tta"] == "false"
    assert ex.record["flops_per_image"] == 8 * plain.record["flops_per_image"]
    assert plain.record["parity"]["metric_torch"] != pytest.approx(par["metric_torch"], abs=1e-9)


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_best_exports_the_tta_graph_unless_told_otherwise(seg, tmp_path, capsys):
    base = ["best", "--results", str(seg["results"]), "--data-root", str(seg["data"]), "--no-bench", "--no-summary"]
    assert ox.main([*base, "--out", str(tmp_path / "a")]) == 0
    assert ModelMeta.from_onnx(tmp_path / "a/warwick.onnx").raw["tta"] == "true"
    assert "which the exported graph computes too" in (tmp_path / "a/deployment.md").read_text()
    assert ox.main([*base, "--out", str(tmp_path / "b"), "--no-tta"]) == 0
    assert ModelMeta.from_onnx(tmp_path / "b/warwick.onnx").raw["tta"] == "false"


def test_tta_refused_for_a_non_square_classification_input(monkeypatch, tmp_path, capsys, data_root):
    assert (
        export.tta_refusal("classification", (28, 28)) is None and export.tta_refusal("segmentation", (20, 30)) is None
    )
    why = export.tta_refusal("classification", (28, 32))
    assert "28x32" in why and "rotation by 90 degrees gives 32x28" in why and "without --tta" in why
    spec = load_spec(write_spec(tmp_path / "m.yaml", base=MNIST_BASE, variants=[{"name": "a"}]))
    train(spec, tmp_path / "results", data_root)
    monkeypatch.setattr(export, "tta_refusal", lambda kind, size: why)
    out = tmp_path / "out"
    code = ox.main(
        [
            str(tmp_path / "results/runs/m/a/seed-0"),
            "--tta",
            "--out",
            str(out),
            "--data-root",
            str(data_root),
            "--no-bench",
            "--no-summary",
        ]
    )
    assert code == 2 and "rotation by 90 degrees" in capsys.readouterr().err and not out.exists()


def test_classification_tta_graph_matches_pytorch(tmp_path, data_root):
    spec = load_spec(write_spec(tmp_path / "m.yaml", base=MNIST_BASE, variants=[{"name": "a"}]))
    train(spec, tmp_path / "results", data_root)
    ex = export.export_run(
        tmp_path / "results/runs/m/a/seed-0", tmp_path / "o", str(data_root), tmp_path / "results", tta=True
    )
    assert ex.tta and ex.record["parity"]["max_abs_prob_diff"] <= 1e-4 and ex.record["parity"]["agreement"] >= 0.999


def test_rungs_costs_not_run_reuse_and_summary(tmp_path, data_root, capsys):
    spec_path = write_spec(
        tmp_path / "r.yaml",
        base=MNIST_BASE,
        variants=[
            {"name": "a", "note": "the base"},
            {"name": "b", "set": {"model.hidden": 64}},
            {"name": "c", "set": {"optim.lr": 1e-3}},
        ],
    )
    spec = load_spec(spec_path)
    res = tmp_path / "results"
    train(spec, res, data_root, runs=spec.runs(["a", "b"]))  # c is never trained
    args = ["rungs", str(spec_path), "--results", str(res), "--data-root", str(data_root), "--repeats", "20", "--int8"]
    assert ox.main(args) == 0
    err = capsys.readouterr().err
    assert "r c: not run" in err
    costs = json.loads((res / "runs/r/costs.json").read_text())
    assert set(costs["rungs"]) == {"a", "b"} and costs["not_run"] == ["c"] and costs["batch"] == 1
    for v in ("a", "b"):
        rec = costs["rungs"][v]
        assert rec["latency"]["cpu/fp32"]["p50_ms"] > 0 and rec["latency"]["cpu/int8"]["calls"] >= 10
        assert (res / "onnx/rungs/r" / f"{v}.onnx").exists() and not rec["export_reused"]
    assert costs["rungs"]["b"]["params"] > costs["rungs"]["a"]["params"]
    assert costs["rungs"]["b"]["flops_per_image"] > costs["rungs"]["a"]["flops_per_image"]
    text = (res / "summary.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant") and "| change" in line)
    assert "MFLOP" in header and "ORT ms" in header and "INT8 ms" in header
    row_c = next(line for line in text.splitlines() if line.startswith("| c "))
    assert row_c.count("not run") == 4  # the metric and the three cost columns
    assert (res / "figures/r-tradeoff.png").exists() and "Pareto front" in text
    # a second call reuses both exports (same best.pt, same code) but times them again
    assert ox.main(args) == 0
    again = json.loads((res / "runs/r/costs.json").read_text())
    assert all(again["rungs"][v]["export_reused"] for v in ("a", "b")) and again["measured"] >= costs["measured"]
    # new weights in b's best.pt: b is exported again, a is not
    ck = torch.load(res / "runs/r/b/seed-0/best.pt", weights_only=True)
    name = next(k for k, t in ck["state_dict"].items() if t.is_floating_point())
    ck["state_dict"][name] = ck["state_dict"][name] * 1.001
    torch.save(ck, res / "runs/r/b/seed-0/best.pt")
    assert ox.main(args) == 0
    third = json.loads((res / "runs/r/costs.json").read_text())
    assert third["rungs"]["a"]["export_reused"] and not third["rungs"]["b"]["export_reused"]
    # c trained after the timing: its cells are "–" and the legend names the command that times it alone
    train(spec, res, data_root, runs=spec.runs(["c"]))
    assert bench(["summary", "--results", str(res)]) == 0
    text = (res / "summary.md").read_text()
    assert (
        f"Not timed (their runs are newer than the timing): c (–); `python -m exporters.onnx rungs {spec_path}" in text
    )
    assert ox.main([*args, "--variants", "c"]) == 0
    fourth = json.loads((res / "runs/r/costs.json").read_text())
    assert (
        fourth["not_run"] == [] and list(fourth["rungs"]) == ["a", "b", "c"] and "timed_apart" in fourth["rungs"]["c"]
    )
    assert all(fourth["rungs"][v] == third["rungs"][v] for v in ("a", "b"))
    text = (res / "summary.md").read_text()
    assert "Not timed" not in text and "Timed apart from the rest, on the same CPU kind and engine: c on" in text


def test_rungs_without_the_best_seed_s_checkpoint(tmp_path, data_root, capsys):
    """A clone has records but not checkpoints: the best seed that has a best.pt stands for the rung, and a rung with
    none keeps empty cost cells; both are said in the log, costs.json and the table's legend."""
    spec_path = write_spec(
        tmp_path / "w.yaml",
        base=MNIST_BASE,
        seeds=[0, 1],
        variants=[{"name": "a"}, {"name": "b", "set": {"model.hidden": 64}}],
    )
    spec = load_spec(spec_path)
    res = tmp_path / "results"
    train(spec, res, data_root)
    store = RunStore(res)
    vals = {r.seed: store.result(r).val_best for r in spec.runs(["a"])}
    best, other = sorted(vals, key=lambda k: (-vals[k], k))
    for gone in (f"a/seed-{best}", "b/seed-0", "b/seed-1"):
        (res / "runs/w" / gone / "best.pt").unlink()
    args = ["rungs", str(spec_path), "--results", str(res), "--data-root", str(data_root), "--repeats", "10"]
    assert ox.main(args) == 0
    err = capsys.readouterr().err
    assert f"w a: seeds {best} have no best.pt here: seed {other} stands for it" in err
    assert "w b: seeds 0, 1 have no best.pt here: no cost columns" in err
    costs = json.loads((res / "runs/w/costs.json").read_text())
    assert set(costs["rungs"]) == {"a"} and costs["rungs"]["a"]["seed"] == other
    assert costs["no_weights"] == {"a": [best], "b": [0, 1]} and costs["not_run"] == []
    text = (res / "summary.md").read_text()
    assert f"another seed stands for a (seed {other}); none for b (–)" in text
    # --retrain: each rung's best seed is trained again from its record into <results>/retrained and stands for it
    assert ox.main([*args, "--retrain"]) == 0
    assert "--retrain: training 2 runs again" in capsys.readouterr().err
    costs = json.loads((res / "runs/w/costs.json").read_text())
    assert costs["rungs"]["a"]["seed"] == best and costs["rungs"]["b"]["seed"] == 0 and costs["no_weights"] == {}
    assert costs["rungs"]["a"]["run"] == f"retrained/runs/w/a/seed-{best}"
    text = (res / "summary.md").read_text()
    assert "another seed stands" not in text
    # the same machine and thread count: the copies are the published runs, and the legend says so
    assert (
        "trained again from the records (checkpoints are not in git): identical to the published run for a, b." in text
    )
    costs["rungs"]["a"]["metric_torch"] = 0.5  # a copy that another machine would have trained: another draw
    (res / "runs/w/costs.json").write_text(json.dumps(costs))
    assert bench(["summary", "--results", str(res)]) == 0
    published = store.result(spec.runs(["a"])[best]).test["acc"]
    text = (res / "summary.md").read_text()
    assert f"identical to the published run for b; another draw for a (50.00 % against {100 * published:.2f} %)" in text
    assert ox.main(args) == 0 and "have no best.pt" not in capsys.readouterr().err  # the copies serve from now on
    # without b's weights, a new measurement would drop b's columns from costs.json: an error, nothing written
    shutil.rmtree(res / "retrained/runs/w/b")
    assert ox.main(args) == 2
    err = capsys.readouterr().err
    assert "holds the costs of b (measured" in err and "--variants times only the rungs named" in err
    before = json.loads((res / "runs/w/costs.json").read_text())
    assert before["rungs"].keys() == {"a", "b"}
    # --variants a: a is timed again, b's row stays as it was measured, and the table says which row was timed apart
    assert ox.main([*args, "--variants", "a"]) == 0
    merged = json.loads((res / "runs/w/costs.json").read_text())
    assert merged["rungs"]["b"] == before["rungs"]["b"] and merged["measured"] == before["measured"]
    apart = merged["rungs"]["a"]["timed_apart"]
    assert apart["command"].endswith("--variants a") and apart["measured"] >= before["measured"]
    assert merged["rungs"]["a"]["latency"] != before["rungs"]["a"]["latency"]
    text = (res / "summary.md").read_text()
    assert f"Timed apart from the rest, on the same CPU kind and engine: a on {apart['measured'][:16]}" in text
    assert ox.main([*args, "--variants", "a", "--threads", "2"]) == 2  # rows of another setup would not compare
    assert "timed with another setup (threads 1 there, 2 here)" in capsys.readouterr().err
    assert ox.main([*args, "--variants", "z"]) == 2
    assert "--variants: unknown variant 'z'" in capsys.readouterr().err
    assert json.loads((res / "runs/w/costs.json").read_text()) == merged
    # -q: warnings and errors alone, so no progress bars while b trains again
    assert ox.main([*args, "--retrain", "-q"]) == 0
    err = capsys.readouterr().err
    assert "ep/s" not in err and "run/s" not in err and "--retrain" not in err
    assert (res / "retrained/runs/w/b/seed-0/best.pt").exists()


def test_rungs_of_a_spec_without_runs_is_an_error(tmp_path, capsys):
    spec_path = write_spec(tmp_path / "none.yaml", base=MNIST_BASE)
    assert ox.main(["rungs", str(spec_path), "--results", str(tmp_path / "results")]) == 2
    assert "no runs of none under" in capsys.readouterr().err and not (tmp_path / "results").exists()
    with pytest.raises(SystemExit):
        ox.main(["rungs"])  # no spec


def test_pareto_front_on_hand_made_points():
    pts = [(1.0, 0.90), (2.0, 0.95), (1.5, 0.92), (3.0, 0.94), (1.0, 0.80), (4.0, 0.99), (float("nan"), 1.0)]
    assert pareto_front(pts) == [0, 2, 1, 5]  # (3.0, 0.94) is beaten by (2.0, 0.95); (1.0, 0.80) by (1.0, 0.90)
    assert pareto_front([(1.0, 5.0), (2.0, 4.0), (3.0, 6.0)], higher_is_better=False) == [0, 1]
    assert pareto_front([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # equal points are all on the front
    # timings of one network within the tolerance count as equal cost: the better one dominates
    same_net = [(0.113, 0.9946), (0.112, 0.9877), (0.276, 0.9910)]
    assert pareto_front(same_net) == [1, 0]
    assert pareto_front(same_net, cost_tolerance=0.1) == [0]


def test_trade_off_labels_never_overlap_each_other_or_a_point_and_stay_inside_the_axes():
    """Five points at one latency near the top of the axes (the TTA rungs of a table) and a neighbour column close
    enough that its long labels would run into theirs: no two label boxes overlap, none covers a point's marker, all
    stay inside the axes (a label above them runs into the title), and a lone point keeps its label beside it."""
    from bench.plots import _place_labels

    xy = np.array(
        [[100.0, 390.0], [102.0, 392.0], [101.0, 395.0], [99.0, 396.0], [100.0, 398.0], [150.0, 393.0], [300.0, 50.0]]
    )
    sizes = [(80.0, 10.0)] * len(xy)
    box = (0.0, 0.0, 600.0, 400.0)
    off = _place_labels(xy, sizes, box)
    rects = []
    for i, (dx, dy) in off.items():
        (x, y), (w, h) = xy[i], sizes[i]
        x0 = x + dx if dx > 0 else x + dx - w
        rects.append((x0, y + dy - h / 2, x0 + w, y + dy + h / 2))
    assert all(box[0] <= r[0] and r[2] <= box[2] and box[1] <= r[1] and r[3] <= box[3] for r in rects)

    def apart(a, b):
        return a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]

    assert all(apart(a, b) for k, a in enumerate(rects) for b in rects[k + 1 :])
    assert all(apart(r, (x - 5, y - 5, x + 5, y + 5)) for r in rects for x, y in xy)
    assert off[6] == (9.0, 0.0)  # the lone point: right of it, at its height
    # with every place taken the label still gets one (the least crowded), not an error
    assert len(_place_labels(np.zeros((40, 2)) + 200.0, [(80.0, 10.0)] * 40, box)) == 40


def test_short_labels():
    assert short_label("optim.lr=0.001") == "optim.lr=0.001"
    assert (
        short_label("Optuna best of 16 trials (4 pruned, 0 failed; 4.4 min on 2 workers), trial 12")
        == "Optuna best of 16 trials, trial 12"
    )
    long = "word " * 30
    cut = short_label(long)
    assert len(cut) <= LABEL_MAX and cut.endswith("…")
    # a key list is cut between whole keys (a list value stays whole) and says that something was left out
    keys = "model.widths=[24, 48, 48, 96, 96], model.hidden=256, optim.lr=0.001, optim.weight_decay=0.0001"
    assert short_label(keys).startswith("model.widths=[24, 48, 48, 96, 96],") and short_label(keys).endswith(" …")
    assert len(short_label(keys)) <= LABEL_MAX


def test_table_columns_keep_their_order_and_decimals(tmp_path):
    """A first rung without runs does not move the Δ column; a latency column has one number of decimals."""
    spec = load_spec(
        write_spec(
            tmp_path / "o.yaml",
            base=MNIST_BASE,
            seeds=[0],
            variants=[
                {"name": "a", "reported": 0.9},
                {"name": "b", "set": {"optim.lr": 1e-3}},
                {"name": "c", "set": {"optim.lr": 1e-4}},
            ],
        )
    )
    store = RunStore(tmp_path)
    store.write_group(spec)
    meta = store.read_group(spec.group)
    runs = [
        StoredRun(
            spec.group,
            v,
            0,
            f"k{v}",
            tmp_path,
            RunRecord(
                f"k{v}",
                seed=0,
                val_best=0.5,
                test={"acc": 0.9},
                params=1000,
                epochs_run=1,
                best_epoch=1,
                train_time_s=1.0,
            ),
        )
        for v in ("b", "c")
    ]
    lat = {"b": 0.0703, "c": 0.111}
    costs = {
        "rungs": {
            v: {"key": f"k{v}", "flops_per_image": 1e6, "latency": {"cpu/fp32": {"p50_ms": ms}}}
            for v, ms in lat.items()
        }
    }
    main = group_tables(meta, runs, costs).main
    assert main.headers == ["variant", "change", "n", "test acc. (%)", "Δ (p)", "report", "params", "MFLOP", "ORT ms"]
    ms = [row[main.headers.index("ORT ms")] for row in main.rows]
    assert ms == ["not run", "0.0703", "0.1110"]


def test_rungs_refuses_tta_choices_and_best_refuses_force(tmp_path, capsys):
    for args in (
        ["rungs", "mnist", "--tta"],
        ["rungs", "mnist", "--no-tta"],
        ["best", "--force"],
        ["best", "--variants", "a"],
    ):
        with pytest.raises(SystemExit) as e:
            ox.main(args)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        "exported with TTA exactly when its metric used it" in err and "--force and --variants go with `rungs`" in err
    )


@pytest.mark.parametrize("name", ["mnist", "warwick"])
@pytest.mark.parametrize("profile", [None, "quick"])
def test_committed_specs_tables_fit_a_screen(name, profile, tmp_path):
    """The width rule on the committed specs: every change label fits without being cut, and the main table, with
    every cost column and the widest plausible numbers, stays within MAX_TABLE_WIDTH characters."""
    spec = load_spec(Path("ablations") / f"{name}.yaml", profile)
    store = RunStore(tmp_path)
    store.write_group(spec)
    meta = store.read_group(spec.group)
    for v in spec.variants:
        assert len(v.label) <= LABEL_MAX and not v.label.endswith("…"), (v.name, v.label)
    metric_keys = (
        ["acc"] if spec.task == "mnist" else ["dice", "dice_pooled", "iou", "obj_f1", "obj_dice", "obj_hausdorff"]
    )
    runs, rungs = [], {}
    for v in spec.variants:
        for seed in spec.seeds:
            test = {k: (0.1 + 0.8 * (seed % 2) if k != "obj_hausdorff" else 123.45) for k in metric_keys}
            result = RunRecord(
                f"k{v.name}{seed}",
                seed=seed,
                val_best=0.5,
                test=test,
                params=12_345_678,
                epochs_run=100,
                best_epoch=88.5,
                train_time_s=12345.0,
            )
            runs.append(StoredRun(spec.group, v.name, seed, result.key, tmp_path, result))
        rungs[v.name] = {
            "key": f"k{v.name}{spec.seeds[0]}",
            "tta": True,
            "flops_per_image": 123_456_789_012,
            "latency": {c: {"p50_ms": 1234.567} for c in ("cpu/fp32", "cpu/int8", "cuda/fp32")},
        }
    tables = group_tables(meta, runs, {"rungs": rungs})
    assert tables.costs_shown and {"ORT ms", "INT8 ms", "CUDA ms", "GFLOP"} <= set(tables.main.headers)
    assert tables.main.width() <= MAX_TABLE_WIDTH, (tables.main.width(), tables.main.markdown().splitlines()[2])
    numeric = [h for h in tables.main.headers if h not in ("variant", "change")]
    assert all(tables.main.align[tables.main.headers.index(h)] == "right" for h in numeric)


def test_published_quick_tables_fit_a_screen():
    """The committed results/summary.md: every main table of a quick section obeys the width rule."""
    text = (Path(__file__).resolve().parents[1] / "results" / "summary.md").read_text()
    quick = [s for s in text.split("\n## ")[1:] if s.startswith(("mnist@quick", "warwick@quick"))]
    assert quick, "no quick section in results/summary.md"
    for section in quick:
        table = [b.strip() for b in section.split("\n\n") if b.strip().startswith("| variant") and "| change" in b]
        assert table, section[:60]
        rows = [
            [c.strip() for c in line.strip("|").split("|")]
            for line in table[0].splitlines()
            if "---" not in line and ":--" not in line and "--:" not in line
        ]
        width = sum(max(len(c) for c in col) + 3 for col in zip(*rows, strict=True))
        assert width <= MAX_TABLE_WIDTH and {"MFLOP", "GFLOP"} & set(rows[0]) and "ORT ms" in rows[0], (
            section[:40],
            width,
        )
