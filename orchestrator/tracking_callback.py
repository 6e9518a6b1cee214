"""The Tune callback that logs each trial to MLflow from the driver (through
:class:`~orchestrator.tracking_write.SweepTracker`), the sweep's progress line per finished
trial, and each attack's hypervolume as it grows. Each tuned trial's Optuna trial gets the run id
as user attr ``mlflow_run_id``, so optuna-dashboard on ``<sweep>/optuna.db`` is a second view of
the same trials.
"""
from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from ray import tune

from .console import echo
from .keys import MLFLOW_RUN_ATTR, STATUS_KEY, TUNE_TRIAL_ATTR
from .pareto import TrialRecord, front_of, growth
from .tracking_write import _TIME_KEYS, _TUNE_KEYS, SweepTracker

def trial_files(out_dir: str | Path | None, save_models: bool = True) -> dict[str, Path]:
    """The files of a trial's folder that go to its MLflow run: ``results.json``, ``trial.log`` and,
    when the trial saved them, the purified model (``model/purified.safetensors`` + ``.json``)."""
    if not out_dir:
        return {}
    d = Path(out_dir)
    names = {"results.json": d / "results.json", "trial.log": d / "trial.log"}
    if save_models:
        names.update({f"model/purified{ext}": d / f"purified{ext}" for ext in (".safetensors", ".json")})
    return {k: p for k, p in names.items() if p.is_file()}


def _history(result: dict) -> list:
    try:
        history = json.loads(result.get("history_json") or "[]")
    except (TypeError, json.JSONDecodeError):
        return []
    return history if isinstance(history, list) else []


def progress_line(done: int, total: int | None, running: int, failed: int, elapsed_s: float,
                  finished_here: int) -> str:
    """``[sweep] 7/24 done, 2 running, failed 1, ETA 3m10s``: the ETA assumes the trials left take
    as long as those finished since this driver started (parallel slots included)."""
    left = (total - done) if total else None
    if left is not None and left > 0 and finished_here > 0:
        eta = _duration(elapsed_s / finished_here * left)
    else:
        eta = "0s" if left == 0 else "?"
    return f"[sweep] {done}/{total if total else '?'} done, {running} running, failed {failed}, ETA {eta}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _record(trial_id: str, cfg: dict, status: str, metrics: dict, error: str | None, order: int) -> TrialRecord:
    return TrialRecord(trial_id=trial_id, study=cfg["study"], attack=cfg["attack"], defense=cfg["defense"],
                       status=status, metrics=metrics, params=dict(cfg.get("params", {})), config=cfg["run"],
                       tuned=bool(cfg.get("tuned", True)), order=order, error=error)


class TrackingCallback(tune.Callback):
    """Logs each finished or failed trial to MLflow from the driver, and the attack's
    hypervolume as it grows. A trial already logged (a resumed sweep) is not logged again; a
    run a dead driver left unfinished is completed.

    Logging runs on one background thread, so Tune schedules the next trial without waiting
    for MLflow; ``on_experiment_end`` waits for it. What a crash loses there, Tune still has,
    and :meth:`reconcile` logs it on ``--resume``."""

    def __init__(self, tracker: SweepTracker, objectives: Sequence, *, total: int | None = None,
                 optuna_url: str | None = None):
        self.tracker = tracker
        self.objectives = list(objectives)
        self.total = total  # the sweep's trial budget, for the progress line
        self.optuna_url = optuna_url  # the studies' storage: each trial gets its MLflow run id there
        self.records: dict[str, TrialRecord] = {}
        self.unfinished: dict[str, str] = {}  # trial id -> run opened at its start (or left by a dead driver)
        self.started: dict[str, float] = {}  # trial id -> when Tune started it (epoch seconds)
        self.pending: dict[str, tuple] = {}  # trials whose logging failed; retried by flush_pending()
        self.failed: set[str] = set()
        self.finished_here = 0
        self.t0 = time.time()
        self._pool: ThreadPoolExecutor | None = None
        self._optuna_storage = None

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment
        return {**self.__dict__, "_pool": None, "pending": {}, "_optuna_storage": None}

    def __setstate__(self, state: dict) -> None:  # a sweep started by an older version lacks the newer fields
        self.__dict__.update({"total": None, "optuna_url": None, "started": {}, "failed": set(), "finished_here": 0,
                              "t0": time.time(), "_optuna_storage": None, **state})

    def setup(self, **info) -> None:
        self.unfinished = self.tracker.unfinished_trial_runs()
        self.records = {r.trial_id: r for r in self.tracker.records() if r.trial_id not in self.unfinished}
        self.failed = {tid for tid, r in self.records.items() if r.status not in ("completed", "gated")}
        self.finished_here, self.t0 = 0, time.time()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow")

    def get_state(self) -> dict | None:
        return None  # MLflow holds the records; setup() reloads them

    def _submit(self, *args) -> None:
        def run() -> None:
            try:
                self.log(*args)
            except Exception as exc:  # a logging bug must not take the sweep down; reconcile retries
                echo(f"MLflow: logging trial {args[0]} failed: {type(exc).__name__}: {exc}")

        if self._pool is None:
            run()
        else:
            self._pool.submit(run)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        """Open the trial's run now (its real start time, RUNNING in the UI) and hand its id to the
        trial's Optuna trial while that can still be updated. Synchronous: Tune tells Optuna the
        trial's result only after this returns."""
        cfg = dict(trial.config or {})
        tid = trial.trial_id
        self.started.setdefault(tid, time.time())
        if "study" not in cfg or tid in self.records:
            return
        try:
            if tid not in self.unfinished:
                rec = _record(tid, cfg, "running", {}, None, len(self.records) + 1)
                self.unfinished[tid] = self.tracker.open_trial(rec, int(self.started[tid] * 1000))
            if cfg.get("tuned"):
                self._link_optuna(cfg["study"], tid, self.unfinished[tid])
        except Exception as exc:  # the run is then created when the trial ends
            echo(f"MLflow: could not open the run of trial {tid} ({type(exc).__name__}: {exc})")

    def _link_optuna(self, study: str, trial_id: str, run_id: str) -> None:
        if not self.optuna_url:
            return
        import optuna

        if self._optuna_storage is None:
            self._optuna_storage = optuna.storages.RDBStorage(self.optuna_url)
        storage = self._optuna_storage
        study_id = storage.get_study_id_from_name(f"{self.tracker.sweep_id}/{study}")
        for t in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get(TUNE_TRIAL_ATTR) == trial_id:
                storage.set_trial_user_attr(t._trial_id, MLFLOW_RUN_ATTR, run_id)
                return

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        result = dict(trial.last_result or {})
        self._progress(trials, trial, result, None)
        self._submit(trial.trial_id, dict(trial.config), result, None)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        text = None
        try:
            if trial.error_file and Path(trial.error_file).is_file():
                text = Path(trial.error_file).read_text()[-8000:]
        except Exception:  # the error file is a nicety; the status is what matters
            text = None
        error = text or "trial raised (see the Tune trial folder)"
        self._progress(trials, trial, {}, error)
        self._submit(trial.trial_id, dict(trial.config), {"trial_end_ts": time.time()}, error)

    def _progress(self, trials: list, trial, result: dict, error: str | None) -> None:
        """``k/N done, r running, failed f, ETA`` and the trial's objectives, one line per finished trial."""
        if "study" not in (trial.config or {}):
            return
        status = "failed" if error is not None else str(result.get(STATUS_KEY, "failed"))
        if status not in ("completed", "gated"):  # a gated trial stopped by design, it did not fail
            self.failed.add(trial.trial_id)
        self.finished_here += 1
        done = sum(1 for t in trials if t.status in ("TERMINATED", "ERROR") or t is trial)
        running = sum(1 for t in trials if t.status == "RUNNING" and t is not trial)
        echo(progress_line(done, self.total, running, len(self.failed), time.time() - self.t0, self.finished_here)
             + f" | {trial.config['study']} {trial.trial_id}: {status}"
             + "".join(f", {o.metric}={result[o.metric]:.4f}" for o in self.objectives
                       if status == "completed" and isinstance(result.get(o.metric), (int, float))))

    def on_experiment_end(self, trials: list, **info) -> None:
        self.drain()

    def drain(self) -> None:
        """Wait until every submitted trial is logged."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def log(self, trial_id: str, cfg: dict, result: dict, error: str | None) -> TrialRecord | None:
        """Log one trial from its Tune config and last result (``error``: it raised)."""
        if "study" not in cfg or trial_id in self.records:
            return self.records.get(trial_id)
        status = result.get(STATUS_KEY) if error is None else "failed"
        if status == "invalid":
            error = str(result.get("error_message", "invalid configuration"))
        status = status if status in ("completed", "diverged", "gated") else "failed"
        metrics = {k: float(v) for k, v in result.items()
                   if k not in _TUNE_KEYS and k not in _TIME_KEYS and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        if status == "failed":
            metrics = {k: v for k, v in metrics.items() if k not in {o.metric for o in self.objectives}}
        if status == "gated":
            error = str(result.get("gate_reason") or "gated: CA failed the sweep's gate")
        if status == "diverged":
            # MLflow gets what the trial measured, not the stand-in values Optuna was spared NaN with
            for o in self.objectives:
                metrics.pop(o.metric, None)
                if f"raw_{o.metric}" in metrics:
                    metrics[o.metric] = metrics.pop(f"raw_{o.metric}")
            error = error or f"diverged: objectives {result.get('diverged_objectives', '?')} were not finite"
        rec = _record(trial_id, cfg, status, metrics, error, len(self.records) + 1)
        start = result.get("trial_start_ts") or self.started.get(trial_id)
        end = result.get("trial_end_ts")
        try:
            rec.run_id = self.tracker.log_trial(rec, metrics, _history(result), run_id=self.unfinished.get(trial_id),
                                                files=trial_files(cfg.get("out_dir")),
                                                start_ms=int(start * 1000) if start else None,
                                                end_ms=int(end * 1000) if end else None)
        except Exception as exc:  # MLflow trouble must not kill the sweep: the trial stays pending
            self.pending[trial_id] = (trial_id, cfg, result, error)
            echo(f"MLflow: could not log trial {trial_id} ({type(exc).__name__}: {exc}); it is kept and "
                 "logged again at the end of the sweep")
            return None
        self.unfinished.pop(trial_id, None)
        self.pending.pop(trial_id, None)
        self.records[trial_id] = rec
        metric_names = [o.metric for o in self.objectives]
        modes = [o.mode for o in self.objectives]
        recs = [r for r in self.records.values() if r.attack == rec.attack]
        curve = growth(recs, metric_names, modes, [o.reference for o in self.objectives])
        try:
            self.tracker.log_growth(rec.attack, len(recs), curve[-1][1], len(front_of(recs, metric_names, modes)))
        except Exception as exc:
            echo(f"MLflow: could not log the hypervolume of {rec.attack}: {exc}")
        return rec

    def reconcile(self, results) -> int:
        """After ``fit()``: log what Tune finished but MLflow lacks or holds unfinished (a driver
        that died between the two). ``results`` is the ``ResultGrid``. Returns how many."""
        self.setup()
        self.drain()  # log synchronously
        fixed = 0
        for res in results:
            cfg = res.config or {}
            metrics = dict(res.metrics or {})
            trial_id = metrics.get("trial_id") or Path(res.path).name.rsplit("-", 1)[-1]  # see sweep._trial_id
            if trial_id in self.records or "study" not in cfg:
                continue
            if res.error is None and STATUS_KEY not in metrics:
                continue  # not finished: nothing to log yet
            if self.log(trial_id, cfg, metrics, None if res.error is None else f"{type(res.error).__name__}: {res.error}"):
                fixed += 1
        return fixed
