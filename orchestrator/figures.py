"""Pareto figures: clean accuracy against each other objective, per attack, and the report's grid
(attacks x objectives). Axes in words and %; the undefended model, chance-level CA, the clean
reference model's value, the export rule's thresholds and the picked point drawn on every
panel, with one front per panel: the 2-D front of that panel's two objectives. Baselines are
hollow markers drawn above the trials, so none hides a trial; trials that lack the panel's
metric (gated after CA/ASR, failed) are left out and counted on the panel. Attacks and defenses
by their display names (``names.py``), each defense in one colour and marker across a grid.

Camera-ready: the grid has one legend, below the panels (outside the data), panels sized for a
two-column page, and the PDF embeds TrueType fonts (``pdf.fonttype`` 42), not the Type 3 fonts
that IEEE's and ACM's checks reject. Saved as PNG (200 dpi) and PDF.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .names import display
from .pareto import TrialRecord, pareto_front
from .results import AttackView
from .rules import Rule

RATES = {"ca", "asr", "r_asr", "q_asr", "ra_clean_asr", "q_asr_clean_model"}  # in [0, 1], shown in %
WORDS = {
    "ca": "clean accuracy, CA",
    "asr": "attack success rate, ASR",
    "r_asr": "ASR after the retuning attack, R-ASR",
    "q_asr": "ASR after query-based reactivation, Q-ASR",
    "bec": "backdoor existence coefficient, BEC",
}
SHORT = {"ca": "CA", "asr": "ASR", "r_asr": "R-ASR", "q_asr": "Q-ASR", "bec": "BEC"}
DPI = 200
FORMATS = ("png", "pdf")
_BASELINE_MARKERS = ("s", "D", "^", "v", "P", "h", "<", ">", "p", "8")
_OPS_TEXT = {"<=": "\u2264", ">=": "\u2265", "<": "<", ">": ">"}


def short(metric: str) -> str:
    return SHORT.get(metric, metric)


def axis_label(metric: str) -> str:
    words = WORDS.get(metric, metric)
    return f"{words} (%)" if metric in RATES else words


def scale(metric: str) -> float:
    return 100.0 if metric in RATES else 1.0


def shown(metric: str, v: float) -> str:
    return f"{100 * v:.1f}%" if metric in RATES else f"{v:.3g}"


def baseline_label(defense: str) -> str:
    """``<defense> (baseline)``, with the data it saw when that is more than the clean split (EP's
    poisoned batch, the IBU reference's poisoned samples, CLP's none)."""
    from trainables.registry import DEFENSES

    use = DEFENSES.get(defense).declared_data_use() if defense in DEFENSES else "clean_split"
    name = display(defense)
    return f"{name} (baseline)" if use == "clean_split" else f"{name} (baseline; data: {use})"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _plottable(r: TrialRecord, x: str, y: str) -> bool:
    return r.status == "completed" and _finite(r.metrics.get(x)) and _finite(r.metrics.get(y))


def styles(views: Sequence[AttackView]) -> dict[str, tuple[str, str]]:
    """defense -> (colour, marker): tuned defenses filled circles of the first colours, baselines
    hollow markers of the later ones, the same in every panel of a grid (one legend serves all)."""
    tuned = sorted({r.defense for v in views for r in v.records if r.tuned})
    fixed = sorted({r.defense for v in views for r in v.records if not r.tuned} - set(tuned))
    out = {d: (f"C{i % 10}", "o") for i, d in enumerate(tuned)}
    out |= {d: (f"C{(i + len(tuned)) % 10}", _BASELINE_MARKERS[i % len(_BASELINE_MARKERS)]) for i, d in enumerate(fixed)}
    return out


def draw_panel(ax, view: AttackView, x, y, objectives: Sequence, rule: Rule | None, *, title: str | None = None,
               legend: bool = True, style: dict[str, tuple[str, str]] | None = None) -> int:
    """One Pareto panel of ``view``: objective ``y`` (CA) against objective ``x``, with the 2-D front
    of those two. Returns how many trials were left out for lacking ``x`` or ``y`` (gated, failed,
    diverged). ``legend``: this panel's own legend, with each reference's value; without it
    (a grid's shared legend) the labels name the references only, and the panel reads the values
    off its axes."""
    sx, sy = scale(x.metric), scale(y.metric)
    style = style or styles([view])
    pts = [r for r in view.records if _plottable(r, x.metric, y.metric)]
    left_out = len(view.records) - len(pts)
    tuned = [r for r in pts if r.tuned]
    for defense in sorted({r.defense for r in tuned}):
        mine = [r for r in tuned if r.defense == defense]
        ax.scatter([sx * r.metrics[x.metric] for r in mine], [sy * r.metrics[y.metric] for r in mine], s=14,
                   alpha=0.6, zorder=2, color=style[defense][0], linewidths=0, label=f"{display(defense)} trials")
    xy = [(r.metrics[x.metric], r.metrics[y.metric]) for r in pts]
    if xy:
        stair = sorted(xy[i] for i in pareto_front(xy, [x.mode, y.mode]))
        ax.step([sx * p[0] for p in stair], [sy * p[1] for p in stair], where="post", color="black", lw=0.8,
                zorder=2.5, label="Pareto front of the panel's two objectives" if not legend
                else f"front in ({short(x.metric)}, {short(y.metric)})")
    # baselines: hollow and above the trials, so a trial at the same place stays visible
    for r in sorted((r for r in pts if not r.tuned), key=lambda r: r.defense):
        color, marker = style[r.defense]
        ax.scatter([sx * r.metrics[x.metric]], [sy * r.metrics[y.metric]], marker=marker, s=60,
                   facecolors="none", edgecolors=color, linewidths=1.4, zorder=4, label=baseline_label(r.defense))
    # seed replicates: the mean ± std of each replicated run (a pick, a baseline) as error bars
    for r in pts:
        sp = view.spread.get(r.run_id or "", {})
        if sp.get(x.metric, (0, 0, 0))[2] > 1 and sp.get(y.metric, (0, 0, 0))[2] > 1:
            (mx, ex, n), (my, ey, _) = sp[x.metric], sp[y.metric]
            ax.errorbar([sx * mx], [sy * my], xerr=[sx * ex], yerr=[sy * ey], fmt="none", ecolor=style[r.defense][0],
                        elinewidth=0.9, capsize=2, zorder=3.5, label="mean ± std over the seeds")
    # references
    base_y = view.undefended.get(y.metric)
    if base_y is not None:
        ax.axhline(sy * base_y, color="firebrick", ls="--", lw=0.9, zorder=1,
                   label="undefended model" if not legend else
                   f"undefended model: {short(y.metric)} {shown(y.metric, base_y)}"
                   + (f", ASR {shown('asr', view.undefended['asr'])}" if "asr" in view.undefended else ""))
        if x.metric in view.undefended:
            ax.scatter([sx * view.undefended[x.metric]], [sy * base_y], marker="X", s=60, facecolors="none",
                       edgecolors="firebrick", linewidths=1.2, zorder=4, label="undefended model")
    if y.metric == "ca" and view.chance is not None:
        ax.axhline(sy * view.chance, color="gray", ls=":", lw=1.0, zorder=1,
                   label="chance-level CA" if not legend else f"chance-level CA {shown('ca', view.chance)}")
    clean = view.clean_reference.get(x.metric)
    if clean is not None:
        ax.axvline(sx * clean, color="seagreen", ls="-.", lw=0.9, zorder=1,
                   label="clean reference model" if not legend else
                   f"clean reference model: {short(x.metric)} {shown(x.metric, clean)}")
    for metric, op, bound in (rule.constraints if rule else []):
        text = f"rule: {short(metric)} {_OPS_TEXT[op]} {shown(metric, bound)}"
        if metric == x.metric:
            ax.axvline(sx * bound, color="darkorange", ls=(0, (4, 2)), lw=1.0, zorder=1, label=text)
        elif metric == y.metric:
            ax.axhline(sy * bound, color="darkorange", ls=(0, (4, 2)), lw=1.0, zorder=1, label=text)
    pick = view.pick
    if pick is not None and _plottable(pick.record, x.metric, y.metric):
        px, py = sx * pick.record.metrics[x.metric], sy * pick.record.metrics[y.metric]
        who = "" if not legend else f" ({display(pick.record.defense)})"
        ax.scatter([px], [py], marker="o", s=150, facecolors="none", edgecolors="red", linewidths=1.8, zorder=6,
                   label=f"picked{who}" if pick.rule_met else f"picked{who}; fallback: NO trial meets the rule")
    if x.metric in RATES:
        ax.set_xlim(-3, 103)
    if y.metric in RATES:
        ax.set_ylim(-3, 103)
    ax.set_xlabel(axis_label(x.metric), fontsize=8)
    ax.set_ylabel(axis_label(y.metric), fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title or display(view.attack), fontsize=9)
    ax.grid(alpha=0.3)
    if left_out:
        ax.text(0.99, 0.01, f"{left_out} trial(s) without {short(x.metric)} or {short(y.metric)} not shown",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=6.5, color="dimgray")
    if legend:  # below the axes, outside the data; below, not beside, so the figure keeps a column's width
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0.0, ncol=2,
                  frameon=False).set_in_layout(False)  # tight_layout keeps the axes' size; saving takes it in
    return left_out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # TrueType (42) instead of Type 3 fonts in PDF and PS: what IEEE's and ACM's PDF checks accept
    matplotlib.rcParams["pdf.fonttype"] = 42
    matplotlib.rcParams["ps.fonttype"] = 42
    return plt


def attack_figures(view: AttackView, objectives: Sequence, rule: Rule | None) -> dict:
    """One figure per objective after the first: ``<first>_vs_<other>`` -> figure."""
    plt = _pyplot()
    figs = {}
    first = objectives[0]
    for o in objectives[1:]:
        fig, ax = plt.subplots(figsize=(3.4, 2.8))
        draw_panel(ax, view, o, first, objectives, rule,
                   title=f"{display(view.attack)}: {short(first.metric)} against {short(o.metric)}")
        fig.tight_layout()
        figs[f"{first.metric}_vs_{o.metric}"] = fig
        plt.close(fig)
    return figs


def grid_figure(rows: Sequence[tuple]):
    """The report's grid: one row per ``(title, attack view, objectives, rule)``, one column per
    objective after the first (the union over the rows, in order)."""
    plt = _pyplot()
    cols: dict[str, object] = {}
    for _, _, objectives, _ in rows:
        for o in objectives[1:]:
            cols.setdefault(o.metric, o)
    # 3.4 x 2.8 in a panel: two panels span a two-column page (7 in) with 7-9 pt text at print size
    fig, axes = plt.subplots(max(1, len(rows)), max(1, len(cols)), figsize=(3.4 * max(1, len(cols)),
                             2.8 * max(1, len(rows))), squeeze=False)
    style = styles([view for _, view, _, _ in rows])
    for i, (title, view, objectives, rule) in enumerate(rows):
        for j, o in enumerate(cols.values()):
            if o.metric in {x.metric for x in objectives}:
                draw_panel(axes[i][j], view, o, objectives[0], objectives, rule, legend=False, style=style,
                           title=f"{display(title)}: {short(o.metric)}")
            else:
                axes[i][j].set_axis_off()
    if not rows or not cols:
        for ax in axes.flat:
            ax.set_axis_off()
    fig.tight_layout()
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:  # one legend for the grid, below the panels
        fig.legend(list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(3, len(handles)), fontsize=8, frameon=False)
    plt.close(fig)
    return fig


def save(fig, base: str | Path, formats: Sequence[str] = FORMATS, dpi: int = DPI) -> list[Path]:
    """``base``.png at ``dpi`` and the vector formats; returns the files."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = base.with_name(f"{base.name}.{fmt}")
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        fig.savefig(path, dpi=dpi, bbox_inches="tight", bbox_extra_artists=legends)
        out.append(path)
    return out


def plot_growth(attack: str, curve: list[tuple[int, float]]):
    """The hypervolume of an attack's front as the trials finish."""
    if not curve:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([k for k, _ in curve], [v for _, v in curve], marker="o", ms=3)
    ax.set_xlabel("trials finished")
    ax.set_ylabel("hypervolume of the front")
    ax.set_title(f"{display(attack)}: hypervolume as the sweep goes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig
