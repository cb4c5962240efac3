"""Multi-objective tuning: the Pareto front as a table and a figure, read back from the study's storage, and a trial
of the front turned into a rung of the spec that `bench run` trains; a dominated or failed trial is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import optuna
import pytest
import yaml

from bench.cli import main
from bench.config import ConfigError
from bench.spec import load_spec
from bench.store import RunStore
from tests.helpers import TINY_MNIST_BASE, bench_process, finish, write_spec

State = optuna.trial.TrialState
SMALL, BIG = [4, 4, 8, 8, 8], [8, 8, 16, 16, 16]
SPACE = {"optim.lr": {"low": 1.0e-7, "high": 1.0e-2, "log": True}, "model.widths": {"choices": [SMALL, BIG]}}


def _spec(
    tmp_path: Path, name: str, objectives: list[str], space: dict = SPACE, epochs: int = 1, **base_changes
) -> Path:
    """A tiny spec (``epochs`` on 400 images, 1,000 with 2 epochs) whose search writes rungs into ``<name>.rungs.yaml``."""
    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"].update(epochs=epochs, threads=1)
    base["data"]["train_subset"] = 400 if epochs == 1 else 1000
    base.update(base_changes)
    return write_spec(
        tmp_path / f"{name}.yaml",
        base=base,
        variants=[{"name": "a"}],
        search={"variant": "a", "trials": 3, "space": space, "objectives": objectives, "rungs": f"{name}.rungs.yaml"},
    )


def _study(res: Path, name: str) -> optuna.Study:
    storage = f"sqlite:///{res / 'optuna' / f'{name}.db'}"
    (study_name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=study_name, storage=storage)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a beats b: the first value (accuracy) maximized, the others minimized."""
    signs = [1] + [-1] * (len(a) - 1)
    ge = all(s * x >= s * y for s, x, y in zip(signs, a, b, strict=True))
    return ge and any(s * x > s * y for s, x, y in zip(signs, a, b, strict=True))


def test_a_two_objective_study_writes_its_pareto_table_and_figure(data_root, tmp_path, capsys):
    path = _spec(tmp_path, "mo", ["val_metric", "train_seconds"])
    res = tmp_path / "results"
    assert main(["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "3 finished trials (0 failed) of val_metric, train_seconds: " in out and "on the Pareto front" in out
    study = _study(res, "mo")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"] and study.study_name.endswith(
        "+train_seconds"
    )
    done = [t for t in study.trials if t.state == State.COMPLETE]
    front = {t.number for t in study.best_trials}
    # The front is non-dominated, and every other trial is beaten by a trial of it (from the stored values).
    for t in done:
        beaten = [u.number for u in done if _dominates(tuple(u.values), tuple(t.values))]
        assert (t.number in front) == (not beaten), (t.number, t.values, beaten)
    # Each trial's objectives are the harness's own records of its run.
    for t in done:
        run = json.loads(next(res.glob(f"runs/mo--tune-*/trial-{t.number:04d}/seed-0/result.json")).read_text())
        assert t.values == [run["val_best"], round(run["train_seconds"], 3)]
        assert t.user_attrs["measures"]["params"] == run["params"] and t.user_attrs["measures"]["flops"] > 0
        assert 0 < run["train_seconds"] <= run["train_time_s"]
    table = (res / "optuna" / "mo-pareto.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]
    assert sorted(int(r.split("|")[1]) for r in rows) == sorted(front)
    assert "harness's own measured training time" in table and "the front holds on that machine" in table
    assert done[0].user_attrs["machine"] in table and ", 1 threads" in done[0].user_attrs["machine"]
    assert "model.widths" in table and (str(SMALL) in table or str(BIG) in table)  # a list choice, decoded
    png = res / "figures" / "tune-mo-pareto.png"
    assert png.stat().st_size > 5000 and "![Pareto front](../figures/tune-mo-pareto.png)" in table
    csv = (res / "optuna" / "mo-pareto-trials.csv").read_text().splitlines()
    assert csv[0].startswith("number,state,val_metric,train_seconds,params,flops,seconds,optim.lr,model.widths")
    assert len(csv) == 1 + 3


def test_a_front_trial_becomes_a_rung_that_run_trains_and_others_are_refused(data_root, tmp_path, capsys):
    # Adam under a one-cycle schedule: a batch of 1,024 of the ~390 training images leaves it too few steps (fails).
    from bench.tune import study_names

    space = {**SPACE, "train.batch_size": {"choices": [64, 1024]}}
    path = _spec(tmp_path, "r", ["val_metric", "params"], space, epochs=2, sched={"name": "onecycle", "pct_start": 0.3})
    # 2 epochs on 1,000 images: lr 3e-3 learns (~50 %), lr 1e-7 stays at chance.
    spec = load_spec(path)
    res = tmp_path / "results"
    args = ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress"]
    (res / "optuna").mkdir(parents=True)
    study = optuna.create_study(
        study_name=study_names(spec, spec.variants[0], ["val_metric", "params"])[0],
        storage=f"sqlite:///{res / 'optuna' / 'r.db'}",
        directions=["maximize", "minimize"],
    )
    for lr, widths, bs in ((3e-3, SMALL, 64), (1e-7, BIG, 64), (3e-3, SMALL, 1024), (3e-3, BIG, 64)):
        study.enqueue_trial({"optim.lr": lr, "model.widths": json.dumps(widths), "train.batch_size": bs})
    assert main([*args, "--trials", "3"]) == 0  # the failed trial does not stop the study
    out = capsys.readouterr().out
    assert "3 finished trials (1 failed) of val_metric, params" in out
    states = {t.number: t.state for t in study.trials}
    assert states[2] == State.FAIL and "ConfigError" in study.trials[2].user_attrs["fail_reason"]
    front = sorted(t.number for t in study.best_trials)
    done = [t for t in study.trials if t.state == State.COMPLETE]
    # Trial 1 (lr 1e-7: chance accuracy, the big network) is beaten by a trial with fewer or as many parameters.
    assert 1 not in front and any(_dominates(tuple(t.values), tuple(study.trials[1].values)) for t in done)

    rungs = tmp_path / "r.rungs.yaml"
    for trial, says in (
        (1, "--trial 1: not on the Pareto front of study r/a/"),
        (2, "--trial 2: trial 2 is fail in"),
        (9, "--trial 9: no such trial in study"),
    ):
        assert main([*args, "--rung", "lean", "--trial", str(trial)]) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: {says}")
            and err.count("\n") == 1
            and f"the front: {', '.join(map(str, front))}" in err
        )
        assert not rungs.exists()
    assert main([*args, "--rung", "lean"]) == 2  # several objectives: no single best
    assert "add --trial N with a trial of its Pareto front" in capsys.readouterr().err
    assert main([*args, "--rung", "a", "--trial", str(front[0])]) == 2  # a name of the spec's own
    assert "already has a variant 'a'" in capsys.readouterr().err

    pick = front[-1]
    assert main([*args, "--rung", "lean", "--trial", str(pick)]) == 0
    entry = yaml.safe_load(rungs.read_text())["rungs"][0]
    trial = study.trials[pick]
    assert entry["variant"]["name"] == "lean" and entry["variant"]["from"] == "a"
    assert entry["variant"]["set"]["model.widths"] == json.loads(trial.params["model.widths"])
    assert entry["study"]["trial"] == pick and entry["study"]["measures"]["params"] == trial.values[1]
    spec = load_spec(path)
    lean = spec.variants[-1]
    assert [v.name for v in spec.variants] == ["a", "lean"]
    assert lean.config.model["widths"] == entry["variant"]["set"]["model.widths"]
    # Making it again (another trial, same name) replaces it: one entry per name.
    assert main([*args, "--rung", "lean", "--trial", str(front[0])]) == 0
    assert [e["variant"]["name"] for e in yaml.safe_load(rungs.read_text())["rungs"]] == ["lean"]
    assert (
        main(
            [
                "run",
                str(path),
                "--data-root",
                str(data_root),
                "--results",
                str(res),
                "--no-progress",
                "--variants",
                "lean",
                "--workers",
                "1",
                "--no-summary",
            ]
        )
        == 0
    )
    (run,) = [r for r in RunStore(res).finished("r") if r.variant == "lean"]
    assert run.result.test  # a rung of the spec: trained with its test metric, unlike a trial


def test_objectives_are_validated(tmp_path, capsys):
    for objectives, says in (
        (["val_metric", "latency_ms"], "latency_ms is not offered: ONNX Runtime latency"),
        (["val_metric", "train_secs"], "unknown objective 'train_secs'"),
        (["params"], "need val_metric"),
        (["val_metric", "params", "params"], "each objective once"),
    ):
        with pytest.raises(ConfigError, match=says):
            load_spec(_spec(tmp_path, "v", objectives))
    path = _spec(tmp_path, "v", ["val_metric"])
    assert main(["tune", str(path), "--results", str(tmp_path), "--objectives", "val_metric,flop"]) == 2
    assert "--objectives: unknown objective 'flop'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["tune", str(path), "--results", str(tmp_path), "--trial", "3"])
    assert e.value.code == 2
    assert "--trial N: needs --rung NAME" in capsys.readouterr().err
    bare = write_spec(tmp_path / "nr.yaml", search={"variant": "a", "space": SPACE})
    assert main(["tune", str(bare), "--results", str(tmp_path), "--rung", "x", "--trial", "0"]) == 2
    assert "names no file for rungs made from trials; add `rungs: nr.rungs.yaml`" in capsys.readouterr().err
    assert main(["tune", str(path), "--results", str(tmp_path), "--rung", "x", "--trial", "0"]) == 2
    assert "--rung x: no study v/a/" in capsys.readouterr().err and not (tmp_path / "optuna").exists()


@pytest.mark.slow  # 35 s; the default suite shares single-objective studies through PostgreSQL (test_many_machines)
def test_two_workers_share_a_multi_objective_study_in_postgresql(data_root, tmp_path, fresh_db):
    path = _spec(tmp_path, "w", ["val_metric", "flops"])
    args = [
        "tune",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        fresh_db,
        "--trials",
        "4",
        "--heartbeat",
        "1",
        "--grace-period",
        "3",
    ]
    outs = finish(*[bench_process(args, tmp_path) for _ in range(2)])
    (name,) = optuna.get_all_study_names(fresh_db)
    study = optuna.load_study(study_name=name, storage=fresh_db)
    finished = [t for t in study.trials if t.state == State.COMPLETE]
    assert len(finished) == 4 and len({t.user_attrs["worker"] for t in finished}) == 2
    assert all("4 finished trials (0 failed) of val_metric, flops" in out for out in outs), outs
    # The table is read back from the database, whichever worker wrote it last; a third process makes the rung.
    table = (tmp_path / "r" / "optuna" / "w-pareto.md").read_text()
    front = [t for t in study.best_trials if "same_as_trial" not in t.user_attrs]
    assert "postgresql database" in table and len([ln for ln in table.splitlines() if ln.startswith("|")]) == 2 + len(
        front
    )
    pick = front[0].number
    assert main([*args, "--rung", "wide", "--trial", str(pick)]) == 0
    assert yaml.safe_load((tmp_path / "w.rungs.yaml").read_text())["rungs"][0]["study"]["trial"] == pick


def test_rung_alone_takes_a_single_objectives_best_trial(data_root, tmp_path, capsys):
    path = _spec(tmp_path, "one", ["val_metric"])
    args = [
        "tune",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--no-progress",
        "--trials",
        "2",
    ]
    assert main([*args, "--rung", "best-lr"]) == 0  # the study, then its best trial as a rung
    assert "one.rungs.yaml (variant best-lr)" in capsys.readouterr().out
    study = _study(tmp_path / "r", "one")
    (entry,) = yaml.safe_load((tmp_path / "one.rungs.yaml").read_text())["rungs"]
    assert entry["study"]["trial"] == study.best_trial.number and entry["study"]["objectives"] == ["val_metric"]
    assert entry["variant"]["set"]["optim.lr"] == study.best_trial.params["optim.lr"]
    other = next(t.number for t in study.trials if t.values != study.best_trial.values)
    assert main([*args, "--rung", "other", "--trial", str(other)]) == 2
    assert f"--trial {other}: not on the Pareto front" in capsys.readouterr().err
