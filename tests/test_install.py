"""How bench is installed: the ``bench`` console script and the one-command set-up (bootstrap.sh, .ci/run)."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]


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
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(target), str(source)]
    p = subprocess.run(install, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    script = target / "bin" / "bench"
    assert os.access(script, os.X_OK)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not this checkout
    help_ = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
    assert help_.returncode == 0 and "--dry-run" in help_.stdout, help_.stderr[-2000:]
    bad = subprocess.run([str(script), "run"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr  # the exit status of main reaches the shell
