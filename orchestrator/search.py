"""One Tune searcher over every study of a sweep, so all attacks share the cluster at once.

Ray Tune runs one search algorithm per ``Tuner``; :class:`StudySearcher` owns one
multi-objective ``OptunaSearch`` per tuned study (attack x defense, each its own Optuna study
in the sweep's RDB storage and its own sampler seed) and the fixed runs of the baselines. It
hands out trials round-robin over the studies that still have budget (and are below their own
concurrency cap), remembers which study each trial belongs to, and forwards completions to
that study. A failed or diverged trial is told to Optuna as FAIL: NaN never reaches a study.
A trial the spec's gate stopped after CA and ASR (``gated``) is told as PRUNED, with no values
(it has no R-ASR or Q-ASR to give) and with its gate margin as the Optuna constraint ``gate``
(``Trial.set_constraint``, Optuna 5's successor of the samplers' ``constraints_func``): TPE
puts infeasible trials among the bad ones; NSGA-II learns from COMPLETE trials only, so to it a
gated trial is simply no candidate. When a gate is set, every completed trial carries its own
(non-positive) margin too, so a study's trials are constrained alike.

Trial configs carry everything a trial needs (the resolved RunConfig mapping, the objectives,
its output folder), so a restored experiment needs nothing from the driver's memory.
"""
from __future__ import annotations

import logging
import json
import math
import warnings
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from trainables.config import merge

from .keys import MLFLOW_RUN_ATTR, STATUS_KEY, TUNE_TRIAL_ATTR  # noqa: F401 (re-exported)
from .objectives import Objective
from .plan import Study

log = logging.getLogger(__name__)

GATE_CONSTRAINT = "gate"  # the Optuna constraint a gated trial violates (> 0) and a passing one meets


def fit_to_space(space, value: Any) -> Any:
    """``value`` as a point of ``space`` (a :class:`~orchestrator.spec.ParamSpace`): numbers clipped to
    the bounds and snapped to the step, ints rounded; None when it cannot be one (a categorical
    value not among the choices, a non-number for a numeric space)."""
    if space.type == "categorical":
        return value if value in (space.choices or []) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    v = min(max(float(value), float(space.low)), float(space.high))
    if space.step:
        v = float(space.low) + round((v - float(space.low)) / float(space.step)) * float(space.step)
        v = min(v, float(space.high))
    return int(round(v)) if space.type == "int" else v


def default_params(study) -> dict:
    """The searched parameters at the values the study's defense runs with when nothing is sampled
    (its defaults and the spec's fixed settings), fitted to the space; a parameter whose value
    cannot be a point of its space is left to the sampler (and logged)."""
    defense = study.config.get("defense") or {}
    out = {}
    for key, space in study.space.items():
        value = fit_to_space(space, defense.get(key))
        if value is None:
            log.info("%s: default %s=%r is not in its search space; the sampler picks it", study.key, key,
                     defense.get(key))
            continue
        if value != defense.get(key):
            log.info("%s: default %s=%r clipped to %r to fit its search space", study.key, key, defense.get(key), value)
        out[key] = value
    return out


def make_sampler(study: Study):
    import optuna

    if study.sampler == "nsga2":
        kwargs = {} if study.population is None else {"population_size": study.population}
        return optuna.samplers.NSGAIISampler(seed=study.seed, **kwargs)
    kwargs = {} if study.startup_trials is None else {"n_startup_trials": study.startup_trials}
    # constant_liar: concurrent trials of one study are told apart while they run
    return optuna.samplers.TPESampler(seed=study.seed, multivariate=True, constant_liar=True, **kwargs)


def continue_stream(sampler, seed: int, asked: int) -> None:
    """Seed ``sampler`` (TPE, NSGA-II, and the random sampler of their start-up trials) from
    ``(seed, asked)``; a sampler without the seeded generators Optuna's have gets fresh entropy,
    which still proposes nothing twice."""
    import numpy as np

    states = np.random.SeedSequence([int(seed), int(asked)]).generate_state(2)
    targets = [sampler, getattr(sampler, "_random_sampler", None)]
    rngs = [getattr(getattr(t, "_rng", None), "rng", None) for t in targets]
    if rngs[0] is None or (targets[1] is not None and rngs[1] is None):
        sampler.reseed_rng()
        return
    for rng, state in zip(rngs, states):
        if rng is not None:
            rng.seed(int(state))  # in place: NSGA-II's child generation shares this RandomState


def result_ok(result: dict | None, metrics: list[str]) -> bool:
    """A trial result Optuna may be told: completed, every objective a finite number."""
    if not result or result.get(STATUS_KEY) != "completed":
        return False
    for m in metrics:
        v = result.get(m)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
    return True


def set_constraint(sub, trial_id: str, margin: float) -> None:
    """Give the Optuna trial behind Tune's ``trial_id`` its gate margin (> 0: infeasible)."""
    import optuna

    trial = sub._ot_trials.get(trial_id)
    if trial is None:
        return
    if isinstance(trial, int):  # a restored searcher knows its trials by number
        study = sub._ot_study
        trial = optuna.trial.Trial(study, study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial))
    trial.set_constraint(GATE_CONSTRAINT, margin)


class StudySearcher(Searcher):
    """Round-robin over the studies of a sweep; see the module docstring."""

    def __init__(self, studies: list[Study], objectives: list[Objective], *, storage_url: str | None,
                 prefix: str, trials_dir: str | Path):
        super().__init__(metric=None, mode=None)
        self.studies = {s.key: s for s in studies}
        self.order = [s.key for s in studies]
        self.objectives = [{"metric": o.metric, "mode": o.mode, "ref": o.reference} for o in objectives]
        self.metrics = [o.metric for o in objectives]
        self.modes = [o.mode for o in objectives]
        self.prefix = prefix
        self.trials_dir = str(trials_dir)
        self.owner: dict[str, str] = {}  # trial id -> study key
        self.launched = {k: 0 for k in self.order}
        self.running = {k: 0 for k in self.order}
        self.done: dict[str, str] = {}  # trial id -> completed | gated | failed
        self.cursor = 0
        self.optuna = {k: self._optuna(self.studies[k], storage_url) for k in self.order if self.studies[k].tuned}

    def _optuna(self, study: Study, storage_url: str | None):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        storage = optuna.storages.RDBStorage(storage_url) if storage_url else None
        # space= given explicitly, metric/mode as lists here only: the study stays multi-objective
        sub = OptunaSearch(space={k: s.distribution() for k, s in study.space.items()},
                           metric=list(self.metrics), mode=list(self.modes), sampler=make_sampler(study),
                           storage=storage, study_name=f"{self.prefix}/{study.key}")
        ot_study = sub._ot_study
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ot_study.set_metric_names(list(self.metrics))  # the dashboard shows ca, r_asr, ... not values_0
        if not ot_study.get_trials(deepcopy=False):  # a fresh study (a resumed one has its first trial already)
            first = default_params(study)
            if first:  # the front then always holds the defense as it runs without a search
                ot_study.enqueue_trial(first, user_attrs={"origin": "defaults"}, skip_if_exists=True)
        return sub

    # -- Searcher interface ------------------------------------------------------------------------
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the sub-searchers are complete; Tune's metric/mode would make them single-objective

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # the ConcurrencyLimiter keeps the sweep-wide limit

    def budget_left(self) -> int:
        return sum(self.studies[k].trials - self.launched[k] for k in self.order)

    def suggest(self, trial_id: str) -> dict | str | None:
        n = len(self.order)
        for step in range(n):
            key = self.order[(self.cursor + step) % n]
            study = self.studies[key]
            if self.launched[key] >= study.trials:
                continue
            if study.concurrency is not None and self.running[key] >= study.concurrency:
                continue
            params = self.optuna[key].suggest(trial_id) if study.tuned else {}
            if params is None:  # an Optuna searcher that cannot suggest right now
                continue
            if study.tuned:  # what the sweep's tracking finds the trial by, to give it its MLflow run id
                self.optuna[key]._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
            self.cursor = (self.cursor + step + 1) % n
            self.owner[trial_id] = key
            self.launched[key] += 1
            self.running[key] += 1
            return self.trial_config(study, trial_id, params)
        return Searcher.FINISHED if self.budget_left() == 0 else None

    def trial_config(self, study: Study, trial_id: str, params: dict) -> dict:
        return {
            "study": study.key, "attack": study.attack, "defense": study.defense, "tuned": study.tuned,
            "params": dict(params), "run": merge(study.config, {"defense": dict(params)}),
            "objectives": self.objectives, "out_dir": str(Path(self.trials_dir) / trial_id),
        }

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        return None  # multi-objective Optuna uses the final result only

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.owner.get(trial_id)
        if key is None or trial_id in self.done:
            return
        self.running[key] -= 1
        ok = not error and result_ok(result, self.metrics)
        gated = not error and bool(result) and result.get(STATUS_KEY) == "gated"
        self.done[trial_id] = "completed" if ok else "gated" if gated else "failed"
        if key in self.optuna:
            sub = self.optuna[key]
            margin = (result or {}).get("gate_margin")
            if (ok or gated) and isinstance(margin, (int, float)) and math.isfinite(margin):
                set_constraint(sub, trial_id, float(margin))
            if ok:
                sub.on_trial_complete(trial_id, {m: float(result[m]) for m in self.metrics})
            elif gated:
                sub.on_trial_complete(trial_id, None, error=False)  # no values: OptunaSearch tells PRUNED
            else:
                sub.on_trial_complete(trial_id, None, error=True)

    # -- state for Tuner.restore: plain JSON, never a pickle ---------------------------------------
    _COUNTERS = ("owner", "launched", "running", "done", "cursor")

    def get_state(self) -> dict:
        """The searcher's progress as JSON data: its counters, and per tuned study which Optuna
        trial (by number; the trials themselves live in the study's database) each Tune trial is."""
        own = {k: getattr(self, k) for k in self._COUNTERS}
        optuna = {}
        for k, sub in self.optuna.items():
            trials = {tid: (t if isinstance(t, int) else t.number) for tid, t in sub._ot_trials.items()}
            optuna[k] = {"trials": trials, "completed": sorted(sub._completed_trials)}
        return {"kind": "bibau-searcher-state", "version": 1, "own": own, "optuna": optuna}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != "bibau-searcher-state" or state.get("version") != 1:
            raise ValueError("not a bibau searcher state (version 1)")
        own = state["own"]
        for k in self._COUNTERS:
            value = own[k]
            ok = isinstance(value, int) if k == "cursor" else isinstance(value, dict)
            if not ok:
                raise ValueError(f"searcher state: {k} has the wrong type")
            setattr(self, k, value)
        for k, d in state["optuna"].items():
            if k not in self.optuna:
                raise ValueError(f"searcher state: unknown study {k!r}")
            sub = self.optuna[k]
            # Optuna's tell() takes a trial number as well as a Trial object
            sub._ot_trials = {str(tid): int(n) for tid, n in d["trials"].items()}
            sub._completed_trials = {str(t) for t in d["completed"]}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as fh:
            json.dump(self.get_state(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            data = fh.read()
        try:
            state = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{checkpoint_path}: not a JSON searcher state; refusing to load it") from None
        self.set_state(state)
        self.fail_orphans()
        self.continue_streams()

    def continue_streams(self) -> None:
        """Reseed each tuned study's sampler for the trials still to come. A resumed sampler is
        rebuilt from its seed, so its random stream would start over and propose the first trials'
        parameters again; seeded from (seed, trials its study has asked), the stream is new at each
        resume point and the same on a re-run of the same resume (the study's database, not a
        pickled random state, is what tells how far the search got)."""
        for key, sub in self.optuna.items():
            asked = len(sub._ot_study.get_trials(deepcopy=False))
            samplers = {id(x): x for x in (sub._ot_study.sampler, sub._sampler) if x is not None}
            for sampler in samplers.values():  # one object, unless unpickling split them
                continue_stream(sampler, self.studies[key].seed, asked)

    def fail_orphans(self) -> int:
        """Mark FAIL the Optuna trials asked after the last snapshot of a driver that died: Tune
        lost them, so nobody would ever tell them and they would stay RUNNING forever."""
        from optuna.trial import TrialState

        failed = 0
        for key, sub in self.optuna.items():
            known = {t if isinstance(t, int) else t.number for t in sub._ot_trials.values()}
            study = sub._ot_study
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                if t.number not in known:
                    study.tell(t.number, state=TrialState.FAIL)
                    failed += 1
        if failed:
            log.warning("marked %d Optuna trial(s) lost with the previous driver as failed", failed)
        return failed

    def study_states(self) -> dict[str, dict[str, int]]:
        """Per tuned study: how many Optuna trials are in each state (for checks and the summary)."""
        out = {}
        for key, sub in self.optuna.items():
            counts: dict[str, int] = {}
            for t in sub._ot_study.get_trials(deepcopy=False):
                counts[t.state.name] = counts.get(t.state.name, 0) + 1
            out[key] = counts
        return out


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default spells out the whole config)."""
    study = str(trial.config.get("study", "trial")).replace("/", "-")
    return f"{study}-{trial.trial_id}"


def describe(studies: list[Study]) -> list[dict[str, Any]]:
    return [{"study": s.key, "trials": s.trials, "tuned": s.tuned, "sampler": s.sampler if s.tuned else "-",
             "space": sorted(s.space)} for s in studies]
