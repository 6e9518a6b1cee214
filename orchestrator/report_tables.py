"""The paper's tables from what sweeps recorded: Table 1 (CA / ASR), Table 2 (R-ASR / Q-ASR) and
BEC, as data. Rows are the undefended model, each fixed baseline as it ran, and each tuned
defense at the export rule's pick among its own trials; columns are the attacks (grouped by
sweep when several are combined) and their average. A rate above the failure threshold marks
a failed defense, a CA below the attack's collapse floor (``results.ca_floor``) a collapsed
model; the best value of each column is chosen only among unmarked cells. A new table is a line
in ``TABLES``; how a table is written is ``report_formats.py``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainables.config import ConfigError

from .objectives import Objective
from .replicates import spread
from .results import AttackView, attack_view, ca_floor, gate_of
from .rules import DEFAULT_RULE, Rule, parse_rule
from .spec_sections import tuned_trials
from .tracking_read import open_sweep

FAIL_ASR = 0.2  # default failure threshold: a defense leaving an ASR above 20% did not remove the backdoor
FAIL_METRICS = ("asr", "r_asr", "q_asr")
TABLES = (  # file stem, title, the metrics of a cell
    ("table1_ca_asr", "Table 1: clean accuracy / attack success rate (%)", ("ca", "asr")),
    ("table2_rasr_qasr", "Table 2: ASR after the retuning attack / after query-based reactivation (%)",
     ("r_asr", "q_asr")),
    ("table3_bec", "Backdoor existence coefficient (BEC)", ("bec",)),
)
NAMES = {"ca": "CA", "asr": "ASR", "r_asr": "R-ASR", "q_asr": "Q-ASR", "bec": "BEC"}
UNDEFENDED_ROW = "No defense"


@dataclass
class SweepResults:
    """One sweep read back from MLflow."""

    uri: str
    experiment: str
    sweep_id: str
    parent_run_id: str
    spec: dict
    objectives: list
    rule: Rule
    views: dict[str, AttackView]  # attack -> view, in the spec's order
    rows: list[tuple[str, str]]  # (defense, "baseline" | "tuned"), in the spec's order
    dataset: str
    folder: Path | None = None  # the sweep's folder, when it is on this machine
    group: str = ""  # the column group of a combined report
    replicates: dict = field(default_factory=dict)  # searched run id -> replicate k -> its metrics


@dataclass
class Cell:
    metrics: dict[str, float] = field(default_factory=dict)  # the mean over the seeds when replicated
    run_id: str = ""
    note: str = ""  # "" | fallback (rule not met) | failed | gated | not run
    picked_by: str = ""
    spread: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # metric -> (mean, std, n)


def load_sweep(uri: str, experiment: str, *, sweep_id: str | None = None, fingerprint: str | None = None,
               rule: str | None = None, folder: Path | None = None) -> SweepResults:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        tracker, spec = open_sweep(uri, experiment, sweep_id, fingerprint)
        objectives = [Objective(**o) for o in spec["objectives"]]
        parsed = parse_rule(rule or spec.get("export_rule") or DEFAULT_RULE, [o.metric for o in objectives])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    state = tracker.state()
    records = tracker.records()
    replicates = tracker.replicate_runs()
    views = {}
    for attack, run in state["attack_runs"].items():
        views[attack] = attack_view(attack, records, dict(tracker.client.get_run(run).data.metrics), parsed,
                                    objectives)
        views[attack].run_id = run
        views[attack].spread = {r.run_id: _spread(r.metrics, replicates[r.run_id]) for r in views[attack].records
                                if r.run_id in replicates}
    order = [_label(a) for a in spec.get("attacks") or []]
    views = dict(sorted(views.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    rows = []
    for d in spec.get("defenses") or []:
        rows.append((d.get("label") or d["name"], "tuned" if d.get("space") else "baseline"))
    for r in records:  # replays and anything the spec does not list
        if r.defense and r.defense not in {d for d, _ in rows}:
            rows.append((r.defense, "tuned" if r.tuned else "baseline"))
    rows = [x for x in rows if x[1] == "baseline"] + [x for x in rows if x[1] == "tuned"]  # as the paper: ours last
    dataset = str(((spec.get("base") or {}).get("data") or {}).get("name", "cifar10"))
    return SweepResults(uri, experiment, tracker.sweep_id, state["parent_run_id"], spec, objectives, parsed, views,
                        rows, dataset, folder, replicates=replicates)


def _spread(searched: dict, replicates: dict[int, dict]) -> dict[str, tuple[float, float, int]]:
    """metric -> (mean, std, n) over the searched run and its replicates."""
    runs = [searched, *replicates.values()]
    return {m: spread([r.get(m, math.nan) for r in runs]) for m in NAMES if isinstance(searched.get(m), (int, float))}


def _with_spread(c: Cell, view: AttackView) -> Cell:
    """A cell of a replicated run: its numbers are the means over the seeds."""
    got = view.spread.get(c.run_id)
    if got:
        c.spread = {m: v for m, v in got.items() if v[2] > 0}
        c.metrics = {**c.metrics, **{m: v[0] for m, v in c.spread.items()}}
    return c


def tuning_line(spec: dict) -> str:
    """Which defenses were tuned and with how many trials each, which ran once at fixed settings."""
    trials = tuned_trials(spec)
    fixed = [str(d.get("label") or d["name"]) for d in spec.get("defenses") or [] if not d.get("space")]
    ref = spec.get("equal_budget")
    return ("tuned (trials per attack): " + (", ".join(f"{k} {v}" for k, v in trials.items()) or "none")
            + (f", each with {ref}'s budget" if ref in trials else "")
            + "; fixed settings, one run per attack: " + (", ".join(fixed) or "none"))


def _label(attack: Any) -> str:
    if isinstance(attack, str):
        return attack
    return str(attack.get("label") or attack.get("name"))


def cell(sweep: SweepResults, attack: str, defense: str | None, kind: str) -> Cell:
    """The values of one table cell: the undefended model (``defense`` None), a baseline's run,
    or a tuned defense's pick."""
    view = sweep.views.get(attack)
    if view is None:
        return Cell(note="not run")
    if defense is None:
        return Cell(dict(view.undefended), run_id=view.run_id, picked_by="attack stage")
    if kind == "tuned":
        pick = view.picks.get(defense)
        if pick is None:
            ran = [r for r in view.records if r.defense == defense]
            gated = [r for r in ran if r.status == "gated" or (r.status == "completed" and r.metrics)]
            return Cell(note="gated" if gated else "failed" if ran else "not run")
        r = pick.record
        return _with_spread(Cell(_numbers(r.metrics), r.run_id or "", "" if pick.rule_met else "fallback", pick.how),
                            view)
    ran = sorted((r for r in view.records if r.defense == defense), key=lambda r: r.order)
    done = [r for r in ran if _numbers(r.metrics).get("ca") is not None and r.status in ("completed", "gated")]
    if not done:
        return Cell(note="failed" if ran else "not run", run_id=(ran[-1].run_id or "") if ran else "")
    r = done[-1]
    numbers = _numbers(r.metrics)
    return _with_spread(Cell(numbers, r.run_id or "", "gated" if "r_asr" not in numbers and r.status == "gated" else "",
                             "as run"), view)


def _numbers(metrics: dict) -> dict[str, float]:
    return {m: float(metrics[m]) for m in NAMES
            if isinstance(metrics.get(m), (int, float)) and math.isfinite(metrics[m])}


@dataclass
class Table:
    stem: str
    title: str
    metrics: tuple[str, ...]
    columns: list[tuple[str, str]]  # (group, attack)
    rows: list[tuple[str, str]]  # (row label, kind): kind undefended | baseline | tuned
    cells: dict[tuple[str, tuple[str, str]], Cell]  # (row label, column) -> cell
    average: dict[str, dict[str, tuple[float, int]]]  # row -> metric -> (mean, columns averaged)
    best: set[tuple[str, str, str]]  # (row, column key or "avg", metric)
    fail_asr: float
    groups: bool  # several sweeps: show the column groups
    floors: dict[str, float | None] = field(default_factory=dict)  # column key -> the CA collapse floor

    def failed(self, metric: str, v: float | None) -> bool:
        return v is not None and metric in FAIL_METRICS and v > self.fail_asr

    def collapsed(self, label: str, key: str) -> bool:
        """The row's model at column ``key`` (``:avg``: at any column) has a CA below the floor."""
        if key == ":avg":
            return any(self.collapsed(label, col_key(c)) for c in self.columns)
        col = next((c for c in self.columns if col_key(c) == key), None)
        floor = self.floors.get(key)
        ca = self.cells[(label, col)].metrics.get("ca") if col is not None else None
        kind = dict(self.rows).get(label)
        return kind != "undefended" and floor is not None and ca is not None and ca < floor

    def marked(self, label: str, key: str) -> bool:
        """The cell carries a failure mark: a collapsed model, or a shown rate above the threshold."""
        if self.collapsed(label, key):
            return True
        if key == ":avg":
            values = {m: v[0] for m, v in self.average.get(label, {}).items()}
        else:
            col = next(c for c in self.columns if col_key(c) == key)
            values = self.cells[(label, col)].metrics
        return any(self.failed(m, values.get(m)) for m in self.metrics)


def _better(metric: str) -> int:
    return 1 if metric == "ca" else -1


def build_tables(sweeps: Sequence[SweepResults], fail_asr: float = FAIL_ASR) -> list[Table]:
    columns = [(s.group, a) for s in sweeps for a in s.views]
    by_group = {s.group: s for s in sweeps}
    rows: list[tuple[str, str]] = [(UNDEFENDED_ROW, "undefended")]
    for s in sweeps:
        for d, kind in s.rows:
            if (d, kind) not in rows:
                rows.append((d, kind))
    cells = {}
    for label, kind in rows:
        for col in columns:
            s = by_group[col[0]]
            if kind == "undefended":
                cells[(label, col)] = cell(s, col[1], None, kind)
            elif (label, kind) in s.rows:
                cells[(label, col)] = cell(s, col[1], label, kind)
            else:
                cells[(label, col)] = Cell(note="not run")
    tables = []
    for stem, title, metrics in TABLES:
        present = [m for m in metrics if any(m in c.metrics for c in cells.values())]
        if not present:
            continue
        average: dict[str, dict[str, tuple[float, int]]] = {}
        for label, _ in rows:
            for m in present:
                vals = [cells[(label, c)].metrics[m] for c in columns if m in cells[(label, c)].metrics]
                if vals:
                    average.setdefault(label, {})[m] = (sum(vals) / len(vals), len(vals))
        floors = {col_key(c): ca_floor(by_group[c[0]].views[c[1]], gate_of(by_group[c[0]].spec))
                  if c[1] in by_group[c[0]].views else None for c in columns}
        table = Table(stem, title, tuple(present), columns, rows, cells, average, set(), fail_asr, len(sweeps) > 1,
                      floors)
        table.best = _best(table)
        tables.append(table)
    return tables


def _best(t: Table) -> set[tuple[str, str, str]]:
    """Per column and metric, the best defense (the undefended model is the reference, never best),
    among the cells with no failure mark (no collapsed CA, no shown rate above the threshold); CA's
    best also among the defenses that did not fail on that column's ASR. A column where every
    defense failed has no best."""
    best = set()
    defended = [label for label, kind in t.rows if kind != "undefended"]

    def pick(values: dict[str, float], metric: str, ok: set[str], key: str) -> set[str]:
        pool = {k: v for k, v in values.items() if k in ok and not t.marked(k, key)}
        if not pool:
            return set()
        target = max(pool.values()) if _better(metric) > 0 else min(pool.values())
        return {k for k, v in pool.items() if v == target}

    for col in [*t.columns, ("", "avg")]:
        key = f"{col[0]}:{col[1]}"
        for m in t.metrics:
            if col[1] == "avg" and col[0] == "":
                values = {d: t.average[d][m][0] for d in defended if m in t.average.get(d, {})}
                asr = {d: t.average[d].get("asr", (None,))[0] for d in defended if d in t.average}
            else:
                values = {d: t.cells[(d, col)].metrics[m] for d in defended if m in t.cells[(d, col)].metrics}
                asr = {d: t.cells[(d, col)].metrics.get("asr") for d in defended}
            ok = {d for d in values if asr.get(d) is None or asr[d] <= t.fail_asr} if m == "ca" else set(values)
            best |= {(d, key, m) for d in pick(values, m, ok, key)}
    return best


def col_key(col: tuple[str, str]) -> str:
    return f"{col[0]}:{col[1]}"
