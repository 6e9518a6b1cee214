"""A sweep's plan: the attack stages and the studies (attack x defense) of a spec, one resolved
trial config each. :func:`plan` builds every trial config (and so validates it) before Ray starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from trainables.config import ConfigError, build, merge, to_dict
from trainables.registry import EVALUATIONS
from trainables.schema import RunConfig

from .spaces import ParamSpace
from .spec_sections import SweepSpec, section_over, attack_sections, tuned_trials

@dataclass
class Study:
    """One attack x defense: a tuned study (``space``) or a fixed run (empty ``space``, 1 trial)."""

    key: str
    attack: str
    defense: str
    config: dict  # resolved RunConfig mapping; a trial merges its sampled params into config["defense"]
    space: dict[str, ParamSpace] = field(default_factory=dict)
    trials: int = 1
    concurrency: int | None = None
    sampler: str = "tpe"
    startup_trials: int | None = None
    population: int | None = None
    seed: int = 0

    @property
    def tuned(self) -> bool:
        return bool(self.space)


@dataclass
class AttackStage:
    """The attack stage of one attack: the trial config with no defense."""

    label: str
    config: dict


@dataclass
class Plan:
    attacks: list[AttackStage]
    studies: list[Study]

    def study(self, key: str) -> Study:
        for s in self.studies:
            if s.key == key:
                return s
        raise KeyError(key)


def _resolve(mapping: Mapping, where: str) -> dict:
    try:
        return to_dict(build(RunConfig, mapping))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _metric_sources(metrics: list[str]) -> dict[str, str]:
    from trainables.evaluation import run_order

    out: dict[str, str] = {}
    for name in run_order(metrics):
        for m in getattr(EVALUATIONS.get(name), "outputs", ()):
            out.setdefault(m, name)
    return out


def plan(spec: SweepSpec) -> Plan:
    """The attack stages and studies of ``spec``, every trial config built (and so validated)."""
    cache = str(spec.storage_path / "cache")
    attacks: dict[str, AttackStage] = {}
    studies: list[Study] = []
    if spec.replay:
        for i, entry in enumerate(spec.replay):
            cfg = merge(entry["config"], {} if entry["config"].get("cache_dir") else {"cache_dir": cache})
            resolved = _resolve(cfg, f"replay[{i}].config")
            if resolved["defense"] is None:
                raise ConfigError(f"replay[{i}].config.defense: an exported selection needs a defense")
            attack, defense = str(entry["attack"]), str(entry["defense"])
            attacks.setdefault(attack, AttackStage(attack, {**resolved, "defense": None}))
            key = f"{attack}/{defense}"
            if any(s.key == key for s in studies):
                key = f"{key}#{i}"
            studies.append(Study(key, attack, defense, resolved, seed=spec.seed + i))
    else:
        base = merge({"cache_dir": cache}, spec.base)
        # a trial uses the CPUs Ray gives it; the count is in its config, so a re-run matches it
        trial_threads = spec.base.get("threads") or max(1, int(spec.resources.cpus))
        attack_threads = spec.base.get("threads") or max(1, int((spec.attack_resources or spec.resources).cpus))
        for i, a in enumerate(attack_sections(spec.attacks, grid=spec.grid)):
            cfg = merge(base, {"attack": a["section"], "defense": None, "threads": attack_threads})
            for key, section in a["overrides"].items():  # this cell's data set and model
                cfg[key] = section_over(cfg.get(key) or {}, section)
            attacks[a["label"]] = AttackStage(a["label"], _resolve(cfg, f"attacks[{i}] ({a['label']})"))
        index = 0
        budget = tuned_trials(to_dict(spec))
        for j, d in enumerate(spec.defenses):
            for label, stage in attacks.items():
                defense = merge(d.fixed, {"name": d.name})
                # the config must also hold with sampled values: check it with the space's low ends
                probe = merge(defense, {k: s.endpoints()[0] for k, s in d.space.items()})
                trial = merge(stage.config, {"threads": trial_threads})
                if spec.gate is not None:  # the spec's gate wins over one in base.evaluation
                    gate = to_dict(spec.gate)
                    if not d.tuned and gate.get("asr_max") is not None:
                        # a baseline is the comparison, one run per attack: its R-ASR shows how far the
                        # backdoor comes back, which is worth the RA it costs; asr_max saves in searches
                        gate = {**gate, "asr_max": None}
                        if gate.get("ca_min") is None and gate.get("ca_drop_max") is None:
                            gate = None
                    trial = merge(trial, {"evaluation": {"gate": gate}})
                _resolve(merge(trial, {"defense": probe}), f"defenses[{j}] ({d.key}) with attack {label}")
                resolved = _resolve(merge(trial, {"defense": defense}), f"defenses[{j}] ({d.key}) with attack {label}")
                studies.append(Study(
                    key=f"{label}/{d.key}", attack=label, defense=d.key, config=resolved, space=dict(d.space),
                    trials=budget[d.key] if d.tuned else 1, concurrency=d.concurrency, sampler=d.sampler,
                    startup_trials=d.startup_trials, population=d.population,
                    seed=d.seed if d.seed is not None else spec.seed + index))
                index += 1
    # every objective must be a metric the trials' evaluations report
    for s in studies:
        sources = _metric_sources(s.config["evaluation"]["metrics"])
        for i, o in enumerate(spec.objectives):
            if o.metric not in sources:
                raise ConfigError(
                    f"objectives[{i}].metric: {o.metric!r} is not reported by the evaluations of {s.key} "
                    f"(evaluation.metrics = {s.config['evaluation']['metrics']}); reported: {', '.join(sorted(sources))}")
    return Plan(list(attacks.values()), studies)


def smoke_plan(plan: Plan) -> Plan:
    """At most 2 trials per study on the trial's smoke-test sizes (a quick end-to-end check)."""
    from trainables.config import build
    from trainables.schema import RunConfig
    from trainables.trial import smoke_config

    def shrink(cfg: dict) -> dict:
        return to_dict(smoke_config(build(RunConfig, cfg)))

    for a in plan.attacks:
        a.config = shrink(a.config)
    for s in plan.studies:
        s.config = shrink(s.config)
        s.trials = min(s.trials, 2)
    return plan
