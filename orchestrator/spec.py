"""The sweep spec, loaded: ``bibau sweep SPEC.yaml`` (or a ``bibau export`` file, whose selections
become fixed runs) plus ``--set key=value`` overrides -> the validated :class:`SweepSpec` and its
:class:`~orchestrator.plan.Plan`, every error naming its field before Ray starts.

The top of the spec language: the sections live in ``spec_sections.py``, the objectives in
``objectives.py``, the search spaces in ``spaces.py``, the export rule in ``rules.py``, the plan
in ``plan.py``; their public names are importable from here too.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Mapping

from trainables.cache import content_hash
from trainables.config import ConfigError, build, load_yaml, merge, parse_overrides, to_dict

from .export_file import EXPORT_KIND
from .objectives import DEFAULT_OBJECTIVES, Objective
from .plan import AttackStage, Plan, Study, plan
from .spaces import ParamSpace
from .spec_sections import (DefenseSpec, Grid, Resources, SweepSpec, Tracking, attack_sections,
                            tuned_trials)

__all__ = ["AttackStage", "DEFAULT_OBJECTIVES", "DefenseSpec", "Grid", "Objective", "ParamSpace", "Plan", "Resources",
           "Study", "SweepSpec", "Tracking", "apply_override", "attack_sections", "load_spec", "plan",
           "spec_fingerprint", "spec_from_export", "tuned_trials"]


def spec_from_export(data: Mapping, path: str) -> dict:
    """A spec mapping whose replay runs are the selections of a ``bibau export`` file."""
    selections = data.get("selections")
    if not isinstance(selections, list) or not selections:
        raise ConfigError(f"{path}: selections: an export file needs a non-empty list of selections")
    replay = []
    for i, sel in enumerate(selections):
        if not isinstance(sel, Mapping) or not isinstance(sel.get("config"), Mapping):
            raise ConfigError(f"{path}: selections[{i}].config: required (a RunConfig mapping)")
        replay.append({"attack": sel.get("attack", f"attack{i}"), "defense": sel.get("defense", f"defense{i}"),
                       "config": dict(sel["config"])})
    prov = selections[0].get("provenance") or {}
    name = f"replay-{Path(path).stem}"
    # the default objectives the selections were measured on (an export of a sweep without QRA has no q_asr)
    objectives = [o for o in DEFAULT_OBJECTIVES if all(o["metric"] in (s.get("metrics") or {}) for s in selections)]
    return {"name": re.sub(r"[^A-Za-z0-9_.+-]", "-", name),
            "tracking": {"experiment": prov.get("experiment") and f"{prov['experiment']}-replay"},
            "objectives": objectives or [{"metric": "ca", "mode": "max"}],
            "export_rule": f"max {(objectives or [{'metric': 'ca'}])[0]['metric']}; fallback nearest",
            "replay": replay}


def apply_override(data: Mapping, item: str) -> dict:
    """``KEY=VALUE`` on a spec mapping. A list is entered by index or by an entry's label or
    name: ``defenses.0.trials=8``, ``defenses.bibau_u.trials=8``, ``attacks.badnets.poison_rate=0.05``."""
    parsed = parse_overrides([item])  # validates the form, parses the value as YAML
    key = item.partition("=")[0].strip()
    value: Any = parsed
    for k in key.split("."):
        value = value[k]
    out = copy.deepcopy(dict(data))
    node: Any = out
    parts = key.split(".")
    for depth, k in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, k, where)
            if last:
                node[idx] = value
            else:
                if isinstance(node[idx], str):  # a bare attack name becomes a mapping to hold the key
                    node[idx] = {"name": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[k] = merge(node[k], value) if isinstance(node.get(k), Mapping) and isinstance(value, Mapping) else value
            else:
                node = node.setdefault(k, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is not a section")
    return out


def _list_index(items: list, key: str, where: str) -> int:
    if key.isdigit():
        if int(key) >= len(items):
            raise ConfigError(f"override {where}: index {key} is out of range ({len(items)} entries)")
        return int(key)
    for i, entry in enumerate(items):
        names = {entry} if isinstance(entry, str) else {entry.get("label"), entry.get("name")} if isinstance(entry, Mapping) else set()
        if key in names:
            return i
    raise ConfigError(f"override {where}: no entry labelled or named {key!r}")


def load_spec(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepSpec, Plan]:
    """Spec file (or export file) + ``key=value`` overrides -> the validated spec and its plan."""
    data = load_yaml(path)
    if data.get("kind") == EXPORT_KIND:
        data = spec_from_export(data, path)
    elif "kind" in data:
        raise ConfigError(f"{path}: kind: {data['kind']!r} is not a sweep spec or a {EXPORT_KIND} file")
    for item in overrides:
        data = apply_override(data, item)
    spec = build(SweepSpec, data)
    return spec, plan(spec)


def spec_fingerprint(spec: SweepSpec) -> str:
    """What a sweep was started from, as a content hash: a resumed sweep, ``bibau export`` and ``bibau
    report`` find the sweeps of a spec by it. Leaves out what may change between a sweep and its
    resumption."""
    data = to_dict(spec)
    for k in ("concurrency", "max_failures", "resources", "attack_resources", "tracking", "export_rule",
              "pending_timeout_s"):
        data.pop(k, None)  # may change between a sweep and its resumption
    if data.get("equal_budget") is None:  # unset: the fingerprint of a spec written before the field existed
        data.pop("equal_budget", None)
    return content_hash(data)
