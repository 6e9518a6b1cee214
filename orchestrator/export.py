"""``bibau export``: pick configurations from each attack's Pareto front by a rule (``rules.py``),
and write them with their provenance to the export file (``export_file.py``) that ``bibau run``
and ``bibau sweep`` accept. The rule language and the file's format are importable from here too.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from trainables.config import ConfigError

from .export_file import EXPORT_KIND, EXPORT_VERSION, build_export, read_export, write_export
from .objectives import Objective
from .results import add_warnings, attack_view, tag_picks
from .rules import DEFAULT_RULE, Rule, distance_to_ideal, parse_rule, select
from .spec import load_spec, spec_fingerprint
from .tracking_read import open_sweep

__all__ = ["DEFAULT_RULE", "EXPORT_KIND", "EXPORT_VERSION", "Rule", "RuleNotMet", "add_export", "add_warnings",
           "build_export", "cmd_export", "distance_to_ideal", "export_sweep", "parse_rule", "read_export", "select",
           "write_export"]


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
    uri, experiment = args.tracking_uri, args.experiment
    fingerprint = None
    if args.spec:
        spec, _ = load_spec(args.spec, args.overrides)
        uri, experiment = uri or spec.tracking_uri, experiment or spec.experiment
        fingerprint = spec_fingerprint(spec)  # the sweeps of this spec, not the experiment's newest
    if not uri or not experiment:
        raise ConfigError("bibau export: give the sweep's SPEC, or --tracking-uri and --experiment")
    try:
        export_sweep(uri, experiment, sweep_id=args.sweep, rule=args.rule, per_defense=args.per_defense, out=args.out,
                     fingerprint=fingerprint, strict=args.strict)
    except RuleNotMet as exc:
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
