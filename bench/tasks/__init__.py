"""Task registry: ``TASKS[name]`` is a :class:`~bench.tasks.base.Task` instance."""
from __future__ import annotations

from bench.registry import Registry
from bench.tasks.base import Data, Split, Task
from bench.tasks.mnist import MnistTask
from bench.tasks.warwick import WarwickTask

TASKS: Registry = Registry("task", {"mnist": MnistTask(), "warwick": WarwickTask()})

__all__ = ["TASKS", "Data", "Split", "Task"]
