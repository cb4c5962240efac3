"""The grid runner: skips finished runs, survives SIGKILL, keeps edited specs apart."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.runner import LocalStore, run_spec
from bench.spec import load_spec
from tests.helpers import write_spec

REPO = Path(__file__).resolve().parents[1]


def test_skips_finished_runs_and_supersedes_edited_ones(data_root, tmp_path):
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    spec = load_spec(path, overrides=[f"data.root={data_root}", "train.epochs=1"])
    res = tmp_path / "results"
    first = run_spec(spec, res, progress=False)
    assert len(first) == 1
    run_dir = res / "runs" / "g" / "a" / "seed-0"
    assert {"config.json", "metrics.csv", "best.pt", "result.json", "curves.png"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "last.pt").exists() and not (run_dir / "lock").exists()
    stamp = (run_dir / "result.json").stat().st_mtime_ns

    t0 = time.perf_counter()
    again = run_spec(spec, res, progress=False)
    assert time.perf_counter() - t0 < 5 and again == first  # nothing trained
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp

    # An edited config for the same (variant, seed) retrains and keeps the old folder aside.
    edited = load_spec(path, overrides=[f"data.root={data_root}", "train.epochs=1", "optim.lr=0.01"])
    run_spec(edited, res, progress=False)
    assert json.loads((run_dir / "result.json").read_text())["key"] == edited.runs()[0].key
    assert (run_dir.parent / f"seed-0.superseded-{spec.runs()[0].key}" / "result.json").exists()


def test_live_lock_blocks_and_dead_lock_is_taken_over(tmp_path):
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    run = load_spec(path).runs()[0]
    store = LocalStore(tmp_path / "runs")
    # A lock held by a live process (our parent, e.g. the shell) blocks the claim ...
    store.path(run).mkdir(parents=True)
    from bench.runner import _proc_start

    lock = store.path(run) / "lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "start": _proc_start(os.getppid())}))
    assert not store.claim(run)
    # ... one whose process is gone (pid reused or dead) does not; neither does a half-written lock.
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getppid(), "start": "0"}))
    assert store.claim(run)
    store.release(run)
    lock.write_text("")
    assert store.claim(run)


def _bench(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "bench", *args, "--no-progress"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigkill_then_rerun_resumes_without_redoing_finished_runs(data_root, tmp_path):
    path = write_spec(tmp_path / "k.yaml", seeds=[0, 1], variants=[{"name": "a"}])
    args = ["run", str(path), "--data-root", str(data_root), "--set", "train.epochs=4", "--set", "train.deterministic=true"]
    runs = tmp_path / "cut" / "runs" / "k" / "a"

    # Kill once seed 0 is finished and seed 1 has written at least one epoch.
    p = _bench([*args, "--results", str(tmp_path / "cut")], tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        csv = runs / "seed-1" / "metrics.csv"
        if (runs / "seed-0" / "result.json").exists() and csv.exists() and len(csv.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[0]
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_stamp = (runs / "seed-0" / "result.json").stat().st_mtime_ns
    assert not (runs / "seed-1" / "result.json").exists()

    p = _bench([*args, "--results", str(tmp_path / "cut")], tmp_path)
    out = p.communicate(timeout=240)[0]
    assert p.returncode == 0, out
    assert "1 already done" in out
    assert (runs / "seed-0" / "result.json").stat().st_mtime_ns == done_stamp  # not redone
    assert not list(runs.rglob("*.tmp")) and not list(runs.rglob("lock"))

    # The resumed seed ends exactly where an uninterrupted run of it ends.
    p = _bench([*args, "--results", str(tmp_path / "whole"), "--seeds", "1"], tmp_path)
    assert p.wait(timeout=240) == 0
    resumed = json.loads((runs / "seed-1" / "result.json").read_text())
    whole = json.loads((tmp_path / "whole" / "runs" / "k" / "a" / "seed-1" / "result.json").read_text())
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    assert resumed["epochs_run"] == 4
    summary = (tmp_path / "cut" / "summary.md").read_text()
    assert "| a" in summary


@pytest.mark.parametrize("bad", ["optim.lrr=0.1", "trian.epochs=2"])
def test_cli_rejects_bad_override_before_training(bad, tmp_path):
    path = write_spec(tmp_path / "b.yaml")
    p = _bench(["run", str(path), "--set", bad, "--results", str(tmp_path / "r")], tmp_path)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 2 and "Traceback" not in out and "unknown key" in out
    assert not (tmp_path / "r").exists()


def test_a_lock_is_never_visible_before_its_owner_is_written_in_it(tmp_path, monkeypatch):
    # Two workers claiming the same run at once: the second one (another process) looks at the lock the
    # very moment it appears; it must see a live owner and back off (an empty lock once looked dead and
    # was taken over, so both trained the run).
    import bench.runner as runner

    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    run = load_spec(path).runs()[0]
    store = LocalStore(tmp_path / "runs")
    second = ("from bench.runner import LocalStore; from bench.spec import load_spec; "
              f"print(LocalStore({str(tmp_path / 'runs')!r}).claim(load_spec({str(path)!r}).runs()[0]))")
    repo = str(Path(__file__).resolve().parents[1])
    real_link, seen = os.link, []

    def link_then_look(src, dst):
        real_link(src, dst)
        seen.append(json.loads((store.path(run) / "lock").read_text())["pid"])
        seen.append(subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, check=True,
                                   env={**os.environ, "PYTHONPATH": repo}).stdout.strip())

    monkeypatch.setattr(runner.os, "link", link_then_look)
    assert store.claim(run)
    assert seen == [os.getpid(), "False"]
    assert not list(store.path(run).glob("lock.*"))  # the private record is gone


def test_a_run_finished_by_another_worker_is_not_claimed_again(tmp_path):
    # Workers iterate the todo list they made at start; one that reaches a run another worker has
    # meanwhile finished and released must skip it, not train it again.
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    run = load_spec(path).runs()[0]
    store = LocalStore(tmp_path / "runs")
    assert store.claim(run)
    store.record(run, {"key": run.key, "test": {}})
    store.release(run)
    assert not store.claim(run)
    assert not (store.path(run) / "lock").exists()  # the refused claim leaves no lock behind
