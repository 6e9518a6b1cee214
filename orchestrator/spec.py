"""The sweep spec: what ``bibau sweep SPEC.yaml`` runs, typed and validated before Ray starts.

A spec names a base trial config (a :class:`~trainables.schema.RunConfig` mapping), the
attacks, the defenses (each with fixed settings, and a search space over its own parameters
for a tuned defense), the objectives, the budgets, the resources per trial, MLflow and the
storage path. :func:`load_spec` builds it and then :func:`plan` builds one trial config per
attack x defense, so every error names its field before any work starts.

A ``bibau export`` file is accepted in place of a spec: each selection becomes a fixed run.
"""
from __future__ import annotations

import copy
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import trainables  # noqa: F401  (fill the registries the validation looks names up in)
from trainables.config import Config, ConfigError, build, load_yaml, merge, param, parse_overrides, to_dict
from trainables.registry import DEFENSES, EVALUATIONS
from trainables.schema import GateConfig, RunConfig

from .export import EXPORT_KIND, DEFAULT_RULE, parse_rule

SAMPLERS = ("tpe", "nsga2")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class ParamSpace(Config):
    """The distribution one hyperparameter of a tuned defense is searched over."""

    type: str = param("float", "distribution", choices=("float", "int", "categorical"))
    low: float | None = param(None, "lower bound, inclusive (float, int)")
    high: float | None = param(None, "upper bound, inclusive (float, int)")
    log: bool = param(False, "sample uniformly in log space (float, int; needs low > 0)")
    step: float | None = param(None, "grid step (float, int); None: continuous floats, steps of 1 for ints",
                               low=0.0, low_open=True)
    choices: list[Any] | None = param(None, "the values to choose from (categorical)")

    def check(self, path: str) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{path}.choices: a categorical parameter needs a non-empty list of choices")
            for key in ("low", "high", "step"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}: not used by a categorical parameter (give choices only)")
            if self.log:
                raise ConfigError(f"{path}.log: not used by a categorical parameter")
            for i, c in enumerate(self.choices):
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise ConfigError(f"{path}.choices[{i}]: {c!r}; allowed: numbers, strings, booleans, null")
            return
        if self.choices is not None:
            raise ConfigError(f"{path}.choices: only for type categorical (this one is {self.type})")
        for key in ("low", "high"):
            if getattr(self, key) is None:
                raise ConfigError(f"{path}.{key}: required for a {self.type} parameter")
        if not self.low < self.high:
            raise ConfigError(f"{path}.high: {self.high} must be greater than low ({self.low})")
        if self.log and self.low <= 0:
            raise ConfigError(f"{path}.low: {self.low} must be > 0 with log: true")
        if self.log and self.step is not None:
            raise ConfigError(f"{path}.step: a log-scale parameter has no step")
        if self.type == "int":
            for key in ("low", "high", "step"):
                v = getattr(self, key)
                if v is not None and not float(v).is_integer():
                    raise ConfigError(f"{path}.{key}: {v} is not an integer (type: int)")

    def endpoints(self) -> list[Any]:
        """The values whose validity implies every sampled value's (bounds, or every choice)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def distribution(self):
        """The Optuna distribution (Optuna is a driver-side dependency only)."""
        import optuna

        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                                      step=self.step)


@dataclass
class Objective(Config):
    metric: str = param(help="a metric of the trial report (ca, asr, r_asr, q_asr, bec, ...)")
    mode: str = param(help="max or min", choices=("max", "min"))
    ref: float | None = param(None, "worst value that still counts, the hypervolume's reference point; "
                              "None: 0 for max, 1 for min (rates in [0, 1])")
    ideal: float | None = param(None, "best possible value, for 'nearest to the ideal'; None: 1 for max, 0 for min")

    @property
    def reference(self) -> float:
        return self.ref if self.ref is not None else (0.0 if self.mode == "max" else 1.0)

    @property
    def best(self) -> float:
        return self.ideal if self.ideal is not None else (1.0 if self.mode == "max" else 0.0)


DEFAULT_OBJECTIVES = [
    {"metric": "ca", "mode": "max"},
    {"metric": "r_asr", "mode": "min"},
    {"metric": "q_asr", "mode": "min"},
]


@dataclass
class DefenseSpec(Config):
    """A defense in the sweep: a fixed-setting baseline, or a study over ``space``."""

    name: str = param(help="registered defense", registry=DEFENSES)
    label: str | None = param(None, "name of this entry in results and MLflow; None: the defense's name")
    fixed: dict[str, Any] = param({}, "settings of the defense that every trial uses")
    space: dict[str, ParamSpace] = param({}, "hyperparameter -> distribution; empty: a baseline run once per attack")
    trials: int = param(20, "trials of the study per attack (tuned defenses only)", low=1)
    concurrency: int | None = param(None, "most trials of one study at once; None: only the sweep's limit", low=1)
    sampler: str = param("tpe", "Optuna sampler: tpe (multi-objective TPE) or nsga2", choices=SAMPLERS)
    startup_trials: int | None = param(None, "TPE: random trials before the model is used; None: Optuna's default (10)", low=0)
    population: int | None = param(None, "NSGA-II: population size; None: Optuna's default (50)", low=2)
    seed: int | None = param(None, "sampler seed; None: the sweep's seed plus the study's index", low=0)

    @property
    def key(self) -> str:
        return self.label or self.name

    @property
    def tuned(self) -> bool:
        return bool(self.space)

    def check(self, path: str) -> None:
        if self.label is not None and not _LABEL.match(self.label):
            raise ConfigError(f"{path}.label: {self.label!r}; use letters, digits and _ . + -")
        both = sorted(set(self.fixed) & set(self.space))
        if both:
            raise ConfigError(f"{path}.space.{both[0]}: also in fixed; a parameter is either fixed or searched")
        if "name" in self.fixed:
            raise ConfigError(f"{path}.fixed.name: the defense is chosen by {path}.name")
        cls = DEFENSES.get(self.name).Config
        allowed = {f.name: f for f in fields(cls) if f.init and f.name != "name"}
        hints = typing.get_type_hints(cls)
        # the fixed settings first, so a bad fixed value is blamed on itself, not on a space bound
        try:
            build(cls, merge(self.fixed, {"name": self.name}), f"{path}.fixed")
        except ConfigError as exc:
            text = str(exc)
            if not any(f".{k}" in text for k in self.space):  # else the space may be what makes it valid
                raise ConfigError(text.replace(f"{path}.fixed.name", f"{path}.name")) from None
        for key, space in self.space.items():
            where = f"{path}.space.{key}"
            if key not in allowed:
                raise ConfigError(f"{where}: {self.name} has no parameter {key!r}; its parameters: "
                                  + ", ".join(sorted(allowed)))
            hint = hints[key]
            kinds = set(typing.get_args(hint)) or {hint}
            if space.type == "float" and int in kinds and float not in kinds:
                raise ConfigError(f"{where}.type: {self.name}.{key} is an integer; use type: int")
            names = ("low", "high") if space.type != "categorical" else [f"choices[{i}]" for i in range(len(space.endpoints()))]
            for label, value in zip(names, space.endpoints()):
                try:
                    build(cls, merge(self.fixed, {"name": self.name, key: value}), "defense", registry=None)
                except ConfigError as exc:
                    raise ConfigError(f"{where}.{label}: {value!r} is not allowed for {self.name}.{key} ({exc})") from None
        try:
            build(cls, merge(self.fixed, {"name": self.name}), f"{path}.fixed")
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"{path}.fixed.name", f"{path}.name")) from None


@dataclass
class Resources(Config):
    cpus: float = param(1.0, "CPU cores per trial (Ray bookkeeping; torch uses as many threads)", low=0.0, low_open=True)
    gpus: float = param(0.0, "GPUs per trial; a fraction packs several trials on one GPU (no memory isolation)", low=0.0)


@dataclass
class Tracking(Config):
    uri: str | None = param(None, "MLflow tracking URI (sqlite:///ABS/PATH.db, http://host:5000); "
                            "None: $MLFLOW_TRACKING_URI when set, else sqlite:///<storage>/mlflow.db")
    experiment: str | None = param(None, "MLflow experiment; None: $MLFLOW_EXPERIMENT_NAME when set, else the spec's name")


@dataclass
class Grid(Config):
    """Data sets and models every attack of the spec runs on (attacks x data sets x models)."""

    data: list[dict[str, Any]] = param([], "data sections (over base.data; one naming another data set replaces it); "
                                       "empty: base.data only")
    model: list[dict[str, Any]] = param([], "model sections (over base.model; one naming another model replaces it); "
                                        "empty: base.model only")

    def cells(self, path: str) -> list[tuple[str, dict]]:
        """(label suffix, {data, model} overrides) per cell of the grid."""
        def named(kind: str, items: list[dict]) -> list[tuple[str, dict | None]]:
            if not items:
                return [("", None)]
            out = []
            for j, item in enumerate(items):
                tag = str(item.get("name") or f"{kind}{j}")
                if not _LABEL.match(tag):
                    raise ConfigError(f"grid.{kind}[{j}].name: {tag!r}; use letters, digits and _ . + -")
                out.append((f"+{tag}", item))
            tags = [t for t, _ in out]
            if len(set(tags)) != len(tags):  # two cifar10 variants: tell them apart by position
                out = [(f"+{kind}{j}", item) for j, (_, item) in enumerate(out)]
            return out

        cells = []
        for dt, d in named("data", self.data):
            for mt, m in named("model", self.model):
                cells.append((dt + mt, {k: v for k, v in (("data", d), ("model", m)) if v is not None}))
        return cells


@dataclass
class SweepSpec(Config):
    name: str = param(help="name of the sweep: MLflow experiment (by default), folder under storage, study prefix")
    base: dict[str, Any] = param({}, "the RunConfig every trial starts from (data, model, train, evaluation, seed, ...)")
    attacks: list[Any] = param([], "attack sections (a registered name, or a mapping with name, target, "
                               "poison_rate, ..., an optional label, and its own data, model or train "
                               "sections over base's)")
    defenses: list[DefenseSpec] = param([], "defenses: tuned (with space) or fixed baselines")
    objectives: list[Objective] = param(factory=lambda: [Objective(**o) for o in DEFAULT_OBJECTIVES],
                                        help="what every study optimises, in this order")
    concurrency: int = param(2, "most trials running at once over the whole sweep", low=1)
    max_failures: int = param(1, "retries of a trial that raised before it is recorded as failed", low=0)
    resources: Resources = param(factory=Resources, help="resources of one defense trial")
    attack_resources: Resources | None = param(None, "resources of one attack-stage task; None: as resources")
    pending_timeout_s: float | None = param(1800.0, "seconds a trial may wait for resources while nothing runs "
                                            "before the sweep stops with the reason (a remote cluster whose "
                                            "nodes are all smaller than resources); None: wait forever",
                                            low=0.0, low_open=True)
    tracking: Tracking = param(factory=Tracking, help="MLflow")
    storage: str = param("runs/sweeps", "folder of Tune state, Optuna studies, the model cache and results "
                         "(a shared file system for multi-node clusters)")
    seed: int = param(0, "seed of the samplers (each study adds its index)", low=0)
    save_models: bool = param(False, "keep every trial's purified and backdoored model in its folder "
                              "(off: config.yaml and results.json only; the attack models stay in the cache)")
    grid: Grid | None = param(None, "data sets and models every attack runs on: {data: [sections], model: [sections]}; "
                              "each cell is its own attack (label <attack>+<data>+<model>) with its own studies; "
                              "None: base.data and base.model (an attack entry may also carry its own data/model)")
    gate: GateConfig | None = param(None, "cheap-first evaluation of every defense trial: {ca_min, ca_drop_max}; "
                                    "a trial whose CA fails it skips RA, QRA and BEC and is recorded as gated "
                                    "(Optuna: pruned); None: every trial is evaluated fully")
    export_rule: str = param(DEFAULT_RULE, "rule the sweep's own export picks configurations by (see bibau export --help)")
    replicates: int = param(1, "seeds each picked configuration and each baseline is run with, counting the searched "
                            "run: N > 1 re-runs them N - 1 times after the search with other seeds of the defense and "
                            "the evaluation (same attacked model); bibau report then gives mean ± std (n)", low=1, high=100)
    equal_budget: str | None = param(None, "label of a tuned defense (e.g. bibau_u) whose trials every tuned defense "
                                     "runs, so each has the same search budget (fair tuning); None: each its own trials")
    replay: list[dict[str, Any]] = param([], "fixed runs {attack, defense, config}, filled from a bibau export file")

    def check(self, path: str) -> None:
        p = (path + ".") if path else ""
        if not _LABEL.match(self.name):
            raise ConfigError(f"{p}name: {self.name!r}; use letters, digits and _ . + - (it names folders)")
        if not self.replay:
            if not self.attacks:
                raise ConfigError(f"{p}attacks: at least one attack is required")
            if not self.defenses:
                raise ConfigError(f"{p}defenses: at least one defense is required")
        labels = [a["label"] for a in attack_sections(self.attacks, f"{p}attacks", self.grid)]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
                raise ConfigError(f"{p}attacks[{i}]: label {lab!r} is used twice; give each entry its own label")
        keys = [d.key for d in self.defenses]
        for i, k in enumerate(keys):
            if k in keys[:i]:
                raise ConfigError(f"{p}defenses[{i}]: label {k!r} is used twice; give each entry its own label")
        if not self.objectives:
            raise ConfigError(f"{p}objectives: at least one objective is required")
        metrics = [o.metric for o in self.objectives]
        for i, m in enumerate(metrics):
            if m in metrics[:i]:
                raise ConfigError(f"{p}objectives[{i}].metric: {m!r} is listed twice")
        if self.equal_budget is not None and self.equal_budget not in {d.key for d in self.defenses if d.tuned}:
            raise ConfigError(f"{p}equal_budget: {self.equal_budget!r} is not a tuned defense of the spec; allowed: "
                              + (", ".join(d.key for d in self.defenses if d.tuned) or "none (no defense has a space)"))
        for i, entry in enumerate(self.replay):
            for key in ("attack", "defense", "config"):
                if key not in entry:
                    raise ConfigError(f"{p}replay[{i}].{key}: required")
        try:
            parse_rule(self.export_rule, metrics)
        except ValueError as exc:
            raise ConfigError(f"{p}export_rule: {exc}") from None

    # -- derived paths ---------------------------------------------------------------------------
    @property
    def storage_path(self) -> Path:
        return Path(self.storage).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        # the environment's MLflow settings are how cluster nodes (cluster.env, KubeRay env) name their server
        return (self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
                or f"sqlite:///{self.storage_path / 'mlflow.db'}")

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.name

    @property
    def modes(self) -> list[str]:
        return [o.mode for o in self.objectives]

    @property
    def metrics(self) -> list[str]:
        return [o.metric for o in self.objectives]


def tuned_trials(spec: Mapping) -> dict[str, int]:
    """Trials per attack of each tuned defense of a spec mapping (label -> trials), ``equal_budget`` applied:
    what the plan runs and the report states."""
    tuned = {str(d.get("label") or d["name"]): int(d.get("trials", 20))
             for d in spec.get("defenses") or [] if d.get("space")}
    ref = spec.get("equal_budget")
    return {k: tuned[ref] for k in tuned} if ref in tuned else tuned


def attack_sections(entries: list[Any], path: str = "attacks", grid: "Grid | None" = None) -> list[dict]:
    """Each attack entry as a mapping with a ``label`` (a bare name is ``{name: NAME}``), and the
    ``data``/``model``/``train`` sections it runs on beside ``base`` (``overrides``; an attack that
    needs a longer training than the others, WaNet at CPU scale, says so in its own ``train``). With a
    ``grid``, each entry once per data set x model of the grid, labelled ``<attack>+<data>+<model>``."""
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{path}[{i}]: expected an attack name or a mapping, got {entry!r}")
        entry = dict(entry)
        label = entry.pop("label", None) or entry.get("name") or "badnets"
        if not isinstance(label, str) or not _LABEL.match(label):
            raise ConfigError(f"{path}[{i}].label: {label!r}; use letters, digits and _ . + -")
        own = {}
        for key in ("data", "model", "train"):
            if key in entry:
                if not isinstance(entry[key], Mapping):
                    raise ConfigError(f"{path}[{i}].{key}: expected a {key} section (a mapping), got {entry[key]!r}")
                own[key] = dict(entry.pop(key))
        for extra, overrides in (grid.cells(f"{path}[{i}]") if grid is not None else [("", {})]):
            cell = dict(overrides)
            for key, section in own.items():  # the entry's own section over the grid's
                cell[key] = _section_over(cell[key], section) if key in cell else section
            out.append({"label": label + extra, "section": entry, "overrides": cell})
    return out


def _section_over(base: Mapping, section: Mapping) -> dict:
    """``section`` over ``base``'s: merged, unless it names another implementation (then alone,
    so a VGG does not inherit a ResNet's width)."""
    if "name" in section and section["name"] != base.get("name"):
        return dict(section)
    return merge(base, section)


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
                cfg[key] = _section_over(cfg.get(key) or {}, section)
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
                    trial = merge(trial, {"evaluation": {"gate": to_dict(spec.gate)}})
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
