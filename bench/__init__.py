"""bench: an ablation benchmark harness for convolutional networks (MNIST, WARWICK glands)."""

from __future__ import annotations

import os

__version__ = "0.1.0"


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask, which Slurm's ``--cpus-per-task``, ``taskset`` and
    a pinned container set (``os.cpu_count()`` counts the machine's cores, owned or not)."""
    return len(os.sched_getaffinity(0))
