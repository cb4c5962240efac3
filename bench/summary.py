"""results/summary.md, rebuilt from the stored runs alone (no training, no spec file needed).

Per group: one row per variant with the test metric's mean +- std over seeds, a 95%
t-interval, the change against the rung it builds on with a paired t-test over the seeds
they share, the report's number, epochs, time and parameters; then a learning-curve
figure.  The best variant is picked by mean *validation* metric, never by test.

``results/summary.md`` publishes the *published* groups only (a spec and profile as
written).  An ad-hoc group (runs with ``--set`` overrides, see ``bench.spec.place_in_group``)
gets its own ``runs/<group>/summary.md`` and never touches the published file.

The records of published groups are in git (bench/records.py), so any clone rebuilds every section from
them; the task's figures, which need checkpoints, are kept in ``runs/<group>/figures.json``.  A section
whose records are not here (made before records were committed) is kept verbatim, and so is a section
that reports runs this folder lacks (a partial re-run here never replaces a fuller table made elsewhere)
unless the group is complete here; delete a section by hand to drop it.
"""
from __future__ import annotations

import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from scipy import stats

from bench import files
from bench.pareto import pareto_front
from bench.plots import plot_spec_curves, plot_tradeoff
from bench.records import GroupRecord, RunRecord, VariantRecord
from bench.spec import group_file_prefix, short_label
from bench.store import RunStore, StoredRun
from bench.tasks import TASKS
from bench.tasks.base import Metric, Task
from bench.train import time_to_target

INTRO = ("Every number below is read from the stored runs of that spec. Mean ± sample std over the seeds shown; "
         "95% CI is the two-sided Student-t interval of the mean; Δ is the mean paired difference over the seeds "
         "both rungs share, with a paired t-test p-value (with 2-3 seeds the test has little power: read it as a "
         "sanity check, not proof). ★ marks the best variant by mean *validation* metric; the test set chose nothing.")
FIGURES_FILE = "figures.json"  # per group: the captions of the task's figures, for a rebuild without checkpoints
CLIPPED = "†"  # marks a confidence interval cut at the metric's range
_MARKER = re.compile(r"<!-- bench: runs (.*?) -->")


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the two-sided t confidence interval); nan where n < 2."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = float(pd.Series(values).std(ddof=1))
    return m, sd, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def paired_test(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean of a-b over shared seeds, two-sided paired t-test p-value (nan if undefined), n shared."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, 0
    d = [a[s] - b[s] for s in seeds]
    mean = sum(d) / len(d)
    if len(d) < 2 or len(set(d)) == 1:
        return mean, math.nan, len(d)
    return mean, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue), len(d)


def format_ci(m: float, hw: float, metric: Metric) -> str:
    """``[lo, hi]`` of a mean, cut to the metric's range and marked with :data:`CLIPPED` when cut."""
    if math.isnan(hw):
        return "–"
    lo, hi = max(m - hw, metric.low), min(m + hw, metric.high)
    mark = CLIPPED if (lo, hi) != (m - hw, m + hw) else ""
    return f"[{metric.text(lo)}, {metric.text(hi)}]{mark}"


def format_count(x: float) -> str:
    """A mean of counts: ``2`` when whole, else one decimal (``41.7``)."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


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


# About what a 1280-pixel-wide rendering shows of a markdown table without scrolling: ~8 pixels a character at a
# code host's 16-pixel font, and each cell's 26 pixels of padding counted as 3 characters.
MAX_TABLE_WIDTH = 160


def _table(rows: list[dict[str, str]], right: set[str]) -> Table:
    """Columns in the order the rows name them, wherever they first appear (a first row without runs has fewer cells:
    its gaps are filled from the rows below, in place)."""
    headers: list[str] = []
    for r in rows:
        for i, k in enumerate(r):
            if k not in headers:
                before = [h for h in list(r)[:i] if h in headers]  # after the last of its predecessors already placed
                headers.insert(headers.index(before[-1]) + 1 if before else 0, k)
    return Table(headers, [[r.get(h, "") for h in headers] for r in rows],
                 ["right" if h in right else "left" for h in headers])


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
    main, training, secondary, clipped = [], [], [], False
    # a metric no run of the group recorded (added to the task after they ran) has no column until a rescore
    shown = [m for m in task.metrics[1:] if any(m.key in r.result.test for r in runs)]
    for v in meta.variants:
        rs = results[v.name]
        name = v.name + (" ★" if v.name == best else "")
        row: dict[str, str] = {"variant": name, "change": v.label or short_label(v.change), "n": str(len(rs))}
        more: dict[str, str] = {"variant": name}
        if rs:
            m, sd, hw = mean_ci([r.test[primary.key] for r in rs])
            row[primary.header] = f"{primary.text(m)} ± {primary.text(sd)}"
            row[DELTA] = _delta(v, by_seed, primary) if v.parent else ""
            more["val (mean)"] = primary.text(val_means[v.name])
            more["95% CI"] = format_ci(m, hw, primary)
            clipped |= more["95% CI"].endswith(CLIPPED)
            ran, best_ep = (sum(getattr(r, k) for r in rs) / len(rs) for k in ("epochs_run", "best_epoch"))
            more["epochs (best)"] = f"{format_count(ran)} ({format_count(best_ep)})"
            more["train s"] = f"{sum(r.train_time_s for r in rs) / len(rs):.0f}"
            if meta.target is not None:
                more[target_column(meta.target, primary)] = format_time_to_target(
                    runs_of(runs, v.name), meta.target, primary)
            if shown:
                sec = {"variant": name, "n": str(len(rs))}
                for metric in shown:
                    if any(metric.key not in r.test for r in rs):  # recorded before the metric existed: rescore
                        sec[metric.column] = metric.text(None)
                        continue
                    mk, sk, _ = mean_ci([r.test[metric.key] for r in rs])
                    sec[metric.column] = f"{metric.text(mk)} ± {metric.text(sk)}"
                secondary.append(sec)
        else:
            row[primary.header] = "not run"
        if reported:
            row["report"] = primary.text(v.reported) if v.reported is not None else ""
        row["params"] = format_params(rs[0].params) if rs else ""
        row.update(cost_cols.get(v.name, {}))
        main.append(row)
        training.append(more)
    numeric = {primary.header, DELTA, "val (mean)", "report", "params", "n", "95% CI", "epochs (best)", "train s",
               "MFLOP", "GFLOP", *COST_HEADERS.values(), *(m.column for m in task.metrics)}
    if meta.target is not None:
        numeric.add(target_column(meta.target, primary))
    return GroupTables(_table(main, numeric), _table(training, numeric), _table(secondary, numeric) if secondary else None,
                       best, clipped, bool(cost_cols), postprocess_table(meta, results, task.metrics))


def postprocess_table(meta: GroupRecord, results: dict[str, list[RunRecord]], metrics: tuple[Metric, ...]) -> Table | None:
    """The rungs whose runs post-process their masks (``eval.postprocess``): the setting each seed chose on validation,
    and for the primary metric and the one that chose, the test's mean before and after and the mean paired change
    within the runs (the same predictions without and with post-processing) with its t-test's p."""
    rows = []
    for v in meta.variants:
        rs = [r for r in results.get(v.name, []) if r.postprocess and r.test_raw]
        if not rs:
            continue
        row = {"variant": v.name, "n": str(len(rs)), CHOSEN: ", ".join(
            f"{r.postprocess['min_area']}{' filled' if r.postprocess['fill_holes'] else ''}"
            + (f" c{r.postprocess['contour_threshold']:g}" if "contour_threshold" in r.postprocess else "") for r in rs)}
        by = {r.postprocess["chosen_by"] for r in rs}
        for m in (m for m in metrics if m is metrics[0] or m.key in by):
            if all(m.key in r.test and m.key in r.test_raw for r in rs):
                before, after = ({r.seed: getattr(r, k)[m.key] for r in rs} for k in ("test_raw", "test"))
                d, p, _ = paired_test(after, before)
                row[f"{m.label} before → after"] = (f"{m.text(sum(before.values()) / len(rs))} → "
                                                    f"{m.text(sum(after.values()) / len(rs))}")
                row[f"Δ {m.label} (p)"] = f"{d * m.scale:+.{m.digits}f} (p={'–' if math.isnan(p) else f'{p:.3f}'})"
        rows.append(row)
    return _table(rows, {h for r in rows for h in r if h not in ("variant", CHOSEN)}) if rows else None


DELTA = "Δ (p)"
CHOSEN = "chosen per seed: min px (filled holes, contour threshold)"
LATENCY_TOLERANCE = 0.1  # relative: the same network timed twice in one run differs by a few percent
COST_HEADERS = {"cpu/fp32": "ORT ms", "cpu/int8": "INT8 ms", "cuda/fp32": "CUDA ms"}


def format_params(n: int) -> str:
    """``1,234``, ``145k``, ``1.9M``: parameter counts as the table shows them (exact counts: result.json)."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:,}"


def flops_unit(costs: dict[str, Any]) -> tuple[str, float, int]:
    """(column header, divisor, decimals) for the FLOPs per image of a group's rungs: MFLOP, or GFLOP from 1 G."""
    most = max((r.get("flops_per_image", 0) for r in costs.get("rungs", {}).values()), default=0)
    return ("GFLOP", 1e9, 2) if most >= 1e9 else ("MFLOP", 1e6, 1)


def _cost_columns(meta: GroupRecord, runs: list[StoredRun], costs: dict[str, Any] | None) -> dict[str, dict[str, str]]:
    """Per variant, its deployment cost cells from ``costs.json`` (see ``exporters.rungs``): FLOPs per image and
    batch-1 p50 latency per provider/precision measured.  ``not run`` for a rung without finished runs, ``–`` for
    one whose export is missing or was made from a run that is no longer current.  Empty without costs."""
    if not costs:
        return {}
    rungs = costs.get("rungs", {})
    columns = [c for c in ("cpu/fp32", "cpu/int8", "cuda/fp32") if any(c in r.get("latency", {}) for r in rungs.values())]
    current = current_costs(costs, runs)
    unit, scale, digits = flops_unit(costs)
    decimals = {c: ms_decimals([r["latency"][c]["p50_ms"] for r in rungs.values() if c in r.get("latency", {})])
                for c in columns}
    out = {}
    for v in meta.variants:
        rec = current.get(v.name)
        if not any(r.variant == v.name for r in runs):
            cells = dict.fromkeys(["flops", *columns], "not run")
        elif rec is None:
            cells = dict.fromkeys(["flops", *columns], "–")
        else:
            lat = rec.get("latency", {})
            cells = {"flops": f"{rec['flops_per_image'] / scale:.{digits}f}",
                     **{c: f"{lat[c]['p50_ms']:.{decimals[c]}f}" if c in lat else "–" for c in columns}}
        out[v.name] = {(unit if k == "flops" else COST_HEADERS[k]): x for k, x in cells.items()}
    return out


def current_costs(costs: dict[str, Any], runs: list[StoredRun]) -> dict[str, dict[str, Any]]:
    """The rungs of ``costs.json`` whose export came from a run of the variant that is still current."""
    keys = {(r.variant, r.key) for r in runs}
    return {v: rec for v, rec in costs.get("rungs", {}).items() if (v, rec.get("key")) in keys}


def ms_decimals(values: list[float]) -> int:
    """One number of decimals for a column of latencies: three significant digits for its smallest value
    (``0.0703`` -> 4, ``2.18`` -> 2, ``38.6`` -> 1), at most 4 and at least 0."""
    low = min((v for v in values if v > 0), default=1.0)
    return max(0, min(4, 2 - int(math.floor(math.log10(low)))))


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


def _delta(v: VariantRecord, by_seed: dict[str, dict[int, float]], metric: Metric) -> str:
    """``+0.21 (p=0.044)``: the mean paired change against the parent over the seeds both have."""
    d, p, n = paired_test(by_seed[v.name], by_seed.get(v.parent, {}))
    p_text = "–" if math.isnan(p) else f"{p:.3f}"
    shared = "" if n == len(by_seed[v.name]) else f", {n} seeds shared"
    return "–" if n == 0 else f"{d * metric.scale:+.{metric.digits}f} (p={p_text}{shared})"


def provenance(runs: list[StoredRun]) -> dict[str, str]:
    rs = [r.result for r in runs]
    return {
        "devices": "; ".join(sorted({(r.device_name or "?") + _precisions(r) for r in rs})),
        "commits": ", ".join(sorted({_short_commit(r.commit or "?") for r in rs})),
        "torch": ", ".join(sorted({r.torch or "?" for r in rs})),
        "finished": max((r.finished or "" for r in rs), default=""),
    }


def _precisions(result: RunRecord) -> str:
    """``, bf16 autocast training, fp32 evaluation``."""
    return f", {result.train_precision} training, {result.eval_precision} evaluation" if result.train_precision else ""


def _short_commit(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "") + (" (stated)" if commit.endswith("(stated)") else "")


def group_command(meta: GroupRecord) -> str:
    """The command that makes this group's runs, with every override that makes it ad hoc, and the data root and
    results folder that ``bench run`` was given when they are not the defaults (a spec of one's own data needs
    them); from the group's record, so a section rebuilt elsewhere says the same."""
    cmd = f"python -m bench run {shlex.quote(meta.path or '')}" + (f" --profile {meta.profile}" if meta.profile else "")
    if meta.role == "adhoc":
        cmd += "".join(f" --set {shlex.quote(f'{k}={files.yaml_scalar(v)}')}" for k, v in (meta.overrides or {}).items())
        cmd += f" --seeds {' '.join(map(str, meta.seeds))} --group {shlex.quote(meta.group)}"
    if meta.extra.get("data_root"):
        cmd += f" --data-root {shlex.quote(meta.extra['data_root'])}"
    if meta.extra.get("results"):
        cmd += f" --results {shlex.quote(meta.extra['results'])}"
    return cmd


def write_summary(results_dir: str | Path = "results", command: str | None = None,
                  groups: list[str] | None = None, refresh_published: bool = False) -> list[Path]:
    """Rebuild, from ``results_dir/runs``, the sections of ``results_dir/summary.md`` (published groups)
    and the ad-hoc groups' own summary.md files: all of them, or only those of ``groups`` (a command
    that trained one group rewrites that group's table and no other's).  Returns the files that changed."""
    store = RunStore(results_dir)
    command = command or "python -m " + " ".join(["bench", *sys.argv[1:]])
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}` at code commit {files.git_commit()}"
    only = None if groups is None else set(groups)
    # results/summary.md is rewritten for published groups (or when asked, for its links) only: an experiment
    # never touches it.
    written = []
    if only is None or only & set(store.groups("published")) or refresh_published:
        written.append(_write_published(store, stamp, only))
    for group in store.groups("adhoc"):
        if only is None or group in only:
            written.append(_write_adhoc(store, group, stamp))
    return [p for p in written if p is not None]


def _write_published(store: RunStore, stamp: str, only: set[str] | None) -> Path | None:
    path = store.results / "summary.md"
    sections = files.read_markdown_sections(path, 2, _group_of_heading)  # kept for groups whose runs are elsewhere
    for group in store.groups("published"):
        if only is not None and group not in only:
            continue
        meta, runs = store.read_group(group), store.finished(group)
        if not runs:
            continue
        old = _runs_in(sections.get(group))
        complete = meta.runs is not None and len(runs) == len(meta.runs)
        if group in sections and not complete and (old is None or not old <= _run_ids(runs)):
            print(f"note: kept the {group} section of {path}: it reports runs this results folder does not hold "
                  f"({len(runs)} of {len(meta.runs or [])} runs here); copy their run folders here, finish the "
                  f"group, or delete the section to rebuild it", file=sys.stderr)
            continue
        sections[group] = group_section(meta, runs, store, store.results / "figures", stamp)
    out = ["# Results", "", INTRO, "", *_index(sections), *(text for _, text in sorted(sections.items()))]
    deployment = store.results / "deployment.md"
    if deployment.exists():
        out += [deployment.read_text().strip(), ""]
    if (store.results / "perf.md").exists():
        out += ["## Speed", "", "Time to the report's numbers, throughput and the speed choices against a textbook loop "
                "of the report's recipe, measured by `python -m bench perf`: [perf.md](perf.md) (raw: `perf.csv`).", ""]
    return path if files.write_text_if_changed(path, "\n".join(out)) else None


def _write_adhoc(store: RunStore, group: str, stamp: str) -> Path | None:
    meta, runs = store.read_group(group), store.finished(group)
    path = store.root / group / "summary.md"
    note = (f"Ad-hoc group: runs of `{meta.path}` with overrides, kept apart from the published table "
            f"`{meta.published_group}` in results/summary.md.")
    body = group_section(meta, runs, store, store.root / group / "figures", stamp) if runs else "No finished runs yet.\n"
    return path if files.write_text_if_changed(path, "\n".join([f"# {group}", "", note, "", INTRO, "", body])) else None


def _index(sections: dict[str, str]) -> list[str]:
    """A table of the sections' provenance (machine, commits, when), read from their own lines."""
    def line(text: str, key: str) -> str:
        m = re.search(rf"^- {key}: (.*)$", text, re.M)
        return m.group(1) if m else "–"

    rows = []
    for group, text in sorted(sections.items()):
        head = text.splitlines()[0]
        profile = re.search(r"profile `([^`]*)`", head)
        rows.append([f"[{group}](#{_anchor(head)})", profile.group(1) if profile else "–", line(text, "machine"),
                     line(text, "commits of the runs").split(";")[0], line(text, "table generated").split(" by ")[0]])
    if not rows:
        return []
    return [files.markdown_table(["section", "profile", "machine", "commits of the runs", "table generated"], rows), ""]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a ``## heading`` line."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _run_ids(runs: list[StoredRun]) -> set[str]:
    return {f"{r.variant}/{r.seed}/{r.key}" for r in runs}


def _runs_in(section: str | None) -> set[str] | None:
    """The runs a section was built from (its marker), None for a section without one."""
    m = _MARKER.search(section or "")
    return set(m.group(1).split()) if m else None


def _group_of_heading(heading: str) -> str | None:
    """``mnist@quick`` for a group heading ``mnist@quick (mnist, spec `...`, ...)``, else None."""
    head = heading.split(" (", 1)
    return head[0] if len(head) == 2 and ", spec `" in head[1] else None


def group_section(meta: GroupRecord, runs: list[StoredRun], store: RunStore, fig_dir: Path, stamp: str) -> str:
    """Markdown for one group: provenance, table, learning curves, the task's figures."""
    task = TASKS[meta.task]
    costs = store.read_costs(meta.group)
    tables = group_tables(meta, runs, costs)
    best = tables.best
    prov = provenance(runs)
    out = [
        f"## {meta.group} ({meta.task}, spec `{meta.path}`, profile `{meta.profile or 'full'}`)",
        "",
        f"- command: `{group_command(meta)}`",
        f"- machine: {prov['devices']}; torch {prov['torch']}",
        f"- commits of the runs: {prov['commits']}; last run finished {prov['finished']}",
        f"- table generated: {stamp}",
    ]
    if tables.costs_shown and costs:
        out.append(f"- deployment cost: `{costs.get('command') or 'python -m exporters.onnx rungs'}` at commit "
                   f"{_short_commit(str(costs.get('commit', '?')))}, {costs['measured'][:16]}")
    if meta.role == "adhoc":
        out.append("- overrides: " + (", ".join(f"`{k}={files.yaml_scalar(v)}`" for k, v in meta.overrides.items())
                                      or "none") + f"; seeds {', '.join(map(str, meta.seeds))}")
    out += _missing_line(meta, runs)
    out += [f"- **failed**: {r.variant} seed {r.seed}: {(r.error or '').splitlines()[0][:300]}"
            for r in store.failed(meta.group)]
    out += ["", f"<!-- bench: runs {' '.join(sorted(_run_ids(runs)))} -->", ""]
    if meta.description:
        out += [meta.description, ""]
    primary = task.metrics[0]
    out += [tables.main.markdown(), ""]
    named = [f"{v.name}: {v.parent}" for i, v in enumerate(meta.variants)
             if v.parent and (i == 0 or meta.variants[i - 1].name != v.parent)]
    out += [f"*{primary.header}*: mean ± sample std over the *n* seeds. *{DELTA}*: the mean paired change against the "
            "rung it builds on, the row above" + (f" unless named here ({'; '.join(named)})" if named else "")
            + ", and the paired t-test's p. ★: the best mean validation metric (the test set chose nothing)."
            + (" *report*: the report's number." if "report" in tables.main.headers else ""), ""]
    if tables.costs_shown and costs:
        out += _cost_legend(costs), ""
        out += _tradeoff(meta, runs, costs, fig_dir, primary)
    elif runs and meta.role == "published":
        out += [f"Deployment cost per rung: `python -m exporters.onnx rungs {meta.path}"
                + (f" --profile {meta.profile}`" if meta.profile else "`") + " adds it to this table.", ""]
    out += _reading(store, meta.group)
    out += _details(meta)
    out += ["Training and statistics of each rung:", "", tables.training.markdown(), ""]
    if tables.clipped:
        out += [f"{CLIPPED} The t-interval reaches outside the metric's range and is shown cut to "
                f"[{primary.text(primary.low)}, {primary.text(primary.high)}] (few seeds make it wide).", ""]
    if meta.target is not None:
        out += [f"*{target_column(meta.target, primary)}*: the first epoch whose validation metric reached "
                f"{primary.text(meta.target, unit=True)} (the report's best number, "
                "the spec's `target`) and the seconds of training steps until its end (evaluation not counted), "
                "mean over the seeds that reached it. Runs trained side by side (workers) shared the machine.", ""]
    if tables.secondary is not None:
        out += ["Secondary test metrics (mean ± std over the seeds):", "", tables.secondary.markdown(), ""]
    if tables.postprocess is not None:
        out += ["Post-processing chosen on validation (`eval.postprocess`; *min px*: objects under it removed, "
                "*filled*: holes filled, *c*: the contour threshold of a contour model, whose glands are post-processed) "
                "and its effect on the test, paired within each run (its own masks before "
                "and after; the table's numbers are after):", "", tables.postprocess.markdown(), ""]
    out += _tuned_block(meta, runs, fig_dir)
    out += _curves(meta, runs, fig_dir, task)
    if best:
        best_run = min((r for r in runs if r.variant == best), key=lambda r: task.metrics[0].rank(r.result.val_best))
        for caption, png in _figures(best_run, store, fig_dir / group_file_prefix(meta.group), task, fig_dir.parent):
            out += [caption, "", f"![{caption}]({_rel(png, fig_dir.parent)})", ""]
    return "\n".join(out).rstrip() + "\n"


def _reading(store: RunStore, group: str) -> list[str]:
    """A person's reading of the table (``runs/<group>/reading.md``, committed with the records), kept verbatim:
    which claims hold, which rungs do not help.  The table is rebuilt by code; its interpretation is not."""
    path = store.root / group / "reading.md"
    return [path.read_text().strip(), ""] if path.exists() else []


def _cost_legend(costs: dict[str, Any]) -> str:
    gpu = f"; *CUDA ms*: the CUDA execution provider on {costs['gpu']}" if costs.get("gpu") else ""
    tta = [v for v, r in costs["rungs"].items() if r.get("tta")]
    ensembles = [f"{v}: {r['members']}" for v, r in costs["rungs"].items() if r.get("members")]
    notes = ([f"the TTA graphs of {', '.join(tta)} run the network 8 times and count it"] if tta else []) + (
        [f"a seed ensemble's graph holds all its members and counts them ({', '.join(ensembles)})"] if ensembles else [])
    return (f"Deployment cost: the best seed (by validation) of each rung exported to ONNX, checked against PyTorch "
            f"on the whole test set, and timed together: *{flops_unit(costs)[0]}* per image of the exported graph"
            + (f" ({'; '.join(notes)})" if notes else "")
            + f", *ORT ms* the p50 of batch-1 calls on {costs['engine']} (CPU provider, "
            f"{costs['threads']} thread, fp32) on {costs['cpu']}"
            + ("; *INT8 ms* the same for its static INT8 copy" if any("cpu/int8" in r.get("latency", {})
                                                                     for r in costs["rungs"].values()) else "")
            + f"{gpu}; load average {costs['load_avg_1m']} during the timings. "
            f"Exact parameter counts and FLOPs: `runs/{costs['group']}/costs.json`.")


def _tradeoff(meta: GroupRecord, runs: list[StoredRun], costs: dict[str, Any], fig_dir: Path,
              metric: Metric) -> list[str]:
    """The trade-off figure (test metric against batch-1 latency, Pareto front) and the front in words."""
    current = current_costs(costs, runs)
    points = []
    for v in meta.variants:
        lat = current.get(v.name, {}).get("latency", {}).get("cpu/fp32")
        if lat is None:
            continue
        m, sd, _ = mean_ci([r.result.test[metric.key] for r in runs if r.variant == v.name])
        points.append((v.name, lat["p50_ms"], m, sd))
    if len(points) < 2:
        return []
    front = pareto_front([(p[1], p[2]) for p in points], metric.higher_is_better, LATENCY_TOLERANCE)
    png = fig_dir / f"{group_file_prefix(meta.group)}-tradeoff.png"
    plot_tradeoff(points, front, png, metric, f"ONNX Runtime batch-1 p50 latency (ms, log scale; {costs['cpu']})",
                  f"{meta.group}: {metric.label} against latency, Pareto front in red")
    names = ", ".join(f"{points[i][0]} ({points[i][1]:.3f} ms, {metric.text(points[i][2])})" for i in front)
    return [f"![trade-off of {meta.group}]({_rel(png, fig_dir.parent)})", "",
            f"Pareto front (no other rung is better on test at no more latency; latencies within "
            f"{LATENCY_TOLERANCE:.0%} count as equal, the timing noise of one network): {names}.", ""]


def _details(meta: GroupRecord) -> list[str]:
    """Every rung's full change (note and every key it sets), collapsed under the table."""
    lines = [f"- **{v.name}**" + (f" (from {v.parent})" if v.ablation else "") + f": {v.change}"
             for v in meta.variants]
    return ["<details><summary>What each rung changes, in full</summary>", "", *lines, "", "</details>", ""]


def _tuned_block(meta: GroupRecord, runs: list[StoredRun], fig_dir: Path) -> list[str]:
    """Where the `tuned` rung came from: its Optuna study's size, pruned and failed trials, wall time, figures."""
    study = meta.tuned
    if not study or not any(r.variant == "tuned" for r in runs):
        return []
    minutes = f"{study['wall_time_s'] / 60:.1f} min" if study.get("wall_time_s") is not None else "unknown time"
    failures = study.get("failures") or {}
    why = f" ({'; '.join(f'{n}x {r}' for r, n in failures.items())})" if failures else ""
    requeued = f", {study['requeued']} requeued after an interruption" if study.get("requeued") else ""
    trials = f"; every trial: `{study['trials_csv']}` beside the spec" if study.get("trials_csv") else ""
    out = [f"*tuned*: the best trial ({study['best_trial']}, {study['metric']} {study['value']:.4f} on seed "
           f"{study['seed']}) of the Optuna study `{study['name']}` (profile `{study.get('profile') or 'full'}`): "
           f"{study['finished']} finished trials, {study['pruned']} of them pruned, {study['failed']} failed{why}"
           f"{requeued}; the search took {minutes} on {study['workers']} worker(s) at once on {study['hosts']} "
           f"machine(s), commit {_short_commit(study.get('commit') or '')}{trials}. Trials are scored on the "
           f"validation split only; the test split is read when the tuned rung is trained like the others, on every "
           f"seed.", ""]
    for name in study.get("figures", []):
        png = fig_dir.parent / name
        if png.exists():
            out += [f"![{Path(name).stem}]({_rel(png, fig_dir.parent)})", ""]
    return out


def _missing_line(meta: GroupRecord, runs: list[StoredRun]) -> list[str]:
    """``- **incomplete**: n of m runs finished; missing ...`` when the group's scope is not all here."""
    seeds = meta.seeds or []
    have = {(r.variant, r.seed) for r in runs}
    missing = {v.name: [s for s in seeds if (v.name, s) not in have] for v in meta.variants}
    missing = {k: m for k, m in missing.items() if m}
    if not missing:
        return []
    n_all = len(seeds) * len(meta.variants)
    return [f"- **incomplete**: {n_all - sum(map(len, missing.values()))} of {n_all} runs finished; missing "
            + "; ".join(f"{k} seed {', '.join(map(str, m))}" for k, m in missing.items())]


def _curves(meta: GroupRecord, runs: list[StoredRun], fig_dir: Path, task: Task) -> list[str]:
    curves: dict[str, list[pd.DataFrame]] = {}
    for r in runs:
        if (r.dir / "metrics.csv").exists():
            curves.setdefault(r.variant, []).append(pd.read_csv(r.dir / "metrics.csv"))
    if not curves:
        return []
    png = fig_dir / f"{group_file_prefix(meta.group)}-curves.png"
    plot_spec_curves(curves, png, task.metrics[0])
    return [f"![learning curves of {meta.group}]({_rel(png, fig_dir.parent)})", ""]


def _figures(run: StoredRun, store: RunStore, out_prefix: Path, task: Task, base: Path) -> list[tuple[str, Path]]:
    """The task's figures of the best run, rebuilt from its best.pt and its data.  Checkpoints are not in git, so
    the figures drawn last (``runs/<group>/figures.json``, in git) stand in while they show this same run; without
    either, none (with a note)."""
    def load() -> tuple[Any, Any, Any]:
        loaded = store.load(run)
        return loaded.model, loaded.config, task.load(loaded.config, torch.device("cpu"))  # its own data root

    drawn = store.root / run.group / FIGURES_FILE
    ident = f"{run.variant}/{run.seed}/{run.key}"
    if not (run.dir / "best.pt").exists() and drawn.exists():
        old = files.read_json(drawn)
        figs = [(caption, base / rel) for caption, rel in old["figures"]]
        if old["run"] == ident and all(png.exists() for _, png in figs):
            return figs
    try:
        figs = list(task.summary_figures(load, out_prefix, f"{run.dir.parent.name}, {run.dir.name}"))
    except (OSError, ValueError, KeyError) as e:
        print(f"note: no figures for {run.dir}: {e}", file=sys.stderr)
        return []
    files.write_json(drawn, {"run": ident, "figures": [[caption, _rel(png, base)] for caption, png in figs]})
    return figs


def _rel(path: Path, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()
