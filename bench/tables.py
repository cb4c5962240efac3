"""The tables of a group's section of the summary, built from its stored runs: the main table (test metric, change
against the parent rung, the report's number, parameters, deployment cost), the training/statistics table, the
secondary metrics and the post-processing table.

Each row is a dict ``{column: cell}`` put together from small helpers, one per group of columns
(``_metric_cells``, ``_training_cells``, ``_cost_cells``, ...); :func:`_table` turns the rows into a :class:`Table`,
its columns in the order the rows name them.  The statistics and number formats are :mod:`bench.stats`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench import files
from bench.metrics import Metric
from bench.records import GroupRecord, RunRecord, VariantRecord
from bench.spec import short_label
from bench.stats import (
    CLIPPED,
    format_change,
    format_ci,
    format_count,
    format_mean_sd,
    format_p,
    format_params,
    mean_ci,
    ms_decimals,
    paired_test,
)
from bench.store import StoredRun
from bench.tasks import TASKS
from bench.train import time_to_target

DELTA = "Δ (p)"
TEST_CI = "test 95% CI"  # the interval of the test mean, in the training table beside the validation mean
CHOSEN = "chosen per seed: min px (filled holes, contour threshold)"
COST_HEADERS = {"cpu/fp32": "ORT ms", "cpu/int8": "INT8 ms", "cuda/fp32": "CUDA ms"}
# About what a 1280-pixel-wide rendering shows of a markdown table without scrolling: ~8 pixels a character at a
# code host's 16-pixel font, and each cell's 26 pixels of padding counted as 3 characters.
MAX_TABLE_WIDTH = 160

Row = dict[str, str]  # one row of a table: {column header: cell}


@dataclass
class Table:
    """A markdown table: headers, rows of strings and each column's alignment (numbers right)."""

    headers: list[str]
    rows: list[list[str]]
    align: list[str]

    def markdown(self) -> str:
        return files.markdown_table(self.headers, self.rows, self.align)

    def width(self) -> int:
        """Characters a reader sees across the rendered table: each column's widest cell plus about 3 characters of
        cell padding.  :data:`MAX_TABLE_WIDTH` bounds it for the main table."""
        cols = zip(self.headers, *self.rows, strict=True)
        return sum(max(len(c) for c in col) + 3 for col in cols)


def _table(rows: list[Row], right: set[str]) -> Table:
    """Columns in the order the rows name them, wherever they first appear (a first row without runs has fewer cells:
    its gaps are filled from the rows below, in place)."""
    headers: list[str] = []
    for r in rows:
        for i, k in enumerate(r):
            if k not in headers:
                before = [h for h in list(r)[:i] if h in headers]  # after the last of its predecessors already placed
                headers.insert(headers.index(before[-1]) + 1 if before else 0, k)
    return Table(
        headers, [[r.get(h, "") for h in headers] for r in rows], ["right" if h in right else "left" for h in headers]
    )


@dataclass
class GroupTables:
    """The tables of one group's section: the main table (metric, change against the parent, deployment cost),
    the training/statistics table, the secondary metrics table (tasks with several metrics), and what they need."""

    main: Table
    training: Table
    secondary: Table | None
    best: str | None
    clipped: bool
    costs_shown: bool
    postprocess: Table | None = None  # rungs that post-process their masks: the choice and its effect on the test


def group_tables(meta: GroupRecord, runs: list[StoredRun], costs: dict[str, Any] | None = None) -> GroupTables:
    """The section's tables; the best variant is the one with the best mean validation metric."""
    task = TASKS[meta.task]
    primary = task.metrics[0]
    results = {v.name: [r.result for r in runs if r.variant == v.name] for v in meta.variants}
    by_seed = {name: {r.seed: r.test[primary.key] for r in rs} for name, rs in results.items()}
    val_means = {name: sum(r.val_best for r in rs) / len(rs) for name, rs in results.items() if rs}
    best = min(val_means, key=lambda name: primary.rank(val_means[name])) if val_means else None
    reported = any(v.reported is not None for v in meta.variants)
    cost_cols = _cost_columns(meta, runs, costs)
    # a metric no run of the group recorded (added to the task after they ran) has no column until a rescore
    shown = [m for m in task.metrics[1:] if any(m.key in r.result.test for r in runs)]
    main, training, secondary = [], [], []
    for v in meta.variants:
        rs = results[v.name]
        name = v.name + (" ★" if v.name == best else "")
        main.append(
            {
                **_rung_cells(v, name, rs),
                **_metric_cells(v, rs, by_seed, primary),
                **(_report_cells(v, primary) if reported else {}),
                **_params_cells(rs),
                **cost_cols.get(v.name, {}),
            }
        )
        training.append(
            {"variant": name, **(_training_cells(rs, runs_of(runs, v.name), primary, meta.target) if rs else {})}
        )
        if rs and shown:
            secondary.append({"variant": name, "n": str(len(rs)), **_secondary_cells(rs, shown)})
    clipped = any(row.get(TEST_CI, "").endswith(CLIPPED) for row in training)
    numeric = {
        primary.header,
        DELTA,
        "val (mean)",
        "report",
        "params",
        "n",
        TEST_CI,
        "epochs (best)",
        "train s",
        "MFLOP",
        "GFLOP",
        *COST_HEADERS.values(),
        *(m.column for m in task.metrics),
    }
    if meta.target is not None:
        numeric.add(target_column(meta.target, primary))
    return GroupTables(
        _table(main, numeric),
        _table(training, numeric),
        _table(secondary, numeric) if secondary else None,
        best,
        clipped,
        bool(cost_cols),
        postprocess_table(meta, results, task.metrics),
    )


# --------------------------------------------------------------------------- the main table's columns


def _rung_cells(v: VariantRecord, name: str, rs: list[RunRecord]) -> Row:
    """Which rung: its name (★ when best on validation), what it changes, and how many seeds it has."""
    return {"variant": name, "change": v.label or short_label(v.change), "n": str(len(rs))}


def _metric_cells(v: VariantRecord, rs: list[RunRecord], by_seed: dict[str, dict[int, float]], metric: Metric) -> Row:
    """The test metric's mean ± std over the seeds and the paired change against the parent rung (empty for a rung
    without one); ``not run`` for a rung without runs."""
    if not rs:
        return {metric.header: "not run"}
    return {
        metric.header: format_mean_sd([r.test[metric.key] for r in rs], metric),
        DELTA: _delta(v, by_seed, metric) if v.parent else "",
    }


def _report_cells(v: VariantRecord, metric: Metric) -> Row:
    """The report's number in the metric's own format (empty for a rung the report has no number for)."""
    return {"report": metric.text(v.reported) if v.reported is not None else ""}


def _params_cells(rs: list[RunRecord]) -> Row:
    return {"params": format_params(rs[0].params) if rs else ""}


def _delta(v: VariantRecord, by_seed: dict[str, dict[int, float]], metric: Metric) -> str:
    """``+0.21 (p=0.044)``: the mean paired change against the parent over the seeds both have."""
    d, p, n = paired_test(by_seed[v.name], by_seed.get(v.parent, {}))
    if n == 0:
        return "–"
    shared = "" if n == len(by_seed[v.name]) else f", {n} seeds shared"
    return f"{format_change(d, metric)} (p={format_p(p)}{shared})"


def flops_unit(costs: dict[str, Any]) -> tuple[str, float, int]:
    """(column header, divisor, decimals) for the FLOPs per image of a group's rungs: MFLOP, or GFLOP from 1 G."""
    most = max((r.get("flops_per_image", 0) for r in costs.get("rungs", {}).values()), default=0)
    return ("GFLOP", 1e9, 2) if most >= 1e9 else ("MFLOP", 1e6, 1)


def _cost_columns(meta: GroupRecord, runs: list[StoredRun], costs: dict[str, Any] | None) -> dict[str, Row]:
    """Per variant, its deployment cost cells from ``costs.json`` (see ``exporters.rungs``): FLOPs per image and
    batch-1 p50 latency per provider/precision measured.  Empty without costs."""
    if not costs:
        return {}
    rungs = costs.get("rungs", {})
    columns = [
        c for c in ("cpu/fp32", "cpu/int8", "cuda/fp32") if any(c in r.get("latency", {}) for r in rungs.values())
    ]
    current = current_costs(costs, runs)
    unit, scale, digits = flops_unit(costs)
    decimals = {
        c: ms_decimals([r["latency"][c]["p50_ms"] for r in rungs.values() if c in r.get("latency", {})])
        for c in columns
    }
    headers = {"flops": unit, **{c: COST_HEADERS[c] for c in columns}}
    out = {}
    for v in meta.variants:
        ran = any(r.variant == v.name for r in runs)
        cells = _cost_cells(ran, current.get(v.name), columns, scale, digits, decimals)
        out[v.name] = {headers[k]: x for k, x in cells.items()}
    return out


def _cost_cells(
    ran: bool, rec: dict[str, Any] | None, columns: list[str], scale: float, digits: int, decimals: dict[str, int]
) -> Row:
    """One rung's cost cells keyed ``flops`` and by provider/precision: ``not run`` for a rung without finished runs,
    ``–`` for one whose export is missing or was made from a run that is no longer current."""
    if not ran:
        return dict.fromkeys(["flops", *columns], "not run")
    if rec is None:
        return dict.fromkeys(["flops", *columns], "–")
    lat = rec.get("latency", {})
    return {
        "flops": f"{rec['flops_per_image'] / scale:.{digits}f}",
        **{c: _latency_cell(lat.get(c), decimals[c]) for c in columns},
    }


def _latency_cell(timing: dict[str, float] | None, decimals: int) -> str:
    return "–" if timing is None else f"{timing['p50_ms']:.{decimals}f}"


def current_costs(costs: dict[str, Any], runs: list[StoredRun]) -> dict[str, dict[str, Any]]:
    """The rungs of ``costs.json`` whose export came from a run of the variant that is still current."""
    keys = {(r.variant, r.key) for r in runs}
    return {v: rec for v, rec in costs.get("rungs", {}).items() if (v, rec.get("key")) in keys}


# --------------------------------------------------------------------------- training, secondary, post-processing


# The best-epoch part of a seed ensemble's epochs cell (the summary explains it under the table when one is shown).
ENSEMBLE_EPOCHS = "(members)"


def _training_cells(rs: list[RunRecord], runs: list[StoredRun], metric: Metric, target: float | None) -> Row:
    """A rung's mean validation metric, the t-interval of its test mean, its epochs, training seconds and (a spec
    with a ``target``) its time to that target; ``runs`` are its stored runs, for their metrics.csv."""
    m, _, hw = mean_ci([r.test[metric.key] for r in rs])
    ran, best_epoch = (sum(getattr(r, k) for r in rs) / len(rs) for k in ("epochs_run", "best_epoch"))
    # A seed ensemble trains nothing: its record sums its members' epochs and seconds (what it cost to make), and a
    # sum of best epochs means nothing.
    ensemble = all(r.extra.get("members") for r in rs)
    cells = {
        "val (mean)": metric.text(sum(r.val_best for r in rs) / len(rs)),
        TEST_CI: format_ci(m, hw, metric),
        "epochs (best)": f"{format_count(ran)} {ENSEMBLE_EPOCHS}"
        if ensemble
        else f"{format_count(ran)} ({format_count(best_epoch)})",
        "train s": f"{sum(r.train_time_s for r in rs) / len(rs):.0f}",
    }
    if target is not None:
        cells[target_column(target, metric)] = format_time_to_target(runs, target, metric)
    return cells


def _secondary_cells(rs: list[RunRecord], shown: list[Metric]) -> Row:
    """Mean ± std of each secondary metric; the metric's empty format where a run recorded it not (a rescore adds it)."""
    return {
        m.column: format_mean_sd([r.test[m.key] for r in rs], m) if all(m.key in r.test for r in rs) else m.text(None)
        for m in shown
    }


def postprocess_table(
    meta: GroupRecord, results: dict[str, list[RunRecord]], metrics: tuple[Metric, ...]
) -> Table | None:
    """The rungs whose runs post-process their masks (``eval.postprocess``): the setting each seed chose on validation,
    and for the primary metric and the one that chose, the test's mean before and after and the mean paired change
    within the runs (the same predictions without and with post-processing) with its t-test's p."""
    rows = []
    for v in meta.variants:
        rs = [r for r in results.get(v.name, []) if r.postprocess and r.test_raw]
        if not rs:
            continue
        row = {"variant": v.name, "n": str(len(rs)), CHOSEN: ", ".join(_chosen(r.postprocess) for r in rs)}
        by = {r.postprocess["chosen_by"] for r in rs}
        for m in (m for m in metrics if m is metrics[0] or m.key in by):
            row.update(_before_after_cells(rs, m))
        rows.append(row)
    return _table(rows, {h for r in rows for h in r if h not in ("variant", CHOSEN)}) if rows else None


def _chosen(postprocess: dict[str, Any]) -> str:
    """``40 filled c0.5``: the minimum object size one seed chose, whether it fills holes, and a contour threshold."""
    text = f"{postprocess['min_area']}"
    if postprocess["fill_holes"]:
        text += " filled"
    if "contour_threshold" in postprocess:
        text += f" c{postprocess['contour_threshold']:g}"
    return text


def _before_after_cells(rs: list[RunRecord], m: Metric) -> Row:
    """The metric's test mean without and with post-processing, and the paired change with its p (nothing where a
    run lacks either number)."""
    if not all(m.key in r.test and m.key in r.test_raw for r in rs):
        return {}
    before, after = ({r.seed: getattr(r, k)[m.key] for r in rs} for k in ("test_raw", "test"))
    d, p, _ = paired_test(after, before)
    return {
        f"{m.label} before → after": f"{m.text(sum(before.values()) / len(rs))} → "
        f"{m.text(sum(after.values()) / len(rs))}",
        f"Δ {m.label} (p)": f"{format_change(d, m)} (p={format_p(p)})",
    }


def target_column(target: float, metric: Metric) -> str:
    return f"to val {metric.text(target, unit=True)}: epoch, train s"


def runs_of(runs: list[StoredRun], variant: str) -> list[StoredRun]:
    return [r for r in runs if r.variant == variant]


def format_time_to_target(runs: list[StoredRun], target: float, metric: Metric | None = None) -> str:
    """``3 · 41 s``: mean over seeds of the first epoch whose validation metric reached ``target`` and of the
    training seconds until then (read from each run's metrics.csv), with how many seeds reached it when not all;
    ``–`` for runs without epochs of their own (seed ensembles)."""
    histories = [files.read_csv(r.dir / "metrics.csv") for r in runs]
    if not any(histories):
        return "–"
    reached = [hit for hit in (time_to_target(h, target, metric) for h in histories) if hit]
    if not reached:
        return "not reached"
    epoch, seconds = (sum(h[i] for h in reached) / len(reached) for i in (0, 1))
    partial = f" ({len(reached)} of {len(runs)} seeds)" if len(reached) < len(runs) else ""
    return f"{format_count(epoch)} · {seconds:.0f} s{partial}"
