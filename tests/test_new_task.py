"""A new task is one module plus its registration: run, summary, export and predict work unedited."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from bench.cli import main as bench
from bench.tasks import TASKS
from exporters.onnx import main as export
from tests.helpers import write_spec
from tests.toy_task import SquaresTask, draw


@pytest.fixture
def squares(monkeypatch):
    monkeypatch.setitem(TASKS, "squares", SquaresTask())  # the registration line


# channels_last off in these toy specs: torch 2.14.1's CPU kernels corrupt the heap ("double free or corruption",
# then SIGABRT or SIGSEGV in backward) training this 4-channel ResNet on 16x16 images channels-last on a 2-core AMD
# EPYC (reproduced in a 15-line loop outside bench, fp32 and bf16 alike; NCHW is fine).  The setting changes speed only.


def test_a_task_added_as_one_module_runs_end_to_end(squares, tmp_path, capsys):
    base = {
        "model": {"name": "mnist_resnet", "width": 4, "dropout": 0.0},
        "optim": {"name": "adam", "lr": 3.0e-3},
        "train": {"epochs": 3, "batch_size": 32, "threads": 2, "channels_last": False},
        "data": {"val_fraction": 0.25},
    }
    path = write_spec(
        tmp_path / "sq.yaml",
        task="squares",
        base=base,
        seeds=[0, 1],
        variants=[{"name": "plain", "reported": 0.9}, {"name": "faster", "set": {"optim.lr": 1.0e-2}}],
    )
    res = tmp_path / "results"
    # One worker: the squares task is registered in this process only (a real task's registry line reaches workers).
    assert (
        bench(
            ["run", str(path), "--data-root", str(tmp_path), "--results", str(res), "--no-progress", "--workers", "1"]
        )
        == 0
    )
    summary = (res / "summary.md").read_text()
    assert "## sq (squares, spec" in summary and "test accuracy (%)" in summary
    assert re.search(r"\|\s+90\.0 \|", summary)  # the report's number, in the metric's own format

    assert export(["best", "--results", str(res), "--task", "squares", "--no-bench"]) == 0
    rec = json.loads((res / "onnx" / "squares.json").read_text())
    assert rec["parity"]["n"] == 200 and rec["parity"]["agreement"] == 1.0

    images, labels = draw(6, seed=7)
    for i, img in enumerate(images):
        Image.fromarray(img).resize((48, 48), Image.Resampling.NEAREST).save(tmp_path / f"img{i}.png")
    out = tmp_path / "pred"
    assert (
        bench(
            [
                "predict",
                str(res / "onnx" / "squares.onnx"),
                *(str(tmp_path / f"img{i}.png") for i in range(6)),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["class"] for r in rows} <= {"left", "right"}  # the task's own class names
    assert np.mean([r["class"] == SquaresTask.classes[y] for r, y in zip(rows, labels, strict=True)]) >= 5 / 6


def test_a_lower_is_better_metric_picks_the_lowest_everywhere(monkeypatch, tmp_path, capsys):
    """A task whose primary metric is an error (lower is better): the best epoch, the best rung (★), the best seed of
    a rung, the shipped run and the studies all take the lowest value, never the highest."""
    import optuna

    from bench.grid import StudyGrid
    from bench.spec import load_spec
    from bench.storage import StorageOptions
    from bench.store import RunStore
    from bench.tables import group_tables
    from bench.train import fit
    from bench.tune import study_file
    from exporters.onnx import finished_runs, pick_best
    from exporters.rungs import choose
    from tests.toy_task import SquaresErrorTask

    monkeypatch.setitem(TASKS, "squares_error", SquaresErrorTask())
    base = {
        "model": {"name": "mnist_resnet", "width": 4, "dropout": 0.0},
        "optim": {"name": "adam", "lr": 3.0e-3},
        "train": {"epochs": 3, "batch_size": 32, "threads": 1, "channels_last": False},
        "data": {"val_fraction": 0.25},
    }
    path = write_spec(
        tmp_path / "se.yaml",
        task="squares_error",
        base=base,
        seeds=[0, 1],
        variants=[{"name": "crawl", "set": {"optim.lr": 1.0e-6}}, {"name": "learn", "set": {"optim.lr": 1.0e-2}}],
        search={"variant": "learn", "trials": 2, "space": {"optim.lr": {"low": 1.0e-5, "high": 1.0e-2, "log": True}}},
    )
    res = tmp_path / "results"
    assert bench(["run", str(path), "--results", str(res), "--no-progress", "--workers", "1", "--no-summary"]) == 0
    store, spec = RunStore(res), load_spec(path)
    runs = list(store.finished("se"))
    val = {(r.variant, r.result.seed): r.result.val_best for r in runs}
    means = {v: (val[v, 0] + val[v, 1]) / 2 for v in ("crawl", "learn")}
    assert means["learn"] < means["crawl"]  # a rung that learns has the lower error, and is the best rung
    assert group_tables(store.read_group("se"), runs).best == "learn"
    for rung in choose(spec, store):  # each rung's best seed
        assert rung.val == min(val[rung.variant, 0], val[rung.variant, 1])
    shipped = pick_best(finished_runs(res), "squares_error")
    assert shipped.val == min(val.values())

    # The best epoch: the training loop's own bookkeeping, on validation errors that go down and up again.
    task, scripted = TASKS["squares_error"], iter([0.4, 0.1, 0.3])
    real = task.evaluate
    run = spec.runs(["learn"])[0]
    with monkeypatch.context() as m:
        m.setattr(
            task,
            "evaluate",
            lambda *a, final, **k: (
                real(*a, final=final, **k) if final else {**real(*a, final=final, **k), "err": next(scripted)}
            ),
        )
        result = fit(
            tmp_path / "one",
            run.config,
            task,
            task.load(run.config, torch.device("cpu")),
            torch.device("cpu"),
            run.key,
            progress=False,
        )
    assert (result["best_epoch"], result["val_best"]) == (2, 0.1)
    assert [float(r["val_metric"]) for r in csv.DictReader((tmp_path / "one" / "metrics.csv").open())] == [
        0.4,
        0.1,
        0.3,
    ]

    grid = StudyGrid(store, spec, spec.runs(), StorageOptions(f"sqlite:///{tmp_path / 'grid.db'}"))
    assert grid.study.direction == optuna.study.StudyDirection.MINIMIZE
    assert bench(["tune", str(path), "--results", str(res), "--no-progress"]) == 0
    (name,) = optuna.get_all_study_names(storage=f"sqlite:///{study_file(res, spec)}")
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{study_file(res, spec)}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.best_value == min(t.value for t in study.trials if t.value is not None)
