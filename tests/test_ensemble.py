"""Seed ensembles as a rung: the spec's `ensemble` key, the runner's evaluation from the members' best.pt, the record
the summary and paired tests read, and the one-graph ONNX export checked against the harness's own evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bench.cli import main as bench
from bench.config import ConfigError
from bench.ensemble import Ensemble
from bench.metrics import dice_per_image
from bench.runner import RETRAINED
from bench.spec import load_spec
from bench.store import RunStore, load_run
from bench.tables import DELTA, group_tables
from exporters import onnx as ox
from exporters.checkpoints import with_checkpoint
from exporters.export import count_flops, graph_module
from tests.helpers import write_spec

BASE = {
    "model": {"name": "encdec", "batch_norm": True, "dropout": 0.0, "width": 4, "depth": 2},
    "optim": {"name": "adam", "lr": 1.0e-2},
    "loss": {"name": "bce"},
    "train": {"epochs": 1, "batch_size": 4, "threads": 2},
}
VARIANTS = [
    {"name": "a"},
    {"name": "ens", "ensemble": {"of": "a", "size": 2}},
    {"name": "ens+tta", "ensemble": {"of": "a"}, "set": {"eval.tta": True}},
    {"name": "ens+pp", "ensemble": {"of": "a"}, "set": {"eval.postprocess": "obj_f1_pooled"}},
]


def spec_file(tmp_path: Path, variants=None, seeds=(0, 1, 2), **more) -> Path:
    return write_spec(
        tmp_path / "ens.yaml", task="warwick", base=BASE, seeds=list(seeds), variants=variants or VARIANTS, **more
    )


def test_each_seeds_members_and_key(tmp_path: Path):
    spec = load_spec(spec_file(tmp_path))
    runs = {(r.variant.name, r.seed): r for r in spec.runs()}
    # seed k's ensemble: seed k and the seeds after it in the spec's list, cyclically
    assert [[m.seed for m in runs["ens", s].members] for s in (0, 1, 2)] == [[0, 1], [1, 2], [0, 2]]
    assert [m.seed for m in runs["ens+tta", 1].members] == [0, 1, 2]  # no size: every seed
    assert all(m.key == runs["a", m.seed].key for m in runs["ens", 2].members)
    assert runs["ens", 0].config.eval.tta is False and runs["ens+tta", 0].config.eval.tta is True
    assert runs["ens", 0].variant.parent == "a" and not runs["a", 0].members
    # the key follows the members: another member config is another ensemble
    other = load_spec(spec_file(tmp_path), overrides=["optim.lr=0.02"])
    assert {r.key for r in other.runs(["ens"])}.isdisjoint(r.key for r in spec.runs(["ens"]))
    # --seeds 1 trains into the published group: the ensemble of seed 1 is still defined by the spec's seeds
    assert load_spec(spec_file(tmp_path), seeds=[1]).runs(["ens"])[0].key == runs["ens", 1].key


@pytest.mark.parametrize(
    "variants, message",
    [
        (
            [{"name": "a"}, {"name": "e", "ensemble": {"of": "b"}}],
            r"variants\[1\] \(e\)\.ensemble\.of: unknown earlier variant",
        ),
        (
            [{"name": "a"}, {"name": "e", "ensemble": {"of": "a", "size": 4}}],
            r"\(e\)\.ensemble\.size: 4 members need as many seeds",
        ),
        (
            [{"name": "a"}, {"name": "e", "ensemble": {"of": "a", "size": 1}}],
            r"ensemble\.size: an ensemble needs at least 2",
        ),
        (
            [{"name": "a"}, {"name": "e", "ensemble": {"of": "a"}, "set": {"train.epochs": 3}}],
            r"\(e\)\.set\.train\.epochs: an ensemble trains nothing; its `set` may change only eval keys",
        ),
        ([{"name": "a"}, {"name": "e", "from": "a", "ensemble": {"of": "a"}}], r"\(e\)\.from: an ensemble builds on"),
        ([{"name": "a"}, {"name": "e", "ensemble": {"off": "a"}}], r"\(e\)\.ensemble: unknown key 'off'"),
        (
            [{"name": "a"}, {"name": "e", "ensemble": {"of": "a"}}, {"name": "f", "ensemble": {"of": "e"}}],
            r"\(f\)\.ensemble\.of: unknown earlier variant that trains 'e'",
        ),
    ],
)
def test_a_wrong_ensemble_is_one_error_naming_the_key(tmp_path: Path, variants, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_spec(spec_file(tmp_path, variants))
    assert len(str(err.value).splitlines()) == 1


def test_a_profile_needs_the_rung_its_ensemble_averages(tmp_path: Path):
    path = spec_file(tmp_path, profiles={"q": {"variants": ["ens"]}})
    with pytest.raises(ConfigError, match=r"profiles\.q\.variants: ens averages the seeds of a, which is not listed"):
        load_spec(path, "q")


def test_an_ensemble_of_unfinished_members_is_one_error_before_anything(tmp_path: Path, make_warwick, capsys):
    root = make_warwick(tmp_path / "data" / "WARWICK", n_train=8, n_test=3).parent
    results = tmp_path / "results"
    assert (
        bench(
            [
                "run",
                str(spec_file(tmp_path)),
                "--results",
                str(results),
                "--data-root",
                str(root),
                "--no-progress",
                "--variants",
                "ens",
            ]
        )
        == 2
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: ens seed 0: its member a seed 0 is not finished; train it first or with it (--variants a ens)"
    )
    assert not results.exists()  # nothing written before the error


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_warwick) -> dict:
    """A rung of 2 seeds and its two ensembles, trained and evaluated by `bench run`."""
    tmp = tmp_path_factory.mktemp("ens")
    root = make_warwick(tmp / "data" / "WARWICK", n_train=8, n_test=3).parent
    path = spec_file(tmp, seeds=(0, 1))
    results = tmp / "results"
    args = ["run", str(path), "--results", str(results), "--data-root", str(root), "--no-progress", "--no-summary"]
    assert bench([*args, "--workers", "1"]) == 0
    return {"spec": load_spec(path), "results": results, "root": root, "tmp": tmp}


def member_probs(store: RunStore, run, split) -> torch.Tensor:
    """The mean of the members' probabilities, computed here from their own best.pt, one by one."""
    probs = []
    for m in run.members:
        loaded = load_run(store.path(m))
        probs.append(loaded.task.predict_proba(loaded.model, split, run.config, tta=run.config.eval.tta))
    return torch.stack(probs).mean(0)


def test_an_ensemble_is_scored_from_its_members_and_recorded_like_a_run(trained):
    spec, store = trained["spec"], RunStore(trained["results"])
    loaded = load_run(store.path(spec.runs(["a"])[0]))
    cfg = loaded.config
    data = loaded.task.load(cfg, torch.device("cpu"))
    for run in spec.runs(["ens", "ens+tta"]):
        res = store.result(run)
        assert res is not None and not (store.path(run) / "metrics.csv").exists()  # nothing trained
        assert [m["seed"] for m in res.extra["members"]] == [m.seed for m in run.members]
        assert [m["run"] for m in res.extra["members"]] == [f"a/seed-{m.seed}" for m in run.members]
        members = [store.result(m) for m in run.members]
        assert res.params == sum(m.params for m in members)
        assert res.train_time_s == pytest.approx(sum(m.train_time_s for m in members))
        for split, value in ((data.test, res.test["dice"]), (data.val, res.val_best)):
            pred = member_probs(store, run, split)[:, 0] > 0.5
            assert value == pytest.approx(float(dice_per_image(pred, split.y[:, 0] > 0.5).mean()), abs=1e-12)
        ens = load_run(store.path(run))  # its best.pt holds every member: export, rescore and figures load it so
        assert isinstance(ens.model, Ensemble) and len(ens.model.members) == len(run.members)
    alike = [store.result(r) for r in spec.runs(["ens+tta"])]  # both seeds: members 0 and 1, one ensemble
    assert alike[0].test == alike[1].test and alike[0].test_time_s == alike[1].test_time_s  # scored once
    # the summary and its paired test treat it as a rung whose parent is the one it averages
    finished = {(r.variant, r.seed) for r in store.finished(spec.group)}
    assert finished == {(v, s) for v in ("a", "ens", "ens+tta", "ens+pp") for s in (0, 1)}
    pp = store.result(spec.runs(["ens+pp"])[0])  # post-processing chosen on validation, as for a trained run
    assert (
        pp.postprocess["chosen_by"] == "obj_f1_pooled"
        and pp.test_raw["dice"] == store.result(spec.runs(["ens"])[0]).test["dice"]
    )
    tables = group_tables(store.read_group(spec.group), store.finished(spec.group))
    rows = {r[0].removesuffix(" ★"): dict(zip(tables.main.headers, r, strict=True)) for r in tables.main.rows}
    rows = {v: rows[v] for v in ("a", "ens", "ens+tta")}
    by_seed = {v: {r.seed: r.result.test["dice"] for r in store.finished(spec.group) if r.variant == v} for v in rows}
    for v in ("ens", "ens+tta"):
        d = sum(by_seed[v][s] - by_seed["a"][s] for s in (0, 1)) / 2
        assert rows[v]["n"] == "2" and rows[v][DELTA].startswith(f"{d:+.4f}")  # paired against the rung it averages
    assert rows["ens+tta"]["change"] == "mean of every seed of a, eval.tta=true"
    training = {
        r[0].removesuffix(" ★"): dict(zip(tables.training.headers, r, strict=True)) for r in tables.training.rows
    }
    epochs = sum(store.result(m).epochs_run for m in spec.runs(["ens"])[0].members)
    assert training["ens"]["epochs (best)"] == f"{epochs} (members)"  # its members' epochs, and no best epoch
    assert "(members)" not in training["a"]["epochs (best)"]


def check_export(trained: dict, variant: str, out: Path) -> None:
    """Export seed 0 of ``variant`` (an ensemble) as one graph; its probabilities against the harness's own
    ensemble evaluation (the members' best.pt, one by one), its metric against the record, its FLOPs."""
    spec, store = trained["spec"], RunStore(trained["results"])
    run = spec.runs([variant])[0]
    ex = ox.export_run(store.path(run), out / "onnx", str(trained["root"]), trained["results"])
    assert ex.tta is run.config.eval.tta and len(list((out / "onnx").glob("*.onnx"))) == 1
    assert ex.record["members"] == store.result(run).extra["members"]
    sess = ort.InferenceSession(str(ex.path), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {ex.meta.input_name: ex.inputs})[0]
    loaded = load_run(store.path(run))
    harness = member_probs(store, run, loaded.task.load(loaded.config, torch.device("cpu")).test).numpy()
    assert np.abs(1 / (1 + np.exp(-logits)) - harness).max() < 1e-4
    assert ex.record["parity"]["metric_ort"] == pytest.approx(store.result(run).test["dice"], abs=1e-9)
    assert ex.record["parity"]["max_abs_prob_diff"] <= 1e-4  # checked on probabilities, as a TTA graph is
    assert json.loads(ex.record["metadata"]["run_tta"]) is run.config.eval.tta
    one = graph_module(load_run(store.path(run.members[0])).model, "segmentation", run.config.eval.tta)
    assert ex.record["flops_per_image"] == len(run.members) * count_flops(one, torch.from_numpy(ex.inputs[:1]))


def test_an_ensemble_exports_as_one_graph_equal_to_the_harness_evaluation(trained, tmp_path):
    check_export(trained, "ens", tmp_path)


@pytest.mark.slow
def test_an_ensemble_with_tta_exports_as_one_graph(trained, tmp_path):
    check_export(trained, "ens+tta", tmp_path)


def test_an_ensemble_without_its_checkpoint_is_rebuilt_from_its_members(trained, tmp_path):
    """Checkpoints are not in git: `exporters.onnx best` rebuilds an ensemble's best.pt from its members' (here all
    present; a missing one is re-trained as for any run) into <results>/retrained, never into the group itself."""
    results = tmp_path / "results"
    shutil.copytree(trained["results"], results)
    spec, store = trained["spec"], RunStore(results)
    run = spec.runs(["ens"])[0]
    (store.path(run) / "best.pt").unlink()
    done = with_checkpoint(store.path(run), results, str(trained["root"]))
    assert (
        done == results / RETRAINED / store.path(run).relative_to(results)
        and not (store.path(run) / "best.pt").exists()
    )
    again, first = load_run(done), load_run(trained["results"] / store.path(run).relative_to(results))
    assert again.key == run.key and again.result.test == store.result(run).test
    x = first.task.load(first.config, torch.device("cpu")).test.x
    assert torch.equal(again.model(x), first.model(x))


def test_members_without_checkpoints_are_trained_again_once_for_a_new_ensemble(trained, tmp_path, capsys):
    """A clone has the members' records but not their best.pt: `bench run` trains each member again from its record
    into <results>/retrained (never into the group), evaluates the ensemble from those, and reuses them next time.
    On the machine and thread count that made the records (train.threads: 2), the reruns are identical, and so is
    the ensemble's test metric."""
    spec, results = trained["spec"], tmp_path / "results"
    shutil.copytree(trained["results"], results)
    store = RunStore(results)
    for m in spec.runs(["a"]):  # what git keeps of a finished member
        for f in store.path(m).iterdir():
            if f.name not in ("config.json", "result.json", "metrics.csv"):
                f.unlink()
    ens = spec.runs(["ens"])
    recorded = [store.result(r).test for r in ens]

    def evaluate_anew() -> None:  # the ensemble rung as if just added to the spec
        shutil.rmtree(store.path(ens[0]).parent)

    evaluate_anew()
    args = [
        "run",
        str(spec_file(trained["tmp"], seeds=(0, 1))),
        "--results",
        str(results),
        "--data-root",
        str(trained["root"]),
        "--no-progress",
        "--no-summary",
        "--variants",
        "ens",
    ]
    assert bench([*args, "--dry-run"]) == 0
    err = capsys.readouterr().err
    for seed in (0, 1):
        assert (
            f"note: a seed {seed} is finished but its best.pt is not here (checkpoints are not in git): it will be "
            f"re-trained from its record into {results / RETRAINED} for ens seed 0, ens seed 1"
        ) in err, err
    assert not (results / RETRAINED).exists() and store.result(ens[0]) is None  # a dry run trains nothing

    assert bench(args) == 0
    err = capsys.readouterr().err
    assert err.count("has no best.pt (checkpoints are not in git): re-training it from its record into") == 2, err
    assert err.count("identical to") == 2 and "to evaluate the ensemble ens seed 0" in err, err
    assert "ens seed 1: its member a seed 0 has no best.pt here (checkpoints are not in git): using the one" in err
    again = RunStore(results / RETRAINED)
    for m in spec.runs(["a"]):
        assert again.result(m).test == store.result(m).test and (again.path(m) / "best.pt").exists()
        assert not (store.path(m) / "best.pt").exists()  # the group's own folders keep only their records
    assert [store.result(r).test for r in ens] == recorded
    assert [x["run"] for x in store.result(ens[0]).extra["members"]] == ["a/seed-0", "a/seed-1"]
    assert store.result(ens[0]).train_time_s == pytest.approx(
        sum(store.result(m).train_time_s for m in spec.runs(["a"]))
    )

    stamps = {p: p.stat().st_mtime_ns for p in (results / RETRAINED).rglob("*") if p.is_file()}
    evaluate_anew()
    assert bench([*args, "--dry-run"]) == 0 and "will be re-trained" not in capsys.readouterr().err
    assert bench(args) == 0
    err = capsys.readouterr().err
    assert "re-training" not in err and err.count("using the one re-trained from its record") == 4, err
    assert {p: p.stat().st_mtime_ns for p in (results / RETRAINED).rglob("*") if p.is_file()} == stamps
    assert [store.result(r).test for r in ens] == recorded
