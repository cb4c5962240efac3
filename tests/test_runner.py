"""The grid runner and the run store: skip finished runs, survive SIGKILL, keep edited specs apart,
share a grid between workers through kernel locks."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.runner as runner
from bench.spec import load_spec
from bench.store import RunStore
from tests.helpers import TINY_MNIST_BASE, bench_process, train, wait_for, write_spec

REPO = Path(__file__).resolve().parents[1]


def test_skips_finished_runs_and_supersedes_edited_ones(data_root, tmp_path, monkeypatch):
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    spec = load_spec(path, overrides=["train.epochs=1"])
    res = tmp_path / "results"
    train(spec, res, data_root)
    store = RunStore(res)
    run_dir = res / "runs" / "g" / "a" / "seed-0"
    assert {"config.json", "metrics.csv", "best.pt", "result.json", "curves.png"} <= {p.name for p in run_dir.iterdir()}
    assert not (run_dir / "last.pt").exists()
    assert [r.dir for r in store.finished("g")] == [run_dir]
    stamp = (run_dir / "result.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "fit", no_training)
    train(spec, res, data_root)  # nothing left to train
    assert (run_dir / "result.json").stat().st_mtime_ns == stamp
    monkeypatch.undo()

    # An edited config for the same (variant, seed) retrains and keeps the old folder aside.
    edited = load_spec(path, overrides=["train.epochs=1", "optim.lr=0.01"])
    train(edited, res, data_root)
    assert json.loads((run_dir / "result.json").read_text())["key"] == edited.runs()[0].key
    assert (run_dir.parent / f"seed-0.superseded-{spec.runs()[0].key}" / "result.json").exists()
    assert [r.key for r in store.finished("g")] == [edited.runs()[0].key]


def test_claim_is_a_kernel_lock_released_when_its_holder_dies(tmp_path):
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    run = load_spec(path).runs()[0]
    store = RunStore(tmp_path)
    holder = (
        "import sys, time; from bench.store import RunStore; from bench.spec import load_spec\n"
        f"with RunStore({str(tmp_path)!r}).claim(load_spec({str(path)!r}).runs()[0]) as mine:\n"
        "    print(mine, flush=True); time.sleep(60)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        assert p.stdout.readline().strip() == "True"
        with store.claim(run) as mine:
            assert not mine  # held by a live process
        p.send_signal(signal.SIGKILL)
        p.wait()
        with store.claim(run) as mine:
            assert mine  # the kernel released the dead holder's lock: no stale lock to detect
            with store.claim(run) as again:
                assert not again  # one holder at a time, within a process too
    finally:
        p.kill()


def test_a_run_finished_by_another_worker_is_not_claimed_again(tmp_path):
    # Workers iterate the todo list they made at start; one that reaches a run another worker has
    # meanwhile finished and released must skip it, not train it again.
    path = write_spec(tmp_path / "g.yaml", variants=[{"name": "a"}])
    run = load_spec(path).runs()[0]
    store = RunStore(tmp_path)
    with store.claim(run) as mine:
        assert mine
        (store.path(run)).mkdir(parents=True)
        (store.path(run) / "config.json").write_text(json.dumps({"key": run.key}))
        store.record(run, {"key": run.key, "test": {}})
    with store.claim(run) as mine:
        assert not mine


def test_two_workers_share_a_grid_and_each_run_is_trained_once(data_root, tmp_path):
    path = write_spec(
        tmp_path / "w.yaml", seeds=[0, 1], variants=[{"name": "a"}, {"name": "b", "set": {"optim.lr": 1.0e-3}}]
    )
    res = tmp_path / "results"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            str(path),
            "--data-root",
            str(data_root),
            "--results",
            str(res),
            "--set",
            "train.epochs=1",
            "--workers",
            "2",
            "--no-progress",
            "--verbose",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "2 workers x 1 threads" in p.stderr
    # The workers (the parent trains nothing) print through a handler like the parent's, at its --verbose.
    assert len([line for line in p.stderr.splitlines() if line.startswith("debug: training ")]) == 4, p.stderr
    done = [line for line in p.stdout.splitlines() if line.startswith("done ")]
    assert len(done) == 4 and len(set(done)) == 4  # one line per run: every run trained exactly once
    group = "w--train.epochs=1"  # --set makes it an ad-hoc group
    finished = RunStore(res).finished(group)
    assert sorted((r.variant, r.seed) for r in finished) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for r in finished:
        assert json.loads((r.dir / "config.json").read_text())["config"]["train"]["threads"] == 1
    assert (res / "runs" / group / "summary.md").exists() and not (res / "summary.md").exists()  # an experiment only


def _epochs(csv: Path) -> int:
    return len(csv.read_text().splitlines()) - 1 if csv.exists() else 0


def test_sigkill_then_rerun_resumes_without_redoing_finished_runs(data_root, tmp_path):
    base = copy.deepcopy(TINY_MNIST_BASE)
    base["train"].update(epochs=4, deterministic=True)
    path = write_spec(tmp_path / "k.yaml", seeds=[0, 1], variants=[{"name": "a"}], base=base)
    args = ["run", str(path), "--data-root", str(data_root), "--workers", "1"]  # the killed process is the trainer
    runs = tmp_path / "cut" / "runs" / "k" / "a"

    # Kill once seed 0 is finished and seed 1 has written at least one epoch.
    p = bench_process([*args, "--results", str(tmp_path / "cut")], tmp_path)
    wait_for(p, lambda: (runs / "seed-0" / "result.json").exists() and (runs / "seed-1" / "last.pt").exists())
    p.send_signal(signal.SIGKILL)
    p.wait()
    done_stamp = (runs / "seed-0" / "result.json").stat().st_mtime_ns
    assert not (runs / "seed-1" / "result.json").exists()
    # What a resume restores (metrics.csv is written just before last.pt, so it may be one epoch ahead of it).
    epochs_before = torch.load(runs / "seed-1" / "last.pt", weights_only=True)["state"]["epoch"]

    p = bench_process([*args, "--results", str(tmp_path / "cut")], tmp_path)
    out = p.communicate(timeout=240)[0]
    assert p.returncode == 0, out
    assert "1 already done" in out and f"resuming a/s1 from epoch {epochs_before + 1}" in out
    assert (runs / "seed-0" / "result.json").stat().st_mtime_ns == done_stamp  # not redone
    assert not list(runs.rglob("*.tmp"))

    # The resumed seed ends exactly where an uninterrupted run of it ends.
    p = bench_process([*args, "--results", str(tmp_path / "whole"), "--seeds", "1"], tmp_path)
    assert p.wait(timeout=240) == 0
    resumed = json.loads((runs / "seed-1" / "result.json").read_text())
    whole = json.loads((tmp_path / "whole" / "runs" / "k" / "a" / "seed-1" / "result.json").read_text())
    assert resumed["test"] == whole["test"] and resumed["best_epoch"] == whole["best_epoch"]
    assert resumed["epochs_run"] == 4
    assert "| a" in (tmp_path / "cut" / "summary.md").read_text()


@pytest.mark.parametrize("workers", ["1", pytest.param("2", marks=pytest.mark.slow)])
def test_ctrl_c_prints_one_line_saying_how_to_resume(data_root, tmp_path, workers):
    path = write_spec(tmp_path / "c.yaml", seeds=[0, 1], variants=[{"name": "a"}])
    res = tmp_path / "r"
    # A budget far beyond the moment of the Ctrl-C, even on a loaded machine (an epoch here takes well under a second).
    runs = res / "runs" / "c--train.epochs=500" / "a"
    args = [
        "run",
        str(path),
        "--data-root",
        str(data_root),
        "--results",
        str(res),
        "--set",
        "train.epochs=500",
        "--workers",
        workers,
    ]
    p = bench_process(
        args,
        tmp_path,
        start_new_session=True,  # its own process group, as a terminal's job is
        # ... with Ctrl-C's default action, whatever an earlier in-process test left this process with
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for(p, lambda: _epochs(runs / "seed-0" / "metrics.csv") >= 1)
    time.sleep(0.5)  # let the checkpoint of that epoch be written
    os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to every process of the foreground group
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130 and "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "interrupted; run the same command to resume (a seed 0 from epoch" in out
    assert out.count("interrupted") == 1


@pytest.mark.parametrize("bad", ["optim.lrr=0.1", "trian.epochs=2", "optim.lr=-1", "model.dropout=1.5"])
def test_cli_rejects_bad_override_before_training(bad, tmp_path, capsys):
    from bench.cli import main

    path = write_spec(tmp_path / "b.yaml")
    assert main(["run", str(path), "--set", bad, "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and ("unknown key" in err or "must be" in err), err
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_core_count_is_the_affinity_not_the_machine(tmp_path):
    """Under ``taskset -c 0`` (as under Slurm's --cpus-per-task=1) every core count sees one core: the workers'
    choice does not time splits of cores the process may not use, and the machine line says 1 core."""
    code = (
        "import torch; from bench import usable_cores; from bench.workers import choose_cpu_workers; "
        "from bench.train import device_name; "
        "print(usable_cores(), choose_cpu_workers(None, None, None, n_runs=4)[1], device_name(torch.device('cpu')))"
    )
    out = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("1 one run or one core CPU: ") and re.search(r"\(1 core, [A-Z0-9-]+\)$", out.strip()), out


def test_a_full_disk_stops_the_grid_with_one_line_and_keeps_what_was_saved(data_root, tmp_path, monkeypatch, capsys):
    """A save that fails for want of space (ENOSPC) stops the grid at once: one error line naming the folder and its
    free space, exit 1, the run not recorded as failed, the other runs not started."""
    import errno

    from bench.cli import main

    path = write_spec(tmp_path / "d.yaml", seeds=[0, 1], variants=[{"name": "a"}])
    res = tmp_path / "r"

    def no_space(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", no_space)
    assert (
        main(
            ["run", str(path), "--data-root", str(data_root), "--results", str(res), "--workers", "1", "--no-progress"]
        )
        == 1
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on the device (" in errors[0] and "MiB free)" in errors[0], errors
    runs = res / "runs" / "d" / "a"
    assert f"error: {runs / 'seed-0'}: " in errors[0]
    assert not (runs / "seed-0" / "result.json").exists() and not (runs / "seed-1").exists()
    assert not list(runs.rglob("*.tmp"))


def test_torch_s_wrapped_full_disk_error_is_a_full_disk_only_when_the_disk_is_full(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos ...");
    a file system with (almost) nothing free as it fails makes that a DiskFull; the previous file stays."""
    from collections import namedtuple

    from bench import files

    target = tmp_path / "last.pt"
    files.torch_save(target, {"epoch": 1})

    def wrapped(obj, f, *args, **kwargs):
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1786112 vs 1786008")

    monkeypatch.setattr(torch, "save", wrapped)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(4 << 20, (4 << 20) - 8192, 8192))
    with pytest.raises(files.DiskFull, match=rf"{tmp_path}: no space left on the device \(0.0 MiB free\)"):
        files.torch_save(target, {"epoch": 2})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 40, 1 << 30, 1 << 39))
    with pytest.raises(RuntimeError, match="unexpected pos") as err:
        files.torch_save(target, {"epoch": 2})
    assert not isinstance(err.value, files.DiskFull)
    assert torch.load(target, weights_only=True) == {"epoch": 1} and not list(tmp_path.glob("*.tmp"))


@pytest.mark.slow
def test_a_real_full_file_system_stops_the_grid(data_root, tmp_path):
    """The same on a 300 KiB tmpfs (needs root to mount; skipped otherwise): torch's own error on a full disk."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        path = write_spec(tmp_path / "t.yaml", seeds=[0, 1])
        p = bench_process(
            ["run", str(path), "--data-root", str(data_root), "--results", str(mnt / "r"), "--workers", "1"], tmp_path
        )
        out = p.communicate(timeout=240)[0]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert p.returncode == 1 and len(errors) == 1 and "no space left on the device" in errors[0], out
        assert "Traceback" not in out and not (mnt / "r" / "runs" / "t" / "a" / "seed-1").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_niced_session_leader_gives_its_scheduling_group_its_niceness(tmp_path, monkeypatch):
    """Linux autogroup (the group's file made up here): a niced process that leads its session and has no terminal
    writes its niceness to its session group; with a terminal, in another's session (a shell that goes on to run
    other work), without niceness or without autogroup, nothing is written."""
    import bench

    group = tmp_path / "autogroup"
    group.write_text("/autogroup-7 nice 0\n")
    real_open = os.open
    state = {"tty": False, "leader": True}

    def fake_open(path, flags, *a):
        if path == "/dev/tty" and not state["tty"]:
            raise OSError(6, "No such device or address")
        return real_open(os.devnull if path == "/dev/tty" else path, flags, *a)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "getsid", lambda pid: os.getpid() if state["leader"] else os.getpid() + 1)
    monkeypatch.setattr(os, "nice", lambda inc: 0)
    assert bench.honour_nice(str(group)) is None  # not niced
    monkeypatch.setattr(os, "nice", lambda inc: 19)
    assert bench.honour_nice(str(tmp_path / "none")) is None  # no autogroup scheduling
    state["tty"] = True
    assert bench.honour_nice(str(group)) is None  # a terminal's session
    state["tty"], state["leader"] = False, False
    assert bench.honour_nice(str(group)) is None  # a session that another process leads
    assert group.read_text().startswith("/autogroup-7")
    state["leader"] = True
    assert bench.honour_nice(str(group)) == 19 and group.read_text() == "19"
