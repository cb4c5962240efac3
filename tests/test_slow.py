"""Slow end-to-end checks (``tox -e slow`` / ``pytest -m slow``): the shipped quick profile as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.perf import fast_rung
from bench.store import RunStore

REPO = Path(__file__).resolve().parents[1]


def run_quick_profile(
    spec_name: str, data_root: Path, results: Path, max_minutes: float, metric: str
) -> tuple[str, float]:
    """Run ``ablations/<spec_name>.yaml --profile quick`` as a user would, into ``results``; check it ends
    within ``max_minutes`` with every rung on every seed and the summary starring the best rung by mean
    validation score.  Returns that rung and its mean test ``metric``."""
    t0 = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            str(REPO / "ablations" / f"{spec_name}.yaml"),
            "--profile",
            "quick",
            "--results",
            str(results),
            "--no-progress",
        ],
        cwd=REPO,
        env=bench_env(data_root),
        check=True,
    )
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < max_minutes, f"quick profile took {minutes:.1f} min"
    store = RunStore(results)
    group = f"{spec_name}@quick"
    spec = store.read_group(group)
    finished = store.finished(group)
    assert len(finished) == len(spec.runs)  # every rung on every seed
    by_variant = {v.name: [r.result for r in finished if r.variant == v.name] for v in spec.variants}
    best = max(by_variant, key=lambda n: sum(r.val_best for r in by_variant[n]) / len(by_variant[n]))
    assert f"{best} ★" in (results / "summary.md").read_text()
    return best, sum(r.test[metric] for r in by_variant[best]) / len(by_variant[best])


def export_best(task: str, data_root: Path, results: Path) -> dict:
    """``exporters.onnx best --task TASK`` on ``results`` (no benchmark); returns the export record."""
    subprocess.run(
        [sys.executable, "-m", "exporters.onnx", "best", "--task", task, "--results", str(results), "--no-bench"],
        cwd=REPO,
        env=bench_env(data_root),
        check=True,
    )
    assert (results / "onnx" / f"{task}.onnx").exists()
    return json.loads((results / "onnx" / f"{task}.json").read_text())


def bench_env(data_root: Path) -> dict[str, str]:
    return {**os.environ, "BENCH_DATA": str(data_root), "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_mnist_quick_profile_meets_its_promises(data_root, tmp_path):
    best, mean_acc = run_quick_profile("mnist", data_root, tmp_path, max_minutes=15, metric="acc")
    assert mean_acc >= 0.994, (best, mean_acc)  # issue 10: the quick profile's best rung reaches 99.4 % on test
    # ... and its export matches on the whole test set.
    meta = export_best("mnist", data_root, tmp_path)
    assert meta["parity"]["n"] == 10000 and meta["parity"]["agreement"] >= 0.999


@pytest.mark.slow
def test_warwick_quick_profile_meets_its_promises(data_root, tmp_path):
    """Issue 3's check: the WARWICK quick profile on a 2-core CPU in under 20 minutes, every rung with both
    seeds, the best rung by validation at mean test pixel Dice >= 0.88, object metrics and figures in the summary,
    and the best run exported to ONNX with parity."""
    best, mean_dice = run_quick_profile("warwick", data_root, tmp_path, max_minutes=20, metric="dice")
    assert mean_dice >= 0.88, (best, mean_dice)
    summary = (tmp_path / "summary.md").read_text()
    assert "obj_f1" in summary and "obj_hausdorff" in summary
    assert (tmp_path / "figures" / "warwick-quick-outlines.png").stat().st_size > 10_000
    meta = export_best("warwick", data_root, tmp_path)
    assert meta["parity"]["n"] == 60 and abs(meta["parity"]["metric_diff"]) <= 1e-3


@pytest.mark.slow
def test_perf_quick_mnist_reaches_the_report_number_and_writes_a_complete_file(data_root, tmp_path):
    """`bench perf --quick --task mnist` as docs/speed.md gives it: under 10 minutes on a 2-core CPU, the weights
    validation chooses at the end of the fast recipe score at least 99 % on test (mean of 3 seeds; the 99.2 % target
    is reported, not asserted: lean-strided passes it by hundredths on an AVX2 CPU), and the file names its machine,
    commit, command and load."""
    import csv

    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "bench", "perf", "--quick", "--task", "mnist", "--results", str(tmp_path)],
        cwd=REPO,
        env=bench_env(data_root),
        check=True,
    )
    assert (time.perf_counter() - t0) / 60 < 10
    text = (tmp_path / "perf.md").read_text()
    for needle in (
        "## mnist (--quick)",
        "- command: `python -m bench perf --quick --task mnist",
        "- machine: ",
        "- commit: ",
        "`lean-strided` (harness)",
        "`lean-strided` to its end",
        "99.50 % on test `lean-long` to its end",
        "(textbook loop)",
        "utilization of matmul peak",
        "× reference",
        "Load average (1 min)",
    ):
        assert needle in text, needle
    rows = list(csv.DictReader(open(tmp_path / "perf.csv")))
    fast = fast_rung("mnist")
    hits = [r for r in rows if r["what"] == "time_to_target" and r["recipe"] == fast and float(r["target"]) == 0.992]
    assert len(hits) == 3  # one row per seed, reached on validation or not
    ends = [r for r in rows if r["what"] == "recipe_end" and r["recipe"] == fast]
    assert len(ends) == 3 and sum(float(r["test"]) for r in ends) / 3 >= 0.99
    assert len([r for r in rows if r["what"] == "recipe_end" and r["recipe"] == "lean-long"]) == 3  # the stretch
    ref = [r for r in rows if r["what"] == "time_to_target" and r["recipe"].startswith("reference:")]
    assert len(ref) == 1 and float(ref[0]["train_seconds"]) > max(float(r["train_seconds"]) for r in ends)
