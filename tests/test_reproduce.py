"""``bench reproduce``: a group's runs re-trained in a temporary folder, compared with their records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.cli import main as bench
from bench.reproduce import TOLERANCE_FLOOR, default_tolerance
from bench.tasks import TASKS
from tests.helpers import write_spec
from tests.toy_task import SquaresTask

# No train.threads: the runner records the count it used (config.json), and the rerun uses the same.
BASE = {
    "model": {"name": "mnist_resnet", "width": 4, "dropout": 0.0},
    "optim": {"name": "adam", "lr": 3.0e-3},
    "train": {"epochs": 1, "batch_size": 32, "channels_last": False},  # see tests/test_new_task.py
    "data": {"val_fraction": 0.25},
}


@pytest.fixture(scope="module")
def group(tmp_path_factory) -> Path:
    """A results folder with a finished toy group ``sq`` (no data files: the squares task draws its images)."""
    TASKS["squares"] = SquaresTask()
    tmp = tmp_path_factory.mktemp("reproduce")
    path = write_spec(tmp / "sq.yaml", task="squares", base=BASE, seeds=[0, 1], variants=[{"name": "plain"}])
    res = tmp / "results"
    assert (
        bench(
            [
                "run",
                str(path),
                "--data-root",
                str(tmp),
                "--results",
                str(res),
                "--no-progress",
                "--workers",
                "1",
                "--no-summary",
            ]
        )
        == 0
    )
    yield res
    del TASKS["squares"]


def _files(res: Path) -> dict[str, bytes]:
    return {str(p.relative_to(res)): p.read_bytes() for p in sorted(res.rglob("*")) if p.is_file()}


def test_identical_reruns_pass_and_leave_the_group_untouched(group, capsys):
    before = _files(group)
    cfg = json.loads((group / "runs/sq/plain/seed-0/config.json").read_text())
    assert cfg["config"]["train"]["threads"] == torch.get_num_threads()  # recorded though none was asked for
    assert bench(["reproduce", "sq", "--results", str(group), "--seeds", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("plain ")]
    assert len(rows) == 1 and rows[0].split()[1] == "0" and rows[0].endswith("identical"), out
    assert "1 of 1 run within the tolerance (1 identical)" in out
    assert f"tolerance max(3 x sqrt(2) x the rung's seed std, {TOLERANCE_FLOOR * 100:.3f})" in out
    assert _files(group) == before  # re-trained elsewhere: not one byte of the group changed


def test_a_tampered_record_fails_and_is_named(group, capsys, tmp_path):
    result = group / "runs/sq/plain/seed-1/result.json"
    original = result.read_text()
    tampered = json.loads(original)
    tampered["test"]["acc"] -= 0.2
    result.write_text(json.dumps(tampered))
    try:
        code = bench(
            [
                "reproduce",
                "sq",
                "--results",
                str(group),
                "--variants",
                "plain",
                "--seeds",
                "1",
                "--tolerance",
                "0.01",
                "--no-progress",
            ]
        )
    finally:
        result.write_text(original)
    out = capsys.readouterr().out
    assert code == 1
    row = next(line for line in out.splitlines() if line.startswith("plain "))
    assert row.split()[1] == "1" and "+20.000" in row and row.endswith("OFF: beyond the tolerance"), out
    assert "tolerance 1.000 (--tolerance)" in out and "off: plain seed 1" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nope"], "unknown group 'nope'; valid choices (closest first): sq"),
        (["sq", "--variants", "plan"], "--variants: unknown variant 'plan'; valid choices (closest first): plain"),
        (["sq", "--seeds", "7"], "--seeds 7: no finished run of that seed in group sq (recorded seeds: 0, 1)"),
    ],
)
def test_unknown_group_variant_or_seed_is_one_line_and_exit_2(group, capsys, argv, message):
    assert bench(["reproduce", *argv, "--results", str(group)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_group_without_records_is_one_line_and_exit_2(tmp_path, capsys):
    from bench.spec import load_spec
    from bench.store import RunStore

    spec = load_spec(write_spec(tmp_path / "empty.yaml"))
    RunStore(tmp_path / "results").write_group(spec)
    assert bench(["reproduce", "empty", "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'results/runs/empty'}: no finished runs recorded; nothing to reproduce"]


def test_default_tolerance_is_a_multiple_of_the_seed_std_with_a_floor():
    assert default_tolerance(float("nan")) == TOLERANCE_FLOOR  # one seed: no spread to scale
    assert default_tolerance(0.0001) == TOLERANCE_FLOOR
    assert default_tolerance(0.01) == pytest.approx(3 * 2**0.5 * 0.01)
