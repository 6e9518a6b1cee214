"""Seed replicates: one sweep's numbers are one run of one seed each, so a difference between two
defenses cannot be told from noise. With ``replicates: N`` in the spec, once the search is done,
each tuned defense's pick (the export rule's, per attack, as the report shows it) and each
baseline's run are re-run N - 1 times on the same attacked model with other seeds of the
defense and of the evaluation (``defense_seed`` and ``evaluation.seed`` + k, k = 1..N-1); the
searched run is seed 0 of the N. The replicates are MLflow runs beside the searched one
(``role = replicate``, ``of_run``: the searched run), so ``bibau report`` gives mean ± std (n)
and says which cells differ beyond their spread. A resumed sweep runs only the missing ones.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

from .pareto import TrialRecord
from .results import AttackView, attack_view
from .rules import parse_rule


def targets(views: Sequence[AttackView]) -> list[TrialRecord]:
    """What is replicated: per attack, each tuned defense's pick and each baseline's newest
    completed run (the rows of the report's tables)."""
    out = []
    for view in views:
        out += [p.record for _, p in sorted(view.picks.items())]
        for defense in sorted({r.defense for r in view.records if not r.tuned}):
            done = [r for r in view.records if r.defense == defense and not r.tuned and r.status == "completed"]
            if done:
                out.append(max(done, key=lambda r: r.order))
    return [r for r in out if r.run_id]


def replicate_config(config: dict, k: int) -> dict:
    """Replicate ``k`` of a trial's resolved config: the defense's and the evaluation's seeds moved
    by ``k``; everything that makes the attacked model (seed, data, model, training) kept."""
    cfg = copy.deepcopy(config)
    cfg["defense_seed"] = int(cfg.get("defense_seed") if cfg.get("defense_seed") is not None else cfg.get("seed", 0)) + k
    evaluation = cfg.setdefault("evaluation", {})
    evaluation["seed"] = int(evaluation.get("seed", 42)) + k
    return cfg


def run_replicates(spec, tracker, records: list[TrialRecord], sweep_dir: Path, backend,
                   log: Callable[[str], None] = print) -> int:
    """Run and log the replicates still missing; returns how many ran."""
    from trainables.ray_adapters import run_trials

    rule = parse_rule(spec.export_rule, spec.metrics)
    state = tracker.state()
    views = [attack_view(a, records, dict(tracker.client.get_run(run).data.metrics), rule, spec.objectives)
             for a, run in state["attack_runs"].items()]
    done = tracker.replicate_runs()
    jobs, of = [], {}
    for rec in targets(views):
        config = rec.config or tracker.load_config(rec.run_id)
        for k in range(1, spec.replicates):
            if k in done.get(rec.run_id, {}):
                continue
            label = f"{rec.run_id}:{k}"
            cfg = replicate_config(config, k)
            jobs.append((label, cfg, str(sweep_dir / "replicates" / f"{rec.trial_id}-r{k}")))
            of[label] = (rec, k, cfg)
    if not jobs:
        return 0
    log(f"replicates: {len(jobs)} run(s), {spec.replicates - 1} more seed(s) of {len(jobs) // max(1, spec.replicates - 1)} "
        "picked configuration(s) and baseline(s)")
    objectives = [{"metric": o.metric, "mode": o.mode, "ref": o.reference} for o in spec.objectives]
    reports = run_trials(jobs, cpus=spec.resources.cpus, gpus=spec.resources.gpus, objectives=objectives,
                         backend=backend, log=log)
    for label, report in reports.items():
        rec, k, cfg = of[label]
        tracker.log_replicate(rec, k, cfg, report)
    return len(jobs)


def spread(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation, n) of finite values; std 0 for one value."""
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def differ(a: tuple[float, float, int], b: tuple[float, float, int]) -> bool:
    """Two cells differ beyond their spread: their means are further apart than the sum of their
    standard deviations (a plain, conservative reading; not a significance test)."""
    return a[2] > 1 and b[2] > 1 and abs(a[0] - b[0]) > a[1] + b[1]
