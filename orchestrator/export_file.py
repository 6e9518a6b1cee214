"""The export file (``kind: bibau-export``): per attack (or attack x defense) the configuration a
rule picked, with its metrics and provenance. ``bibau export`` and the sweep write it; ``bibau
run FILE --attack NAME`` and ``bibau sweep FILE`` read it (``config.py``, ``spec.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from .pareto import TrialRecord
from .rules import Rule, select

EXPORT_KIND = "bibau-export"
EXPORT_VERSION = 1


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


def read_export(path: str | Path) -> dict:
    """An export file, checked for its kind and version."""
    with open(path) as fh:
        doc = yaml.safe_load(fh)
    if not isinstance(doc, dict) or doc.get("kind") != EXPORT_KIND:
        raise ValueError(f"{path}: not a {EXPORT_KIND} file (kind: {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != EXPORT_VERSION:
        raise ValueError(f"{path}: version {doc.get('version')!r}; this code reads version {EXPORT_VERSION}")
    return doc
