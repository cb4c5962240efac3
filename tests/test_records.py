"""Run records: the typed result.json/spec.json with their migration, `bench rescore`, and the published tables
rebuilt from the records committed to git."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.cli import main
from bench.records import FORMAT_VERSION, GroupRecord, RecordError, RunRecord
from bench.spec import load_spec
from bench.store import RunStore
from bench.summary import write_summary
from tests.helpers import train, write_spec

REPO = Path(__file__).resolve().parents[1]


def test_a_version_1_result_reads_as_the_current_format():
    old = {"key": "k", "variant": "a", "seed": 1, "test": {"acc": 0.99}, "precision": "bf16 autocast", "trial": 3}
    rec = RunRecord.from_dict(old)
    # version 1 evaluated in the same autocast as it trained; no status meant finished
    assert (rec.train_precision, rec.eval_precision, rec.status) == ("bf16 autocast", "bf16 autocast", "finished")
    assert rec.extra == {"trial": 3} and rec.format_version == FORMAT_VERSION
    again = RunRecord.from_dict(rec.to_dict())
    assert again == rec and "precision" not in rec.to_dict()


def test_a_version_1_group_is_published_and_a_newer_record_is_refused():
    raw = {"name": "s", "group": "s", "task": "mnist", "variants": [{"name": "a", "dir": "a", "parent": None}]}
    group = GroupRecord.from_dict(raw)
    assert group.role == "published" and group.runs is None and group.expected_keys() is None
    assert GroupRecord.from_dict(group.to_dict()) == group
    with pytest.raises(RecordError, match="newer bench"):
        RunRecord.from_dict({"key": "k", "format_version": FORMAT_VERSION + 1})


@pytest.fixture(scope="module")
def toy(tmp_path_factory, data_root) -> Path:
    """A finished one-run group of tiny real-MNIST training, with its summary written."""
    tmp = tmp_path_factory.mktemp("records")
    spec = load_spec(write_spec(tmp / "rec.yaml", variants=[{"name": "a"}]))
    train(spec, tmp / "results", data_root)
    write_summary(tmp / "results", command="python -m bench run rec.yaml")
    return tmp / "results"


def test_rescore_changes_only_the_metrics_and_keeps_the_old_ones(toy, tmp_path, data_root, capsys):
    results = tmp_path / "results"
    shutil.copytree(toy, results)
    run_dir = results / "runs/rec/a/seed-0"
    true = json.loads((run_dir / "result.json").read_text())
    old = dict(true, test={**true["test"], "acc": 0.5}, val_best=0.25, eval_precision="bf16 autocast")
    (run_dir / "result.json").write_text(json.dumps(old))  # as an older evaluation scored it
    assert main(["rescore", "rec", "--results", str(results), "--data-root", str(data_root)]) == 0
    new = json.loads((run_dir / "result.json").read_text())
    assert new["test"] == true["test"] and new["val_best"] == true["val_best"] and new["eval_precision"] == "fp32"
    (entry,) = new["history"]
    assert (entry["test"]["acc"], entry["val_best"], entry["eval_precision"]) == (0.5, 0.25, "bf16 autocast")
    assert entry["scored_by"] == true["commit"]
    same = {k: v for k, v in new.items() if k not in ("test", "val_best", "eval_precision", "history", "scored_by")}
    assert same == {k: v for k, v in true.items() if k not in ("test", "val_best", "eval_precision")}
    assert f"{true['test']['acc'] * 100:.2f}" in (results / "summary.md").read_text()  # the section is rebuilt
    # a second rescore finds nothing to change and adds no history
    assert main(["rescore", "rec", "--results", str(results), "--data-root", str(data_root)]) == 0
    assert json.loads((run_dir / "result.json").read_text())["history"] == new["history"]


def test_rescore_without_checkpoints_says_so(toy, tmp_path, capsys):
    results = tmp_path / "results"
    shutil.copytree(toy, results)
    (results / "runs/rec/a/seed-0/best.pt").unlink()
    before = (results / "runs/rec/a/seed-0/result.json").read_text()
    assert main(["rescore", "rec", "--results", str(results)]) == 1
    err = capsys.readouterr().err
    assert "no best.pt here (checkpoints are not in git" in err and "a seed 0" in err
    assert (results / "runs/rec/a/seed-0/result.json").read_text() == before
    assert main(["rescore", "nope", "--results", str(results)]) == 2
    assert "neither a group" in capsys.readouterr().err


def test_a_section_rebuilds_from_its_records_alone(toy, tmp_path):
    """What git keeps of a group (its records, the figures) rebuilds its section as it was, but for the time stamps."""
    results = tmp_path / "results"
    shutil.copytree(toy, results)
    for f in results.glob("runs/*/*/seed-*/*"):
        if f.name not in ("config.json", "result.json", "metrics.csv"):
            f.unlink()
    write_summary(results, command="python -m bench run rec.yaml")
    assert _unstamped((results / "summary.md").read_text()) == _unstamped((toy / "summary.md").read_text())


def test_a_hand_written_reading_stays_under_its_section(toy, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(toy, results)
    group = RunStore(results).groups()[0]
    (results / "runs" / group / "reading.md").write_text("**Reading the table.** The +bn rung does not help.\n")
    write_summary(results, command="python -m bench run rec.yaml")
    text = (results / "summary.md").read_text()
    section = text[text.index(f"## {group} ") :]
    assert "**Reading the table.** The +bn rung does not help." in section
    assert section.index("Reading the table") < section.index("Training and statistics of each rung")


def _unstamped(text: str) -> str:
    """``text`` without the times and commits at which it was generated."""
    text = re.sub(r"table generated: .*", "table generated: STAMP", text)
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+", "TIME", text)


def test_committed_records_rebuild_the_published_summary(tmp_path):
    """`bench summary` on a fresh clone: every section of results/summary.md comes back from the records in git,
    identical but for the time stamps."""
    tracked = subprocess.run(["git", "ls-files", "results"], cwd=REPO, capture_output=True, text=True, check=True)
    paths = tracked.stdout.split()
    if not any(p.startswith("results/runs/") for p in paths):
        pytest.skip("no run records in git yet")
    for p in paths:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / p, tmp_path / p)
    results = tmp_path / "results"
    committed = (results / "summary.md").read_text()
    groups = RunStore(results).groups()
    assert groups and all(RunStore(results).read_group(g).role == "published" for g in groups)  # no experiment in git
    write_summary(results)
    assert _unstamped((results / "summary.md").read_text()) == _unstamped(committed)


def test_committed_runs_are_current_for_their_spec_as_written():
    """Every committed run's key is the key its spec and profile resolve to today: a code change that adds a config
    key (without `config.later`) or changes a default would silently make `bench run` retrain the published tables."""
    store = RunStore(REPO / "results")
    checked = 0
    for group in store.groups():
        rec = store.read_group(group)
        if rec.role != "published" or not (REPO / rec.path).exists():  # an experiment (--set) has its own keys
            continue
        keys = {(r.variant.name, r.seed): r.key for r in load_spec(REPO / rec.path, rec.profile).runs()}
        for run in store.finished(group):
            assert keys.get((run.variant, run.seed)) == run.key, f"{group} {run.variant} seed {run.seed}"
            checked += 1
    if not checked:
        pytest.skip("no run records in git yet")


def test_a_later_key_at_its_default_leaves_the_run_key_alone():
    from bench.config import Config, DataCfg
    from bench.spec import run_key

    cfg = Config(task="mnist", model={"name": "mnist_cnn"})
    assert "images" not in cfg.to_dict()["data"]  # `later` keys at their default are not saved
    assert run_key(cfg) != run_key(cfg.copy(data=DataCfg(images="a/*")))
    assert "border" not in cfg.to_dict()["eval"]  # the runs scored before eval.border existed keep their keys
