"""bench: an ablation benchmark harness for convolutional networks (MNIST, WARWICK glands)."""

from __future__ import annotations

import os

__version__ = "0.1.0"


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask, which Slurm's ``--cpus-per-task``, ``taskset`` and
    a pinned container set (``os.cpu_count()`` counts the machine's cores, owned or not)."""
    return len(os.sched_getaffinity(0))


def honour_nice(autogroup: str = "/proc/self/autogroup") -> int | None:
    """Make ``nice -n N`` mean "after the foreground work" under Linux's autogroup scheduling; returns the niceness
    given to this process's session group, or None when nothing was changed.

    With ``kernel.sched_autogroup_enabled`` (the default of most distributions) the scheduler first shares the CPU
    between sessions, each as one unit, and a process's own niceness orders it only within its session.  A grid
    started in a session of its own (``setsid``, a service) therefore takes half the cores from the foreground
    however nice it is: a 2-thread run was 3.6x slower beside a nice-19 grid (docs/speed.md).  The session group's
    niceness orders sessions, and it applies to every process of the session (for as long as the session lives),
    so it is changed only when the session is this command's alone: this process leads it (``setsid nice -n 19
    python -m bench ...``) and has no terminal.  Anywhere else (a terminal, a shell that goes on to run other work)
    nothing changes."""
    nice = os.nice(0)
    if nice <= 0 or os.getsid(0) != os.getpid() or not os.path.exists(autogroup) or _has_terminal():
        return None
    try:
        with open(autogroup, "w") as f:
            f.write(str(nice))
    except OSError:
        return None
    return nice


def _has_terminal() -> bool:
    try:
        os.close(os.open("/dev/tty", os.O_RDONLY))
        return True
    except OSError:
        return False
