"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

A run killed at any moment leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def torch_save(path: str | Path, obj: Any) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's commit, with ``-dirty`` when tracked files other than results/ differ
    (the published results are rewritten by the runs themselves); ``unknown`` outside git.

    ``$BENCH_COMMIT``, when set, wins and is returned with ``(stated)`` appended: code copied to
    a remote GPU machine may travel without its .git, or with a stale copy of it (seen: a device
    session whose .git still named the session's first commit), so the caller states the commit
    of the tree it sent, and the record says it was stated, not checked.
    """
    stated = os.environ.get("BENCH_COMMIT", "").strip()
    if stated:
        return f"{stated} (stated)"
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        code_only = ["--", ":/", ":(exclude,top)results"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", *code_only], cwd=cwd,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
