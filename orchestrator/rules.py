"""The export rule's language: which point of a Pareto front a sweep picks (a leaf of the spec
language: the spec checks its ``export_rule`` with it, the export, the results and the figures use it).

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
from typing import Sequence

from .pareto import TrialRecord, front_of

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
