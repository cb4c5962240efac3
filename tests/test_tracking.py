"""MLflow tracking (--mlflow): every finished run and tuning trial logged once, read back with MlflowClient from a
temporary SQLite store; without the extra, one error line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.config import ConfigError
from bench.spec import load_spec
from tests.helpers import TINY_MNIST_BASE, write_spec

REPO = Path(__file__).resolve().parents[1]
BASE = copy.deepcopy(TINY_MNIST_BASE)
BASE["data"]["train_subset"] = 300


def test_without_mlflow_installed_mlflow_is_one_error_line_before_anything(tmp_path, capsys, monkeypatch):
    # Importing the tracking modules loads nothing of mlflow (it is an optional extra).
    code = "import sys, bench.tracking, exporters.tracking, bench.cli; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    path = write_spec(tmp_path / "g.yaml")
    res = tmp_path / "results"
    for argv in (["run", str(path), "--mlflow"], ["tune", str(path), "--mlflow", "sqlite:///x.db"]):
        assert main([*argv, "--results", str(res)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err == ["error: --mlflow: MLflow is not installed; install the extra with: pip install -e '.[mlflow]'"]
    # A spec that asks for tracking says so too, naming its file and key; --no-mlflow turns it off.
    tracked = write_spec(tmp_path / "t.yaml", tracking={"mlflow": True})
    assert main(["run", str(tracked), "--results", str(res), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tracked}: tracking.mlflow: MLflow is not installed")
    assert main(["run", str(tracked), "--results", str(res), "--dry-run", "--no-mlflow"]) == 0
    capsys.readouterr()
    assert not res.exists()
    from exporters.onnx import main as onnx_main

    run_dir = res / "runs" / "g" / "a" / "seed-0"
    run_dir.mkdir(parents=True)
    (run_dir / "best.pt").touch()
    assert onnx_main([str(run_dir), "--mlflow"]) == 2  # before any export
    assert capsys.readouterr().err.splitlines() == [
        "error: --mlflow: MLflow is not installed; install the extra with: pip install -e '.[mlflow]'"
    ]
    assert {p.name for p in run_dir.iterdir()} == {"best.pt"}


def test_tracking_section_is_validated_and_changes_no_run_key(tmp_path):
    spec = yaml.safe_load((REPO / "ablations" / "mnist.yaml").read_text())
    keys = [r.key for r in load_spec(REPO / "ablations" / "mnist.yaml", "quick").runs()]
    tuned = REPO / "ablations" / spec["search"]["tuned"]
    if tuned.exists():  # the `tuned` rung is read from beside the spec
        (tmp_path / tuned.name).write_text(tuned.read_text())
    for value in (True, "sqlite:///elsewhere.db"):
        path = tmp_path / "mnist.yaml"
        path.write_text(yaml.safe_dump({**spec, "tracking": {"mlflow": value}}, sort_keys=False))
        loaded = load_spec(path, "quick")
        assert loaded.mlflow == value and [r.key for r in loaded.runs()] == keys
    for bad, message in (
        ({"mlflow": 5}, "tracking.mlflow: expected true, false or a tracking URI"),
        ({"mlfow": True}, "tracking: unknown key 'mlfow'"),
        ("yes", "tracking: expected a mapping"),
    ):
        path.write_text(yaml.safe_dump({**spec, "tracking": bad}, sort_keys=False))
        with pytest.raises(ConfigError, match=message):
            load_spec(path)


def _client(res: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(res / 'mlflow.db').resolve()}")


def _runs(client, experiment: str, kind: str = "run") -> list:
    exp = client.get_experiment_by_name(experiment)
    return sorted(client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'"), key=lambda r: r.info.run_name)


def test_runs_are_logged_once_with_params_metrics_and_artifacts(data_root, tmp_path, capsys):
    pytest.importorskip("mlflow")
    path = write_spec(tmp_path / "ml.yaml", base=BASE)
    res = tmp_path / "results"
    args = ["run", str(path), "--results", str(res), "--data-root", str(data_root), "--no-progress", "--no-summary"]
    assert main([*args, "--variants", "a", "--workers", "1"]) == 0  # trained before --mlflow was given
    assert not (res / "mlflow.db").exists()
    # b's runs are logged as each finishes (the runner's after-run hook), a's (already finished) by the command.
    assert main([*args, "--workers", "1", "--mlflow"]) == 0
    assert f"MLflow: 2 runs of ml in sqlite:///{(res / 'mlflow.db').resolve()}" in capsys.readouterr().err
    client = _client(res)
    exp = client.get_experiment_by_name("ml")
    assert exp.artifact_location == (res / "mlartifacts" / "ml").resolve().as_uri()
    [parent] = _runs(client, "ml", "group")
    assert parent.info.run_name == "ml" and parent.data.tags["spec"] == str(path)
    runs = _runs(client, "ml")
    assert [r.info.run_name for r in runs] == ["a/s0", "b/s0"]
    for r in runs:
        variant, seed = r.info.run_name.split("/s")
        d = res / "runs" / "ml" / variant / f"seed-{seed}"
        result, config = (json.loads((d / f).read_text()) for f in ("result.json", "config.json"))
        tags = r.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["config_key"] == result["key"]
        assert (tags["group"], tags["variant"], tags["seed"], tags["commit"], tags["device"]) == (
            "ml",
            variant,
            seed,
            result["commit"],
            result["device"],
        )
        assert r.data.params["optim.lr"] == str(config["config"]["optim"]["lr"])
        assert r.data.params["model.widths"] == "[8, 8, 16, 16, 16]" and r.data.params["seed"] == seed
        history = client.get_metric_history(r.info.run_id, "val_metric")
        assert [(m.step, m.value) for m in history] == [
            (e + 1, pytest.approx(v))
            for e, v in enumerate(float(row.split(",")[4]) for row in (d / "metrics.csv").read_text().splitlines()[1:])
        ]
        assert len(history) == BASE["train"]["epochs"] and r.info.status == "FINISHED"
        assert r.data.metrics["test_acc"] == pytest.approx(result["test"]["acc"])
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"curves.png", "config.json", "metrics.csv", "result.json"} <= artifacts
    # A rerun logs nothing twice; a run left half-logged (RUNNING) by a killed process is replaced.
    b0 = runs[1]
    client.delete_run(b0.info.run_id)
    client.create_run(parent.info.experiment_id, tags={k: b0.data.tags[k] for k in ("kind", "group", "config_key")})
    assert main([*args, "--mlflow"]) == 0
    again = _runs(client, "ml")
    assert [r.info.run_name for r in again] == ["a/s0", "b/s0"]
    assert [r.info.run_id for r in again if r.info.run_name != "b/s0"] == [r.info.run_id for r in runs if r is not b0]
    assert all(r.info.status == "FINISHED" for r in again) and len(_runs(client, "ml", "group")) == 1

    # The exported ONNX file goes to its source run's MLflow run.
    from exporters.onnx import main as onnx_main

    assert onnx_main([str(res / "runs/ml/a/seed-0"), "--no-bench", "--out", str(tmp_path / "onnx"), "--mlflow"]) == 0
    a0 = again[0].info.run_id
    assert {a.path for a in client.list_artifacts(a0, "onnx")} == {"onnx/mnist.onnx", "onnx/mnist.json"}


def test_bad_tracking_uris_are_errors_before_anything_is_written(data_root, tmp_path, capsys, monkeypatch):
    import time

    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    path = write_spec(tmp_path / "g.yaml", base=BASE)
    res = tmp_path / "results"
    args = ["run", str(path), "--results", str(res), "--data-root", str(data_root), "--no-progress"]
    for uri, message in (
        (str(tmp_path / "folder"), "not a tracking URI MLflow can write to"),
        ("sqlite:x.db", "a SQLite tracking URI is sqlite:///"),
        # nobody listens on port 9: one try, and urllib3's cause alone
        (
            "http://127.0.0.1:9",
            "cannot use this tracking store: cannot reach the server: Failed to "
            "establish a new connection: [Errno 111] Connection refused",
        ),
    ):
        t0 = time.monotonic()
        assert main([*args, "--mlflow", uri]) == 2
        [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert message in err and err.startswith(f"error: --mlflow {uri}") and (len(err) < 200 or "http" not in uri)
        assert time.monotonic() - t0 < 30 and not (res / "runs" / "g").exists()


def _tables(db: Path) -> list[str]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return sorted(r[0] for r in con.execute("select name from sqlite_master where type = 'table'"))


def test_mlflow_never_writes_into_optuna_s_database(data_root, tmp_path, capsys):
    import optuna

    pytest.importorskip("mlflow")
    path = write_spec(tmp_path / "o.yaml", base=BASE)
    db = tmp_path / "optuna.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="someone's")
    before = _tables(db)
    res = tmp_path / "results"
    args = [
        "run",
        str(path),
        "--results",
        str(res),
        "--data-root",
        str(data_root),
        "--no-progress",
        "--mlflow",
        f"sqlite:///{db}",
    ]
    for extra, message in (
        ([], "this database holds another application's tables (studies, "),
        (["--storage", f"sqlite:///{db}"], f"this is the database of --storage sqlite:///{db} (Optuna's)"),
    ):
        assert main([*args, *extra]) == 2
        [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
        assert err.startswith(f"error: --mlflow sqlite:///{db}: {message}")
        assert _tables(db) == before and not res.exists()


def test_a_new_tracking_file_that_fails_is_removed(tmp_path, monkeypatch):
    from bench.tracking import Tracker

    pytest.importorskip("mlflow")
    monkeypatch.setattr(Tracker, "_parent", lambda *a: 1 / 0)  # MLflow made its tables, then something went wrong
    tracker = Tracker.for_uri(f"sqlite:///{tmp_path / 'm.db'}", tmp_path)
    with pytest.raises(ConfigError, match="cannot use this tracking store: division by zero"):
        tracker.check([{"group": "g"}])
    assert not (tmp_path / "m.db").exists()


def test_tune_logs_every_trial_under_its_study(data_root, tmp_path, capsys):
    pytest.importorskip("mlflow")
    base = copy.deepcopy(BASE)
    base["train"]["epochs"] = 1
    space = {"optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}}
    path = write_spec(
        tmp_path / "tu.yaml", base=base, search={"variant": "a", "trials": 2, "space": space}, tracking={"mlflow": True}
    )
    res = tmp_path / "results"
    args = ["tune", str(path), "--results", str(res), "--data-root", str(data_root), "--no-progress"]
    assert main(args) == 0
    assert "MLflow: 2 trials of study tu/a/" in capsys.readouterr().err
    client = _client(res)
    [study] = _runs(client, "tu", "group")
    trials = _runs(client, "tu")
    assert [r.info.run_name for r in trials] == ["trial-0000", "trial-0001"]
    for r in trials:
        result = json.loads(
            (res / "runs" / study.data.tags["group"] / r.info.run_name / "seed-0/result.json").read_text()
        )
        assert (
            r.data.tags["mlflow.parentRunId"] == study.info.run_id and r.data.tags["study"] == study.data.tags["study"]
        )
        assert float(r.data.params["optim.lr"]) == pytest.approx(result["search_params"]["optim.lr"])
        assert r.data.metrics["val_best"] == pytest.approx(result["val_best"])
        assert len(client.get_metric_history(r.info.run_id, "val_loss")) == 1
    assert main([*args, "--trials", "2"]) == 0  # nothing new: nothing logged twice
    assert [r.info.run_id for r in _runs(client, "tu")] == [r.info.run_id for r in trials]


@pytest.mark.slow
def test_worker_processes_log_each_run_once(data_root, tmp_path, capsys):
    pytest.importorskip("mlflow")
    base = copy.deepcopy(BASE)
    base["train"]["epochs"] = 1
    path = write_spec(tmp_path / "wk.yaml", base=base, seeds=[0, 1])
    res = tmp_path / "results"
    args = [
        "run",
        str(path),
        "--results",
        str(res),
        "--data-root",
        str(data_root),
        "--no-progress",
        "--no-summary",
        "--mlflow",
    ]
    assert main([*args, "--workers", "2"]) == 0  # each worker process logs the runs it trains
    assert "warning" not in capsys.readouterr().err
    client = _client(res)
    runs = _runs(client, "wk")
    assert [r.info.run_name for r in runs] == ["a/s0", "a/s1", "b/s0", "b/s1"] and len(
        _runs(client, "wk", "group")
    ) == 1
    assert all(
        r.info.status == "FINISHED" and len(client.get_metric_history(r.info.run_id, "val_loss")) == 1 for r in runs
    )
    assert main([*args, "--workers", "2"]) == 0
    assert [r.info.run_id for r in _runs(client, "wk")] == [r.info.run_id for r in runs]
