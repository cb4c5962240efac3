"""``python -m bench reproduce GROUP``: re-train a group's finished runs and compare their test metric.

Each chosen run is trained again from its own ``config.json`` (the resolved config, the seed and the key it
was recorded with; its thread count too) by the runner's loop, in a temporary folder that is deleted
afterwards: the group's own runs are never touched.  Per run it prints the recorded and the new test
metric, their difference, and that difference in units of the rung's seed-to-seed spread (the sample std
of the test metric over the rung's recorded seeds).  A run whose difference exceeds the tolerance fails
the command (exit 1).

The default tolerance is ``max(TOLERANCE_SDS * sqrt(2) * seed std, TOLERANCE_FLOOR)``: on another machine
(another CPU's bf16 rounding, another thread count, a GPU) a run follows another trajectory, like another
seed, so the rerun and the record differ like two seeds do: by ``sqrt(2) * std`` typically.  The floor
covers rungs with one seed or a std from two seeds, which can be far too small (docs/runs.md,
"Rescore and reproduce").  On the machine and thread count that made the record, a deterministic run is identical.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.config import ConfigError
from bench.log import count, note
from bench.metrics import Metric
from bench.records import RunRecord, read_record
from bench.registry import unknown_name_message
from bench.runner import RunOptions, resolve_data_root, retrain
from bench.stats import mean_ci
from bench.store import RunStore, StoredRun
from bench.tasks import TASKS

# The default tolerance, in units of the rung's seed std and with an absolute floor in the metric's own
# units (a fraction: accuracy, Dice).  Measured on quick MNIST and WARWICK rungs (docs/runs.md, "Rescore and reproduce").
TOLERANCE_SDS = 3.0
TOLERANCE_FLOOR = 0.01

log = logging.getLogger(__name__)


@dataclass
class Comparison:
    """One re-trained run against its record."""

    variant: str
    seed: int
    recorded: float
    new: float | None  # None: the rerun failed
    sd: float  # the rung's seed std over its recorded seeds; nan with one seed
    n: int  # the rung's recorded seeds
    tolerance: float
    error: str = ""  # why the rerun failed

    @property
    def diff(self) -> float:
        return math.nan if self.new is None else self.new - self.recorded

    @property
    def ok(self) -> bool:
        return self.new is not None and abs(self.diff) <= self.tolerance


def _test_metric(stored: StoredRun | RunRecord, metric: str) -> float:
    """The recorded test metric of a stored run (or of a run record)."""
    result = stored.result if isinstance(stored, StoredRun) else stored
    return float(result.test[metric])


def default_tolerance(sd: float) -> float:
    """``max(TOLERANCE_SDS * sqrt(2) * sd, TOLERANCE_FLOOR)``; the floor alone where ``sd`` is nan (one seed)."""
    return TOLERANCE_FLOOR if math.isnan(sd) else max(TOLERANCE_SDS * math.sqrt(2) * sd, TOLERANCE_FLOOR)


def choose_runs(store: RunStore, group: str, variants: list[str] | None, seeds: list[int] | None) -> list[StoredRun]:
    """The finished runs of ``group`` to re-train (all, or those of ``variants`` x ``seeds``); ConfigError naming
    the group, variant or seed that has no record."""
    groups = store.groups()
    if group not in groups:
        raise ConfigError(f"{store.root}: {unknown_name_message('group', group, groups) if groups else 'no groups'}")
    meta = store.read_group(group)
    if meta.role == "study":
        raise ConfigError(
            f"{store.root / group}: a study's trials have no test metric to reproduce; choose a "
            f"published or ad-hoc group"
        )
    finished = store.finished(group)
    ensembles = {r.variant for r in finished if "members" in r.result.extra}  # they train nothing: reproduce members
    if ensembles and not variants:
        note(log, f"{', '.join(sorted(ensembles))} of {group}: seed ensembles of other rungs, not re-trained")
    if any(v in ensembles for v in variants or []):
        raise ConfigError(
            f"--variants {', '.join(v for v in variants if v in ensembles)}: a seed ensemble trains "
            f"nothing; reproduce the rung it averages"
        )
    finished = [r for r in finished if r.variant not in ensembles]
    if not finished:
        raise ConfigError(f"{store.root / group}: no finished runs recorded; nothing to reproduce")
    names = [v.name for v in meta.variants]
    for name in variants or []:
        if name not in names:
            raise ConfigError(f"--variants: {unknown_name_message('variant', name, names)} (group {group})")
        if not any(r.variant == name for r in finished):
            raise ConfigError(f"--variants {name}: no finished run of it in group {group}")
    chosen = [r for r in finished if variants is None or r.variant in variants]
    recorded = sorted({r.seed for r in chosen})
    for seed in seeds or []:
        if seed not in recorded:
            raise ConfigError(
                f"--seeds {seed}: no finished run of that seed in group {group}"
                f"{' for ' + ', '.join(variants) if variants else ''} (recorded seeds: "
                f"{', '.join(map(str, recorded))})"
            )
    return [r for r in chosen if seeds is None or r.seed in seeds]


def seed_spread(finished: list[StoredRun], metric: str) -> dict[str, tuple[float, int]]:
    """Per variant: (sample std of the test metric over its recorded seeds, number of seeds); nan for one seed."""
    out: dict[str, tuple[float, int]] = {}
    for name in dict.fromkeys(r.variant for r in finished):
        values = [_test_metric(r, metric) for r in finished if r.variant == name]
        out[name] = (mean_ci(values)[1], len(values))
    return out


def reproduce(
    results: str | Path,
    group: str,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
    data_root: str | None = None,
    tolerance: float | None = None,
    device: str | None = None,
    progress: bool = True,
    out: Callable[[str], None] = print,
) -> list[Comparison]:
    """Re-train the chosen runs of ``group`` in a temporary folder and compare each with its record (printed
    through ``out``).  ``tolerance``: an absolute bound on |new - recorded| for every run; None: per rung,
    :func:`default_tolerance` of its seed std."""
    store = RunStore(results)
    chosen = choose_runs(store, group, variants, seeds)
    meta = store.read_group(group)
    task = TASKS[meta.task]
    metric = task.metrics[0]
    spread = seed_spread(store.finished(group), metric.key)
    with tempfile.TemporaryDirectory(prefix="bench-reproduce-") as tmp:
        log.info(f"re-training {count(len(chosen), 'run')} of {group} in {tmp} (deleted afterwards)")
        opts = RunOptions(resolve_data_root(data_root)[0], device, progress=progress)
        tmp_store, runs = retrain(meta, chosen, tmp, opts, data_root)
        rows = []
        for stored, run in zip(chosen, runs, strict=True):
            result = tmp_store.result(run)
            sd, n = spread[stored.variant]
            failed = _failure(tmp_store.path(run)) if result is None else ""
            rows.append(
                Comparison(
                    stored.variant,
                    stored.seed,
                    _test_metric(stored, metric.key),
                    None if result is None else _test_metric(result, metric.key),
                    sd,
                    n,
                    default_tolerance(sd) if tolerance is None else tolerance,
                    failed,
                )
            )
    for line in report(group, rows, metric, tolerance):
        out(line)
    return rows


def _failure(run_dir: Path) -> str:
    """The error a failed rerun recorded."""
    try:
        return read_record(run_dir).error or ""
    except (OSError, ValueError):  # RecordError is a ValueError
        return ""


def report(group: str, rows: list[Comparison], metric: Metric, tolerance: float | None) -> list[str]:
    """The comparison table and the verdict, as printed."""
    digits = metric.digits + 2  # two more than the summary shows: small differences are visible

    def num(x: float, sign: str = "") -> str:
        return "–" if math.isnan(x) else f"{x * metric.scale:{sign}.{digits}f}"

    rule = (
        f"{num(tolerance)} (--tolerance)"
        if tolerance is not None
        else f"max({TOLERANCE_SDS:g} x sqrt(2) x the rung's seed std, {num(TOLERANCE_FLOOR)}); the floor alone "
        f"for a rung with one seed"
    )
    lines = [
        f"{group}: {metric.column}, re-trained vs recorded; tolerance {rule}; within the seed spread: "
        f"|diff| <= sqrt(2) x seed std (how far two seeds lie apart, typically)",
        f"{'variant':<20} {'seed':>4} {'recorded':>10} {'new':>10} {'diff':>10} {'seed std (n)':>14} "
        f"{'|diff|/std':>10} {'tolerance':>10}  verdict",
    ]
    for r in rows:
        ratio = abs(r.diff) / r.sd if r.sd > 0 else math.nan
        if r.new is None:
            verdict = f"FAILED: {r.error or 'the rerun did not finish'}"
        elif r.diff == 0:
            verdict = "identical"
        elif not r.ok:
            verdict = "OFF: beyond the tolerance"
        else:
            verdict = (
                "within the seed spread" if ratio <= math.sqrt(2) else "within the tolerance, beyond the seed spread"
            )
        lines.append(
            f"{r.variant:<20} {r.seed:>4} {num(r.recorded):>10} {num(r.new if r.new is not None else math.nan):>10} "
            f"{num(r.diff, '+'):>10} {num(r.sd) + f' ({r.n})':>14} "
            f"{'–' if math.isnan(ratio) else f'{ratio:.1f}':>10} {num(r.tolerance):>10}  {verdict}"
        )
    bad = [r for r in rows if not r.ok]
    same = sum(r.diff == 0 for r in rows)
    lines.append(
        f"{len(rows) - len(bad)} of {count(len(rows), 'run')} within the tolerance "
        f"({same} identical)" + (f"; off: {', '.join(f'{r.variant} seed {r.seed}' for r in bad)}" if bad else "")
    )
    return lines
