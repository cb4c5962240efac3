"""Slow end-to-end checks (``tox -e slow`` / ``pytest -m slow``): the shipped quick profile as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_mnist_quick_profile_meets_its_promises(data_root, tmp_path):
    env = {**os.environ, "BENCH_DATA": str(data_root), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench", "run", str(REPO / "ablations" / "mnist.yaml"), "--profile", "quick",
                    "--results", str(tmp_path), "--no-progress"], cwd=REPO, env=env, check=True)
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < 15, f"quick profile took {minutes:.1f} min"
    group = tmp_path / "runs" / "mnist@quick"
    spec = json.loads((group / "spec.json").read_text())
    by_variant = {v["name"]: [json.loads(p.read_text()) for p in (group / v["dir"]).glob("seed-*/result.json")]
                  for v in spec["variants"]}
    assert all(len(rs) == len(spec["seeds"]) for rs in by_variant.values())
    best = max(by_variant, key=lambda n: sum(r["val_best"] for r in by_variant[n]) / len(by_variant[n]))
    mean_acc = sum(r["test"]["acc"] for r in by_variant[best]) / len(by_variant[best])
    assert mean_acc >= 0.99, (best, mean_acc)
    summary = (tmp_path / "summary.md").read_text()
    assert f"{best} ★" in summary
    # ... and its export matches on the whole test set.
    subprocess.run([sys.executable, "-m", "exporters.onnx", "best", "--results", str(tmp_path), "--no-bench"],
                   cwd=REPO, env=env, check=True)
    meta = json.loads((tmp_path / "onnx" / "mnist.json").read_text())
    assert (tmp_path / "onnx" / "mnist.onnx").exists()
    assert meta["parity"]["passed"] and meta["parity"]["n"] == 10000 and meta["parity"]["agreement"] >= 0.999


@pytest.mark.slow
def test_warwick_quick_profile_meets_its_promises(data_root, tmp_path):
    """Issue 3's check: the WARWICK quick profile on a 2-core CPU in under 20 minutes, every rung with both
    seeds, the best rung by validation at mean test pixel Dice >= 0.88, object metrics and figures in the summary,
    and the best run exported to ONNX with parity."""
    env = {**os.environ, "BENCH_DATA": str(data_root), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench", "run", str(REPO / "ablations" / "warwick.yaml"), "--profile", "quick",
                    "--results", str(tmp_path), "--no-progress"], cwd=REPO, env=env, check=True)
    minutes = (time.perf_counter() - t0) / 60
    assert minutes < 20, f"quick profile took {minutes:.1f} min"
    group = tmp_path / "runs" / "warwick@quick"
    spec = json.loads((group / "spec.json").read_text())
    by_variant = {v["name"]: [json.loads(p.read_text()) for p in (group / v["dir"]).glob("seed-*/result.json")]
                  for v in spec["variants"]}
    assert all(len(rs) == len(spec["seeds"]) for rs in by_variant.values())
    best = max(by_variant, key=lambda n: sum(r["val_best"] for r in by_variant[n]) / len(by_variant[n]))
    mean_dice = sum(r["test"]["dice"] for r in by_variant[best]) / len(by_variant[best])
    assert mean_dice >= 0.88, (best, mean_dice)
    summary = (tmp_path / "summary.md").read_text()
    assert f"{best} ★" in summary and "obj_f1" in summary and "obj_hausdorff" in summary
    assert (tmp_path / "figures" / "warwick-quick-outlines.png").stat().st_size > 10_000
    subprocess.run([sys.executable, "-m", "exporters.onnx", "best", "--task", "warwick", "--results", str(tmp_path),
                    "--no-bench"], cwd=REPO, env=env, check=True)
    meta = json.loads((tmp_path / "onnx" / "warwick.json").read_text())
    assert meta["parity"]["passed"] and meta["parity"]["n"] == 60
