"""The statistics of the published tables and how their numbers are written: means with t-intervals over seeds,
paired t-tests between rungs, and the formats of counts, parameter counts, latencies and p-values.

Pure functions of numbers (and of a :class:`~bench.metrics.Metric` for its range and format): no runs, no store.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from bench.metrics import Metric

CLIPPED = "†"  # marks a confidence interval cut at the metric's range


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


def format_mean_sd(values: list[float], metric: Metric) -> str:
    """``98.20 ± 0.20``: the mean and sample std of ``values`` in the metric's format (``± –`` for one value)."""
    m, sd, _ = mean_ci(values)
    return f"{metric.text(m)} ± {metric.text(sd)}"


def format_change(d: float, metric: Metric) -> str:
    """``+0.21``: a difference of the metric, signed, in the metric's scale and digits."""
    return f"{d * metric.scale:+.{metric.digits}f}"


def format_p(p: float) -> str:
    """A p-value with three decimals, ``–`` where the test is undefined (nan)."""
    return "–" if math.isnan(p) else f"{p:.3f}"


def format_count(x: float) -> str:
    """A mean of counts: ``2`` when whole, else one decimal (``41.7``)."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def format_duration(seconds: float) -> str:
    """``3 h 05 min``, ``12 min``, ``40 s``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def format_params(n: int) -> str:
    """``1,234``, ``145k``, ``1.9M``: parameter counts as the table shows them (exact counts: result.json)."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}k" if n >= 1e4 else f"{n:,}"


def ms_decimals(values: list[float]) -> int:
    """One number of decimals for a column of latencies: three significant digits for its smallest value
    (``0.0703`` -> 4, ``2.18`` -> 2, ``38.6`` -> 1), at most 4 and at least 0."""
    low = min((v for v in values if v > 0), default=1.0)
    return max(0, min(4, 2 - int(math.floor(math.log10(low)))))
