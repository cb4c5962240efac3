"""Optuna search: validation-only objective, resumable study, validated search space."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.config import ConfigError
from bench.spec import load_spec
from bench.store import RunStore
from tests.helpers import TINY_MNIST_BASE, write_spec

SPACE = {"optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}, "train.batch_size": {"choices": [32, 64]}}


def _trials(res: Path, group_prefix: str) -> list[dict]:
    """result.json of every trial run of the studies of ``group_prefix``, in trial order."""
    return [
        json.loads(p.read_text()) for p in sorted(res.glob(f"runs/{group_prefix}--tune-*/trial-*/seed-*/result.json"))
    ]


def test_tune_runs_resumes_without_repeating_and_never_touches_test(data_root, tmp_path, capsys):
    path = write_spec(tmp_path / "t.yaml", search={"variant": "a", "trials": 2, "space": SPACE})
    res = tmp_path / "results"
    args = ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "best validation acc (seed 0): " in out and "after 2 finished trials (" in out and ": new" in err
    first = _trials(res, "t")
    assert len(first) == 2
    for r in first:
        assert r["test"] == {} and 0 < r["val_best"] <= 1 and r["status"] == "finished"  # validation only
        assert set(r["search_params"]) == set(SPACE)
    best = yaml.safe_load((res / "optuna" / "t-best.yaml").read_text())
    assert best[0]["name"] == "a-tuned" and best[0]["from"] == "a" and set(best[0]["set"]) == set(SPACE)
    # The study is stored: asking for 4 trials in total runs two more, with parameters not tried before
    # (the seeded sampler used to restart and propose trial 0's parameters again).
    assert main([*args, "--trials", "4"]) == 0
    out, err = capsys.readouterr()
    assert "after 4 finished trials" in out and "continuing after 2 finished trials" in err
    lrs = [r["search_params"]["optim.lr"] for r in _trials(res, "t")]
    assert len(lrs) == 4 and len(set(lrs)) == 4
    # A different budget is a different study, not a continuation whose best only had more data.
    assert main([*args, "--set", "data.train_subset=500", "--trials", "1"]) == 0
    out, err = capsys.readouterr()
    assert "after 1 finished trials" in out and ": new" in err


def test_pruning_stops_a_hopeless_trial(data_root, tmp_path, capsys):
    import optuna

    from bench.tune import study_key

    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"]["epochs"] = 3
    space = {"optim.lr": {"low": 1.0e-7, "high": 1.0e-2, "log": True}}
    path = write_spec(tmp_path / "pr.yaml", base=base, search={"variant": "a", "space": space})
    res = tmp_path / "results"
    spec = load_spec(path)
    name = f"pr/a/{study_key(spec.variants[0], space)}"
    (res / "optuna").mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{res / 'optuna' / 'pr.db'}", direction="maximize")
    for lr in (3e-3, 2e-3, 4e-3, 1e-7):  # three good trials first (the pruner's startup), then a hopeless one
        study.enqueue_trial({"optim.lr": lr})
    assert (
        main(
            ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress", "--trials", "4"]
        )
        == 0
    )
    assert "(1 pruned, 0 failed)" in capsys.readouterr().out
    pruned = [r for r in _trials(res, "pr") if r["status"] == "pruned"]
    assert len(pruned) == 1 and pruned[0]["search_params"]["optim.lr"] == 1e-7 and pruned[0]["epochs_run"] < 3


def test_an_edited_search_space_is_another_study(tmp_path):
    """Narrowing a bound or adding a key starts a new study (a continued one would keep, and could pick as its best,
    trials drawn outside the new space); the same space written in another order is the same study."""
    from bench.tune import study_key

    space = {"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True}, "train.batch_size": {"choices": [64, 128]}}
    spec = load_spec(write_spec(tmp_path / "s.yaml", base=TINY_MNIST_BASE, search={"variant": "a", "space": space}))
    variant = spec.variants[0]
    key = study_key(variant, space)
    assert study_key(variant, dict(reversed(space.items()))) == key
    narrower = {**space, "optim.lr": {"low": 1.0e-4, "high": 3.0e-3, "log": True}}
    assert study_key(variant, narrower) != key
    assert study_key(variant, {**space, "model.dropout": {"low": 0.0, "high": 0.5}}) != key


def _failing_space_spec(tmp_path: Path, space: dict, name: str) -> tuple[Path, str]:
    """A spec whose trials train with SGD under a one-cycle schedule (2 epochs), and its study's name."""
    from bench.tune import study_key

    base = copy.deepcopy(TINY_MNIST_BASE)
    base.update(optim={"name": "sgd", "lr": 0.05}, sched={"name": "onecycle", "pct_start": 0.3})
    path = write_spec(tmp_path / f"{name}.yaml", base=base, search={"variant": "a", "space": space})
    return path, f"{name}/a/{study_key(load_spec(path).variants[0], space)}"


def test_a_failing_trial_is_recorded_and_the_study_goes_on(data_root, tmp_path, capsys):
    import optuna

    # SGD at lr 1e30 diverges (NaN loss); a batch of 1,024 of the 980 training images leaves a one-cycle 2 steps: raises.
    space = {"optim.lr": {"low": 1.0e-3, "high": 1.0e30, "log": True}, "train.batch_size": {"choices": [64, 1024]}}
    path, name = _failing_space_spec(tmp_path, space, "f")
    res = tmp_path / "results"
    (res / "optuna").mkdir(parents=True)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{res / 'optuna' / 'f.db'}", direction="maximize")
    for params in (
        {"optim.lr": 1e30, "train.batch_size": 64},
        {"optim.lr": 0.05, "train.batch_size": 1024},
        {"optim.lr": 0.05, "train.batch_size": 64},
        {"optim.lr": 0.03, "train.batch_size": 64},
    ):
        study.enqueue_trial(params)
    assert (
        main(
            ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress", "--trials", "2"]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "after 2 finished trials (0 pruned, 2 failed)" in out  # --trials counts complete and pruned trials
    assert "failed 1x: Diverged: epoch 1: the training loss is nan" in out
    assert "failed 1x: ConfigError: sched.pct_start: a one-cycle of 2 steps" in out
    assert "trial 0 failed (the study goes on): Diverged" in err and "Traceback (most recent call last)" in err
    assert (
        "note: search.space.train.batch_size=1024: sched.pct_start: a one-cycle of 2 steps (2 epochs x 1 batch)" in err
        and "trials drawn there will fail" in err
    )  # said before the study starts
    states = [
        t.state.name for t in optuna.load_study(study_name=name, storage=f"sqlite:///{res / 'optuna' / 'f.db'}").trials
    ]
    assert states == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    rows = (res / "optuna" / "f-trials.csv").read_text().splitlines()
    assert rows[0] == "number,state,value,seconds,optim.lr,train.batch_size,worker,reason"
    assert rows[1].startswith("0,fail,,") and "Diverged" in rows[1] and rows[3].startswith("2,complete,0.")
    assert [r["status"] for r in _trials(res, "f")] == ["failed", "failed", "finished", "finished"]


def test_a_study_whose_every_trial_fails_stops(data_root, tmp_path, capsys):
    from bench.tune import MIN_FAILURES_IN_A_ROW

    path, _ = _failing_space_spec(tmp_path, {"train.batch_size": {"choices": [1024, 2048]}}, "g")
    assert (
        main(
            [
                "tune",
                str(path),
                "--data-root",
                str(data_root),
                "--results",
                str(tmp_path / "results"),
                "--no-progress",
                "--trials",
                "1",
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        f"error: the last {MIN_FAILURES_IN_A_ROW} trials of study g/a/" in err
        and "all failed (last: ConfigError: sched.pct_start" in err
    )


@pytest.mark.parametrize(
    "search, expected",
    [
        ({"space": {"optim.lrr": {"low": 0.1, "high": 1.0}}}, "search.space.optim: unknown key 'lrr'"),
        ({"space": {"optim.lr": {"low": 1.0, "high": 0.1}}}, "need low < high"),
        ({"space": {"optim.lr": {"lo": 0.1, "high": 1.0}}}, "search.space.optim.lr: unknown key 'lo'"),
        ({"space": {"train.batch_size": {"choices": [32, "big"]}}}, "train.batch_size: expected int, got str"),
        ({"variant": "zz", "space": {"optim.lr": {"low": 0.1, "high": 1.0}}}, "unknown variant 'zz'"),
        ({"space": {}}, "search.space: expected a non-empty mapping"),
    ],
)
def test_search_section_is_validated(tmp_path, search, expected):
    path = write_spec(tmp_path / "s.yaml", search=search)
    with pytest.raises(ConfigError, match=expected.replace("(", "\\(").replace(")", "\\)")):
        load_spec(path)


def test_spec_without_search_cannot_be_tuned(tmp_path, capsys):
    path = write_spec(tmp_path / "n.yaml")
    assert main(["tune", str(path), "--results", str(tmp_path)]) == 2
    assert "no 'search:' section" in capsys.readouterr().err


def test_interrupted_trial_resumes_with_its_parameters(data_root, tmp_path, capsys, monkeypatch):
    import bench.train as train_mod

    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"]["epochs"] = 3
    path = write_spec(tmp_path / "i.yaml", base=base, search={"variant": "a", "space": SPACE})
    res = tmp_path / "results"
    args = ["tune", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress", "--trials", "1"]
    real_save, saves = train_mod.files.torch_save, []

    def save_then_interrupt(p, obj):  # Ctrl-C right after the 2nd epoch's checkpoint
        real_save(p, obj)
        saves.append(p)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod.files, "torch_save", save_then_interrupt)
    assert main(args) == 130
    assert "interrupted; run the same command to resume (trial 0 from epoch 3)" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert "resuming trial 0 from epoch 3" in err and "after 1 finished trials (0 pruned, 0 failed, 1 requeued" in out
    (trial,) = _trials(res, "i")
    assert trial["epochs_run"] == 3 and trial["status"] == "finished"


def test_searched_keys_cannot_be_set(tmp_path, capsys):
    path = write_spec(tmp_path / "k.yaml", search={"variant": "a", "space": SPACE})
    assert main(["tune", str(path), "--set", "optim.lr=0.05", "--results", str(tmp_path)]) == 2
    assert "--set optim.lr: the study searches this key" in capsys.readouterr().err


def test_tune_writes_the_tuned_rung_that_run_trains_beside_the_others(data_root, tmp_path, capsys):
    # Tuning reads no test file: the data root here holds only MNIST's two training files.
    train_only = tmp_path / "data" / "MNIST" / "raw"
    train_only.mkdir(parents=True)
    for p in (Path(data_root) / "MNIST" / "raw").iterdir():
        if p.name.startswith("train-"):
            (train_only / p.name).symlink_to(p)
    path = write_spec(
        tmp_path / "tt.yaml",
        seeds=[0, 1],
        search={"variant": "a", "trials": 3, "space": SPACE, "tuned": "tt.tuned.yaml"},
    )
    res = tmp_path / "results"
    args = ["tune", str(path), "--data-root", str(tmp_path / "data"), "--results", str(res), "--no-progress"]
    # Another budget is an experiment: its best, trials and figures go beside its study, never over the spec's file.
    assert main([*args, "--trials", "2"]) == 0
    out, err = capsys.readouterr()
    assert "an experiment (--trials 2, not the spec's 3): its best goes to" in err and "tt.tuned.yaml" not in out
    assert not (tmp_path / "tt.tuned.yaml").exists() and not (res / "figures").exists()
    assert (res / "optuna" / "tt-trials.csv").exists() and (res / "optuna" / "tt-best.yaml").exists()
    assert main(args) == 0  # the spec's own budget: the same study goes on to its 3 trials and publishes
    assert "tt.tuned.yaml" in capsys.readouterr().out
    written = yaml.safe_load((tmp_path / "tt.tuned.yaml").read_text())
    assert written["study"]["finished"] == 3 and written["study"]["workers"] == 1
    assert written["study"]["ran_in"].startswith("SQLite file ") and "storage" not in written["study"]
    assert len((tmp_path / written["study"]["trials_csv"]).read_text().splitlines()) == 1 + 3
    assert written["variant"]["from"] == "a" and set(written["variant"]["set"]) == set(SPACE)
    history = res / written["study"]["figures"][0]
    assert history.name == "tune-tt-history.png" and history.stat().st_size > 1000

    spec = load_spec(path)
    tuned = spec.variants[-1]
    assert tuned.name == "tuned" and tuned.parent == "a" and [v.name for v in spec.variants] == ["a", "b", "tuned"]
    assert tuned.config.optim["lr"] == written["variant"]["set"]["optim.lr"]
    # Without the test files a run cannot report its test metric: a clear error, nothing trained.
    assert (
        main(
            [
                "run",
                str(path),
                "--data-root",
                str(tmp_path / "data"),
                "--results",
                str(res),
                "--no-progress",
                "--variants",
                "tuned",
                "--workers",
                "1",
            ]
        )
        == 2
    )
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err
    assert (
        main(
            ["run", str(path), "--data-root", str(data_root), "--results", str(res), "--no-progress", "--workers", "1"]
        )
        == 0
    )
    summary = (res / "summary.md").read_text()
    assert "| tuned" in summary and "Optuna study" in summary and "3 finished trials" in summary
    assert "](figures/tune-tt-history.png)" in summary
    assert {(r.variant, r.seed) for r in RunStore(res).finished("tt") if r.variant == "tuned"} == {
        ("tuned", 0),
        ("tuned", 1),
    }


def test_study_summary_counts_workers_at_once_and_requeued_trials():
    import datetime

    import optuna

    from bench.study_report import study_summary

    t = datetime.datetime(2026, 1, 1)

    def trial(start: int, end: int, worker: str, state=optuna.trial.TrialState.COMPLETE, **attrs):
        return optuna.trial.FrozenTrial(
            number=0,
            state=state,
            value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
            datetime_start=t + datetime.timedelta(seconds=start),
            datetime_complete=t + datetime.timedelta(seconds=end),
            params={},
            distributions={},
            user_attrs={"worker": worker, **attrs},
            system_attrs={},
            intermediate_values={},
            trial_id=0,
        )

    one_after_the_other = optuna.create_study()
    for s, e, w in ((0, 10, "h:1"), (10, 20, "h:2"), (20, 30, "h:3")):  # three processes, never two at once
        one_after_the_other.add_trial(trial(s, e, w))
    assert study_summary(one_after_the_other)["workers"] == 1
    side_by_side = optuna.create_study()
    for s, e, w in ((0, 10, "h:1"), (5, 15, "h:2"), (10, 20, "h:1")):
        side_by_side.add_trial(trial(s, e, w))
    side_by_side.add_trial(trial(20, 25, "h:1", optuna.trial.TrialState.FAIL, requeued=True))  # Ctrl-C, queued again
    side_by_side.add_trial(trial(25, 26, "h:1", optuna.trial.TrialState.FAIL, fail_reason="Diverged: epoch 1"))
    counts = study_summary(side_by_side)
    assert (counts["workers"], counts["failed"], counts["requeued"]) == (2, 1, 1)
    assert counts["failures"] == {"Diverged: epoch 1": 1}


@pytest.mark.parametrize("ending", ["values", "failure", "attribute", "interrupt"])
def test_a_trial_another_worker_failed_as_stale_is_dropped_not_a_crash(tmp_path, caplog, ending):
    """A worker too busy to beat within the grace period (seen with two tuning workers beside other training) finds
    its trial failed and queued again by another worker: it says so and goes on, however its trial ends."""
    import optuna
    from optuna.trial import TrialState

    from bench.tune import _run_trial

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, direction="maximize")

    class Trained:  # what _run_trial needs of a TrialObjective
        seed, objectives, store, run = 0, ["val_metric"], None, None

        def __call__(self, trial: optuna.Trial) -> dict[str, float]:
            trial.suggest_float("x", 0.0, 1.0)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)  # another worker's fail_stale_trials
            if ending == "failure":
                raise RuntimeError("the trial's own failure, after the takeover")
            if ending == "interrupt":
                raise KeyboardInterrupt
            if ending == "attribute":
                trial.set_user_attr("measures", {"val_metric": 0.5})
            return {"val_metric": 0.5}

    if ending == "interrupt":  # Ctrl-C still stops the study, and queues no second retry of the trial
        with pytest.raises(KeyboardInterrupt):
            _run_trial(study, storage, Trained(), target=3)
        assert [t.state for t in study.trials] == [TrialState.FAIL]
        return
    assert _run_trial(study, storage, Trained(), target=3) is None
    assert [t.state for t in study.trials] == [TrialState.FAIL]
    assert "trial 0: another worker counted it dead (no heartbeat within the grace period)" in caplog.text


def test_one_process_at_a_time_asks_an_sqlite_study_for_a_trial(tmp_path):
    """Two workers asking an SQLite study at once could both be handed the same queued trial (its read and its update
    are not one transaction there), so ``study.ask()`` is taken under a kernel lock beside the database file."""
    import fcntl

    from bench.storage import one_asker

    lock = tmp_path / "s.db.ask-lock"
    with one_asker(f"sqlite:///{tmp_path / 's.db'}"):
        with open(lock) as other:  # another process's attempt, as the kernel sees it: a second open file
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:  # free again once the ask is over
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with one_asker("postgresql://u@localhost/db"):  # the row lock of PostgreSQL does it: no file
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.db.ask-lock"]
