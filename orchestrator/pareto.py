"""Pareto fronts and hypervolumes over a mix of maximised and minimised objectives.

Pure functions on plain sequences of values: the sweep driver, the MLflow layout and the
export all use them, and they are tested without Ray or MLflow. Every function takes the
objectives' ``modes`` ("max"/"min") and works internally on "smaller is better" copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

Point = Sequence[float]


def _as_min(points: Sequence[Point], modes: Sequence[str]) -> list[tuple[float, ...]]:
    for m in modes:
        if m not in ("max", "min"):
            raise ValueError(f"mode {m!r}: expected 'max' or 'min'")
    out = []
    for p in points:
        if len(p) != len(modes):
            raise ValueError(f"point {tuple(p)} has {len(p)} values for {len(modes)} objectives")
        if not all(math.isfinite(v) for v in p):
            raise ValueError(f"point {tuple(p)} has a non-finite value; failed trials have no place on a front")
        out.append(tuple(-v if m == "max" else v for v, m in zip(p, modes)))
    return out


def dominates(a: Point, b: Point, modes: Sequence[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and strictly better in one."""
    (ma, mb) = _as_min([a, b], modes)
    return all(x <= y for x, y in zip(ma, mb)) and any(x < y for x, y in zip(ma, mb))


def non_dominated_sort(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Front rank of every point (0: non-dominated). Equal points share a rank.

    The O(n^2) sort of NSGA-II (Deb et al. 2002): sweeps count a few hundred trials per attack.
    """
    pts = _as_min(points, modes)
    n = len(pts)
    dominated_by: list[list[int]] = [[] for _ in range(n)]  # j in dominated_by[i]: i dominates j
    counts = [0] * n
    for i in range(n):
        for j in range(i + 1, n):
            a, b = pts[i], pts[j]
            a_le = all(x <= y for x, y in zip(a, b))
            b_le = all(y <= x for x, y in zip(a, b))
            if a_le and not b_le:
                dominated_by[i].append(j)
                counts[j] += 1
            elif b_le and not a_le:
                dominated_by[j].append(i)
                counts[i] += 1
    rank = [-1] * n
    current = [i for i in range(n) if counts[i] == 0]
    level = 0
    while current:
        nxt = []
        for i in current:
            rank[i] = level
            for j in dominated_by[i]:
                counts[j] -= 1
                if counts[j] == 0:
                    nxt.append(j)
        current, level = nxt, level + 1
    return rank


def pareto_mask(points: Sequence[Point], modes: Sequence[str]) -> list[bool]:
    """True for the non-dominated points."""
    return [r == 0 for r in non_dominated_sort(points, modes)]


def pareto_front(points: Sequence[Point], modes: Sequence[str]) -> list[int]:
    """Indices of the non-dominated points, in input order."""
    return [i for i, keep in enumerate(pareto_mask(points, modes)) if keep]


def _hv_min(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Volume dominated by ``points`` (minimisation) and bounded by ``ref``: slicing over the
    first objective, recursing on the rest (HSO; exact, fine for a few hundred points in 2-4 D)."""
    pts = [p for p in points if all(x < r for x, r in zip(p, ref))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    volume = 0.0
    xs = sorted({p[0] for p in pts}) + [ref[0]]
    for k in range(len(xs) - 1):
        # the slab [xs[k], xs[k+1]) is dominated by every point with first value <= xs[k]
        active = [p[1:] for p in pts if p[0] <= xs[k]]
        volume += (xs[k + 1] - xs[k]) * _hv_min(active, ref[1:])
    return volume


def hypervolume(points: Sequence[Point], modes: Sequence[str], ref: Sequence[float]) -> float:
    """Hypervolume of ``points`` relative to the reference (worst acceptable) point ``ref``.

    Points no better than ``ref`` in every objective add nothing; the value never decreases
    when a point is added.
    """
    if len(ref) != len(modes):
        raise ValueError(f"reference point {tuple(ref)} has {len(ref)} values for {len(modes)} objectives")
    if not points:
        return 0.0
    pts = _as_min(points, modes)
    r = tuple(-v if m == "max" else v for v, m in zip(ref, modes))
    front = [pts[i] for i in pareto_front(points, modes)]
    return _hv_min(front, r)


def hypervolume_curve(points: Sequence[Point], modes: Sequence[str], ref: Sequence[float]) -> list[float]:
    """Hypervolume of the first k points, for k = 1..n (the front as it grows with the trials)."""
    return [hypervolume(points[: k + 1], modes, ref) for k in range(len(points))]


# -- fronts over trial records ---------------------------------------------------------------------
@dataclass
class TrialRecord:
    """What the driver knows about one finished trial (from Tune's result or from MLflow)."""

    trial_id: str
    study: str  # "<attack>/<defense>"
    attack: str
    defense: str
    status: str  # completed | gated (stopped after CA/ASR by the sweep's gate) | failed | diverged
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)  # the sampled hyperparameters (empty for a baseline)
    config: dict = field(default_factory=dict)  # the resolved RunConfig mapping
    tuned: bool = True
    order: int = 0  # completion order within the sweep
    run_id: str | None = None  # MLflow run
    error: str | None = None

    def values(self, metrics: Sequence[str]) -> list[float]:
        return [float(self.metrics.get(m, float("nan"))) for m in metrics]

    def usable(self, metrics: Sequence[str]) -> bool:
        """Completed, with a finite value for every objective."""
        return self.status == "completed" and all(math.isfinite(v) for v in self.values(metrics))


def front_of(records: Sequence[TrialRecord], metrics: Sequence[str], modes: Sequence[str]) -> list[TrialRecord]:
    """The non-dominated usable records, in completion order."""
    ok = sorted((r for r in records if r.usable(metrics)), key=lambda r: r.order)
    return [ok[i] for i in pareto_front([r.values(metrics) for r in ok], modes)]


def growth(records: Sequence[TrialRecord], metrics: Sequence[str], modes: Sequence[str],
           ref: Sequence[float]) -> list[tuple[int, float]]:
    """(trials finished, hypervolume) after each finished trial, failed ones included in the count."""
    out, seen = [], []
    for k, r in enumerate(sorted(records, key=lambda r: r.order), start=1):
        if r.usable(metrics):
            seen.append(r.values(metrics))
        out.append((k, hypervolume(seen, modes, ref)))
    return out
