"""Resources a sweep asks for against what its Ray cluster has. A local Ray's size is known before
the sweep (``preflight.check_resources`` refuses what it cannot hold); a remote cluster may grow
(an autoscaler), so there the sweep warns when no node can hold a trial, and
:class:`PendingLimit` stops it with the reason when trials wait longer than the spec's
``pending_timeout_s`` while nothing runs, instead of Ray's endless "No available node types can
fulfill resource request".
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from ray import tune


class PendingTooLong(RuntimeError):
    """Trials waited longer than the spec allows for resources while no trial ran."""


def node_fit_warnings(spec, nodes: Iterable[dict[str, Any]]) -> list[str]:
    """One warning per resources section no alive node of ``nodes`` (``ray.nodes()``) can hold."""
    alive = [n.get("Resources") or {} for n in nodes if n.get("Alive", True)]
    out = []
    asks = [("resources", spec.resources)] + ([("attack_resources", spec.attack_resources)]
                                             if spec.attack_resources is not None else [])
    for field, res in asks:
        want = {"CPU": float(res.cpus), "GPU": float(res.gpus)}
        if any(all(float(n.get(k, 0.0)) >= v for k, v in want.items() if v > 0) for n in alive):
            continue
        largest = max(alive, key=lambda n: (float(n.get("GPU", 0.0)), float(n.get("CPU", 0.0))), default={})
        limit = (f"after {spec.pending_timeout_s:g}s of waiting with nothing running the sweep stops"
                 if spec.pending_timeout_s is not None else "pending_timeout_s is None: it would wait forever")
        out.append(f"warning: {field} asks {res.cpus:g} CPU, {res.gpus:g} GPU per task, but no node of the cluster "
                   f"has that now (largest: {float(largest.get('CPU', 0.0)):g} CPU, {float(largest.get('GPU', 0.0)):g} "
                   f"GPU); it runs only if the cluster grows; {limit}")
    return out


class PendingLimit(tune.Callback):
    """Stop the defense stage when trials have waited ``limit_s`` for resources and none runs (with
    trials running, a pending one is only queued behind them)."""

    def __init__(self, limit_s: float, resources, clock=time.monotonic):
        self.limit_s = float(limit_s)
        self.resources = resources
        self.clock = clock
        self.since: float | None = None

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        statuses = {str(t.status) for t in trials}
        if "RUNNING" in statuses or "PENDING" not in statuses:
            self.since = None
            return
        now = self.clock()
        if self.since is None:
            self.since = now
        elif now - self.since > self.limit_s:
            waiting = sum(str(t.status) == "PENDING" for t in trials)
            raise PendingTooLong(
                f"{waiting} trial(s) waited {now - self.since:.0f}s for {self.resources.cpus:g} CPU, "
                f"{self.resources.gpus:g} GPU each while no trial ran (pending_timeout_s {self.limit_s:g}): the "
                "cluster has no node that size; lower resources or grow the cluster, then --resume")
