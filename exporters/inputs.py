"""Which files ``bench predict`` reads, how it decodes them, and the names its outputs get.

Output names (:func:`output_names`): the folders under ``--out`` mirror each image's path relative to the PATH
argument it came from (``PATH/sub/x.png`` -> ``<out>/sub/x_mask.png``; a file argument writes to ``<out>``
itself).  An image is named by its stem, ``x_mask.png`` and ``x_overlay.png``, unless another image of the same
output folder has the same stem (ignoring case, as some file systems do): then by its whole name,
``x.png_mask.png`` / ``x.jpg_mask.png``.  Images that still clash (same name from different PATHs) are numbered,
``x.png-1_mask.png``, ``x.png-2_mask.png``, and a note on stderr says which input got which name.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
from PIL import Image, UnidentifiedImageError

from bench import files


class ImageError(ValueError):
    """A file could not be used as an input image."""


class UsageError(ValueError):
    """The command line names something that cannot be used (exit status 2)."""


@dataclass(frozen=True)
class Input:
    """One file to predict on."""

    path: Path  # as the user will recognize it: the PATH argument, joined with the file's place under it
    rel: PurePath  # relative to the PATH argument it came from (a file argument: its name); outputs mirror it


def collect_inputs(paths: list[str], out_dir: Path) -> list[Input]:
    """The files to try, in command-line order (a folder's sorted, recursively).

    Hidden files (any part of the path below the folder starting with ``.``) and files under
    ``out_dir`` (earlier outputs) are left out.  Raises :class:`UsageError` naming every PATH
    that does not exist, so that a typo stops the command before it does anything.
    """
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UsageError("no such file or directory: " + ", ".join(missing))
    out = out_dir.resolve()
    found: list[Input] = []
    seen: set[Path] = set()  # a file reached twice (a folder and its subfolder both given) is predicted once
    for p in map(Path, paths):
        for f, rel in _candidates(p, out):
            if f.resolve() not in seen:
                seen.add(f.resolve())
                found.append(Input(f, rel))
    return found


def _candidates(p: Path, out: Path) -> list[tuple[Path, PurePath]]:
    """(file, its place below the PATH argument ``p``) of each file to try: a file argument itself, or a folder's
    files, sorted, leaving out hidden ones and earlier outputs (under ``out``)."""
    if not p.is_dir():
        return [(p, PurePath(p.name))]
    found = []
    for f in sorted(p.rglob("*")):
        rel = f.relative_to(p)
        if f.is_file() and not any(s.startswith(".") for s in rel.parts) and out not in f.resolve().parents:
            found.append((f, rel))
    return found


def output_names(inputs: list[Input | None]) -> tuple[list[str | None], list[str]]:
    """(output name of each input, notes): see the module docstring for the rule.

    A name is a POSIX path relative to ``--out`` without the suffix (``sub/x`` for
    ``sub/x_mask.png`` and ``sub/x_overlay.png``); None inputs (files that are not images, which
    must not push an image off its plain name) get None.  Names are compared ignoring case.
    The notes, one per clash that had to be numbered, are for the user.
    """
    by_folder: dict[PurePath, list[int]] = defaultdict(list)
    for i, inp in enumerate(inputs):
        if inp is not None:
            by_folder[inp.rel.parent].append(i)
    names: list[str | None] = [None] * len(inputs)
    notes: list[str] = []
    for folder, idx in by_folder.items():
        got, clashes = _folder_names(folder, {i: inputs[i] for i in idx})  # type: ignore[misc]
        for i, name in got.items():
            names[i] = name
        notes += clashes
    return names, notes


def _folder_names(folder: PurePath, inputs: dict[int, Input]) -> tuple[dict[int, str], list[str]]:
    """({input index: output name}, notes) of the inputs that write to one output ``folder``."""
    stems = Counter(inp.rel.stem.casefold() for inp in inputs.values())
    key = {i: inp.rel.stem if stems[inp.rel.stem.casefold()] == 1 else inp.rel.name for i, inp in inputs.items()}
    uses = Counter(k.casefold() for k in key.values())
    taken = set(uses)
    names: dict[int, str] = {}
    clashes: dict[str, list[int]] = defaultdict(list)
    for i in inputs:
        if uses[key[i].casefold()] == 1:
            names[i] = (folder / key[i]).as_posix()
        else:
            clashes[key[i].casefold()].append(i)
    notes = []
    for group in clashes.values():
        # every one of them numbered: none keeps the plain name, so none is mistaken for another
        k, moved = 0, []
        for i in group:
            k += 1
            while f"{key[i]}-{k}".casefold() in taken:
                k += 1
            taken.add(f"{key[i]}-{k}".casefold())
            names[i] = (folder / f"{key[i]}-{k}").as_posix()
            moved.append(f"{inputs[i].path} -> {names[i]}_mask.png")
        notes.append(
            f"{len(group)} inputs would write {(folder / key[group[0]]).as_posix()}_mask.png; "
            f"numbered instead (and _overlay.png alike): " + ", ".join(moved)
        )
    return names, notes


def opens_as_image(path: Path) -> bool:
    """Whether PIL recognizes the file's header (cheap: the pixels are not decoded)."""
    try:
        with Image.open(path):
            return True
    except files.IMAGE_ERRORS:
        return False


def is_colour(rgb: np.ndarray, levels: float = 8.0) -> bool:
    """Whether (H, W, 3) uint8 ``rgb`` is a colour picture rather than grey stored as RGB: its channels differ by more
    than ``levels`` grey levels on average (JPEG noise in a scanned grey page stays under that)."""
    x = rgb.astype(np.int16)
    return float(np.abs(x - x.mean(axis=2, keepdims=True)).mean()) > levels


def read_image(path: Path, mode: str) -> np.ndarray:
    """(H, W) uint8 for mode ``L``, (H, W, 3) for ``RGB``; transparency is composited on white."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im.alpha_composite(rgba)
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageError("not an image file (unrecognized format)") from None
    except files.IMAGE_ERRORS as e:  # truncated or corrupt file, decoder error
        raise ImageError(f"not a readable image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise ImageError("empty image")
    return arr
