"""``bibau report``: the paper's tables (Table 1: CA / ASR, Table 2: R-ASR / Q-ASR, and BEC) and
a figure grid from what one or more sweeps recorded in MLflow.

Rows are the undefended model, each fixed baseline as it ran, and each tuned defense at the
export rule's pick among its own trials; columns are the attacks (grouped by sweep, e.g. one
per data set, when several are combined) and their average. A rate above the failure
threshold is marked (a failed defense), so is a CA below the attack's collapse floor
(``results.ca_floor``: the gate's, else half way from chance to the undefended model), and a
pick the rule was not met for. The best value of each column is bold, chosen only among the
cells that carry no failure mark: a collapsed model's low ASR is never "best". Rows and columns
use the display names of ``names.py``. Written as Markdown, LaTeX (booktabs) and CSV (one row
per cell, the metrics at full precision, with the MLflow run they come from), plus the grid
(attacks x the objectives after CA) as PNG and PDF, and attached to each sweep's parent run.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from trainables.config import ConfigError

from .export import DEFAULT_RULE, Rule, parse_rule
from .names import display
from .results import AttackView, attack_view, ca_floor, gate_of

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


# -- what the sweeps recorded --------------------------------------------------------------------------


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
    from .spec import Objective
    from .tracking import open_sweep

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
    from .replicates import spread

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
    from .spec import tuned_trials

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


# -- the tables -------------------------------------------------------------------------------------------


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
            return any(self.collapsed(label, _col_key(c)) for c in self.columns)
        col = next((c for c in self.columns if _col_key(c) == key), None)
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
            col = next(c for c in self.columns if _col_key(c) == key)
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
        floors = {_col_key(c): ca_floor(by_group[c[0]].views[c[1]], gate_of(by_group[c[0]].spec))
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


def _col_key(col: tuple[str, str]) -> str:
    return f"{col[0]}:{col[1]}"


def _num(metric: str, v: float) -> str:
    return f"{100 * v:.2f}" if metric != "bec" else f"{v:.3f}"


def _avg_note(t: Table, label: str, metric: str) -> str:
    got = t.average.get(label, {}).get(metric)
    return "" if got is None or got[1] == len(t.columns) else f" ({got[1]}/{len(t.columns)})"


MARKS = {  # mark -> (Markdown, LaTeX)
    "failed": ("†", r"$^{\dagger}$"),
    "collapsed": ("✗", r"$^{\times}$"),
    "fallback": ("‡", r"$^{\ddagger}$"),
}


def _mark(name: str, fmt: str) -> str:
    return MARKS[name][1 if fmt == "tex" else 0]


def _entry(t: Table, label: str, col: tuple[str, str] | None, metric: str, fmt: str) -> str:
    """One metric of a cell, with the marks that qualify that number: best (bold), a rate above the
    threshold (dagger), a CA below the collapse floor (cross)."""
    if col is None:
        got = t.average.get(label, {}).get(metric)
        v, key = (got[0] if got else None), ":avg"
    else:
        v, key = t.cells[(label, col)].metrics.get(metric), _col_key(col)
    if v is None:
        return "--" if fmt == "tex" else "–"
    text = _num(metric, v)
    sp = t.cells[(label, col)].spread.get(metric) if col is not None else None
    if sp and sp[2] > 1:  # mean ± std over the seeds; n after the cell
        text += (r" $\pm$ " if fmt == "tex" else " ± ") + _num(metric, sp[1])
    if (label, key, metric) in t.best:  # never on a marked cell (``_best``)
        text = rf"\textbf{{{text}}}" if fmt == "tex" else f"**{text}**"
    if t.failed(metric, v):
        text += _mark("failed", fmt)
    if metric == "ca" and t.collapsed(label, key):
        text += _mark("collapsed", fmt)
    return text


def _cell_text(t: Table, label: str, col: tuple[str, str] | None, fmt: str) -> str:
    parts = " / ".join(_entry(t, label, col, m, fmt) for m in t.metrics)
    key = ":avg" if col is None else _col_key(col)
    if "ca" not in t.metrics and t.collapsed(label, key):  # no CA number here to carry the mark
        parts += " " + _mark("collapsed", fmt)
    if col is None:
        notes = {_avg_note(t, label, m) for m in t.metrics} - {""}
        return parts + (sorted(notes)[0] if notes else "")
    c = t.cells[(label, col)]
    ns = {v[2] for m, v in c.spread.items() if m in t.metrics}
    if ns and max(ns) > 1:
        parts += f" (n={'/'.join(str(n) for n in sorted(ns))})"
    if c.note == "fallback":
        parts += _mark("fallback", fmt)
    elif c.note and not c.metrics:
        parts = c.note
    elif c.note == "gated" and not any(m in c.metrics for m in t.metrics):
        parts = "gated"
    return parts


def _legend(t: Table, fmt: str) -> str:
    dagger, cross, ddagger = (_mark(m, fmt) for m in ("failed", "collapsed", "fallback"))
    bold = "bold" if fmt == "tex" else "**bold**"
    floors = sorted({round(100 * f, 1) for f in t.floors.values() if f is not None})
    floor_text = (f" ({', '.join(f'{f:g}%' for f in floors)})" if floors else "")
    collapse = (f"{cross}: the model collapsed, its CA below the floor{floor_text}: the gate's, else half way "
                "from chance to the undefended model's CA; its ASR says nothing about the backdoor"
                + ("" if "ca" in t.metrics else " (marked after the cell, whose CA is in Table 1)") + ".")
    return (f"{' / '.join(NAMES[m] for m in t.metrics)}"
            + (" in %" if t.metrics != ("bec",) else "")
            + f". {bold}: best of the column among the defenses with no failure mark (CA: also among those "
              f"whose ASR is at most {100 * t.fail_asr:.0f}%; the undefended model is the reference). {dagger}: "
              f"above {100 * t.fail_asr:.0f}% (the defense failed). {collapse} {ddagger}: no trial met the export "
              "rule; the fallback's pick. Tuned defenses at the export rule's pick, baselines as run. "
              "Avg: mean over the attacks (n/m: over the n of m that have it).")


def _headers(t: Table) -> list[str]:
    return [f"{g}: {display(a)}" if t.groups else display(a) for g, a in t.columns]


def to_markdown(t: Table) -> str:
    head = ["defense", *_headers(t), "Avg"]
    lines = [f"### {t.title}", "", "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for label, _ in t.rows:
        cells = [_cell_text(t, label, col, "md") for col in t.columns] + [_cell_text(t, label, None, "md")]
        lines.append(f"| {display(label)} | " + " | ".join(cells) + " |")
    lines += ["", _legend(t, "md"), ""]
    notes = spread_notes(t)
    if notes:
        lines += ["Seed replicates: mean ± std (n seeds). Two cells differ beyond their spread when their means are "
                  "further apart than the sum of their standard deviations:", "", *notes, ""]
    return "\n".join(lines)


def spread_notes(t: Table) -> list[str]:
    """Per column and metric, each pair of replicated defenses: beyond or within their spread."""
    from .replicates import differ

    out = []
    defended = [label for label, kind in t.rows if kind != "undefended"]
    for col in t.columns:
        for m in t.metrics:
            cells = [(d, t.cells[(d, col)].spread.get(m)) for d in defended]
            cells = [(d, s) for d, s in cells if s and s[2] > 1]
            for i, (a, sa) in enumerate(cells):
                for b, sb in cells[i + 1:]:
                    verdict = "differ beyond their spread" if differ(sa, sb) else "within their spread (not told apart)"
                    out.append(f"- {display(col[1])}, {NAMES[m]}: {display(a)} {_num(m, sa[0])} ± {_num(m, sa[1])} "
                               f"(n={sa[2]}) vs {display(b)} {_num(m, sb[0])} ± {_num(m, sb[1])} (n={sb[2]}): {verdict}")
    return out


_TEX_SPECIAL = re.compile(r"([&%$#_{}])")


def tex_escape(text: str) -> str:
    text = str(text).replace("\\", r"\textbackslash{}").replace("~", r"\textasciitilde{}").replace("^", r"\^{}")
    return _TEX_SPECIAL.sub(r"\\\1", text)


def _caption(title: str) -> str:
    """The title without its "Table N:" (LaTeX's \\caption numbers the table itself)."""
    return re.sub(r"^Table \d+:\s*", "", title)


def to_latex(t: Table) -> str:
    """A booktabs table (needs ``\\usepackage{booktabs}``)."""
    n = len(t.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(_caption(t.title))}. {_legend(t, 'tex').replace('%', chr(92) + '%')}}}",
             rf"\label{{tab:{t.stem}}}",
             r"\begin{tabular}{l" + "c" * (n + 1) + "}", r"\toprule"]
    if t.groups:
        spans, start = [], 0
        groups = [g for g, _ in t.columns]
        while start < n:
            end = start
            while end + 1 < n and groups[end + 1] == groups[start]:
                end += 1
            spans.append((groups[start], start, end))
            start = end + 1
        lines.append(" & " + " & ".join(rf"\multicolumn{{{e - s + 1}}}{{c}}{{{tex_escape(g)}}}" for g, s, e in spans)
                     + r" & \\")
        lines.append("".join(rf"\cmidrule(lr){{{s + 2}-{e + 2}}}" for _, s, e in spans))
    lines.append("Defense & " + " & ".join(tex_escape(display(a)) for _, a in t.columns) + r" & Avg \\")
    lines.append(r"\midrule")
    for i, (label, kind) in enumerate(t.rows):
        row = [tex_escape(display(label))] + [_cell_text(t, label, col, "tex") for col in t.columns] \
            + [_cell_text(t, label, None, "tex")]
        lines.append(" & ".join(row) + r" \\")
        if kind == "undefended":
            lines.append(r"\midrule")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


CSV_FIELDS = ["table", "group", "sweep_id", "attack", "defense", "kind", "run_id", "picked_by", "note",
              "ca", "asr", "r_asr", "q_asr", "bec", "failed", "collapsed", "best", "n_seeds", "ca_std", "asr_std", "r_asr_std",
              "q_asr_std", "bec_std"]


def to_csv(tables: Sequence[Table], sweeps: Sequence[SweepResults]) -> str:
    """One row per table cell, the metrics at full precision (``repr``), plus each row's average."""
    ids = {s.group: s.sweep_id for s in sweeps}
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_FIELDS)
    w.writeheader()
    for t in tables:
        for label, kind in t.rows:
            for col in [*t.columns, None]:
                if col is None:
                    vals = {m: t.average[label][m][0] for m in t.metrics if m in t.average.get(label, {})}
                    c, key, group, attack = Cell(), ":avg", "", "average"
                else:
                    c, key, (group, attack) = t.cells[(label, col)], _col_key(col), col
                    vals = {m: c.metrics[m] for m in t.metrics if m in c.metrics}
                w.writerow({"table": t.stem, "group": group, "sweep_id": ids.get(group, "") if col else "",
                            "attack": attack, "defense": label, "kind": kind, "run_id": c.run_id,
                            "picked_by": c.picked_by, "note": c.note,
                            **{m: repr(v) for m, v in vals.items()},
                            "failed": str(t.marked(label, key)).lower(),
                            "collapsed": str(t.collapsed(label, key)).lower(),
                            "n_seeds": max((v[2] for v in c.spread.values()), default=""),
                            **{f"{m}_std": repr(v[1]) for m, v in c.spread.items() if m in t.metrics},
                            "best": " ".join(m for m in t.metrics if (label, key, m) in t.best)})
    return buf.getvalue()


# -- sources, writing, attaching ----------------------------------------------------------------------------


def resolve_source(source: str, *, tracking_uri: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """A spec file, a sweep folder (or the folder of a spec's sweeps) or an MLflow experiment name ->
    where its sweep lives: uri, experiment, sweep_id / fingerprint, folder."""
    path = Path(source)
    if path.is_file():
        from .spec import load_spec
        from .sweep import spec_fingerprint

        spec, _ = load_spec(str(path), list(overrides))
        return {"uri": tracking_uri or spec.tracking_uri, "experiment": spec.experiment, "sweep_id": None,
                "fingerprint": spec_fingerprint(spec), "folder": None, "storage": spec.storage_path / spec.name}
    if path.is_dir():
        from .sweep import read_state

        states = [path / "state.json"] if (path / "state.json").is_file() else sorted(
            path.glob("*/state.json"), key=lambda p: p.stat().st_mtime)
        states = [s for s in states if read_state(s).get("status") == "finished"] or states
        if not states:
            raise ConfigError(f"{source}: not a sweep folder (no state.json in it or in its subfolders)")
        state = read_state(states[-1])
        missing = [k for k in ("tracking_uri", "experiment", "sweep_id") if not state.get(k)]
        if missing:
            raise ConfigError(f"{states[-1]}: no {missing[0]}; the sweep never reached MLflow")
        return {"uri": tracking_uri or state["tracking_uri"], "experiment": state["experiment"],
                "sweep_id": state["sweep_id"], "fingerprint": None, "folder": states[-1].parent}
    if source.endswith((".yaml", ".yml")) or "/" in source:
        raise ConfigError(f"{source}: no such spec file or sweep folder")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{source}: not a file or folder, so read as an MLflow experiment name; give its "
                          "--tracking-uri (or set MLFLOW_TRACKING_URI)")
    return {"uri": uri, "experiment": source, "sweep_id": None, "fingerprint": None, "folder": None}


def _groups(sweeps: list[SweepResults]) -> None:
    """Column groups: the data set, unless two sweeps share one (then the sweep's name or id)."""
    datasets = [s.dataset for s in sweeps]
    for s in sweeps:
        s.group = s.dataset if datasets.count(s.dataset) == 1 else s.spec.get("name", s.sweep_id)
    names = [s.group for s in sweeps]
    for s in sweeps:
        if names.count(s.group) > 1:
            s.group = s.sweep_id


def grid_rows(sweeps: Sequence[SweepResults]) -> list[tuple]:
    return [(f"{s.group}: {a}" if len(sweeps) > 1 else a, v, s.objectives, s.rule)
            for s in sweeps for a, v in s.views.items()]


def write_report(sweeps: list[SweepResults], out: Path, fail_asr: float = FAIL_ASR) -> list[Path]:
    from .figures import grid_figure, save

    _groups(sweeps)
    tables = build_tables(sweeps, fail_asr)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = [f"# Results: {', '.join(f'{s.sweep_id} ({s.dataset})' for s in sweeps)}", ""]
    for s in sweeps:
        md.append(f"- sweep `{s.sweep_id}`: experiment `{s.experiment}` at `{s.uri}`, parent run `{s.parent_run_id}`, "
                  f"export rule `{s.rule.text}`")
        md.append(f"  - {tuning_line(s.spec)}")
    md.append("")
    for t in tables:
        md.append(to_markdown(t))
        path = out / f"{t.stem}.tex"
        path.write_text(to_latex(t))
        files.append(path)
    gated = sum(1 for s in sweeps for v in s.views.values() for r in v.records
                if r.status in ("completed", "gated") and any(o.metric not in r.metrics for o in s.objectives[1:]))
    if gated:
        md.append(f"{gated} trial(s) stopped before R-ASR/Q-ASR (gated) are in no R-ASR/Q-ASR cell or panel.")
    notes = [w for s in sweeps for v in s.views.values() for w in [_warn(v)] if w]
    md += [*notes, "", "![Pareto fronts](pareto_grid.png)", ""]
    path = out / "tables.md"
    path.write_text("\n".join(md))
    files.insert(0, path)
    path = out / "tables.csv"
    path.write_text(to_csv(tables, sweeps))
    files.append(path)
    files += save(grid_figure(grid_rows(sweeps)), out / "pareto_grid")
    return files


def _warn(view: AttackView) -> str | None:
    from .results import fallback_warning

    return fallback_warning(view)


def attach(sweeps: Sequence[SweepResults], out: Path) -> None:
    """The report's files as artifacts of each sweep's parent run (``report/``)."""
    from mlflow.tracking import MlflowClient

    from .tracking import RetryingClient

    for s in sweeps:
        client = RetryingClient(MlflowClient(tracking_uri=s.uri))
        client.log_artifacts(s.parent_run_id, str(out), "report")
        client.set_tag(s.parent_run_id, "report", "report/tables.md")


def report(sources: Sequence[str], *, out: str | Path | None = None, tracking_uri: str | None = None,
           overrides: Sequence[str] = (), sweep_id: str | None = None, rule: str | None = None,
           fail_asr: float = FAIL_ASR, upload: bool = True, log=print) -> list[Path]:
    if sweep_id and len(sources) != 1:
        raise ConfigError(f"--sweep {sweep_id}: names one sweep; give one source with it")
    sweeps = []
    for source in sources:
        where = resolve_source(source, tracking_uri=tracking_uri, overrides=overrides)
        sweeps.append(load_sweep(where["uri"], where["experiment"], sweep_id=sweep_id or where["sweep_id"],
                                 fingerprint=where["fingerprint"], rule=rule, folder=where["folder"]))
        if sweeps[-1].folder is None and where.get("storage") and (where["storage"] / sweeps[-1].sweep_id).is_dir():
            sweeps[-1].folder = where["storage"] / sweeps[-1].sweep_id
    if out is None:
        out = sweeps[0].folder / "report" if len(sweeps) == 1 and sweeps[0].folder else \
            Path("reports") / "+".join(s.sweep_id for s in sweeps)
    out = Path(out)
    files = write_report(sweeps, out, fail_asr)
    for f in files:
        log(f"wrote {f}")
    for s in sweeps:
        for v in s.views.values():
            w = _warn(v)
            if w:
                log(w)
    if upload:
        attach(sweeps, out)
        log("attached to the parent run(s) in MLflow under report/: "
            + ", ".join(f"{s.sweep_id} ({s.parent_run_id})" for s in sweeps))
    return files


def cmd_report(args) -> int:
    if not 0.0 <= args.fail_asr <= 1.0:
        raise ConfigError(f"--fail-asr: {args.fail_asr}; a rate in [0, 1] (e.g. 0.2 for 20%)")
    # -o DIR: the report goes to DIR only, unless --upload; the default folder is also attached to MLflow
    upload = args.upload if args.upload is not None else args.out is None
    report(args.sources, out=args.out, tracking_uri=args.tracking_uri, overrides=args.overrides,
           sweep_id=args.sweep, rule=args.rule, fail_asr=args.fail_asr, upload=upload)
    return 0


def add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="the paper's tables (CA/ASR, R-ASR/Q-ASR, BEC) and a Pareto figure grid from sweeps",
        description="Rows: the undefended model, each fixed baseline as run, each tuned defense at the export "
        "rule's pick; columns: the attacks of each sweep and their average. Written as Markdown, LaTeX (booktabs) "
        "and CSV, with the figure grid as PNG and PDF, and attached to each sweep's parent run in MLflow. "
        "Several sources make one table (e.g. one sweep per data set).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a sweep spec YAML (its newest sweep), a sweep folder (<storage>/<name>/<sweep id>, or "
                   "<storage>/<name> for its newest), or an MLflow experiment name (with --tracking-uri)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="spec overrides the sweep ran with (e.g. storage)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's or the sweep's)")
    p.add_argument("--sweep", help="sweep id (one source only; default: the newest sweep of the source)")
    p.add_argument("--rule", help="export rule that picks each tuned defense's row (default: the spec's export_rule)")
    p.add_argument("--fail-asr", type=float, default=FAIL_ASR,
                   help=f"ASR, R-ASR or Q-ASR above this marks a failed defense (default {FAIL_ASR})")
    p.add_argument("-o", "--out", help="folder to write, and the only place written unless --upload (default: "
                   "<sweep folder>/report, else reports/<sweep ids>, also attached to MLflow)")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--upload", dest="upload", action="store_true", default=None,
                    help="also attach the report to the parent run(s) in MLflow (under report/); the default "
                    "without -o")
    up.add_argument("--no-upload", dest="upload", action="store_false",
                    help="do not attach the report to MLflow (the default with -o)")
    p.set_defaults(func=cmd_report)
