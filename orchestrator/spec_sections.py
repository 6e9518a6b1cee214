"""The sweep spec's typed sections (what ``bibau sweep SPEC.yaml`` runs): the attacks, the
defenses (fixed settings, and a search space for a tuned one), objectives, budgets, resources,
MLflow, storage, the data set x model grid. Each section checks itself (``Config.check``), so
every error names its field before any work starts. A new sweep option is a field here.
"""
from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import trainables  # noqa: F401  (fill the registries the validation looks names up in)
from trainables.config import Config, ConfigError, build, merge, param
from trainables.registry import DEFENSES
from trainables.schema import GateConfig

from .objectives import DEFAULT_OBJECTIVES, Objective
from .rules import DEFAULT_RULE, parse_rule
from .spaces import ParamSpace

SAMPLERS = ("tpe", "nsga2")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


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
    gate: GateConfig | None = param(None, "cheap-first evaluation of every defense trial: {ca_min, ca_drop_max, asr_max}; "
                                    "a trial whose CA or ASR fails it skips RA, QRA and BEC and is recorded as gated "
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
                cell[key] = section_over(cell[key], section) if key in cell else section
            out.append({"label": label + extra, "section": entry, "overrides": cell})
    return out


def section_over(base: Mapping, section: Mapping) -> dict:
    """``section`` over ``base``'s: merged, unless it names another implementation (then alone,
    so a VGG does not inherit a ResNet's width)."""
    if "name" in section and section["name"] != base.get("name"):
        return dict(section)
    return merge(base, section)
