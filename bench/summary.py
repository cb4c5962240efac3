"""results/summary.md, rebuilt from the stored runs alone (no training, no spec file needed).

Per spec group: one row per variant with the test metric's mean +- std over seeds, a 95%
t-interval, the change against the rung it builds on with a paired t-test over the seeds
they share, the report's number, epochs, time and parameters; then a learning-curve
figure.  The best variant is picked by mean *validation* metric, never by test.

Run folders are not committed, so one results folder rarely holds every spec's runs (the
MNIST table may come from a CPU, the WARWICK one from a GPU session).  A rebuild therefore
rewrites the sections of the groups whose runs are here and keeps, verbatim, the sections of
other groups already in ``summary.md``; delete a section by hand to drop it.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench import files


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the two-sided t confidence interval); nan where n < 2."""
    from scipy import stats

    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, math.nan, math.nan
    sd = float(pd.Series(values).std(ddof=1))
    return m, sd, float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)


def paired_test(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean of a-b over shared seeds, two-sided paired t-test p-value (nan if undefined), n shared."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return math.nan, math.nan, 0
    d = [a[s] - b[s] for s in seeds]
    mean = sum(d) / len(d)
    if len(d) < 2 or len(set(d)) == 1:
        return mean, math.nan, len(d)
    return mean, float(stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue), len(d)


def load_group(group_dir: Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """spec.json and, per variant name, the result.json of its finished seeds."""
    meta = files.read_json(group_dir / "spec.json")
    results: dict[str, list[dict[str, Any]]] = {}
    for v in meta["variants"]:
        rs = []
        for seed_dir in sorted((group_dir / v["dir"]).glob("seed-*")):
            if seed_dir.name.removeprefix("seed-").isdigit() and (seed_dir / "result.json").exists():
                r = files.read_json(seed_dir / "result.json")
                cfg = seed_dir / "config.json"
                # A result from an older config of this run (superseded key) is not this variant's.
                if cfg.exists() and files.read_json(cfg).get("key") == r.get("key"):
                    r["_dir"] = str(seed_dir)
                    rs.append(r)
        results[v["name"]] = rs
    return meta, results


def _fmt(x: float, scale: float, digits: int) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{digits}f}"


def group_table(meta: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> tuple[pd.DataFrame, str | None]:
    from bench.tasks import TASKS

    task = TASKS[meta["task"]]
    scale, digits = (100.0, 2) if task.metric == "acc" else (1.0, 4)
    unit = " (%)" if scale == 100 else ""
    by_seed = {name: {r["seed"]: r["test"][task.metric] for r in rs} for name, rs in results.items()}
    val_means = {name: sum(r["val_best"] for r in rs) / len(rs) for name, rs in results.items() if rs}
    best = max(val_means, key=val_means.get) if val_means else None
    rows = []
    for v in meta["variants"]:
        rs = results[v["name"]]
        row: dict[str, Any] = {"variant": v["name"] + (" ★" if v["name"] == best else ""), "change": v["change"],
                               "seeds": len(rs)}
        if rs:
            vals = [r["test"][task.metric] for r in rs]
            m, sd, hw = mean_ci(vals)
            row[f"{task.metric_label}{unit}"] = f"{_fmt(m, scale, digits)} ± {_fmt(sd, scale, digits)}"
            row["95% CI"] = "–" if math.isnan(hw) else f"[{_fmt(m - hw, scale, digits)}, {_fmt(m + hw, scale, digits)}]"
            if v["parent"]:
                d, p, n = paired_test(by_seed[v["name"]], by_seed.get(v["parent"], {}))
                ref = f"vs {v['parent']}" if v["ablation"] else "vs prev"
                row["Δ (paired)"] = "–" if n == 0 else f"{d * scale:+.{digits}f} {ref}, p={_fmt(p, 1, 3)} (n={n})"
            else:
                row["Δ (paired)"] = ""
            for key in task.report_metrics:
                if key != task.metric:
                    mk, sk, _ = mean_ci([r["test"][key] for r in rs])
                    d = 2 if key in task.lower_is_better else 3  # distances in pixels, scores in [0, 1]
                    row[key] = f"{mk:.{d}f} ± {_fmt(sk, 1, d)}"
            row["val (mean)"] = _fmt(val_means[v["name"]], scale, digits)
        # the report's number exactly as written in the spec (0.66 stays 0.66, 0.982 -> 98.2 %)
        row["reported"] = f"{v['reported'] * scale:.6g}" if v.get("reported") is not None else ""
        if rs:
            ran, best_ep = (sum(r[k] for r in rs) / len(rs) for k in ("epochs_run", "best_epoch"))
            row["epochs (best)"] = f"{ran:.1f} ({best_ep:.1f})"
            row["train time (s)"] = f"{sum(r['train_time_s'] for r in rs) / len(rs):.0f}"
            row["params"] = f"{rs[0]['params']:,}"
        rows.append(row)
    return pd.DataFrame(rows).fillna(""), best


def provenance(results: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    allr = [r for rs in results.values() for r in rs]
    return {
        "devices": ", ".join(sorted({r.get("device_name", "?") for r in allr})),
        "commits": ", ".join(sorted({_short_commit(str(r.get("commit", "?"))) for r in allr})),
        "torch": ", ".join(sorted({r.get("torch", "?") for r in allr})),
        "finished": max((r.get("finished", "") for r in allr), default=""),
    }


def _short_commit(commit: str) -> str:
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "") + (" (stated)" if commit.endswith("(stated)") else "")


def write_summary(results_dir: str | Path = "results", command: str | None = None, groups: list[str] | None = None) -> Path:
    """Rebuild ``results_dir/summary.md`` (and its figures) from ``results_dir/runs``; sections of
    groups with no runs here are kept from the existing file."""
    results_dir = Path(results_dir)
    runs_dir = results_dir / "runs"
    fig_dir = results_dir / "figures"
    command = command or "python -m " + " ".join(["bench", *sys.argv[1:]])
    header = [
        "# Results",
        "",
        "Every number below is read from the stored runs of that spec. Mean ± sample std over the seeds shown; "
        "95% CI is the two-sided Student-t interval of the mean; Δ is the mean paired difference over the seeds "
        "both rungs share, with a paired t-test p-value (with 2-3 seeds the test has little power: read it as a "
        "sanity check, not proof). ★ marks the best variant by mean *validation* metric; the test set chose nothing.",
        "",
    ]
    # kept for groups whose runs are not here; the deployment section is rebuilt, never kept
    sections = files.read_markdown_sections(results_dir / "summary.md", 2, _group_of_heading)
    group_dirs = sorted(p.parent for p in runs_dir.glob("*/spec.json")) if runs_dir.exists() else []
    if groups:
        group_dirs = [g for g in group_dirs if g.name in groups]
    stamp = f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')} by `{command}` at code commit {files.git_commit()}"
    for gdir in group_dirs:
        meta, results = load_group(gdir)
        if any(results.values()):
            sections[meta["group"]] = group_section(meta, results, results_dir, fig_dir, stamp)
    out = header + [text for _, text in sorted(sections.items())]
    extra = results_dir / "deployment.md"
    if extra.exists():
        out += [extra.read_text().strip(), ""]
    path = results_dir / "summary.md"
    files.write_text(path, "\n".join(out))
    return path


def _group_of_heading(heading: str) -> str | None:
    """``mnist@quick`` for a group heading ``mnist@quick (mnist, spec `...`, ...)``, else None."""
    head = heading.split(" (", 1)
    return head[0] if len(head) == 2 and ", spec `" in head[1] else None


def group_section(meta: dict[str, Any], results: dict[str, list[dict[str, Any]]], results_dir: Path, fig_dir: Path,
                  stamp: str) -> str:
    """Markdown for one spec group: provenance, table, learning curves, the task's figures."""
    from bench.plots import plot_spec_curves
    from bench.tasks import TASKS

    task = TASKS[meta["task"]]
    table, best = group_table(meta, results)
    prov = provenance(results)
    out = [
        f"## {meta['group']} ({meta['task']}, spec `{meta['path']}`, profile `{meta['profile'] or 'full'}`)",
        "",
        f"- command: `python -m bench run {meta['path']}" + (f" --profile {meta['profile']}`" if meta["profile"] else "`"),
        f"- machine: {prov['devices']}; torch {prov['torch']}",
        f"- commits of the runs: {prov['commits']}; last run finished {prov['finished']}",
        f"- table generated: {stamp}",
    ]
    seeds = meta.get("seeds") or []
    missing = {v["name"]: sorted(set(seeds) - {r["seed"] for r in results[v["name"]]}) for v in meta["variants"]}
    missing = {k: m for k, m in missing.items() if m}
    if missing:
        n_all = len(seeds) * len(meta["variants"])
        out.append(f"- **incomplete**: {n_all - sum(map(len, missing.values()))} of {n_all} runs finished; missing "
                   + "; ".join(f"{k} seed {', '.join(map(str, m))}" for k, m in missing.items()))
    out.append("")
    if meta.get("description"):
        out += [meta["description"], ""]
    out += [table.to_markdown(index=False, disable_numparse=True), ""]
    curves = {}
    for v in meta["variants"]:
        frames = [pd.read_csv(Path(r["_dir"]) / "metrics.csv") for r in results[v["name"]]
                  if (Path(r["_dir"]) / "metrics.csv").exists()]
        if frames:
            curves[v["name"]] = frames
    if curves:
        png = fig_dir / f"{meta['group'].replace('@', '-')}-curves.png"
        plot_spec_curves(curves, png, task.metric_label)
        out += [f"![learning curves of {meta['group']}]({png.relative_to(results_dir).as_posix()})", ""]
    figures = getattr(task, "summary_figures", None)
    if best and figures is not None:
        best_dir = max(results[best], key=lambda r: r["val_best"])["_dir"]
        for caption, png in figures(Path(best_dir), fig_dir / meta["group"].replace("@", "-")):
            out += [f"{caption}", "", f"![{caption}]({Path(png).relative_to(results_dir).as_posix()})", ""]
    return "\n".join(out).rstrip() + "\n"
