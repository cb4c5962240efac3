"""A task class of the user's own, named by a spec through its import path (``examples.shapes.tasks:Shapes``).

A task is a :class:`bench.tasks.base.Task` subclass (see that module for what it provides).  Here the
generic ``image_folder`` task becomes a preset for this data: its own name (the exported model is
``results/onnx/shapes.onnx``), a larger validation share and only the augmentations that suit shapes.
"""
from __future__ import annotations

from bench.tasks.image_folder import ImageFolderTask


class Shapes(ImageFolderTask):
    name = "shapes"
    default_val_fraction = 0.2
    augmentations = ("flips", "translate")  # rotations would turn a square's corners into a diamond's
