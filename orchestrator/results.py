"""A sweep's results per attack, as the report, the figures and the export read them: the trials,
the undefended (backdoored) model, the chance level, the clean reference model's values, and the
export rule's picks, with the loud warning when no trial met the rule.

Also the MLflow side of the picks: the picked runs are tagged (``picked = 'true'``, with the rule
in ``picked.rule``), so one filter in the UI finds them, and the per-attack Pareto table and the
picks become the attack and parent runs' descriptions (``mlflow.note.content``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .names import display
from .pareto import TrialRecord, front_of
from .rules import Rule, select

PICK_TAG = "picked"  # 'true' on the runs the export rule picked: filter ``tags.picked = 'true'``
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI
UNDEFENDED = {"ca": "backdoored_ca", "asr": "backdoored_asr"}  # objective -> the undefended model's metric
CLEAN_REFERENCE = {"r_asr": "ra_clean_asr", "q_asr": "q_asr_clean_model"}  # objective -> the clean model's
NAMES = {"ca": "CA", "asr": "ASR", "r_asr": "R-ASR", "q_asr": "Q-ASR"}
# A defended model whose CA fell below this share of the way from chance to the undefended model's
# CA has collapsed (when the sweep has no gate): its low ASR says nothing about the backdoor, so no
# table calls it best. 0.5 on ten classes and an undefended CA of 90%: a floor of 50%.
COLLAPSE_SHARE = 0.5


@dataclass
class Pick:
    record: TrialRecord
    how: str  # "rule": it meets the rule; "fallback": nothing did, the point nearest the ideal was taken
    rule: str

    @property
    def rule_met(self) -> bool:
        return self.how == "rule"


@dataclass
class AttackView:
    """What a sweep recorded for one attack."""

    attack: str
    records: list[TrialRecord]
    undefended: dict[str, float] = field(default_factory=dict)  # objective -> the backdoored model's value
    chance: float | None = None  # chance-level CA: 1 / classes (None when the sweep did not record the classes)
    clean_reference: dict[str, float] = field(default_factory=dict)  # objective -> the clean model's value
    pick: Pick | None = None  # the export rule's pick over all defenses (what the export file holds)
    picks: dict[str, Pick] = field(default_factory=dict)  # defense -> the rule's pick among its own trials
    run_id: str = ""  # the attack's MLflow run (its attack_stage/* metrics: the undefended model)
    # seed replicates (replicates.py): searched run id -> metric -> (mean, std, n) over its seeds
    spread: dict[str, dict[str, tuple[float, float, int]]] = field(default_factory=dict)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _median(values: Sequence[float]) -> float | None:
    vals = sorted(v for v in values if _finite(v))
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def attack_view(attack: str, records: Sequence[TrialRecord], attack_metrics: dict[str, float], rule: Rule,
                objectives: Sequence) -> AttackView:
    """The view of ``attack`` from its trial records and its attack run's metrics (``attack_stage/*``).

    The undefended model's CA and ASR are the attack stage's (every trial also carries them as
    ``backdoored_*``); the clean reference's R-ASR and Q-ASR are what the trials measured on it
    (``ra_clean_asr`` with ``evaluation.ra_on_clean``, ``q_asr_clean_model``), when they did.
    """
    recs = [r for r in records if r.attack == attack]
    undefended = {}
    for objective, metric in UNDEFENDED.items():
        v = attack_metrics.get(f"attack_stage/{metric}")
        v = v if _finite(v) else _median([r.metrics.get(metric, math.nan) for r in recs])
        if v is not None:
            undefended[objective] = float(v)
    classes = attack_metrics.get("attack_stage/num_classes")
    clean = {}
    for objective, metric in CLEAN_REFERENCE.items():
        v = _median([r.metrics.get(metric, math.nan) for r in recs])
        if v is not None:
            clean[objective] = v
    view = AttackView(attack, recs, undefended, 1.0 / classes if _finite(classes) and classes >= 1 else None, clean)
    metrics, modes, ideal = [o.metric for o in objectives], [o.mode for o in objectives], [o.best for o in objectives]
    usable = [r for r in recs if r.usable(metrics)]
    got = select(usable, rule, metrics, modes, ideal)
    if got is not None:
        view.pick = Pick(got[0], got[1], rule.text)
    for defense in sorted({r.defense for r in usable if r.tuned}):
        got = select([r for r in usable if r.defense == defense], rule, metrics, modes, ideal)
        if got is not None:
            view.picks[defense] = Pick(got[0], got[1], rule.text)
    return view


def gate_of(spec: dict) -> dict | None:
    """The gate a sweep's defense trials ran under (the spec's ``gate``, else ``base.evaluation.gate``)."""
    gate = spec.get("gate") or (((spec.get("base") or {}).get("evaluation") or {}).get("gate"))
    return gate if isinstance(gate, dict) else None


def ca_floor(view: AttackView, gate: dict | None = None) -> float | None:
    """The CA below which a defended model of ``view``'s attack counts as collapsed: the gate's floor
    (``ca_min``, and ``ca_drop_max`` below the undefended model: the higher), else chance plus
    ``COLLAPSE_SHARE`` of the way to the undefended model's CA (twice chance when that is unknown).
    None when neither the gate, the chance level nor the undefended model is known."""
    base = view.undefended.get("ca")
    floors = []
    if gate:
        if _finite(gate.get("ca_min")):
            floors.append(float(gate["ca_min"]))
        if _finite(gate.get("ca_drop_max")) and base is not None:
            floors.append(base - float(gate["ca_drop_max"]))
    if floors:
        return max(floors)
    if view.chance is not None and base is not None:
        return view.chance + COLLAPSE_SHARE * max(0.0, base - view.chance)
    if view.chance is not None:
        return min(1.0, 2 * view.chance)
    if base is not None:
        return COLLAPSE_SHARE * base
    return None


def pct(v: float | None) -> str:
    return "n/a" if v is None or not _finite(v) else f"{100 * v:.1f}%"


def fallback_warning(view: AttackView, pick: Pick | None = None) -> str | None:
    """The loud line when no trial met the rule: what was picked instead, its CA drop from the
    undefended model and the chance level. None when the rule was met."""
    pick = pick or view.pick
    if pick is None or pick.rule_met:
        return None
    r = pick.record
    ca = r.metrics.get("ca")
    parts = [f"WARNING: {view.attack}: no trial meets the rule {pick.rule!r}; the fallback picked the point "
             f"nearest the ideal, {r.defense} run {r.run_id or r.trial_id}: CA {pct(ca)}"]
    base = view.undefended.get("ca")
    if base is not None and _finite(ca):
        parts.append(f"(undefended model {pct(base)}: a drop of {100 * (base - ca):.1f} points)")
    parts.append(f"chance level {pct(view.chance)}" if view.chance is not None else "chance level unknown")
    others = ", ".join(f"{NAMES[m]} {pct(r.metrics.get(m))}" for m in ("asr", "r_asr", "q_asr")
                       if _finite(r.metrics.get(m)))
    return " ".join(parts) + (f"; {others}" if others else "") + ". Relax the rule or search further before using it."


def add_warnings(doc: dict, views: dict) -> list[str]:
    """Give each selection no trial met the rule for its ``warning`` (:func:`fallback_warning`:
    the pick, its CA drop, the chance level), in place; ``views``: attack -> ``AttackView``. One
    function for ``bibau export`` and the sweep's own export file, so both say the same."""
    warnings = []
    for sel in doc["selections"]:
        view = views.get(sel["attack"])
        if view is None or sel["provenance"]["picked_by"] == "rule":
            continue
        pick = next((p for p in ([view.pick] + list(view.picks.values())) if p and p.record.run_id ==
                     sel["provenance"]["run_id"]), None)
        text = fallback_warning(view, pick) if pick else None
        if text:
            sel["warning"] = text
            warnings.append(text)
    return warnings


# -- MLflow ------------------------------------------------------------------------------------------


def _cell(v: Any, metric: str) -> str:
    if not _finite(v):
        return "-"
    return f"{100 * v:.1f}" if metric in ("ca", "asr", "r_asr", "q_asr") else f"{v:.3g}"


def _run_link(run_id: str, name: str, experiment_id: str | None) -> str:
    """A run's name linking to its page, relative to the UI (works under any host and prefix)."""
    if not run_id or not experiment_id:
        return name
    return f"[{name}](#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning)"


def attack_note(view: AttackView, objectives: Sequence, experiment_id: str | None = None) -> str:
    """The attack run's description, what its page shows first: the Pareto figure (CA against the
    second objective, the run's own artifact), the front's table with each run's name linking to
    its page (%), the pick and how it was made."""
    metrics = [o.metric for o in objectives]
    modes = [o.mode for o in objectives]
    front = sorted(front_of(view.records, metrics, modes), key=lambda r: -r.metrics.get(metrics[0], 0.0))
    lines = [f"### {display(view.attack)}: Pareto front ({len(front)} of {len(view.records)} trials)", ""]
    if view.run_id and len(metrics) > 1:  # served by the MLflow server's get-artifact route
        figure = f"pareto/{metrics[0]}_vs_{metrics[1]}.png"
        lines += [f"![{NAMES.get(metrics[0], metrics[0])} against {NAMES.get(metrics[1], metrics[1])}]"
                  f"(get-artifact?path={figure.replace('/', '%2F')}&run_uuid={view.run_id})", "",
                  "All figures: Artifacts, `pareto/`.", ""]
    if view.undefended:
        lines.append("Undefended model: " + ", ".join(f"{m.upper().replace('_', '-')} {pct(v)}"
                                                     for m, v in view.undefended.items())
                     + (f"; chance-level CA {pct(view.chance)}" if view.chance is not None else "") + ".")
        lines.append("")
    lines.append("| defense | run | " + " | ".join(f"{m} (%)" if m in ("ca", "asr", "r_asr", "q_asr") else m
                                                   for m in metrics) + " | picked |")
    lines.append("|---|---|" + "---:|" * len(metrics) + "---|")
    picked = view.pick.record.run_id if view.pick else None
    for r in front:
        name = f"{r.study}/{r.trial_id}"  # the run's name in MLflow
        lines.append(f"| {display(r.defense)} | {_run_link(r.run_id or '', name, experiment_id)} | "
                     + " | ".join(_cell(r.metrics.get(m), m) for m in metrics)
                     + f" | {'**yes**' if picked and r.run_id == picked else ''} |")
    lines.append("")
    lines.append(pick_line(view))
    return "\n".join(lines)


def glance(view: AttackView, gate: dict | None = None, fail_asr: float = 0.2) -> str:
    """One sentence per attack, the paper's comparison as the sweep measured it: for each defense's
    pick (tuned: the rule's among its trials; baselines: its run), whether the backdoor stays out
    after reactivation (ASR, R-ASR and Q-ASR at most ``fail_asr``) at a CA above the collapse
    floor, and at what cost; a defense that misses says so, with its numbers."""
    base, floor = view.undefended.get("ca"), ca_floor(view, gate)
    parts = []
    for defense in dict.fromkeys(t.defense for t in view.records):
        p = view.picks.get(defense)
        # a gated baseline still has the CA and ASR it was gated on
        runs = [t for t in view.records if t.defense == defense and t.status in ("completed", "gated")]
        if p is None and not runs:
            continue
        r = p.record if p is not None else runs[0]  # a baseline: its one run
        m = r.metrics
        ca = m.get("ca")
        if not _finite(ca):
            continue
        rates = {k: m.get(k) for k in ("asr", "r_asr", "q_asr") if _finite(m.get(k))}
        shown = ", ".join(f"{NAMES[k]} {pct(v)}" for k, v in rates.items() if k != "asr") or f"ASR {pct(rates.get('asr'))}"
        cost = f"CA {pct(ca)}" + (f" ({100 * (ca - base):+.1f} points)" if _finite(base) else "")
        n = sum(1 for t in view.records if t.defense == defense)
        trials = f"{n} trial{'s' if n != 1 else ''}"
        tried = (f" (best of {trials} by the rule)" if r.tuned and p is not None and p.rule_met else
                 f" (no trial of {n} met the rule; the nearest)" if r.tuned and n > 1 else
                 " (one trial, not meeting the rule)" if r.tuned else "")
        if floor is not None and ca < floor:
            verdict = f"collapses the model: {cost}, below the floor {pct(floor)}; its rates say nothing"
        elif all(v <= fail_asr for v in rates.values()) and "r_asr" in rates:
            verdict = f"keeps the backdoor out after reactivation ({shown}) at {cost}"
        elif "r_asr" not in rates and rates.get("asr", 1.0) <= fail_asr:
            verdict = f"removes the backdoor (ASR {pct(rates['asr'])}), reactivation not measured, at {cost}"
        else:
            verdict = f"leaves the backdoor or lets it back ({', '.join(f'{NAMES[k]} {pct(v)}' for k, v in rates.items())}) at {cost}"
        parts.append(f"{display(defense)}{tried} {verdict}")
    if not parts:
        return f"{display(view.attack)}: no defense has a completed run."
    return f"{display(view.attack)}: " + "; ".join(parts) + "."


def pick_line(view: AttackView) -> str:
    if view.pick is None:
        return f"{view.attack}: nothing picked (no completed trial with every objective)."
    r = view.pick.record
    text = (f"{view.attack}: picked {r.defense} run {r.run_id or r.trial_id} by the rule `{view.pick.rule}`"
            + ("" if view.pick.rule_met else " **(fallback: no trial meets the rule)**")
            + ": " + ", ".join(f"{NAMES[m]} {pct(r.metrics.get(m))}" for m in ("ca", "asr", "r_asr", "q_asr")
                               if _finite(r.metrics.get(m))))
    warning = fallback_warning(view)
    return text + ("\n\n" + warning if warning else "")


def sweep_note(views: Sequence[AttackView], rule: str, attack_runs: dict[str, str] | None = None,
               experiment_id: str | None = None) -> str:
    """The parent run's description: first, one line per attack linking its front (the attack run's
    page: figure and table) and its picked run, what the collapsed description shows; then every
    attack's pick in full, and the warning where the rule was not met."""
    lines = []
    for v in views:
        front = _run_link((attack_runs or {}).get(v.attack, ""), "Pareto front", experiment_id)
        pick = ""
        if v.pick is not None:
            r = v.pick.record
            pick = (f" · picked {_run_link(r.run_id or '', f'{r.study}/{r.trial_id}', experiment_id)}"
                    + ("" if v.pick.rule_met else " (fallback)") + ": "
                    + ", ".join(f"{NAMES[m]} {pct(r.metrics.get(m))}" for m in ("ca", "r_asr", "q_asr")
                                if _finite(r.metrics.get(m))))
        lines.append(f"- **{display(v.attack)}**: {front}{pick}")
    lines += ["", f"### Picks by the export rule `{rule}`", "", "Filter the picked runs with `tags.picked = 'true'`.", ""]
    lines += [f"- {pick_line(v)}" for v in views]
    return "\n".join(lines)


def tag_picks(client, views: Sequence[AttackView], rule: str, attack_runs: dict[str, str], parent_run: str,
              objectives: Sequence, *, experiment_id: str | None = None, sweep_id: str | None = None,
              picks: dict[str, str] | None = None, scope: str = "attack") -> list[str]:
    """Tag the picked runs (``picked``, ``picked.rule``, ``picked.by``, ``picked.scope``), clear the
    tag of runs an earlier export of this sweep picked, write the attack and parent runs' descriptions
    and the parent's ``export.*`` tags. ``picks``: run id -> how it was picked (rule | fallback), what
    an export file holds when it is not one pick per attack (``--per-defense``: ``scope`` "attack and
    defense"); None: each view's pick. Returns the warning lines (one per attack whose rule was not met)."""
    picked = picks if picks is not None else {
        v.pick.record.run_id: v.pick.how for v in views if v.pick and v.pick.record.run_id}
    if experiment_id and sweep_id:
        earlier = client.search_runs([experiment_id], filter_string=f"tags.sweep_id = '{sweep_id}' and "
                                     f"tags.{PICK_TAG} = 'true'", max_results=10000)
        for run in earlier:
            if run.info.run_id not in picked:
                client.set_tag(run.info.run_id, PICK_TAG, "false")
                client.set_tag(run.info.run_id, NOTE_TAG, "Picked by an earlier export of this sweep; not by its last.")
    for run_id, how in picked.items():
        client.set_tag(run_id, PICK_TAG, "true")
        client.set_tag(run_id, "picked.rule", rule)
        client.set_tag(run_id, "picked.by", how)
        client.set_tag(run_id, "picked.scope", scope)
    for v in views:  # the picked run's page says so where it opens, with the numbers it was picked by
        if v.pick is not None and v.pick.record.run_id in picked:
            client.set_tag(v.pick.record.run_id, NOTE_TAG, pick_line(v))
    warnings = []
    for v in views:
        run = attack_runs.get(v.attack)
        if run:
            v.run_id = v.run_id or run
            client.set_tag(run, NOTE_TAG, attack_note(v, objectives, experiment_id))
            client.set_tag(run, "export.rule_met", "n/a" if v.pick is None else str(v.pick.rule_met).lower())
        w = fallback_warning(v)
        if w:
            warnings.append(w)
    client.set_tag(parent_run, NOTE_TAG, sweep_note(views, rule, attack_runs, experiment_id))
    client.set_tag(parent_run, "export.rule", rule)
    client.set_tag(parent_run, "export.rule_met", str(not warnings).lower())
    client.set_tag(parent_run, "export.warning", " | ".join(warnings)[:4900] if warnings else "")
    return warnings
