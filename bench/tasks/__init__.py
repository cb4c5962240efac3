"""Task registry: ``TASKS[name]`` is a :class:`~bench.tasks.base.Task` instance.

Besides the names below, a spec's ``task:`` may be an import path to a Task subclass of the user's own
(``my_tasks:Squares``) or a name declared in the entry-point group ``bench.tasks``.
"""

from __future__ import annotations

from typing import Any

from bench.registry import Registry, UnknownName
from bench.tasks.base import Data, Split, Task
from bench.tasks.image_folder import ImageFolderTask
from bench.tasks.mask_folder import MaskFolderTask
from bench.tasks.mnist import MnistTask
from bench.tasks.warwick import WarwickTask


def _as_task(obj: Any, where: str) -> Task:
    """A Task subclass (instantiated without arguments) or instance."""
    if isinstance(obj, type) and issubclass(obj, Task):
        try:
            obj = obj()
        except Exception as e:
            raise UnknownName(f"{where}: {obj.__qualname__}() failed ({type(e).__name__}: {e})") from None
    if not isinstance(obj, Task):
        raise UnknownName(
            f"{where}: {getattr(obj, '__qualname__', type(obj).__name__)} is not a bench.tasks.base.Task subclass"
        )
    if not obj.name:
        raise UnknownName(f"{where}: the task must set `name` (its tables and exported files are named after it)")
    if obj.kind not in ("classification", "segmentation") or not obj.metrics:
        raise UnknownName(
            f"{where}: the task must set `kind` ('classification' or 'segmentation') and `metrics` "
            f"(subclass ClassificationTask to get both)"
        )
    return obj


TASKS: Registry = Registry(
    "task",
    {
        "mnist": MnistTask(),
        "warwick": WarwickTask(),
        "image_folder": ImageFolderTask(),
        "mask_folder": MaskFolderTask(),
    },
    group="bench.tasks",
    adapt=_as_task,
)

__all__ = ["TASKS", "Data", "Split", "Task"]
