"""A new task is one module plus its registration: run, summary, export and predict work unedited."""
from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from bench.cli import main as bench
from bench.tasks import TASKS
from exporters.onnx import main as export
from tests.helpers import write_spec
from tests.toy_task import SquaresTask, draw


@pytest.fixture
def squares(monkeypatch):
    monkeypatch.setitem(TASKS, "squares", SquaresTask())  # the registration line


def test_a_task_added_as_one_module_runs_end_to_end(squares, tmp_path, capsys):
    base = {"model": {"name": "mnist_resnet", "width": 4, "dropout": 0.0}, "optim": {"name": "adam", "lr": 3.0e-3},
            "train": {"epochs": 3, "batch_size": 32, "threads": 2}, "data": {"val_fraction": 0.25}}
    path = write_spec(tmp_path / "sq.yaml", task="squares", base=base, seeds=[0, 1],
                      variants=[{"name": "plain", "reported": 0.9}, {"name": "faster", "set": {"optim.lr": 1.0e-2}}])
    res = tmp_path / "results"
    # One worker: the squares task is registered in this process only (a real task's registry line reaches workers).
    assert bench(["run", str(path), "--data-root", str(tmp_path), "--results", str(res), "--no-progress",
                  "--workers", "1"]) == 0
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
    assert bench(["predict", str(res / "onnx" / "squares.onnx"), *(str(tmp_path / f"img{i}.png") for i in range(6)),
                  "--out", str(out)]) == 0
    with (out / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["class"] for r in rows} <= {"left", "right"}  # the task's own class names
    assert np.mean([r["class"] == SquaresTask.classes[y] for r, y in zip(rows, labels, strict=True)]) >= 5 / 6
