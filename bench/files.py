"""Files: atomic writes, JSON, markdown sections, the checkout's commit, what a bad image file raises, and the
machine's core slots.

Every result file is written to a temp file in the same folder, fsynced, then renamed
(``os.replace``): a run killed at any moment leaves either the old file or the new one, never
half of one; a write that fails for want of space raises :class:`DiskFull`.  Named ``files`` (not
``io``) so that it never shadows the standard module.
"""

from __future__ import annotations

import argparse
import csv
import errno
import fcntl
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from tabulate import tabulate

from bench.log import first_line

# What PIL raises for a file that is not a decodable image: unrecognized (UnidentifiedImageError, an OSError), truncated
# or corrupt (OSError, ValueError, SyntaxError from a plugin's parser), or a pixel count past its bomb limit.  Anything
# else while decoding is a bug of ours and keeps its traceback.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# A writer that wraps the OS's "no space left" in its own error (torch.save: RuntimeError "[enforce fail at
# inline_container.cc] unexpected pos") is taken for a full disk when less than this is free as it fails.
NEARLY_FULL_BYTES = 64 << 20


class DiskFull(OSError):
    """A write failed because the file system holding ``folder`` is full; nothing else will fit there either."""

    def __init__(self, folder: Path, free: int):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        self.folder, self.free = folder, free

    def __str__(self) -> str:
        return (
            f"{self.folder}: no space left on the device ({self.free / 2**20:.1f} MiB free); what was saved is "
            f"kept: free some space and run the same command to resume"
        )


def output_folder(value: str) -> str:
    """An ``argparse`` type for an output folder (made later, when the outputs are written): refused at once when the
    path exists and is not a folder, rather than after all the work."""
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value} exists and is not a folder")
    return value


def _disk_full(folder: Path, error: BaseException) -> DiskFull | None:
    """A DiskFull for ``error``, raised while writing into ``folder``, when it means the disk is full (None when
    it does not, or already is one)."""
    if isinstance(error, DiskFull) or not isinstance(error, (OSError, RuntimeError)):
        return None
    free = shutil.disk_usage(folder).free
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(folder, free)
    return DiskFull(folder, free) if isinstance(error, RuntimeError) and free < NEARLY_FULL_BYTES else None


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and restore at once
    os.umask(mask)
    return mask


def make_readable(path: str | Path) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode a plain ``open(path, "w")`` would:
    0666 less the umask, so results are readable by the other users of a shared machine."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "w") -> None:
    """Write ``path`` by calling ``write(f)`` on a temp file, then renaming it into place; :class:`DiskFull` when the
    disk is full (the previous ``path``, if any, stays as it was)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # no inode left
        if (full := _disk_full(path.parent, e)) is None:
            raise
        raise full from e
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(path.parent, e)  # while the partial temp file still takes its space
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as strings; no rows when the file is missing."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str | Path, columns: list[str], rows: list[dict[str, Any]], extra: str = "raise") -> None:
    """``rows`` under a header of ``columns``, written atomically; ``extra="ignore"`` drops keys not in ``columns``
    (``"raise"``: such a key is an error)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction=extra)
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def write_text_if_changed(path: str | Path, text: str) -> bool:
    """Write ``path`` unless it already holds ``text`` (a rebuild that changes nothing leaves no diff); True if written."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    write_text(path, text)
    return True


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` of ``obj`` to ``path`` by :func:`atomic_write`, with Ctrl-C and SIGTERM held until it is done
    (:func:`signals_deferred`)."""
    import torch  # lazily: this bottom module also serves commands that never load torch (--help, summary of text)

    with signals_deferred():
        atomic_write(path, lambda f: torch.save(obj, f), mode="wb")


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM arriving inside the block takes effect when it ends.  Why: torch.save's zip writer
    turns a KeyboardInterrupt raised inside one of its writes into a RuntimeError ("unexpected pos"), which reads as
    a failed run, not an interrupted one, and the grid would go on to the next run.  The main thread only (signal
    handlers live there); elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda n, frame: caught.append((n, frame))) for s in watched}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            n, frame = caught[0]
            handler = previous[n]
            if callable(handler):
                handler(n, frame)  # e.g. Python's own: KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(n)


def markdown_table(headers: list[str], rows: list[list[Any]], align: list[str] | None = None) -> str:
    """A GitHub markdown (pipe) table of strings, padded so the source reads as a table too; ``align``
    per column: ``left`` (default) or ``right`` (numbers).  The one way this project writes tables."""
    return tabulate(
        [[str(c) for c in r] for r in rows], headers=headers, tablefmt="pipe", disable_numparse=True, colalign=align
    )


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string (a float needs a dot there); people type it, and
    YAML 1.2 says it is a float: this loader agrees."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str) -> Any:
    """Parse YAML safely (no arbitrary objects), with ``1e-3`` read as a number."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506  (a SafeLoader subclass)


def yaml_error(path: str | Path, e: Exception) -> str:
    """One line for a YAML syntax error: ``FILE:LINE:COLUMN: not valid YAML: what the parser found``."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = getattr(e, "problem", None) or first_line(e)
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    return f"{where}: not valid YAML: {what}" + (
        f" ({context}{f' begun at line {start.line + 1}' if start is not None else ''})" if context else ""
    )


def yaml_scalar(value: Any) -> str:
    """``value`` as one would type it after ``--set KEY=`` (YAML flow style): ``0.001``, ``[8, 16]``, ``true``."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def read_markdown_sections(path: str | Path, level: int, name: Callable[[str], str | None]) -> dict[str, str]:
    """The level-``level`` sections of a markdown file, ``{name(heading text): section text}``.

    A section runs from its heading to the next heading of the same or a higher level; sections
    whose heading ``name`` maps to None are left out.  Used to keep, on a rebuild, the parts of a
    generated file (summary.md, deployment.md) whose inputs are not on this machine.
    """
    path = Path(path)
    if not path.exists():
        return {}
    sections: dict[str, str] = {}
    current, lines = None, []
    for line in [*path.read_text().splitlines(), None]:
        hashes = len(line) - len(line.lstrip("#")) if line is not None else 0
        if line is None or (0 < hashes <= level and line[hashes : hashes + 1] == " "):
            if current is not None:
                sections[current] = "\n".join(lines).rstrip() + "\n"
            current = name(line[hashes + 1 :]) if line is not None and hashes == level else None
            lines = []
        if current is not None:
            lines.append(line)
    return sections


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
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        code_only = ["--", ":/", ":(exclude,top)results"]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", *code_only],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- core slots


def core_slots_dir() -> Path:
    """One lock file per core of the machine, shared by every bench process of this user ($BENCH_CORE_SLOTS to move)."""
    return Path(os.environ.get("BENCH_CORE_SLOTS") or Path(tempfile.gettempdir()) / f"bench-cores-{os.getuid()}")


def _lock_free_slots(n: int) -> list[Any]:
    """Open and lock (flock, without waiting) up to ``n`` free slot files; the open files (closing one frees it)."""
    folder = core_slots_dir()
    folder.mkdir(parents=True, exist_ok=True)
    held = []
    for i in random.sample(range(os.cpu_count() or 1), os.cpu_count() or 1):
        if len(held) == n:
            break
        f = open(folder / f"core-{i}", "a")  # noqa: SIM115 - held open as long as the slot is held
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(f)
        except BlockingIOError:
            f.close()
    return held


def free_cores() -> int:
    """Cores of the machine that no bench process on it trains with now."""
    held = _lock_free_slots(os.cpu_count() or 1)
    for f in held:
        f.close()
    return len(held)


@contextmanager
def hold_cores(n: int, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``n`` of the machine's cores (at most all) while the block runs: a semaphore of kernel locks, one file
    per core, so that bench processes started together (``bench run --storage`` twice on one machine) never train
    with more threads than there are cores; the others wait.  All or none are taken at once (a process holding some
    while waiting for more could wait forever on another doing the same); the kernel frees a killed holder's."""
    n = max(1, min(n, os.cpu_count() or 1))
    while len(held := _lock_free_slots(n)) < n:
        for f in held:
            f.close()
        if on_wait is not None:
            on_wait()
            on_wait = None
        time.sleep(0.2 + random.random())
    try:
        yield
    finally:
        for f in held:
            f.close()
