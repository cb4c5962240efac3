"""Grids and studies shared through a real PostgreSQL server (tests/postgres.py starts one): every run
trained once by two workers, a SIGKILLed worker's run resumed by the other, exactly N tuning trials,
a killed SQLite study resumed, bad URLs refused before anything is trained or written."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from bench.cli import main
from bench.runner import gpu_slots
from bench.spec import load_spec
from tests.helpers import TINY_MNIST_BASE, bench_process, finish, wait_for, write_spec

REPO = Path(__file__).resolve().parents[1]
State = optuna.trial.TrialState
FAST_BEAT = ["--heartbeat", "1", "--grace-period", "3"]  # a dead worker is noticed within seconds


def _grid_trials(url: str, group: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=f"grid:{group}", storage=url).get_trials(deepcopy=False)


def _spec(tmp_path: Path, name: str, epochs: int = 1, **kw) -> Path:
    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"].update(epochs=epochs, threads=1, deterministic=True)
    base["data"]["train_subset"] = 400
    return write_spec(tmp_path / f"{name}.yaml", base=base, **kw)


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_two_workers_share_a_grid_each_run_once_and_a_rerun_trains_nothing(data_root, tmp_path, fresh_db):
    path = _spec(
        tmp_path,
        "g",
        seeds=[0, 1],
        variants=[
            {"name": "a"},
            {"name": "b", "set": {"optim.lr": 1.0e-3}},
            {"name": "c", "set": {"model.dropout": 0.0}},
        ],
    )
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        fresh_db,
        "--workers",
        "1",
        *FAST_BEAT,
    ]
    outs = finish(bench_process(args, tmp_path), bench_process(args, tmp_path))
    done = [line for out in outs for line in out.splitlines() if line.startswith("done ")]
    assert len(done) == 6 and len({line.split(":")[0] for line in done}) == 6, outs  # every run, each once
    trials = _grid_trials(fresh_db, "g")
    complete = [t for t in trials if t.state == State.COMPLETE]
    assert len(complete) == 6 and len({t.user_attrs["run"] for t in complete}) == 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2, "both workers trained"
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "| a" in summary and "| c" in summary and "incomplete" not in summary

    out = finish(bench_process(args, tmp_path))[0]  # the same command again: nothing queued, nothing trained
    assert "6 already done" in out and "done " not in out.replace("already done", "")
    assert len(_grid_trials(fresh_db, "g")) == len(trials)

    # The results folder, not the study, says what is finished: a run deleted there is trained again, with a warning.
    import shutil

    shutil.rmtree(tmp_path / "r" / "runs" / "g" / "b" / "seed-1")
    out = finish(bench_process(args, tmp_path))[0]
    assert "does not hold them (e.g. g/b/seed-1)" in out and "done g b seed 1" in out and out.count("done g ") == 1

    # The same grid on one machine, without the database: the same numbers, run by run.
    alone = tmp_path / "alone"
    finish(bench_process([*args[:5], str(alone), "--workers", "1"], tmp_path))
    for run in load_spec(path).runs():
        shared = json.loads((tmp_path / "r" / "runs" / run.rel_dir / "result.json").read_text())
        own = json.loads((alone / "runs" / run.rel_dir / "result.json").read_text())
        assert shared["test"] == own["test"] and shared["val_best"] == own["val_best"], run.rel_dir


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_a_sigkilled_worker_run_is_resumed_by_the_other_and_ends_as_if_uninterrupted(data_root, tmp_path, fresh_db):
    path = _spec(tmp_path, "k", epochs=5, seeds=[0, 1], variants=[{"name": "a"}])
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "cut"),
        "--storage",
        fresh_db,
        "--workers",
        "1",
        *FAST_BEAT,
    ]
    seed0 = tmp_path / "cut" / "runs" / "k" / "a" / "seed-0"
    first = bench_process(args, tmp_path)  # alone at first: it claims seed 0, the oldest trial
    wait_for(first, lambda: (seed0 / "last.pt").exists())
    second = bench_process(args, tmp_path)
    time.sleep(1.0)
    first.send_signal(signal.SIGKILL)  # mid-run: no chance to release anything
    first.wait()
    assert not (seed0 / "result.json").exists()
    out = finish(second)[0]
    assert "resuming a/s0 from epoch" in out and "done k a seed 0" in out and "done k a seed 1" in out, out
    trials = _grid_trials(fresh_db, "k")
    seed0_trials = [t for t in trials if t.user_attrs["run"].endswith("seed-0")]
    assert [t.state for t in seed0_trials] == [State.FAIL, State.COMPLETE]  # failed by heartbeat, then retried
    assert seed0_trials[1].system_attrs["failed_trial"] == seed0_trials[0].number

    whole = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            str(path),
            "--data-root",
            str(data_root),
            "--results",
            str(tmp_path / "whole"),
            "--seeds",
            "0",
            "--no-progress",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert whole.returncode == 0, whole.stderr
    resumed = json.loads((seed0 / "result.json").read_text())
    ref = json.loads((tmp_path / "whole" / "runs" / "k" / "a" / "seed-0" / "result.json").read_text())
    assert resumed["test"] == ref["test"] and resumed["best_epoch"] == ref["best_epoch"] and resumed["epochs_run"] == 5


def test_a_run_that_fails_by_itself_is_recorded_and_not_retried(data_root, tmp_path, fresh_db):
    # SGD at lr 1e12 without batch norm overflows in the first epoch: the run's own failure, not a dead worker's.
    boom = {"optim": {"name": "sgd", "lr": 1.0e12}, "model.batch_norm": False}
    path = _spec(tmp_path, "f", variants=[{"name": "ok"}, {"name": "boom", "set": boom}])
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        fresh_db,
        "--workers",
        "1",
        *FAST_BEAT,
    ]
    p = bench_process(args, tmp_path)
    out = p.communicate(timeout=300)[0]
    assert p.returncode == 1 and "Traceback" not in out, out
    assert "error: 1 run failed" in out and "boom seed 0: Diverged: epoch 1: the training loss is" in out
    res = json.loads((tmp_path / "r" / "runs" / "f" / "boom" / "seed-0" / "result.json").read_text())
    assert res["status"] == "failed" and res["error"].startswith("Diverged")
    trials = _grid_trials(fresh_db, "f")
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]  # failed once, nothing queued again
    assert "Diverged" in next(t for t in trials if t.state == State.FAIL).user_attrs["error"]
    assert "**failed**: boom seed 0: Diverged" in (tmp_path / "r" / "summary.md").read_text()


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_two_tuning_workers_end_with_exactly_the_trials_asked_for(data_root, tmp_path, fresh_db):
    space = {"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    path = _spec(tmp_path, "t", variants=[{"name": "a"}], search={"variant": "a", "space": space})
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
        "8",
        *FAST_BEAT,
    ]
    outs = finish(bench_process(args, tmp_path), bench_process(args, tmp_path))
    (name,) = optuna.get_all_study_names(storage=fresh_db)
    trials = optuna.load_study(study_name=name, storage=fresh_db).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (State.COMPLETE, State.PRUNED)]
    assert len(finished) == 8, [t.state for t in trials]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == State.FAIL)  # only a lost race is failed
    assert len({t.user_attrs["worker"] for t in finished}) == 2
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 8  # workers asking at once draw different points
    assert all("after 8 finished trials" in out for out in outs), outs


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_a_killed_sqlite_study_resumes_its_trial(data_root, tmp_path):
    space = {"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    path = _spec(tmp_path, "s", epochs=6, variants=[{"name": "a"}], search={"variant": "a", "space": space})
    args = ["tune", str(path), "--data-root", str(data_root), "--results", str(tmp_path / "r"), "--trials", "2"]
    p = bench_process(args, tmp_path)
    wait_for(p, lambda: any((tmp_path / "r" / "runs").glob("*--tune-*/trial-0000/seed-0/last.pt")))
    p.send_signal(signal.SIGKILL)
    p.wait()
    out = finish(bench_process([*args, "--heartbeat", "1", "--grace-period", "2"], tmp_path))[0]
    assert "resuming trial 0 from epoch" in out and "after 2 finished trials" in out, out
    db = f"sqlite:///{tmp_path / 'r' / 'optuna' / 's.db'}"
    (name,) = optuna.get_all_study_names(storage=db)
    states = [t.state for t in optuna.load_study(study_name=name, storage=db).get_trials(deepcopy=False)]
    assert states.count(State.COMPLETE) + states.count(State.PRUNED) == 2 and states.count(State.FAIL) == 1


@pytest.mark.parametrize(
    "url, says",
    [
        ("postgresql://bench:s3cret@127.0.0.1:1/bench", "cannot use this database"),  # nothing listens on port 1
        ("not a url", "not a database URL"),
        ("mysql://u@localhost/db", "unsupported database 'mysql'"),
        ("postgresql://u@127.0.0.1:5432", "no database name"),
        ("sqlite:////no/such/folder/x.db", "PATH in an existing folder"),
    ],
)
def test_a_bad_storage_url_is_one_error_before_anything_is_written(url, says, data_root, tmp_path, capsys):
    path = _spec(tmp_path, "b")
    for command in ("run", "tune"):
        args = [command, str(path), "--data-root", str(data_root), "--results", str(tmp_path / "r"), "--storage", url]
        assert main(args) == 2
        out = capsys.readouterr().err
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--storage" in errors[0] and says in errors[0], out
        assert "s3cret" not in out
        assert not (tmp_path / "r").exists()


def test_workers_are_spread_over_the_gpus_round_robin():
    assert gpu_slots(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]  # several small runs share each GPU
    assert gpu_slots(3, ["2", "5", "7", "1"]) == ["2", "5", "7"]
    assert gpu_slots(2, ["0"]) == [None, None]  # one GPU: nothing to spread
    assert gpu_slots(2, []) == [None, None]


def test_spec_without_search_file_has_no_tuned_variant(tmp_path):
    space = {"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}}
    path = _spec(
        tmp_path, "n", variants=[{"name": "a"}], search={"variant": "a", "space": space, "tuned": "n.tuned.yaml"}
    )
    assert [v.name for v in load_spec(path).variants] == ["a"]


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_a_run_whose_workers_keep_dying_is_reported_once_retries_are_exhausted(data_root, tmp_path, fresh_db):
    path = _spec(tmp_path, "d", epochs=50, variants=[{"name": "a"}])
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        fresh_db,
        "--workers",
        "1",
        "--heartbeat",
        "1",
        "--grace-period",
        "2",
        "--retries",
        "0",
    ]
    first = bench_process(args, tmp_path)
    wait_for(first, lambda: (tmp_path / "r" / "runs" / "d" / "a" / "seed-0" / "last.pt").exists())
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = bench_process(args, tmp_path)  # finds the run held by a dead worker, no retry left: it says so and fails
    out = second.communicate(timeout=120)[0]
    assert second.returncode == 1 and "d/a/seed-0: its worker stopped beating 1 times (--retries exhausted)" in out, out


@pytest.mark.slow  # tox -e slow: the default suite stays under ~10 minutes on 2 cores
def test_sigterm_queues_the_run_again_at_once_without_using_a_retry(data_root, tmp_path, fresh_db):
    path = _spec(tmp_path, "t", epochs=12, variants=[{"name": "a"}])
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        fresh_db,
        "--workers",
        "1",
        "--retries",
        "0",
    ]  # the default 60 s grace: only an explicit release is fast here
    first = bench_process(args, tmp_path)
    wait_for(first, lambda: (tmp_path / "r" / "runs" / "t" / "a" / "seed-0" / "last.pt").exists())
    first.send_signal(signal.SIGTERM)  # what Slurm sends a preempted job
    assert first.wait(timeout=60) == 130
    # Queued again at once, for any worker already waiting (not only for a command that starts later).
    assert [t.state.name for t in _grid_trials(fresh_db, "t")] == ["FAIL", "WAITING"]
    out = finish(bench_process(args, tmp_path))[0]
    assert "resuming a/s0 from epoch" in out and "done t a seed 0" in out, out
    states = [t.state.name for t in _grid_trials(fresh_db, "t")]
    assert states == ["FAIL", "COMPLETE"]


def test_passwords_are_hidden_wherever_a_url_is_shown():
    from bench.storage import shown

    assert shown("postgresql://bench:s3cret@db:5432/bench") == "postgresql://***@db:5432/bench"
    assert shown("postgresql://bench:p@ss@db:abc/bench") == "postgresql://***@db:abc/bench"  # malformed too
    cmd = "python -m bench run mnist --storage postgresql+psycopg://u:pw@h/db --workers 2"
    assert shown(cmd) == "python -m bench run mnist --storage postgresql+psycopg://***@h/db --workers 2"
    assert shown("run x --storage=postgresql://u:pw@h/db") == "run x --storage=postgresql://***@h/db"
    assert shown("postgresql//u:pw@h/db") == "postgresql//u:***@h/db"  # no "://": still hidden
    assert (
        shown("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
        and shown("postgresql://u@h/db") == "postgresql://***@h/db"
    )
    assert shown("sqlite:///results/optuna/mnist@quick.db") == "sqlite:///results/optuna/mnist@quick.db"  # a path


def test_an_unescaped_at_in_a_password_is_refused_without_showing_it(tmp_path):
    from bench.config import ConfigError
    from bench.storage import StorageOptions, open_storage, where_it_ran

    with pytest.raises(ConfigError) as e:
        open_storage(StorageOptions("postgresql://bench:p@ss@127.0.0.1/bench"))
    assert str(e.value) == (
        "--storage postgresql://***@127.0.0.1/bench: an unescaped '@' in the user or password; percent-encode it as %40"
    )
    assert where_it_ran("postgresql://bench:p@ss@127.0.0.1:5433/bench") == "postgresql database bench on 127.0.0.1:5433"


def test_a_run_queued_twice_is_trained_once_and_counted_once(tmp_path):
    # Two workers starting together may both queue a run; whichever copy is claimed second is failed as a duplicate.
    from bench.grid import StudyGrid
    from bench.storage import StorageOptions
    from bench.store import RunStore

    spec = load_spec(_spec(tmp_path, "q", variants=[{"name": "a"}]))
    (run,) = spec.runs()
    store = RunStore(tmp_path / "r")
    grid = StudyGrid(store, spec, [run], StorageOptions(f"sqlite:///{tmp_path / 'grid.db'}"), poll=0.01)
    grid.enqueue()
    grid.study.enqueue_trial({}, user_attrs={"run": str(run.rel_dir), "key": run.key})  # the other worker's copy
    trained = []
    for claimed in grid.claims():
        trained.append(claimed)
        store.path(claimed).mkdir(parents=True)
        (store.path(claimed) / "config.json").write_text(json.dumps({"key": claimed.key}))
        grid.done(claimed, {"key": claimed.key, "val_best": 0.5, "test": {}})
    assert trained == [run]
    trials = grid.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [State.COMPLETE, State.FAIL] and trials[1].user_attrs["duplicate"]


def test_mlflow_is_refused_the_optuna_database_before_creating_anything(tmp_path, fresh_db, capsys):
    import sqlalchemy

    from bench.cli import main
    from bench.storage import shown

    pytest.importorskip("mlflow")
    path = write_spec(tmp_path / "m.yaml")

    def tables() -> list[str]:
        engine = sqlalchemy.create_engine(fresh_db)
        try:
            return sorted(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()

    assert main(["run", str(path), "--dry-run", "--storage", fresh_db]) == 0  # Optuna's tables
    before = tables()
    assert main(["run", str(path), "--results", str(tmp_path / "r"), "--storage", fresh_db, "--mlflow", fresh_db]) == 2
    assert f"this is the database of --storage {shown(fresh_db)} (Optuna's)" in capsys.readouterr().err
    assert tables() == before and len(before) > 5


def test_trainers_of_several_processes_take_turns_at_the_cores(tmp_path, monkeypatch):
    from bench import files

    monkeypatch.setenv("BENCH_CORE_SLOTS", str(tmp_path / "slots"))
    code = (
        f"from bench import files; import time\nwith files.hold_cores({os.cpu_count()}):\n"
        f" print('held', flush=True)\n time.sleep(2)"
    )
    other = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "held\n"  # another bench process trains on every core
    t0 = time.monotonic()
    assert files.free_cores() == 0
    waited = []
    with files.hold_cores(1, lambda: waited.append(True)):
        assert time.monotonic() - t0 > 1.5  # this one's trainer starts only once the other has let go (after 2 s)
    assert waited == [True] and files.free_cores() == os.cpu_count()
    other.wait()


def test_two_tuning_workers_record_failed_trials_and_go_on(data_root, tmp_path):
    from bench.tune import study_key

    # SGD at lr 1e30 diverges; a batch of 1,024 of the ~390 training images leaves a one-cycle 1 step: raises.
    space = {"optim.lr": {"low": 1.0e-3, "high": 1.0e30, "log": True}, "train.batch_size": {"choices": [64, 1024]}}
    path = _spec(
        tmp_path,
        "f",
        variants=[{"name": "a", "set": {"optim": {"name": "sgd", "lr": 0.05}, "sched": {"name": "onecycle"}}}],
        search={"variant": "a", "space": space},
    )
    db = f"sqlite:///{tmp_path / 'f.db'}"
    study = optuna.create_study(
        study_name=f"f/a/{study_key(load_spec(path).variants[0], space)}", storage=db, direction="maximize"
    )
    for lr, bs in ((1e30, 64), (0.05, 1024), (0.05, 64), (0.03, 64), (0.02, 64)):
        study.enqueue_trial({"optim.lr": lr, "train.batch_size": bs})
    args = [
        "tune",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(tmp_path / "r"),
        "--storage",
        db,
        "--trials",
        "3",
        # No worker dies here: a grace period of seconds would let a machine busy with other training fail a live
        # trial as stale (tests/test_tune.py covers that case)
        *["--heartbeat", "1", "--grace-period", "60"],
    ]
    outs = finish(
        bench_process(args, tmp_path), bench_process(args, tmp_path)
    )  # both end well: a failed trial is the trial's
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    assert sum(t.state in (State.COMPLETE, State.PRUNED) for t in trials) == 3
    reasons = sorted(t.user_attrs["fail_reason"].split(":")[0] for t in trials if t.state == State.FAIL)
    assert reasons == ["ConfigError", "Diverged"], [(t.state, t.user_attrs) for t in trials]
    assert all("after 3 finished trials (" in out and "2 failed" in out for out in outs), outs


def test_a_bug_while_opening_the_storage_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the driver's and Optuna's storage errors are "cannot use this database"; a programming error inside
    (here a TypeError) is not reported as bad input."""
    from bench.config import ConfigError
    from bench.storage import StorageOptions, open_storage

    folder = tmp_path / "a-folder.db"
    folder.mkdir()  # SQLite cannot open a folder: the driver's own error, one line naming the URL
    with pytest.raises(ConfigError, match=f"--storage sqlite:///{folder}: cannot use this database"):
        open_storage(StorageOptions(f"sqlite:///{folder}"))

    def broken(*args, **kwargs):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(TypeError, match="a bug of ours"):
        open_storage(StorageOptions(f"sqlite:///{tmp_path / 'grid.db'}"))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_run_counts_as_failed_only_when_its_record_says_so_or_its_retries_ran_out(tmp_path):
    """The false failure seen with two machines, one SIGKILLed: a survivor's fail_stale_trials fails the dead
    worker's trial and queues its retry a moment later; in between, the other survivor saw a failed last trial and
    counted the run as failed, with no record to name.  Now: a stale trial with retries left is not a failure, one
    whose retries ran out is (named), a run whose record says failed is (named), a run finished in the folder is not."""
    from bench.grid import StudyGrid
    from bench.runner import failures
    from bench.storage import StorageOptions, trial_id
    from bench.store import RunStore

    spec = load_spec(_spec(tmp_path, "f", variants=[{"name": "a"}, {"name": "b", "set": {"optim.lr": 1.0e-3}}]))
    run_a, run_b = spec.runs()
    store, storage = RunStore(tmp_path / "r"), StorageOptions(f"sqlite:///{tmp_path / 'grid.db'}", retries=1)
    store.write_group(spec)
    grid = StudyGrid(store, spec, [run_a, run_b], storage, poll=0.01)
    grid.enqueue()
    study, State = grid.study, optuna.trial.TrialState

    def dies(number: int) -> optuna.trial.FrozenTrial:  # claimed, then failed by another worker's fail_stale_trials
        tid = trial_id(grid.storage, study, study.trials[number])
        grid.storage.set_trial_state_values(tid, state=State.RUNNING)
        grid.storage.set_trial_state_values(tid, state=State.FAIL)
        return study.trials[number]

    first = dies(0)  # run a's worker is SIGKILLed: the window before the retry is queued
    assert grid.abandoned() == [] and failures(spec, [run_a, run_b], store, storage) == []
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, first)  # the retry is queued (trial 2)
    dies(2)  # and its worker dies too: --retries 1 ran out
    (line,) = failures(spec, [run_a, run_b], store, storage)
    assert line.startswith(f"{run_a.rel_dir}: its worker stopped beating 2 times (--retries exhausted)")
    store.record_failure(run_b, "RuntimeError: the loss diverged")
    assert failures(spec, [run_b], store, storage) == ["b seed 0: RuntimeError: the loss diverged"]
    store.path(run_a).mkdir(parents=True, exist_ok=True)  # run a finished after all (its worker died after writing it)
    (store.path(run_a) / "config.json").write_text(json.dumps({"key": run_a.key}))
    store.record(run_a, {"key": run_a.key, "val_best": 0.5, "test": {}})
    assert failures(spec, [run_a, run_b], store, storage) == ["b seed 0: RuntimeError: the loss diverged"]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_the_private_heartbeat_optuna_lends_still_beats(tmp_path):
    """bench.storage.heartbeat is bench's one use of a private Optuna name (no public heartbeat serves ask and tell).
    On an Optuna that moved or changed it, this fails saying so: a held trial must outlive the grace period, and
    one nobody beats for must not."""
    from bench.storage import StorageOptions, fail_stale_trials, heartbeat, open_storage, trial_id

    storage = open_storage(StorageOptions(f"sqlite:///{tmp_path / 'beat.db'}", heartbeat=1, grace=2))
    study = optuna.create_study(study_name="beat", storage=storage)
    held, left = study.ask(), study.ask()  # both RUNNING; the second one beats once and stops
    with heartbeat(storage, trial_id(storage, study, left)):
        pass
    with heartbeat(storage, trial_id(storage, study, held)):
        time.sleep(3.5)
        fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[held.number] == optuna.trial.TrialState.RUNNING, (
        f"optuna {optuna.__version__}: bench.storage.heartbeat no longer records heartbeats (see its docstring)"
    )
    assert states[left.number] == optuna.trial.TrialState.FAIL
