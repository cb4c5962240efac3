"""results/summary.md, rebuilt from the stored runs alone (no training, no spec file needed).

Per group: one row per variant with the test metric's mean +- std over seeds, a 95%
t-interval, the change against the rung it builds on with a paired t-test over the seeds
they share, the report's number, epochs, time and parameters; then a learning-curve
figure.  The best variant is picked by mean *validation* metric, never by test.  The tables are
:mod:`bench.tables`', their statistics :mod:`bench.stats`'; this module writes the files.

``results/summary.md`` publishes the *published* groups only (a spec and profile as
written).  An ad-hoc group (runs with ``--set`` overrides, see ``bench.spec.place_in_group``)
gets its own ``runs/<group>/summary.md`` and never touches the published file.

The records of published groups are in git (bench/records.py), so any clone rebuilds every section from
them; the task's figures, which need checkpoints, are kept in ``runs/<group>/figures.json``.  A section
whose records are not here (made before records were committed) is kept verbatim, and so is a section
that reports runs this folder lacks (a partial re-run here never replaces a fuller table made elsewhere)
unless the group is complete here.  What the writer wrote last time (each section's group, heading, provenance,
runs and text) it keeps in ``results/summary.json`` beside summary.md (:class:`Section`), committed with it; a
section deleted from summary.md by hand is dropped from that memory on the next write, and rebuilt when its runs
are here.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bench import files
from bench.config import ConfigError
from bench.log import count, note
from bench.metrics import Metric
from bench.pareto import pareto_front
from bench.plots import plot_spec_curves, plot_tradeoff
from bench.records import GroupRecord, RunRecord
from bench.spec import group_file_prefix
from bench.stats import CLIPPED, format_duration, mean_ci
from bench.store import RunStore, StoredRun
from bench.tables import DELTA, ENSEMBLE_EPOCHS, GroupTables, current_costs, flops_unit, group_tables, target_column
from bench.tasks import TASKS
from bench.tasks.base import Task

log = logging.getLogger(__name__)

INTRO = (
    "Every number below is read from the stored runs of that spec. Mean ± sample std over the seeds shown; "
    "test 95% CI is the two-sided Student-t interval of the test mean; Δ is the mean paired difference over the seeds "
    "both rungs share, with a paired t-test p-value (with 2-3 seeds the test has little power: read it as a "
    "sanity check, not proof). ★ marks the best variant by mean *validation* metric; the test set chose nothing."
)
FIGURES_FILE = "figures.json"  # per group: the captions of the task's figures, for a rebuild without checkpoints
MEMORY_FILE = "summary.json"  # beside summary.md: the sections the writer wrote there (:class:`Section`)
MEMORY_FORMAT = 1
LATENCY_TOLERANCE = 0.1  # relative: the same network timed twice in one run differs by a few percent
INDEX_HEADERS = ["section", "profile", "machine", "commits of the runs", "table generated"]


@dataclass
class Section:
    """One published group's section of summary.md as the writer remembers it (an entry of summary.json): what the
    index table lists, which runs the section reports, and its Markdown, to keep it when its runs are elsewhere."""

    group: str
    heading: str  # the section's first line, ``## mnist@quick (mnist, spec `...`, profile `quick`)``
    profile: str
    machine: str
    commits: str
    generated: str  # when the section was built
    runs: (
        list[str] | None
    )  # ``variant/seed/key`` of each run it reports; None: not known (a section without its marker)
    text: str

    def index_row(self) -> list[str]:
        return [f"[{self.group}](#{_anchor(self.heading)})", self.profile, self.machine, self.commits, self.generated]


def provenance(runs: list[StoredRun]) -> dict[str, str]:
    rs = [r.result for r in runs]
    devices, torches = (
        "; ".join(sorted({_one_core(r.device_name or "?") + _precisions(r) for r in rs})),
        ", ".join(sorted({r.torch or "?" for r in rs})),
    )
    return {
        "machine": f"{devices}; torch {torches}",
        "commits": ", ".join(sorted({_short_commit(r.commit or "?") for r in rs})),
        "finished": max((r.finished or "" for r in rs), default=""),
    }


def _one_core(name: str) -> str:
    """``CPU: AMD EPYC (1 core, AVX2)``: records written before bench.train.device_name said "1 cores" read right."""
    return name.replace("(1 cores,", "(1 core,")


def _precisions(result: RunRecord) -> str:
    """``, bf16 autocast training, fp32 evaluation``."""
    return f", {result.train_precision} training, {result.eval_precision} evaluation" if result.train_precision else ""


def _short_commit(commit: str) -> str:
    return (
        commit[:12]
        + ("-dirty" if commit.endswith("-dirty") else "")
        + (" (stated)" if commit.endswith("(stated)") else "")
    )


def group_command(meta: GroupRecord) -> str:
    """The command that makes this group's runs, with every override that makes it ad hoc, and the data root and
    results folder that ``bench run`` was given when they are not the defaults (a spec of one's own data needs
    them); from the group's record, so a section rebuilt elsewhere says the same."""
    cmd = f"python -m bench run {shlex.quote(meta.path or '')}" + (f" --profile {meta.profile}" if meta.profile else "")
    if meta.role == "adhoc":
        cmd += "".join(
            f" --set {shlex.quote(f'{k}={files.yaml_scalar(v)}')}" for k, v in (meta.overrides or {}).items()
        )
        cmd += f" --seeds {' '.join(map(str, meta.seeds))} --group {shlex.quote(meta.group)}"
    if meta.extra.get("data_root"):
        cmd += f" --data-root {shlex.quote(meta.extra['data_root'])}"
    if meta.extra.get("results"):
        cmd += f" --results {shlex.quote(meta.extra['results'])}"
    return cmd


def write_summary(
    results_dir: str | Path = "results",
    command: str | None = None,
    groups: list[str] | None = None,
    refresh_published: bool = False,
) -> list[Path]:
    """Rebuild, from ``results_dir/runs``, the sections of ``results_dir/summary.md`` (published groups)
    and the ad-hoc groups' own summary.md files: all of them, or only those of ``groups`` (a command
    that trained one group rewrites that group's table and no other's).  Returns the files that changed."""
    store = RunStore(results_dir)
    command = command or "python -m " + " ".join(["bench", *sys.argv[1:]])
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}` at code commit {files.git_commit()}"
    only = None if groups is None else set(groups)
    # results/summary.md is rewritten for published groups (or when asked, for its links) only: an experiment
    # never touches it.
    written: list[Path | None] = []
    if only is None or only & set(store.groups("published")) or refresh_published:
        written += _write_published(store, stamp, only)
    for group in store.groups("adhoc"):
        if only is None or group in only:
            written.append(_write_adhoc(store, group, stamp))
    return [p for p in written if p is not None]


def _write_published(store: RunStore, stamp: str, only: set[str] | None) -> list[Path | None]:
    """summary.md and its memory, summary.json: the published groups' sections rebuilt, or kept from the memory."""
    path, memory_path = store.results / "summary.md", store.results / MEMORY_FILE
    sections = read_memory(path, memory_path)  # kept for groups whose runs are elsewhere
    for group in store.groups("published"):
        if only is not None and group not in only:
            continue
        meta, runs = store.read_group(group), store.finished(group)
        if not runs:
            continue
        old = sections[group].runs if group in sections else None
        complete = meta.runs is not None and len(runs) == len(meta.runs)
        if group in sections and not complete and (old is None or not set(old) <= _run_ids(runs)):
            note(
                log,
                "kept the %s section of %s: it reports runs this results folder does not hold (%d of %d runs "
                "here); copy their run folders here, finish the group, or delete the section to rebuild it",
                group,
                path,
                len(runs),
                len(meta.runs or []),
            )
            continue
        text = group_section(meta, runs, store, store.results / "figures", stamp)
        if group in sections and _unstamped(sections[group].text) == _unstamped(text):
            continue  # the same table: it keeps the stamp of the write that made it, and the file stays as it is
        sections[group] = _section(meta, runs, text, stamp)
    ordered = [sections[g] for g in sorted(sections)]
    index = [files.markdown_table(INDEX_HEADERS, [s.index_row() for s in ordered]), ""] if ordered else []
    out = ["# Results", "", INTRO, "", *index, *(s.text for s in ordered)]
    deployment = store.results / "deployment.md"
    if deployment.exists():
        out += [deployment.read_text().strip(), ""]
    if (store.results / "perf.md").exists():
        out += [
            "## Speed",
            "",
            "Time to the report's numbers, throughput and the speed choices against a textbook loop "
            "of the report's recipe, measured by `python -m bench perf`: [perf.md](perf.md) (raw: `perf.csv`).",
            "",
        ]
    wrote_md = files.write_text_if_changed(path, "\n".join(out))
    memory = {
        "format": MEMORY_FORMAT,
        "about": f"what `bench summary` wrote to {path.name}, read by its next write",
        "sections": [asdict(s) for s in ordered],
    }
    wrote_memory = files.write_text_if_changed(memory_path, json.dumps(memory, indent=1, ensure_ascii=False) + "\n")
    return [path if wrote_md else None, memory_path if wrote_memory else None]


def _unstamped(text: str) -> str:
    """A section's Markdown without its ``- table generated:`` line: what a rebuild compares, so that rebuilding
    unchanged runs (a fresh clone's `bench summary`) changes no file."""
    return re.sub(r"^- table generated: .*$", "", text, flags=re.MULTILINE)


def _section(meta: GroupRecord, runs: list[StoredRun], text: str, stamp: str) -> Section:
    """The memory of a section just built from ``runs``."""
    prov = provenance(runs)
    return Section(
        meta.group,
        _heading(meta),
        meta.profile or "full",
        prov["machine"],
        prov["commits"],
        stamp.split(" by ")[0],
        sorted(_run_ids(runs)),
        text,
    )


def read_memory(path: Path, memory_path: Path) -> dict[str, Section]:
    """The sections the last write put in summary.md (``path``), by group, from its memory (``memory_path``); a
    section no longer in summary.md (deleted by hand, or summary.md gone) is forgotten.  Without a memory (a
    summary.md written before it existed) the sections are read once from summary.md itself."""
    text = path.read_text() if path.exists() else ""
    if not memory_path.exists():
        return _sections_of_markdown(path) if text else {}
    memory = files.read_json(memory_path)
    if memory.get("format") != MEMORY_FORMAT:
        raise ConfigError(
            f"{memory_path}: format {memory.get('format')!r}, this code reads format {MEMORY_FORMAT}; "
            f"update the code, or delete it to have summary.md's sections read from the file"
        )
    sections = {s["group"]: Section(**s) for s in memory["sections"]}
    for group in [g for g, s in sections.items() if s.text not in text]:
        log.debug("%s: the %s section is no longer in %s: forgotten", memory_path, group, path)
        del sections[group]
    return sections


def _heading(meta: GroupRecord) -> str:
    return f"## {meta.group} ({meta.task}, spec `{meta.path}`, profile `{meta.profile or 'full'}`)"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a ``## heading`` line."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _run_ids(runs: list[StoredRun]) -> set[str]:
    return {f"{r.variant}/{r.seed}/{r.key}" for r in runs}


def _run_marker(runs: list[StoredRun]) -> str:
    """The line of a section that names its runs (read only by :func:`_sections_of_markdown`, for an old summary.md)."""
    return f"<!-- bench: runs {' '.join(sorted(_run_ids(runs)))} -->"


# The migration from a summary.md without summary.json (written before the memory existed, as committed until then):
# its sections are read back from their headings, marker and provenance lines, once; the next write adds the memory.
_MARKER = re.compile(r"<!-- bench: runs (.*?) -->")


def _sections_of_markdown(path: Path) -> dict[str, Section]:
    """The group sections of an old summary.md, as :class:`Section` entries read from their own lines."""

    def line(text: str, key: str) -> str:
        m = re.search(rf"^- {key}: (.*)$", text, re.M)
        return m.group(1) if m else "–"

    log.debug("%s has no %s beside it: its sections are read from the file itself", path, MEMORY_FILE)
    sections = {}
    for group, text in files.read_markdown_sections(path, 2, _group_of_heading).items():
        head = text.splitlines()[0]
        profile, marker = re.search(r"profile `([^`]*)`", head), _MARKER.search(text)
        sections[group] = Section(
            group,
            head,
            profile.group(1) if profile else "–",
            line(text, "machine"),
            line(text, "commits of the runs").split(";")[0],
            line(text, "table generated").split(" by ")[0],
            sorted(marker.group(1).split()) if marker else None,
            text,
        )
    return sections


def _group_of_heading(heading: str) -> str | None:
    """``mnist@quick`` for a group heading ``mnist@quick (mnist, spec `...`, ...)``, else None."""
    head = heading.split(" (", 1)
    return head[0] if len(head) == 2 and ", spec `" in head[1] else None


def _write_adhoc(store: RunStore, group: str, stamp: str) -> Path | None:
    meta, runs = store.read_group(group), store.finished(group)
    path = store.root / group / "summary.md"
    intro = (
        f"Ad-hoc group: runs of `{meta.path}` with overrides, kept apart from the published table "
        f"`{meta.published_group}` in results/summary.md."
    )
    body = (
        group_section(meta, runs, store, store.root / group / "figures", stamp) if runs else "No finished runs yet.\n"
    )
    return (
        path if files.write_text_if_changed(path, "\n".join([f"# {group}", "", intro, "", INTRO, "", body])) else None
    )


def _compute_line(runs: list[StoredRun]) -> str:
    """What the runs cost the machine that made them: their training and test seconds, summed over the runs (a grid
    of several workers takes less wall time than the sum).  Seed ensembles, and runs evaluated from another run's
    weights (``trained_by``, bench/derived.py), train nothing of their own: only their evaluation counts."""
    trained = [r for r in runs if not r.result.extra.get("members") and not r.result.extra.get("trained_by")]
    train = sum(r.result.train_time_s or 0.0 for r in trained)
    test = sum(r.result.test_time_s or 0.0 for r in runs)
    return (
        f"- compute: {format_duration(train)} of training over {count(len(trained), 'trained run')} "
        f"and {format_duration(test)} of testing, "
        f"summed over the runs"
    )


def group_section(meta: GroupRecord, runs: list[StoredRun], store: RunStore, fig_dir: Path, stamp: str) -> str:
    """Markdown for one group: provenance, table, learning curves, the task's figures."""
    task = TASKS[meta.task]
    primary = task.metrics[0]
    costs = store.read_costs(meta.group)
    tables = group_tables(meta, runs, costs)
    out = [_heading(meta), ""]
    out += _provenance(meta, runs, store, tables, costs, stamp)
    out += ["", _run_marker(runs), ""]
    if meta.description:
        out += [meta.description, ""]
    out += [tables.main.markdown(), ""]
    out += _main_legend(meta, tables, primary)
    out += _cost_lines(meta, runs, tables, costs, fig_dir, primary)
    out += _reading(store, meta.group)
    out += _details(meta)
    out += ["Training and statistics of each rung:", "", tables.training.markdown(), ""]
    out += _training_notes(meta, runs, tables, primary)
    out += _secondary_tables(tables)
    out += _tuned_block(meta, runs, fig_dir)
    out += _curves(meta, runs, fig_dir, task)
    out += _best_run_figures(meta, tables.best, runs, store, fig_dir, task)
    return "\n".join(out).rstrip() + "\n"


def _provenance(
    meta: GroupRecord,
    runs: list[StoredRun],
    store: RunStore,
    tables: GroupTables,
    costs: dict[str, Any] | None,
    stamp: str,
) -> list[str]:
    """The group's bullet list: its command, machine, commits, compute, when the table and the costs were made, an
    ad-hoc group's overrides, the runs missing and those that failed."""
    prov = provenance(runs)
    out = [
        f"- command: `{group_command(meta)}`",
        f"- machine: {prov['machine']}",
        f"- commits of the runs: {prov['commits']}; last run finished {prov['finished']}",
        _compute_line(runs),
        f"- table generated: {stamp}",
    ]
    if tables.costs_shown and costs:
        out.append(
            f"- deployment cost: `{costs.get('command') or 'python -m exporters.onnx rungs'}` at commit "
            f"{_short_commit(str(costs.get('commit', '?')))}, {costs['measured'][:16]}"
            + "".join(
                f"; `{t['command']}` at commit {_short_commit(str(t['commit']))}, {t['measured'][:16]}"
                for t in {
                    r["timed_apart"]["measured"]: r["timed_apart"]
                    for r in costs["rungs"].values()
                    if r.get("timed_apart")
                }.values()
            )
        )
    if meta.role == "adhoc":
        out.append(
            "- overrides: "
            + (", ".join(f"`{k}={files.yaml_scalar(v)}`" for k, v in meta.overrides.items()) or "none")
            + f"; seeds {', '.join(map(str, meta.seeds))}"
        )
    out += _missing_line(meta, runs)
    out += [
        f"- **failed**: {r.variant} seed {r.seed}: {(r.error or '').splitlines()[0][:300]}"
        for r in store.failed(meta.group)
    ]
    return out


def _main_legend(meta: GroupRecord, tables: GroupTables, primary: Metric) -> list[str]:
    """What the main table's columns mean: the mean and std, the paired change against which rung, the star."""
    named = [
        f"{v.name}: {v.parent}"
        for i, v in enumerate(meta.variants)
        if v.parent and (i == 0 or meta.variants[i - 1].name != v.parent)
    ]
    return [
        f"*{primary.header}*: mean ± sample std over the *n* seeds. *{DELTA}*: the mean paired change against the "
        "rung it builds on, the row above"
        + (f" unless named here ({'; '.join(named)})" if named else "")
        + ", and the paired t-test's p. ★: the best mean validation metric (the test set chose nothing)."
        + (" *report*: the report's number." if "report" in tables.main.headers else ""),
        "",
    ]


def _cost_lines(
    meta: GroupRecord,
    runs: list[StoredRun],
    tables: GroupTables,
    costs: dict[str, Any] | None,
    fig_dir: Path,
    primary: Metric,
) -> list[str]:
    """The deployment costs' legend and trade-off, or (a published group without them) the command that adds them."""
    if tables.costs_shown and costs:
        return [
            _cost_legend(costs) + _retrained_note(costs, runs, primary) + _unmeasured_note(costs, runs),
            "",
            *_tradeoff(meta, runs, costs, fig_dir, primary),
        ]
    if runs and meta.role == "published":
        return [
            f"Deployment cost per rung: `python -m exporters.onnx rungs {meta.path}"
            + (f" --profile {meta.profile}`" if meta.profile else "`")
            + " adds it to this table.",
            "",
        ]
    return []


def _training_notes(meta: GroupRecord, runs: list[StoredRun], tables: GroupTables, primary: Metric) -> list[str]:
    """Under the training table: a clipped interval's mark, the time-to-target column of a spec with a target, and
    what a seed ensemble's epochs and seconds are."""
    out = []
    if tables.clipped:
        out += [
            f"{CLIPPED} The t-interval reaches outside the metric's range and is shown cut to "
            f"[{primary.text(primary.low)}, {primary.text(primary.high)}] (few seeds make it wide).",
            "",
        ]
    if meta.target is not None:
        out += [
            f"*{target_column(meta.target, primary)}*: the first epoch whose validation metric reached "
            f"{primary.text(meta.target, unit=True)} (the report's best number, "
            "the spec's `target`) and the seconds of training steps until its end (evaluation not counted), "
            "mean over the seeds that reached it. Runs trained side by side (workers) shared the machine.",
            "",
        ]
    if any(cell.endswith(ENSEMBLE_EPOCHS) for row in tables.training.rows for cell in row):
        out += [
            "A seed ensemble trains nothing: its *epochs* and *train s* are its members' summed (what it cost to "
            "make), and it has no best epoch of its own "
            f"(*{ENSEMBLE_EPOCHS}*).",
            "",
        ]
    if derived := [
        f"{r.variant} seed {r.seed} from {r.result.extra['trained_by']}"
        for r in runs
        if r.result.extra.get("trained_by")
    ]:
        out += [
            "Evaluated from another run's weights, not trained (their configs differ only after training; their "
            f"training columns are that run's): {', '.join(derived)}.",
            "",
        ]
    return out


def _secondary_tables(tables: GroupTables) -> list[str]:
    """The secondary test metrics and the post-processing's effect, where the group has them."""
    out = []
    if tables.secondary is not None:
        out += ["Secondary test metrics (mean ± std over the seeds):", "", tables.secondary.markdown(), ""]
    if tables.postprocess is not None:
        out += [
            "Post-processing chosen on validation (`eval.postprocess`; *min px*: objects under it removed, "
            "*filled*: holes filled, *c*: the contour threshold of a contour model, whose glands are post-processed) "
            "and its effect on the test, paired within each run (its own masks before "
            "and after; the table's numbers are after):",
            "",
            tables.postprocess.markdown(),
            "",
        ]
    return out


def _best_run_figures(
    meta: GroupRecord, best: str | None, runs: list[StoredRun], store: RunStore, fig_dir: Path, task: Task
) -> list[str]:
    """The task's figures of the best rung's best seed (by the validation metric)."""
    if not best:
        return []
    best_run = min((r for r in runs if r.variant == best), key=lambda r: task.metrics[0].rank(r.result.val_best))
    out = []
    for caption, png in _figures(best_run, store, fig_dir / group_file_prefix(meta.group), task, fig_dir.parent):
        out += [caption, "", f"![{caption}]({_rel(png, fig_dir.parent)})", ""]
    return out


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
        [f"a seed ensemble's graph holds all its members and counts them ({', '.join(ensembles)})"] if ensembles else []
    )
    return (
        f"Deployment cost: the best seed (by validation) of each rung exported to ONNX, checked against PyTorch "
        f"on the whole test set, and timed together: *{flops_unit(costs)[0]}* per image of the exported graph"
        + (f" ({'; '.join(notes)})" if notes else "")
        + f", *ORT ms* the p50 of batch-1 calls on {costs['engine']} (CPU provider, "
        f"{costs['threads']} thread, fp32) on {costs['cpu']}"
        + (
            "; *INT8 ms* the same for its static INT8 copy"
            if any("cpu/int8" in r.get("latency", {}) for r in costs["rungs"].values())
            else ""
        )
        + f"{gpu}; load average {costs['load_avg_1m']} during the timings. "
        + _apart_note(costs)
        + _no_weights_note(costs)
        + f"Exact parameter counts and FLOPs: `runs/{costs['group']}/costs.json`."
    )


def _retrained_note(costs: dict[str, Any], runs: list[StoredRun], metric: Metric) -> str:
    """Which rungs' costs were measured on their best seed trained again from its record (``--retrain``: the
    measuring machine had no best.pt; exporters.checkpoints), and that copy's test metric against the published run's:
    the same on the machine and precision that made the record, another draw elsewhere."""
    again = {v: r for v, r in costs["rungs"].items() if str(r.get("run", "")).startswith("retrained/")}
    if not again:
        return ""
    published = {(r.variant, r.seed): r.result.test.get(metric.key) for r in runs}
    same, other = [], []
    for v, r in again.items():
        old, new = published.get((v, r["seed"])), r.get("metric_torch")
        if old == new:
            same.append(v)
        else:
            other.append(f"{v} ({metric.text(new, unit=True)} against {metric.text(old, unit=True)})")
    parts = ([f"identical to the published run for {', '.join(same)}"] if same else []) + (
        [f"another draw for {', '.join(other)} (the copy's {metric.label} against the published seed's)"]
        if other
        else []
    )
    why = (
        " A record made on another CPU kind, precision or thread count trains other weights; the cost columns do not "
        "depend on them."
        if other
        else ""
    )
    return (
        f" The weights timed were trained again from the records (checkpoints are not in git): {'; '.join(parts)}.{why}"
    )


def _apart_note(costs: dict[str, Any]) -> str:
    """Which rows were timed later than the rest (``rungs --variants``: exporters.rungs.merge_costs), when and under
    which load: the same machine kind and engine, but not the same minutes."""
    apart: dict[tuple[str, str], list[str]] = {}
    for v, r in costs["rungs"].items():
        if t := r.get("timed_apart"):
            apart.setdefault((t["measured"][:16], t["load_avg_1m"]), []).append(v)
    parts = [f"{', '.join(vs)} on {when} (load average {load})" for (when, load), vs in apart.items()]
    return (
        f"Timed apart from the rest, on the same CPU kind and engine: {'; '.join(parts)}; "
        f"compare its milliseconds with theirs less closely than theirs with each other. "
        if parts
        else ""
    )


def _unmeasured_note(costs: dict[str, Any], runs: list[StoredRun]) -> str:
    """Which rungs with finished runs have no current row in costs.json (added to the spec, or trained again with
    another config, after the timing; their cells are "–"), and the command that times them alone."""
    current, missing = current_costs(costs, runs), costs.get("no_weights") or {}
    left = [v for v in dict.fromkeys(r.variant for r in runs) if v not in current and v not in missing]
    if not left:
        return ""
    profile = f" --profile {costs['profile']}" if costs.get("profile") else ""
    return (
        f" Not timed (their runs are newer than the timing): {', '.join(left)} (–); `python -m exporters.onnx rungs "
        f"{costs.get('spec', 'SPEC')}{profile} --int8 --variants {' '.join(left)}` times them beside the rows above "
        "on the same CPU kind, or without --variants every rung again."
    )


def _no_weights_note(costs: dict[str, Any]) -> str:
    """Which rungs' costs come from another seed than the best, or are missing, because the measuring machine had
    no best.pt of them (a clone holds records, not checkpoints; exporters.rungs)."""
    missing = costs.get("no_weights") or {}
    stand_in = [f"{v} (seed {costs['rungs'][v]['seed']})" for v in missing if v in costs["rungs"]]
    none = [v for v in missing if v not in costs["rungs"]]
    parts = ([f"another seed stands for {', '.join(stand_in)}"] if stand_in else []) + (
        [f"none for {', '.join(none)} (–)"] if none else []
    )
    return f"Without the best seed's best.pt on that machine, {'; '.join(parts)}. " if parts else ""


def _tradeoff(
    meta: GroupRecord, runs: list[StoredRun], costs: dict[str, Any], fig_dir: Path, metric: Metric
) -> list[str]:
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
    plot_tradeoff(
        points,
        front,
        png,
        metric,
        f"ONNX Runtime batch-1 p50 latency (ms, log scale; {costs['cpu']})",
        f"{meta.group}: {metric.label} against latency, Pareto front in red",
    )
    names = ", ".join(f"{points[i][0]} ({points[i][1]:.3f} ms, {metric.text(points[i][2])})" for i in front)
    return [
        f"![trade-off of {meta.group}]({_rel(png, fig_dir.parent)})",
        "",
        f"Pareto front (no other rung is better on test at no more latency; latencies within "
        f"{LATENCY_TOLERANCE:.0%} count as equal, the timing noise of one network): {names}.",
        "",
    ]


def _details(meta: GroupRecord) -> list[str]:
    """Every rung's full change (note and every key it sets), collapsed under the table."""
    lines = [f"- **{v.name}**" + (f" (from {v.parent})" if v.ablation else "") + f": {v.change}" for v in meta.variants]
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
    out = [
        f"*tuned*: the best trial ({study['best_trial']}, {study['metric']} {study['value']:.4f} on seed "
        f"{study['seed']}) of the Optuna study `{study['name']}` (profile `{study.get('profile') or 'full'}`): "
        f"{study['finished']} finished trials, {study['pruned']} of them pruned, {study['failed']} failed{why}"
        f"{requeued}; the search took {minutes} on {count(study['workers'], 'worker')} at once on "
        f"{count(study['hosts'], 'machine')}, commit {_short_commit(study.get('commit') or '')}{trials}. "
        f"Trials are scored on the validation split only; the test split is read when the tuned rung is trained "
        f"like the others, on every seed.",
        "",
    ]
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
    return [
        f"- **incomplete**: {n_all - sum(map(len, missing.values()))} of {n_all} runs finished; missing "
        + "; ".join(f"{k} seed {', '.join(map(str, m))}" for k, m in missing.items())
    ]


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
    if not (run.dir / "best.pt").exists():  # a clone's records: checkpoints stay out of git
        note(
            log,
            "no figures for %s: its best.pt is not here (checkpoints are not in git); train it again to draw them",
            run.dir,
        )
        return []
    try:
        figs = list(task.summary_figures(load, out_prefix, f"{run.dir.parent.name}, {run.dir.name}"))
    except (OSError, ValueError, KeyError) as e:
        note(log, "no figures for %s: %s", run.dir, e)
        return []
    files.write_json(drawn, {"run": ident, "figures": [[caption, _rel(png, base)] for caption, png in figs]})
    return figs


def _rel(path: Path, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()
