"""summary.md from a store of runs written by the test (known numbers -> known table)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench import files
from bench.records import GroupRecord, VariantRecord
from bench.spec import load_spec, place_in_group
from bench.stats import mean_ci, paired_test
from bench.store import RunStore
from bench.summary import write_summary
from bench.tables import Table, group_tables
from tests.helpers import write_spec


def test_mean_ci_and_paired_test_against_hand_values():
    m, sd, hw = mean_ci([0.98, 0.99, 1.00])
    assert m == pytest.approx(0.99) and sd == pytest.approx(0.01)
    assert hw == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)  # t_{0.975, 2} = 4.3027
    assert math.isnan(mean_ci([0.5])[1])
    # differences 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 3.464, p = 0.0742
    d, p, n = paired_test({0: 0.91, 1: 0.92, 2: 0.93, 7: 1.0}, {0: 0.90, 1: 0.90, 2: 0.90})
    assert (d, n) == (pytest.approx(0.02), 3) and p == pytest.approx(0.0742, abs=2e-4)
    assert paired_test({0: 1.0}, {1: 1.0})[2] == 0


ACC = {"a": [0.980, 0.982, 0.984], "b": [0.990, 0.991, 0.995], "c": [0.970, 0.972, 0.974]}
VAL = {"a": 0.97, "b": 0.99, "c": 0.999}  # c is best on validation (test does not choose)


def fake_store(tmp_path: Path, overrides: list[str] | None = None, acc: dict | None = None) -> Path:
    """Write result/metrics files for a 3-variant spec as the runner would, with chosen accuracies."""
    path = write_spec(
        tmp_path / "demo.yaml",
        seeds=[0, 1, 2],
        variants=[
            {"name": "a", "reported": 0.982},
            {"name": "b", "set": {"optim.lr": 1.0e-3}},
            {"name": "c", "from": "a", "set": {"model.batch_norm": False}},
        ],
    )
    spec = place_in_group(load_spec(path, overrides=overrides), load_spec(path))
    fake_runs(RunStore(tmp_path / "results"), spec, acc or ACC)
    return tmp_path / "results"


def fake_runs(store: RunStore, spec, acc: dict, runs: list | None = None, val: dict | None = None) -> None:
    store.write_group(spec)
    for run in runs if runs is not None else spec.runs():
        d = store.path(run)
        files.write_json(d / "config.json", {"key": run.key, "config": run.config.to_dict()})
        (d / "metrics.csv").write_text(
            "epoch,train_loss,train_metric,val_loss,val_metric,lr,epoch_time\n"
            "1,1.0,0.5,0.9,0.6,0.001,1.0\n2,0.5,0.8,0.4,0.9,0.001,1.0\n"
        )
        files.write_json(
            d / "result.json",
            {
                "key": run.key,
                "variant": run.variant.name,
                "seed": run.seed,
                "test": {"acc": acc[run.variant.name][run.seed], "loss": 0.1},
                "val_best": (val or VAL)[run.variant.name],
                "best_epoch": 2,
                "epochs_run": 2,
                "train_time_s": 12.0,
                "params": 1234,
                "device_name": "CPU: test",
                "torch": "2.x",
                "commit": "abcdef1234567890",
                "finished": "2026-01-01T00:00:00",
            },
        )


def test_summary_table(tmp_path):
    results = fake_store(tmp_path)
    text = _summary(results, command="python -m bench summary")
    assert "incomplete" not in text
    rows, more = (table_rows(text, n) for n in (0, 1))  # the main table, the training/statistics table
    assert re.search(r"\|\s+3\s+\|\s+98.20 ± 0.20\s+\|", rows["a"])  # 3 seeds, mean ± sd
    assert re.search(r"\|\s+98.20\s+\|", rows["a"])  # the report's number beside it, in the table's format
    # b - a per seed: 1.0, 0.9, 1.1 points -> +1.00 against the row above
    assert "+1.00 (p=" in rows["b"]
    assert "-1.00 (p=" in rows["c ★"]  # the leave-one-out compares with its `from`, and is best by validation
    assert "the row above unless named here (c: a)" in text
    assert "[97.70, 98.70]" in more["a"]  # 98.2 +- 4.3027 * 0.2 / sqrt 3
    assert "CPU: test" in text and "abcdef123456" in text and "`python -m bench summary`" in text
    png = results / "figures" / "demo-curves.png"
    assert png.stat().st_size > 1000 and "figures/demo-curves.png" in text


def table_rows(text: str, n: int) -> dict[str, str]:
    """The rows of the n-th table of rungs (``| variant ...``) of ``text`` by their first cell."""
    tables = [block for block in text.split("\n\n") if block.startswith("| variant")]
    return {line.split("|")[1].strip(): line for line in tables[n].splitlines()[2:]}


def test_summary_ignores_results_of_an_old_config(tmp_path):
    results = fake_store(tmp_path)
    cfg = results / "runs" / "demo" / "a" / "seed-0" / "config.json"
    d = json.loads(cfg.read_text())
    d["key"] = "another"
    cfg.write_text(json.dumps(d))
    text = _summary(results)
    row = next(line for line in text.splitlines() if line.startswith("| a "))
    assert re.search(r"\|\s+2\s+\|\s+98.30 ± 0.14", row)  # only seeds 1 and 2 remain
    assert "**incomplete**: 8 of 9 runs finished; missing a seed 0" in text


def test_summary_keeps_sections_of_groups_whose_runs_are_elsewhere(tmp_path):
    results = fake_store(tmp_path)
    other = (
        "## mnist@gpu (mnist, spec `ablations/mnist.yaml`, profile `full`)\n\n- machine: NVIDIA H200\n\n"
        "| variant | test accuracy (%) |\n|:--|:--|\n| x | 99.60 ± 0.01 |\n"
    )
    (results / "summary.md").write_text(
        "# Results\n\nold intro\n\n" + other + "\n## Deployment (ONNX Runtime)\n\nold\n"
    )
    text = _summary(results)
    assert other.strip() in text  # kept verbatim, runs not here
    assert "## demo (" in text and "old intro" not in text and "\nold\n" not in text
    assert text.index("## demo (") < text.index("## mnist@gpu (")  # groups in name order
    # rebuilding unchanged runs changes no file, not even the stamp (a fresh clone's `bench summary` leaves git clean)
    before = {p.name: p.read_bytes() for p in (results / "summary.md", results / "summary.json")}
    assert write_summary(results, command="python -m bench summary --again") == []
    assert {p.name: p.read_bytes() for p in (results / "summary.md", results / "summary.json")} == before
    again = _summary(results)
    assert again.count("## demo (") == 1 and again.count("## mnist@gpu (") == 1
    # the first write read that old summary.md's sections from the file itself; from then on its memory holds them
    memory = {s["group"]: s for s in json.loads((results / "summary.json").read_text())["sections"]}
    assert memory["mnist@gpu"]["text"] == other and memory["mnist@gpu"]["runs"] is None
    assert memory["mnist@gpu"]["machine"] == "NVIDIA H200" and len(memory["demo"]["runs"]) == 9


def test_reported_number_is_shown_in_the_metric_s_own_format():
    for task, reported, shown in (("warwick", 0.66, "0.6600"), ("warwick", 0.88, "0.8800"), ("mnist", 0.982, "98.20")):
        meta = GroupRecord("t", "t", task, [VariantRecord("a", "a", reported=reported)])
        assert column(group_tables(meta, []).main, "report") == [
            shown
        ]  # as the table's own numbers (0.66 once showed as 0.7)


def test_interval_is_clipped_to_the_metric_s_range_and_counts_are_integers(tmp_path):
    results = fake_store(
        tmp_path, acc={"a": [0.95, 0.999, 0.90], "b": [0.990, 0.991, 0.995], "c": [0.97, 0.972, 0.974]}
    )
    text = _summary(results)
    row_a = table_rows(text, 1)["a"]
    assert "100.00]†" in row_a and "101" not in row_a  # 94.97 + 4.30 * 4.95 / sqrt 3 > 100 %
    assert "† The t-interval reaches outside the metric's range and is shown cut to [0.00, 100.00]" in text
    assert re.search(r"\|\s+2 \(2\)\s+\|", row_a)  # epochs "2 (2)", not "2.0 (2.0)"


def test_an_adhoc_experiment_never_changes_the_published_table(tmp_path):
    results = fake_store(tmp_path)
    published = _summary(results)
    # the same spec with an override: its own group, its own summary file; summary.md is unchanged
    fake_store(tmp_path, overrides=["train.epochs=3"], acc={k: [0.5] * 3 for k in ACC})
    store = RunStore(results)
    assert store.groups("published") == ["demo"] and store.groups("adhoc") == ["demo--train.epochs=3"]
    paths = write_summary(results, groups=["demo--train.epochs=3"])  # what `bench run` of the experiment rebuilds
    assert paths == [results / "runs" / "demo--train.epochs=3" / "summary.md"]
    assert (results / "summary.md").read_text() == published  # not even its "table generated" line
    write_summary(results)  # a full rebuild: the published table is the same, the experiment is not in it
    assert _unstamped((results / "summary.md").read_text()) == _unstamped(published)
    adhoc = (results / "runs" / "demo--train.epochs=3" / "summary.md").read_text()
    assert "--set train.epochs=3" in adhoc and "overrides: `train.epochs=3`" in adhoc and "50.00 ± 0.00" in adhoc


def test_a_partial_rerun_never_replaces_a_fuller_published_section(tmp_path):
    results = fake_store(tmp_path)
    full = _summary(results)
    # another results folder (another machine) with one run of the same group: its section is kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "summary.md").write_text(full)
    spec = load_spec(tmp_path / "demo.yaml")
    fake_runs(RunStore(other), spec, ACC, runs=spec.runs(["a"])[:1])
    text = _summary(other)
    assert text.count("## demo (") == 1 and "incomplete" not in text and "| b " in text  # the full table is kept
    # the group's scope is the whole spec, whatever subset a command trained: the rebuilt section says so
    (other / "summary.md").unlink()
    text = _summary(other)
    assert "**incomplete**: 1 of 9 runs finished; missing a seed 1, 2; b seed 0, 1, 2; c seed 0, 1, 2" in text


def test_the_memory_keeps_a_section_its_runs_are_elsewhere_and_forgets_a_deleted_one(tmp_path):
    """summary.json, beside summary.md, is what the writer knows of its last write: a clone with one run of a group
    keeps the fuller section it was given, write after write; a section deleted from summary.md is rebuilt."""
    full = _summary(fake_store(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    for name in ("summary.md", "summary.json"):  # as committed together
        (other / name).write_text((tmp_path / "results" / name).read_text())
    spec = load_spec(tmp_path / "demo.yaml")
    fake_runs(RunStore(other), spec, ACC, runs=spec.runs(["a"])[:1])
    for _ in range(2):
        assert _summary(other) == full  # kept, stamp and all
    memory = json.loads((other / "summary.json").read_text())
    memory["sections"][0]["machine"] = "GPU: as remembered"
    (other / "summary.json").write_text(json.dumps(memory))
    assert "| GPU: as remembered |" in _summary(other)  # the index is the memory's, not read from the markdown
    section = full[full.index("## demo (") :]
    (other / "summary.md").write_text(full.replace(section, ""))  # deleted by hand: forgotten and rebuilt
    text = _summary(other)
    assert "**incomplete**: 1 of 9 runs finished" in text and "not run" in table_rows(text, 0)["b"]
    memory = json.loads((other / "summary.json").read_text())["sections"]
    assert [s["group"] for s in memory] == ["demo"] and memory[0]["runs"] == [f"a/0/{spec.runs(['a'])[0].key}"]
    assert memory[0]["text"] in text


def _summary(results: Path, command: str | None = None) -> str:
    write_summary(results, command=command)
    return (results / "summary.md").read_text()


def _unstamped(text: str) -> str:
    """``text`` without the times at which it was generated."""
    return re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \w+", "TIME", text)


def test_a_stated_commit_is_marked_as_stated(tmp_path, monkeypatch):
    monkeypatch.delenv("BENCH_COMMIT", raising=False)
    assert files.git_commit(tmp_path) == "unknown"  # tmp_path is no git checkout
    assert files.git_commit() not in ("unknown", "")  # this checkout
    monkeypatch.setenv("BENCH_COMMIT", "0123456789abcdef")
    assert files.git_commit(tmp_path) == files.git_commit() == "0123456789abcdef (stated)"  # wins over git, marked


def test_time_to_target_column_reads_each_runs_metrics(tmp_path):
    """A spec with `target` gains a column: mean first epoch and training seconds over the seeds that reached it."""
    path = write_spec(
        tmp_path / "t.yaml",
        seeds=[0, 1],
        target=0.95,
        variants=[{"name": "a"}, {"name": "b", "set": {"optim.lr": 1.0e-3}}],
    )
    store, spec = RunStore(tmp_path / "results"), load_spec(path)
    fake_runs(store, spec, {"a": [0.96, 0.97], "b": [0.9, 0.9]}, val={"a": 0.96, "b": 0.9})
    for seed, rows in (
        (0, "1,1,0.5,1,0.90,0.1,5.0,4.0\n2,1,0.5,1,0.951,0.1,5.0,8.5\n"),  # reaches 0.95 at epoch 2
        (1, "1,1,0.5,1,0.96,0.1,5.0,3.5\n"),
    ):  # at epoch 1
        (store.path(next(r for r in spec.runs(["a"]) if r.seed == seed)) / "metrics.csv").write_text(
            "epoch,train_loss,train_metric,val_loss,val_metric,lr,epoch_time,train_seconds\n" + rows
        )
    table = group_tables(store.read_group("t"), store.finished("t")).training
    target = "to val 95.00 %: epoch, train s"
    assert column(table, target) == ["1.5 · 6 s", "not reached"]  # (2 + 1) / 2 epochs, (8.5 + 3.5) / 2 s
    (store.path(next(r for r in spec.runs(["a"]) if r.seed == 1)) / "metrics.csv").write_text(
        "epoch,train_loss,train_metric,val_loss,val_metric,lr,epoch_time,train_seconds\n1,1,0.5,1,0.5,0.1,5.0,3.5\n"
    )
    assert (
        column(group_tables(store.read_group("t"), store.finished("t")).training, target)[0] == "2 · 8 s (1 of 2 seeds)"
    )
    text = _summary(store.results)
    assert "the report's best number, the spec's `target`" in text


def test_a_partial_group_with_a_target_builds_its_table(tmp_path):
    """Rungs without runs yet leave their cells empty (a subset once crashed on the parameter count)."""
    path = write_spec(
        tmp_path / "p.yaml",
        seeds=[0],
        target=0.95,
        variants=[{"name": "a"}, {"name": "b", "set": {"optim.lr": 1.0e-3}}],
    )
    store, spec = RunStore(tmp_path / "results"), load_spec(path)
    fake_runs(store, spec, {"a": [0.96], "b": [0.9]}, runs=spec.runs(["a"]), val={"a": 0.96, "b": 0.9})
    table = group_tables(store.read_group("p"), store.finished("p")).main
    assert column(table, "n") == ["1", "0"] and column(table, "params") == ["1,234", ""]
    assert column(table, "test acc. (%)") == ["96.00 ± –", "not run"]


def column(table: Table, header: str) -> list[str]:
    """One column of a summary table, top to bottom."""
    return [row[table.headers.index(header)] for row in table.rows]


def test_an_experiment_alone_writes_no_published_summary(tmp_path):
    path = write_spec(tmp_path / "e.yaml", seeds=[0])
    spec = place_in_group(load_spec(path, overrides=["optim.lr=0.5"]), load_spec(path))
    store = RunStore(tmp_path / "results")
    fake_runs(store, spec, {"a": [0.9], "b": [0.9]}, val={"a": 0.9, "b": 0.9})
    written = write_summary(store.results, groups=[spec.group])
    assert written == [store.root / spec.group / "summary.md"] and not (store.results / "summary.md").exists()


def test_compute_line_sums_the_runs_and_counts_no_training_for_an_ensemble():
    from types import SimpleNamespace

    from bench.summary import _compute_line

    def run(train: float | None, test: float, members: list | None = None) -> SimpleNamespace:
        extra = {"members": members} if members else {}
        return SimpleNamespace(result=SimpleNamespace(train_time_s=train, test_time_s=test, extra=extra))

    # 3,600 + 1,500 s of training (the ensemble's 5,100 s are its members' again), 30 + 20 + 10 s of testing
    runs = [run(3600.0, 30.0), run(1500.0, 20.0), run(5100.0, 10.0, members=[{}, {}])]
    assert (
        _compute_line(runs)
        == "- compute: 1 h 25 min of training over 2 trained runs and 1 min of testing, summed over the runs"
    )
    assert (
        _compute_line([run(None, 40.0)])
        == "- compute: 0 s of training over 1 trained run and 40 s of testing, summed over the runs"
    )
