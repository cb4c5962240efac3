"""A run that differs from another of its group only in a key acting after training (eval.postprocess) is evaluated
from that run's weights, not trained (bench/derived.py): its files and record, and its numbers against the same run
trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.cli import main as bench
from bench.derived import plan, source_of
from bench.records import read_record
from bench.spec import load_spec, training_key
from bench.store import RunStore
from bench.tasks.warwick import WarwickTask
from exporters.checkpoints import untrained_here, with_checkpoint
from tests.helpers import write_spec

BASE = {
    "model": {"name": "encdec", "batch_norm": True, "dropout": 0.0, "width": 4, "depth": 2},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "loss": {"name": "bce"},
    "train": {"epochs": 2, "batch_size": 4, "threads": 1},
}
VARIANTS = [
    {"name": "a"},
    {"name": "a+pp", "set": {"eval.postprocess": "obj_f1_pooled"}},
    {"name": "a+tta", "from": "a", "set": {"eval.tta": True}},  # TTA scores every epoch: it trains
]


def spec_file(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "d.yaml", task="warwick", base=BASE, seeds=[0], variants=VARIANTS)


def test_only_post_training_keys_make_a_run_another_runs_evaluation(tmp_path: Path):
    spec = load_spec(spec_file(tmp_path))
    runs = {r.variant.name: r for r in spec.runs()}
    assert training_key(runs["a+pp"].config) == runs["a"].key != runs["a+pp"].key
    assert source_of(runs["a+pp"], spec.runs()).key == runs["a"].key
    assert source_of(runs["a"], spec.runs()) is None  # its post-training keys are at their defaults
    assert source_of(runs["a+tta"], spec.runs()) is None
    assert source_of(runs["a+pp"], spec.runs(["a+pp", "a+tta"])) is None  # no run trains its weights


@pytest.fixture(scope="module")
def made(tmp_path_factory, make_warwick) -> dict:
    tmp = tmp_path_factory.mktemp("derived")
    root = make_warwick(tmp / "data" / "WARWICK", n_train=8, n_test=3).parent
    path = spec_file(tmp)
    return {"path": path, "root": root, "tmp": tmp}


def run_args(made: dict, results: Path, *more: str) -> list[str]:
    return ["run", str(made["path"]), "--results", str(results), "--data-root", str(made["root"]), "--no-progress",
            "--no-summary", "--workers", "1", *more]  # fmt: skip


def test_a_post_processing_rung_is_evaluated_from_its_parents_weights(made, capsys, monkeypatch):
    results = made["tmp"] / "results"
    assert bench(run_args(made, results, "--variants", "a")) == 0
    torch.set_num_threads(2)  # not a's 1: the evaluation must use the thread count a was trained with (a CPU's sums
    threads = []  # depend on it), as training would have
    scored = WarwickTask.test_record
    monkeypatch.setattr(WarwickTask, "test_record", lambda *a: threads.append(torch.get_num_threads()) or scored(*a))
    capsys.readouterr()
    assert bench(run_args(made, results, "--dry-run", "--variants", "a", "a+pp")) == 0
    assert (
        "note: to be evaluated from another run's weights, not trained (eval.postprocess acts only after training): "
        "a+pp seed 0 from a seed 0"
    ) in capsys.readouterr().err
    assert bench(run_args(made, results, "--variants", "a", "a+pp")) == 0
    out, err = capsys.readouterr()
    assert "note: evaluated from another run's weights, not trained" in err
    assert out.count("done d ") == 1 and "(val " in out and ", evaluated from the weights of a seed 0" in out
    assert threads == [1] and torch.get_num_threads() == 2
    spec, store = load_spec(made["path"]), RunStore(results)
    a, pp = (spec.runs([v])[0] for v in ("a", "a+pp"))
    src, res = store.result(a), store.result(pp)
    assert res.extra["trained_by"] == "a seed 0" and "trained_by" not in src.extra
    assert res.test_raw == src.test  # the same weights, scored the same way before post-processing
    assert res.postprocess["chosen_by"] == "obj_f1_pooled"
    for field in ("val_best", "best_epoch", "epochs_run", "train_time_s", "params", "device_name", "train_precision"):
        assert getattr(res, field) == getattr(src, field), field
    d, s = store.path(pp), store.path(a)
    assert (d / "metrics.csv").read_bytes() == (s / "metrics.csv").read_bytes()
    ck, ck_src = (torch.load(p / "best.pt", weights_only=True) for p in (d, s))
    assert ck["key"] == pp.key and ck["config"]["eval"]["postprocess"] == "obj_f1_pooled"
    assert all(torch.equal(ck["state_dict"][k], v) for k, v in ck_src["state_dict"].items())
    config = json.loads((d / "config.json").read_text())
    assert config["key"] == pp.key and config["config"]["train"]["threads"] == 1
    assert bench(["summary", "--results", str(results)]) == 0
    summary = (results / "summary.md").read_text()
    assert "Evaluated from another run's weights, not trained" in summary and "a+pp seed 0 from a seed 0" in summary
    assert "of training over 1 trained run " in summary  # its training is a's, counted once
    made["derived"] = res


def test_the_same_rung_trained_alone_gives_the_same_numbers(made, capsys):
    """Without its parent in the group's runs here, the rung trains; on one machine and thread count, to the same
    weights and so the same record as the one evaluated from its parent's weights."""
    if "derived" not in made:
        pytest.skip("needs test_a_post_processing_rung_is_evaluated_from_its_parents_weights")
    results = made["tmp"] / "alone"
    assert bench(run_args(made, results, "--dry-run", "--variants", "a+pp")) == 0
    assert "evaluated from another run's weights" not in capsys.readouterr().err
    assert bench(run_args(made, results, "--variants", "a+pp")) == 0
    res = RunStore(results).result(load_spec(made["path"]).runs(["a+pp"])[0])
    assert "trained_by" not in res.extra
    derived = made["derived"]
    assert (res.test, res.test_raw, res.postprocess, res.val_best, res.best_epoch) == (
        derived.test,
        derived.test_raw,
        derived.postprocess,
        derived.val_best,
        derived.best_epoch,
    )


def test_a_parent_finished_without_its_weights_leaves_the_rung_to_train(made, capsys):
    """Checkpoints are not in git: a parent finished on another machine cannot lend its weights."""
    results = made["tmp"] / "no-weights"
    assert bench(run_args(made, results, "--variants", "a")) == 0
    spec, store = load_spec(made["path"]), RunStore(results)
    (store.path(spec.runs(["a"])[0]) / "best.pt").unlink()
    capsys.readouterr()
    assert bench(run_args(made, results, "--variants", "a", "a+pp")) == 0
    out, err = capsys.readouterr()
    assert (
        "note: trained although only eval.postprocess sets them apart, as the best.pt of the run they would be " in err
    )
    assert "done d a+pp seed 0" in out and "2 epochs" in out
    assert "trained_by" not in store.result(spec.runs(["a+pp"])[0]).extra


def test_a_failed_parent_fails_the_rung_without_training_it(made, capsys):
    """Its training would fail the same way: the rung is recorded as failed with its parent's error."""
    results = made["tmp"] / "failed"
    assert (
        bench(run_args(made, results, "--variants", "a", "a+pp", "--set", "optim.name=sgd", "--set", "optim.lr=1e30"))
        == 1
    )
    out, err = capsys.readouterr()
    assert "done " not in out
    (runs,) = (results / "runs").iterdir()  # the experiment's group
    pp = json.loads((runs / "a+pp" / "seed-0" / "result.json").read_text())
    assert pp["status"] == "failed" and pp["error"].startswith("SourceFailed: a seed 0 failed (Diverged: "), pp
    assert not (runs / "a+pp" / "seed-0" / "metrics.csv").exists()  # never trained


def test_a_parent_another_process_trains_is_waited_for(made, tmp_path):
    spec = load_spec(made["path"])
    store = RunStore(tmp_path / "r")
    a, pp = (spec.runs([v])[0] for v in ("a", "a+pp"))
    lock = store._lock(a)
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = subprocess.Popen(  # another process training a: it holds a's kernel lock for a second
        [sys.executable, "-c", f"import fcntl, time; f = open({str(lock)!r}); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(1)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    assert store.busy(a) and plan([pp], spec.runs(), store) == ([(pp, a)], [])
    store.wait_for(a)  # returns once the holder is gone
    assert holder.wait(timeout=10) == 0 and not store.busy(a)
    assert plan([pp], spec.runs(), store) == ([], [])  # a is neither finished nor trained anywhere: pp trains


def test_a_parent_copied_from_another_group_lends_its_weights(made, tmp_path, capsys):
    """A rung kept as written in two profiles is copied into the second, not trained: its weights come with it."""
    profiles = {"quick": {"set": {"train.epochs": 1}, "as_written": ["a", "a+pp"]}}
    path = write_spec(
        tmp_path / "d.yaml", task="warwick", base=BASE, seeds=[0], variants=VARIANTS[:2], profiles=profiles
    )
    args = ["--results", str(tmp_path / "r"), "--data-root", str(made["root"]), "--no-progress", "--no-summary"]
    assert bench(["run", str(path), "--variants", "a", *args]) == 0
    capsys.readouterr()
    assert bench(["run", str(path), "--profile", "quick", "--variants", "a", "a+pp", *args]) == 0
    out, err = capsys.readouterr()
    assert "a seed 0: the same config and seed, already finished in another group (d): copied" in err
    assert out.count("done ") == 1 and "done d@quick a+pp seed 0:" in out and "from the weights of a seed 0" in out


def test_exporting_a_rung_without_weights_trains_only_its_parent(made, tmp_path):
    """A clone has records, not checkpoints: exporting a+pp trains a again from its record (once, what the export
    says it will train) and scores a+pp from those weights, to a+pp's own record."""
    if "derived" not in made:
        pytest.skip("needs test_a_post_processing_rung_is_evaluated_from_its_parents_weights")
    results = tmp_path / "results"
    shutil.copytree(made["tmp"] / "results" / "runs", results / "runs", ignore=shutil.ignore_patterns("*.pt", ".locks"))
    spec, store = load_spec(made["path"]), RunStore(results)
    a, pp = (spec.runs([v])[0] for v in ("a", "a+pp"))
    assert [(s.variant, s.seed) for s in untrained_here(store.path(pp), results)] == [("a", 0)]
    done = with_checkpoint(store.path(pp), results, str(made["root"]))
    assert done == results / "retrained" / "runs" / "d" / "a+pp" / "seed-0" and (done / "best.pt").exists()
    again = read_record(done)
    assert again.extra["trained_by"] == "a seed 0" and again.key == pp.key
    assert (again.test, again.postprocess, again.best_epoch) == (
        made["derived"].test,
        made["derived"].postprocess,
        made["derived"].best_epoch,
    )
    assert read_record(results / "retrained" / "runs" / "d" / "a" / "seed-0").key == a.key
    assert untrained_here(store.path(pp), results) == [] and untrained_here(store.path(a), results) == []
    assert with_checkpoint(store.path(pp), results, str(made["root"])) == done  # reused, not scored again
