"""The records a group and its runs leave behind, as types: ``result.json`` is a :class:`RunRecord`,
``spec.json`` a :class:`GroupRecord`.

These small files (with ``config.json`` and ``metrics.csv``) are what git keeps of a published group, so
records written by any earlier version of the code must keep reading.  Every record carries a
``format_version``; :func:`migrate` is the one place that knows how older versions looked and brings them
up to the current one.  Nothing else in the code branches on a record's age.

Versions:
  1. (no ``format_version``) one ``precision`` for the whole run: validation and test ran in the same bf16
     autocast as training; a result without ``status`` is finished; a group without ``role`` is published and
     one without ``runs`` (its keys) accepts any run whose result and config agree.
  2. ``train_precision`` and ``eval_precision`` (evaluation is fp32 from this version on); ``history`` keeps
     the metrics a ``bench rescore`` replaced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import files

FORMAT_VERSION = 2


class RecordError(ValueError):
    """A record this code cannot read (written by a newer version, or damaged)."""


def migrate(raw: dict[str, Any], kind: str) -> dict[str, Any]:
    """``raw`` (a ``result.json`` for kind ``run``, a ``spec.json`` for kind ``group``) in the current format."""
    version = raw.get("format_version", 1)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise RecordError(
            f"format_version {version!r}: written by a newer bench (this one reads up to {FORMAT_VERSION})"
        )
    out = dict(raw)
    if version < 2 and kind == "run":
        precision = out.pop("precision", None)
        out.setdefault("train_precision", precision)
        out.setdefault("eval_precision", precision)
        out.setdefault("status", "finished")
    if version < 2 and kind == "group":
        out.setdefault("role", "published")
    out["format_version"] = FORMAT_VERSION
    return out


def _split(cls: type, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the fields of dataclass ``cls`` found in ``raw``, the rest)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    return {k: v for k, v in raw.items() if k in names}, {k: v for k, v in raw.items() if k not in names}


@dataclass
class RunRecord:
    """``result.json`` of one run: finished (with its metrics), pruned (a tuning trial) or failed (with ``error``).

    ``test`` maps a metric key to its value on the test split (empty for tuning trials); ``val_best`` is the
    best epoch's validation metric.  ``extra`` keeps what a caller added (a trial's number, ...) as written."""

    key: str
    status: str = "finished"
    variant: str | None = None
    seed: int | None = None
    test: dict[str, float] = field(default_factory=dict)
    val_best: float | None = None
    best_epoch: int | None = None
    epochs_run: int | None = None
    params: int | None = None
    train_time_s: float | None = None
    test_time_s: float | None = None
    device: str | None = None
    device_name: str | None = None
    train_precision: str | None = None
    eval_precision: str | None = None
    torch: str | None = None
    commit: str | None = None
    finished: str | None = None
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # what each `bench rescore` replaced
    # eval.postprocess: the setting chosen on validation (min_area, fill_holes, chosen_by, val, val_raw), and the
    # test metrics before it (``test`` holds them with it)
    postprocess: dict[str, Any] | None = None
    test_raw: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        known, rest = _split(cls, migrate(raw, "run"))
        if "key" not in known:
            raise RecordError("no key")
        return cls(**known, extra=rest)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out = {k: v for k, v in out.items() if v is not None and v != [] or k in ("test",)}
        return {**out, **self.extra}

    @property
    def ok(self) -> bool:
        """Finished with metrics (not pruned, not failed)."""
        return self.status == "finished"


@dataclass
class VariantRecord:
    """One rung of a group as its spec defined it: ``dir`` is its folder under the group."""

    name: str
    dir: str
    parent: str | None = None
    ablation: bool = False
    change: str = ""
    label: str = ""
    reported: float | None = None


@dataclass
class GroupRecord:
    """``spec.json``: a group's definition (its role, its variants, the key of every run in its scope).

    ``runs`` is None for groups written before their keys were listed (any run whose result and config agree
    counts then).  ``extra`` keeps what a caller added (a study's name, ...)."""

    name: str
    group: str
    task: str
    variants: list[VariantRecord]
    role: str = "published"
    published_group: str | None = None
    path: str | None = None
    profile: str | None = None
    seeds: list[int] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    target: float | None = None
    tuned: Any = None
    runs: list[dict[str, Any]] | None = None  # {"variant", "seed", "key"}
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GroupRecord:
        known, rest = _split(cls, migrate(raw, "group"))
        variants = []
        for v in known.pop("variants", []):
            vk, _ = _split(VariantRecord, v)
            variants.append(VariantRecord(**vk))
        return cls(**known, variants=variants, extra=rest)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "variants")}
        return {**out, "variants": [dataclasses.asdict(v) for v in self.variants], **self.extra}

    def expected_keys(self) -> dict[tuple[str, int], str] | None:
        """{(variant, seed): key} of the runs in the group's scope; None for a group that predates the list."""
        return None if self.runs is None else {(r["variant"], r["seed"]): r["key"] for r in self.runs}

    def variant(self, name: str) -> VariantRecord | None:
        return next((v for v in self.variants if v.name == name), None)


def read_record(run_dir: Path) -> RunRecord:
    """A run folder's ``result.json``, in the current record format."""
    return RunRecord.from_dict(files.read_json(Path(run_dir) / "result.json"))


def write_record(run_dir: Path, record: RunRecord) -> None:
    files.write_json(Path(run_dir) / "result.json", record.to_dict())
