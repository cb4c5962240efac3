"""How bench is installed: the ``bench`` console script and the one-command set-up (bootstrap.sh, .ci/run)."""

from __future__ import annotations

import configparser
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]
DEPENDENCIES = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
TORCH_PINS = " ".join(d for d in DEPENDENCIES if d.startswith(("torch>", "torchvision>")))  # e.g. torch>=2.13,<2.15


def test_the_bench_script_is_bench_s_main():
    """pyproject.toml declares ``bench`` as the console script a pip install writes; it resolves to the CLI's main."""
    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["bench"]
    entry = importlib.metadata.EntryPoint(name="bench", value=target, group="console_scripts")
    assert entry.load() is main


def test_pip_install_writes_a_bench_command(tmp_path):
    """A pip install of this checkout (into a throwaway folder, with the running interpreter's pip and setuptools: no
    network) writes a ``bench`` executable that answers like ``python -m bench``."""
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "bench", "exporters"):  # a copy: the build leaves build/ beside it
        (shutil.copytree if (REPO / part).is_dir() else shutil.copy)(REPO / part, source / part)
    install = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(target),
        str(source),
    ]
    p = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    script = target / "bin" / "bench"
    assert os.access(script, os.X_OK)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    help_ = subprocess.run(
        [str(script), "run", "--help"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    assert help_.returncode == 0 and "--dry-run" in help_.stdout, help_.stderr[-2000:]
    bad = subprocess.run([str(script), "run"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr  # the exit status of main reaches the shell


def _fake_python(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding bootstrap.sh and pyproject.toml, and a ``PYTHON`` whose venv's ``python`` and ``bench`` only
    log their arguments (``python -c`` runs for real: the script reads pyproject.toml with it)."""
    work, log = tmp_path / "checkout", tmp_path / "calls.log"
    work.mkdir()
    for name in ("bootstrap.sh", "pyproject.toml"):
        shutil.copy(REPO / name, work / name)
    fake_bin = tmp_path / "venv-bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(
        f'#!/bin/sh\nif [ "$1" = -c ]; then exec {sys.executable} "$@"; fi\necho "python $*" >> {log}\n'
    )
    (fake_bin / "bench").write_text(f'#!/bin/sh\necho "bench $*" >> {log}\n')
    (fake_bin / "ruff").write_text(f'#!/bin/sh\necho "ruff $*" >> {log}\n')
    maker = tmp_path / "python3"  # `$PYTHON -m venv .venv` makes a venv whose activate puts the fakes first
    maker.write_text(f"#!/bin/sh\nmkdir -p .venv/bin\necho 'PATH=\"{fake_bin}:$PATH\"' > .venv/bin/activate\n")
    for f in (*fake_bin.iterdir(), maker):
        f.chmod(0o755)
    return work, log


def _bootstrap(tmp_path: Path, *args: str, gpu: bool = False, index: str | None = None) -> list[str]:
    work, log = _fake_python(tmp_path)
    tools = tmp_path / "tools"  # a PATH with or without nvidia-smi
    tools.mkdir()
    if gpu:
        (tools / "nvidia-smi").write_text("#!/bin/sh\n")
        (tools / "nvidia-smi").chmod(0o755)
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "PYTHON": str(tmp_path / "python3"),
        "BENCH_NO_POSTGRES": "1",
        "HOME": str(tmp_path),
        **({"BENCH_TORCH_INDEX": index} if index is not None else {}),
    }
    p = subprocess.run(["bash", str(work / "bootstrap.sh"), *args], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return log.read_text().splitlines()


def test_bootstrap_quick_takes_cpu_torch_without_a_gpu_then_runs_the_quick_ladder(tmp_path):
    calls = _bootstrap(tmp_path, "quick", "--dry-run")
    torch = next(c for c in calls if " torch" in c)
    assert f"install --quiet {TORCH_PINS} --index-url" in torch  # pyproject.toml's pins, not a copy of them
    assert torch.endswith("--index-url https://download.pytorch.org/whl/cpu")
    assert calls.index(torch) < calls.index("python -m pip install --quiet -e .")  # the install keeps CPU torch
    assert calls[-1] == "bench run mnist --profile quick --results results-local --dry-run"


@pytest.mark.parametrize(
    "gpu, index, expected",
    [
        (True, None, None),  # a GPU machine: pip's default wheels (CUDA)
        (False, "pip", None),  # told to use pip's own configuration (.ci/run: this project's wheel cache)
        (False, "https://example.org/simple", "https://example.org/simple"),
    ],
)
def test_bootstrap_s_torch_index(tmp_path, gpu, index, expected):
    calls = _bootstrap(tmp_path, "quick", gpu=gpu, index=index)
    torch = [c for c in calls if " torch" in c]
    assert torch == ([f"python -m pip install --quiet {TORCH_PINS} --index-url {expected}"] if expected else [])


def test_bootstrap_test_is_what_ci_and_tox_run(tmp_path):
    """`./bootstrap.sh test` installs the test extras and runs tox's lint and the default suite; .ci/run is it."""
    calls = _bootstrap(tmp_path, "test", "-k", "x")
    assert "python -m pip install --quiet -e .[dev,mlflow]" in calls
    tox = configparser.ConfigParser()
    tox.read(REPO / "tox.ini")
    lint = [line.strip() for line in tox["testenv:lint"]["commands"].splitlines() if line.strip()]
    assert lint and all(line.startswith("ruff ") for line in lint)
    assert calls[-len(lint) - 1 :] == [*lint, "python -m pytest -k x"]
    assert "exec ./bootstrap.sh test" in (REPO / ".ci" / "run").read_text()


def test_bootstrap_needs_a_mode(tmp_path):
    work, _ = _fake_python(tmp_path)
    p = subprocess.run(["bash", str(work / "bootstrap.sh")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "usage: ./bootstrap.sh quick|test" in p.stderr
