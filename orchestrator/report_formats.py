"""A table of the report written out: Markdown, LaTeX (booktabs) and CSV (one row per cell, the
metrics at full precision, with the MLflow run they come from). The marks (failed, collapsed,
fallback) and the bold best cells as ``report_tables.Table`` decided them; mean ± std (n) where
a cell was replicated.
"""
from __future__ import annotations

import csv
import io
import re
from typing import Sequence

from .names import display
from .replicates import differ
from .report_tables import NAMES, Cell, SweepResults, Table, col_key

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
        v, key = t.cells[(label, col)].metrics.get(metric), col_key(col)
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
    key = ":avg" if col is None else col_key(col)
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
                    c, key, (group, attack) = t.cells[(label, col)], col_key(col), col
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
