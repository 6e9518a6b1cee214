"""``bibau export``: pick configurations from each attack's Pareto front by a rule, and write
them with their provenance to a YAML file that ``bibau run`` and ``bibau sweep`` accept.

A rule is a ``;``-separated list of clauses::

    max ca; r_asr <= 0.1; q_asr <= 0.1; fallback nearest

``max M`` / ``min M`` is what is optimised among the front's points that meet every
constraint (``M <= v``, ``M >= v``, ``M < v``, ``M > v``); ties go to the point nearest the
ideal. When no point meets the constraints, ``fallback nearest`` (the default) takes the point
nearest the ideal (each objective's best value: 1 for a maximised rate, 0 for a minimised
one), ``fallback none`` takes nothing.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .pareto import TrialRecord, front_of

EXPORT_KIND = "bibau-export"
EXPORT_VERSION = 1
DEFAULT_RULE = "max ca; r_asr <= 0.1; q_asr <= 0.1; fallback nearest"

_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_CONSTRAINT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)$")


@dataclass
class Rule:
    direction: str  # max | min
    metric: str
    constraints: list[tuple[str, str, float]] = field(default_factory=list)
    fallback: str = "nearest"  # nearest | none
    text: str = DEFAULT_RULE

    def feasible(self, r: TrialRecord) -> bool:
        for metric, op, bound in self.constraints:
            v = r.metrics.get(metric)
            if v is None or not math.isfinite(v) or not _OPS[op](v, bound):
                return False
        return True


def parse_rule(text: str, objectives: Sequence[str] | None = None) -> Rule:
    """Parse a selection rule; errors say which clause is wrong and what is allowed."""
    target = None
    constraints, fallback = [], "nearest"
    for clause in (c.strip() for c in re.split(r"[;,]", text)):
        if not clause:
            continue
        words = clause.split()
        if words[0] in ("max", "min") and len(words) == 2:
            if target is not None:
                raise ValueError(f"rule {text!r}: two targets ({target[0]} {target[1]}, {clause}); give one max or min")
            target = (words[0], words[1])
        elif words[0] == "fallback" and len(words) == 2 and words[1] in ("nearest", "none"):
            fallback = words[1]
        elif m := _CONSTRAINT.match(clause):
            try:
                bound = float(m.group(3))
            except ValueError:
                raise ValueError(f"rule {text!r}: clause {clause!r}: {m.group(3)!r} is not a number") from None
            constraints.append((m.group(1), m.group(2), bound))
        else:
            raise ValueError(f"rule {text!r}: clause {clause!r} not understood; allowed: 'max METRIC', 'min METRIC', "
                             "'METRIC <= VALUE' (or >=, <, >), 'fallback nearest', 'fallback none'")
    if target is None:
        raise ValueError(f"rule {text!r}: no target; start with 'max METRIC' or 'min METRIC'")
    if objectives is not None and target[1] not in objectives:
        raise ValueError(f"rule {text!r}: target {target[1]!r} is not an objective; objectives: {', '.join(objectives)}")
    return Rule(target[0], target[1], constraints, fallback, text)


def distance_to_ideal(r: TrialRecord, metrics: Sequence[str], ideal: Sequence[float]) -> float:
    return math.sqrt(sum((v - b) ** 2 for v, b in zip(r.values(metrics), ideal)))


def select(records: Sequence[TrialRecord], rule: Rule, metrics: Sequence[str], modes: Sequence[str],
           ideal: Sequence[float]) -> tuple[TrialRecord, str] | None:
    """The record the rule picks from the Pareto front of ``records``, and how ("rule" or
    "fallback"); None when the front is empty or the fallback is "none"."""
    front = front_of(records, metrics, modes)
    if not front:
        return None
    near = lambda r: distance_to_ideal(r, metrics, ideal)  # noqa: E731
    ok = [r for r in front if rule.feasible(r) and math.isfinite(r.metrics.get(rule.metric, math.nan))]
    if ok:
        sign = -1.0 if rule.direction == "max" else 1.0
        return min(ok, key=lambda r: (sign * r.metrics[rule.metric], near(r), r.order)), "rule"
    if rule.fallback == "none":
        return None
    return min(front, key=lambda r: (near(r), r.order)), "fallback"


def build_export(records: Sequence[TrialRecord], rule: Rule, metrics: Sequence[str], modes: Sequence[str],
                 ideal: Sequence[float], provenance: dict[str, Any], per_defense: bool = False) -> dict:
    """The export document: per attack (or per attack x defense) the selected configuration."""
    groups: dict[tuple, list[TrialRecord]] = {}
    for r in records:
        groups.setdefault((r.attack, r.defense) if per_defense else (r.attack,), []).append(r)
    selections = []
    for key in groups:
        picked = select(groups[key], rule, metrics, modes, ideal)
        if picked is None:
            continue
        r, how = picked
        selections.append({
            "attack": r.attack,
            "defense": r.defense,
            "config": r.config,
            "metrics": {k: float(v) for k, v in sorted(r.metrics.items())
                        if isinstance(v, (int, float)) and not k.startswith("curve/")},
            "provenance": {**provenance, "run_id": r.run_id, "trial_id": r.trial_id, "rule": rule.text,
                           "picked_by": how},
        })
    return {"kind": EXPORT_KIND, "version": EXPORT_VERSION, "selections": selections}


def write_export(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(path)
    return path


def add_warnings(doc: dict, views: dict) -> list[str]:
    """Give each selection no trial met the rule for its ``warning`` (``results.fallback_warning``:
    the pick, its CA drop, the chance level), in place; ``views``: attack -> ``AttackView``. One
    function for ``bibau export`` and the sweep's own export file, so both say the same."""
    from .results import fallback_warning

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


def read_export(path: str | Path) -> dict:
    """An export file, checked for its kind and version."""
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    if not isinstance(doc, dict) or doc.get("kind") != EXPORT_KIND:
        raise ValueError(f"{path}: not a {EXPORT_KIND} file (kind: {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != EXPORT_VERSION:
        raise ValueError(f"{path}: version {doc.get('version')!r}; this code reads version {EXPORT_VERSION}")
    return doc


# -- bibau export ---------------------------------------------------------------------------------


class RuleNotMet(Exception):
    """``--strict``: for some attack no trial meets the export rule."""


def export_sweep(uri: str, experiment: str, *, sweep_id: str | None = None, rule: str | None = None,
                 per_defense: bool = False, out: str | Path | None = None, log=print,
                 fingerprint: str | None = None, strict: bool = False, tag: bool = True) -> tuple[Path, dict]:
    """Read a finished sweep from MLflow, pick by ``rule`` and write the export file.

    Without ``sweep_id`` the newest sweep of ``experiment`` started from the spec with
    ``fingerprint`` is used (any spec's when None); without ``rule``, the sweep spec's own
    ``export_rule``. The objectives come from the spec the sweep logged. A selection no trial
    met the rule for carries a ``warning`` (also printed, and tagged on the parent run); with
    ``strict`` that raises :class:`RuleNotMet` before anything is written. ``tag``: mark the
    picks in MLflow (``picked``; per attack, or per attack and defense with ``per_defense``) and write
    them as the runs' descriptions.
    """
    import os

    from .results import attack_view, tag_picks
    from .spec import Objective
    from .tracking import open_sweep

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracker, spec = open_sweep(uri, experiment, sweep_id, fingerprint)
    objectives = [Objective(**o) for o in spec["objectives"]]
    metrics, modes = [o.metric for o in objectives], [o.mode for o in objectives]
    parsed = parse_rule(rule or spec.get("export_rule") or DEFAULT_RULE, metrics)
    every = tracker.records()
    records = [r for r in every if r.usable(metrics)]
    for r in records:
        r.config = tracker.load_config(r.run_id)
    state = tracker.state()
    doc = build_export(records, parsed, metrics, modes, [o.best for o in objectives],
                       {"experiment": experiment, "sweep": tracker.sweep_id,
                        "code_version": state.get("code_version", ""), "tracking_uri": uri}, per_defense)
    if not doc["selections"]:
        raise ValueError(f"sweep {tracker.sweep_id}: no completed trial to export (rule {parsed.text!r}, fallback {parsed.fallback})")
    attack_runs = state.get("attack_runs", {})
    views = {a: attack_view(a, every, dict(tracker.client.get_run(run).data.metrics), parsed, objectives)
             for a, run in attack_runs.items()}
    warnings = add_warnings(doc, views)
    if strict and warnings:
        raise RuleNotMet(f"--strict: no trial meets the rule {parsed.text!r} for "
                         f"{', '.join(sorted({s['attack'] for s in doc['selections'] if 'warning' in s}))}; "
                         f"nothing written.\n" + "\n".join(warnings))
    path = write_export(doc, out or "export.yaml")
    for s in doc["selections"]:
        shown = ", ".join(f"{m}={s['metrics'].get(m, float('nan')):.4f}" for m in metrics)
        view = views.get(s["attack"])
        base, ca = (view.undefended.get("ca") if view else None), s["metrics"].get("ca")
        context = "" if base is None or ca is None else (
            f" (CA drop {100 * (base - ca):.1f} points from the undefended model"
            + (f", chance level {100 * view.chance:.1f}%)" if view.chance is not None else ")"))
        log(f"{s['attack']}: {s['defense']} ({s['provenance']['picked_by']}) {shown}{context}  "
            f"run {s['provenance']['run_id']}")
    if tag and attack_runs:
        # per defense, the file's picks are not the views' one pick per attack: tag what the file holds
        picks = {s["provenance"]["run_id"]: s["provenance"]["picked_by"] for s in doc["selections"]
                 if s["provenance"].get("run_id")} if per_defense else None
        tag_picks(tracker.client, list(views.values()), parsed.text, attack_runs, state["parent_run_id"], objectives,
                  experiment_id=state.get("experiment_id"), sweep_id=tracker.sweep_id, picks=picks,
                  scope="attack and defense" if per_defense else "attack")
        log("picked runs tagged in MLflow: filter tags.picked = 'true'")
    for w in warnings:  # last, where nobody misses them
        log(w)
    log(f"wrote {path} ({len(doc['selections'])} selection(s)); reproduce with: bibau run {path} --attack NAME")
    return path, doc


def cmd_export(args) -> int:
    from trainables.config import ConfigError

    uri, experiment = args.tracking_uri, args.experiment
    fingerprint = None
    if args.spec:
        from .spec import load_spec
        from .sweep import spec_fingerprint

        spec, _ = load_spec(args.spec, args.overrides)
        uri, experiment = uri or spec.tracking_uri, experiment or spec.experiment
        fingerprint = spec_fingerprint(spec)  # the sweeps of this spec, not the experiment's newest
    if not uri or not experiment:
        raise ConfigError("bibau export: give the sweep's SPEC, or --tracking-uri and --experiment")
    try:
        export_sweep(uri, experiment, sweep_id=args.sweep, rule=args.rule, per_defense=args.per_defense, out=args.out,
                     fingerprint=fingerprint, strict=args.strict)
    except RuleNotMet as exc:
        import sys

        print(f"bibau export: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="pick configurations from a sweep's Pareto fronts and write them with their provenance",
        description="Per attack, the rule picks one point of the Pareto front. A rule is a ';'-separated list "
        "of clauses: 'max METRIC' or 'min METRIC' (what is optimised), constraints 'METRIC <= VALUE' (or >=, <, >) "
        "and 'fallback nearest' (default: with no point meeting the constraints, take the point nearest the "
        "ideal) or 'fallback none'. The file is accepted by 'bibau run FILE --attack NAME' and 'bibau sweep FILE'.")
    p.add_argument("spec", nargs="?", help="the sweep spec (gives the tracking URI and experiment)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="spec overrides the sweep ran with (e.g. storage)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's)")
    p.add_argument("--experiment", help="MLflow experiment (default: the spec's)")
    p.add_argument("--sweep", help="sweep id (default: the newest sweep of SPEC, found by the spec's fingerprint; "
                   "without SPEC the newest sweep of the experiment)")
    p.add_argument("--rule", help=f"selection rule (default: the spec's export_rule, normally {DEFAULT_RULE!r})")
    p.add_argument("--per-defense", action="store_true", help="one selection per attack and defense, not per attack")
    p.add_argument("-o", "--out", default="export.yaml", help="file to write (default: export.yaml)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit code 1, nothing written) when for some attack no trial meets the rule, "
                   "instead of taking the fallback with a warning")
    p.set_defaults(func=cmd_export)
