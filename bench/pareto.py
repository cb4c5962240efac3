"""The Pareto front of a trade-off: which rungs no other rung beats on both cost and quality."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(
    points: Sequence[tuple[float, float]], higher_is_better: bool = True, cost_tolerance: float = 0.0
) -> list[int]:
    """Indices of the points (cost, value) that no other point dominates, ordered by cost.

    A point is dominated when another costs no more and is no worse, and is strictly better in
    one of the two.  Lower cost is better; higher value is better unless ``higher_is_better``
    is False.  ``cost_tolerance``: costs within this relative margin count as equal (timings of
    the same network differ by noise: the better of two such rungs dominates the other; a cost is
    lower only when below ``cost * (1 - tolerance)``).  Equal points are all on the front; NaN
    points are never on it.
    """
    sign = 1.0 if higher_is_better else -1.0
    pts = [(float(c), sign * float(v)) for c, v in points]
    ok = [i for i, (c, v) in enumerate(pts) if c == c and v == v]  # not NaN
    tol = float(cost_tolerance)

    def beats(j: int, i: int) -> bool:
        (cj, vj), (ci, vi) = pts[j], pts[i]
        no_more = cj <= ci * (1 + tol)
        return no_more and vj >= vi and (vj > vi or cj < ci * (1 - tol))

    def dominated(i: int) -> bool:
        return any(beats(j, i) for j in ok if j != i)

    return sorted((i for i in ok if not dominated(i)), key=lambda i: (pts[i][0], -pts[i][1]))
