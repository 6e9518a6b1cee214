"""MLflow layout of a sweep; only the driver talks to MLflow, so trials never race on its DB.

One experiment per spec; per sweep a parent run, under it a run per attack, and under each
attack run a child run per trial. Runs are created by the driver: the parent and attack runs
before Ray starts, a trial's run when Tune reports the trial finished (:class:`TrackingCallback`).
A trial's run is created when Tune starts the trial (so it shows as running, with its real
start time) and finished with the trial's own end time. It holds the resolved config (every
field as a param, the searched values again as ``hp.<name>``, ``config.yaml`` runnable by
``bibau run``, ``config.json``), every metric of the report, per-epoch curves, the time per
stage, ``results.json`` and ``trial.log``, the purified model when the spec saves models, and
tags ``attack``, ``defense``, ``status``, the git commit and, once the sweep ends, ``pareto``
and, on the export rule's picks, ``picked`` (``results.py``).
The experiment is tagged as model development (MLflow 3 opens it in its training view, not
the GenAI one). Each tuned trial's Optuna trial gets the run id as user attr ``mlflow_run_id``,
so optuna-dashboard on ``<sweep>/optuna.db`` is a second view of the same trials. Each attack run holds the Pareto front (CSV, the figures of ``figures.py``: the first objective
against each other one, PNG and PDF) and the hypervolume as it grows with the trials; its
description is its Pareto table and pick.

Run ids live in the sweep's ``state.json`` and trial runs are keyed by Tune's trial id, so a
resumed sweep reuses its runs instead of duplicating them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from ray import tune

from .figures import attack_figures, baseline_label, plot_growth, save  # noqa: F401 (baseline_label: re-exported)
from .pareto import TrialRecord, front_of, growth
from .results import attack_view, tag_picks
from .search import STATUS_KEY

# keys Tune adds to every result; everything else in a report is the trial's own
_TUNE_KEYS = {
    "training_iteration", "time_total_s", "episodes_total", "timesteps_total", "node_ip", "hostname", "pid",
    "time_this_iter_s", "timestamp", "date", "time_since_restore", "timesteps_since_restore",
    "iterations_since_restore", "config", "checkpoint_dir_name", "done", "should_checkpoint", "trial_id",
    "experiment_id", "experiment_tag",
}
_MAX_PARAM = 6000  # MLflow's limit on a param value
# what the trial reports about itself that is no metric: its wall-clock start and end (epoch seconds)
_TIME_KEYS = {"trial_start_ts", "trial_end_ts"}
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3: which UI an experiment opens in
EXPERIMENT_KIND = "custom_model_development"
UI_PORT = 5000  # ``mlflow ui``'s default port
# MLflow 3 opens an experiment in the GenAI or the model-training view by this query parameter
# (it overrides the choice the browser remembers; the experiment's kind tag only sets a default)
UI_VIEW = "workflowType=machine_learning"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
HP_PREFIX = "hp."  # the searched values, apart from the hundred-odd fixed params


def git_commit() -> str | None:
    """The full commit of the checkout this code runs from (None outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha if re.fullmatch(r"[0-9a-f]{40}", sha) else None


CONSOLE: "Any" = None  # set by the sweep while it sends Tune's and Optuna's chatter to its log file


def echo(message: str) -> None:
    """A line for the user's terminal (the sweep's progress, MLflow trouble)."""
    (CONSOLE or print)(message)


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _ms() -> int:
    return int(time.time() * 1000)


_TRANSIENT = ("database is locked", "connection", "temporarily unavailable", "timed out", "timeout",
              "max retries exceeded", "502", "503", "504", "bad gateway", "service unavailable", "reset by peer")


def transient(exc: BaseException) -> bool:
    """An MLflow failure that waiting can cure: the server restarting, SQLite locked by another sweep."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = str(getattr(exc, "error_code", ""))
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(t in text for t in _TRANSIENT)


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried with exponential backoff on transient errors
    (on top of MLflow's own HTTP retries), so a server restart or a busy SQLite file costs time,
    not runs. ``MLFLOW_RETRY_S`` bounds the total wait (default 300 s)."""

    def __init__(self, client, budget_s: float | None = None, first_s: float = 0.5):
        import os

        self._client = client
        self._budget_s = float(os.environ.get("BIBAU_MLFLOW_RETRY_S", 300)) if budget_s is None else budget_s
        self._first_s = first_s

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            deadline = time.monotonic() + self._budget_s
            delay = self._first_s
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    if not transient(exc) or time.monotonic() + delay > deadline:
                        raise
                    echo(f"MLflow: {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                         f"retrying in {delay:.1f}s")
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)

        return call


class SweepTracker:
    """The sweep's MLflow runs. Picklable (the client is rebuilt after unpickling), because
    Tune stores its callbacks with the experiment for ``Tuner.restore``."""

    def __init__(self, uri: str, experiment: str, sweep_id: str, state_file: str | Path | None,
                 artifact_root: str | Path | None = None, state: dict | None = None):
        self.uri = uri
        self.experiment = experiment
        self.sweep_id = sweep_id
        self.state_file = str(state_file) if state_file else None
        self.artifact_root = str(artifact_root) if artifact_root else None
        self._fixed_state = state  # a sweep read back from MLflow alone (bibau export)
        self._client = None
        self.pick_warnings: list[str] = []  # set by finish(): attacks whose export rule no trial met

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"} | {"_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = RetryingClient(MlflowClient(tracking_uri=self.uri))
        return self._client

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        if self._fixed_state is not None:
            return self._fixed_state
        p = Path(self.state_file)
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_state(self, **changes: Any) -> dict:
        state = {**self.state(), **changes}
        p = Path(self.state_file)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(p)
        return state

    # -- runs ------------------------------------------------------------------------------------
    def experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        location = Path(self.artifact_root, self.experiment).as_uri() if self.artifact_root else None
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location,
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:
            exp = self.client.get_experiment_by_name(self.experiment)  # another sweep created it just now
            if exp is None:
                raise
            return exp.experiment_id

    def start(self, *, name: str, attacks: Sequence[str], spec: dict, code_version: str, summary: dict) -> dict:
        """Create (or, for a resumed sweep, find) the parent run and the attack runs."""
        state = self.state()
        exp_id = state.get("experiment_id") or self.experiment_id()
        parent = state.get("parent_run_id")
        commit = git_commit()
        if parent is None:
            run = self.client.create_run(exp_id, run_name=f"sweep-{self.sweep_id}", tags={
                "role": "sweep", "sweep_id": self.sweep_id, "sweep": name, "code_version": code_version,
                **({GIT_COMMIT_TAG: commit} if commit else {})})
            parent = run.info.run_id
            params = {k: str(v)[:_MAX_PARAM] for k, v in summary.items()}
            self._log_batch(parent, params=params)
            self.client.log_dict(parent, spec, "spec.yaml")
        else:
            self.client.update_run(parent, status="RUNNING")
        runs = dict(state.get("attack_runs", {}))
        for label in attacks:
            if label not in runs:
                run = self.client.create_run(exp_id, run_name=label, tags={
                    "mlflow.parentRunId": parent, "role": "attack", "attack": label, "sweep_id": self.sweep_id})
                runs[label] = run.info.run_id
            else:
                self.client.update_run(runs[label], status="RUNNING")
        return self.save_state(sweep_id=self.sweep_id, name=name, experiment=self.experiment, experiment_id=exp_id,
                               tracking_uri=self.uri, parent_run_id=parent, attack_runs=runs, status="running",
                               git_commit=commit)

    def log_attack_stage(self, label: str, info: dict) -> None:
        run = self.state()["attack_runs"][label]
        metrics = {f"attack_stage/{k}": float(v) for k, v in info.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        tags = {f"attack_stage.{k}": str(v)[:5000] for k, v in info.items()
                if isinstance(v, (str, bool)) and k != "log_tail"}
        steps = [(f"curve/attack/{k}", v, int(e.get("epoch", i)))
                 for i, e in enumerate(info.get("history") or []) if isinstance(e, dict)
                 for k, v in e.items()
                 if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self._log_batch(run, metrics=metrics, tags=tags, steps=steps)
        if info.get("log_tail") or info.get("error"):
            self.client.log_text(run, info.get("error") or info["log_tail"], "attack_stage.log")

    def _log_batch(self, run_id: str, *, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
                   tags: dict[str, str] | None = None, steps: list[tuple[str, float, int]] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = _ms()
        m = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        m += [Metric(k, float(v), now, int(s)) for k, v, s in (steps or [])]
        p = [Param(k, str(v)[:_MAX_PARAM]) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        # MLflow's batch limits: 100 params, 100 tags, 1000 metrics per call
        for i in range(0, len(p), 100):
            self.client.log_batch(run_id, params=p[i:i + 100])
        for i in range(0, len(t), 100):
            self.client.log_batch(run_id, tags=t[i:i + 100])
        for i in range(0, len(m), 1000):
            self.client.log_batch(run_id, metrics=m[i:i + 1000])

    def unfinished_trial_runs(self) -> dict[str, str]:
        """Trial id -> run id of trial runs a dead driver left RUNNING (created, not completed)."""
        return {tid: r.info.run_id for tid, r in self.trial_runs().items() if r.info.status == "RUNNING"}

    def trial_runs(self) -> dict[str, Any]:
        """Tune trial id -> MLflow run of this sweep's logged trials."""
        state = self.state()
        if "experiment_id" not in state:
            return {}
        runs = self.client.search_runs(
            [state["experiment_id"]], filter_string=f"tags.sweep_id = '{self.sweep_id}' and tags.role = 'trial'",
            max_results=50000)
        return {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}

    def load_config(self, run_id: str) -> dict:
        """The resolved RunConfig mapping a trial ran with (its ``config.json`` artifact)."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(self.client.download_artifacts(run_id, "config.json", d)).read_text())

    def records(self) -> list[TrialRecord]:
        return [record_from_run(r) for r in self.trial_runs().values()]

    # -- seed replicates (replicates.py) ------------------------------------------------------------
    def replicate_runs(self) -> dict[str, dict[int, dict[str, float]]]:
        """Searched run id -> replicate index -> that replicate's metrics (runs tagged ``role =
        replicate``)."""
        state = self.state()
        if "experiment_id" not in state:
            return {}
        runs = self.client.search_runs(
            [state["experiment_id"]], filter_string=f"tags.sweep_id = '{self.sweep_id}' and tags.role = 'replicate'",
            max_results=50000)
        out: dict[str, dict[int, dict[str, float]]] = {}
        for r in runs:
            tags = r.data.tags
            if tags.get("status") == "completed" and "of_run" in tags:
                out.setdefault(tags["of_run"], {})[int(tags.get("replicate", 0))] = dict(r.data.metrics)
        return out

    def log_replicate(self, rec: TrialRecord, k: int, config: dict, report: dict) -> str:
        """Replicate ``k`` of the searched run ``rec`` as a run beside it (under the attack's run)."""
        state = self.state()
        status = str(report.get(STATUS_KEY, "failed")) if "error" not in report else "failed"
        tags = {"mlflow.parentRunId": state["attack_runs"][rec.attack], "role": "replicate", "sweep_id": self.sweep_id,
                "attack": rec.attack, "defense": rec.defense, "of_run": rec.run_id or "", "replicate": str(k),
                "trial_id": f"{rec.trial_id}-r{k}", "status": status, "tuned": str(rec.tuned).lower(),
                **({"error": str(report["error"])[:5000]} if "error" in report else {})}
        run_id = self.client.create_run(state["experiment_id"], run_name=f"{rec.study}/{rec.trial_id}/replicate-{k}",
                                        tags=tags).info.run_id
        metrics = {k2: float(v) for k2, v in report.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        self._log_batch(run_id, metrics=metrics, params={"defense_seed": config.get("defense_seed"),
                                                        "evaluation.seed": (config.get("evaluation") or {}).get("seed")})
        self.client.set_terminated(run_id, "FINISHED" if status == "completed" else "FAILED")
        return run_id

    def _trial_tags(self, rec: TrialRecord, parent: str) -> dict[str, str]:
        commit = self.state().get("git_commit")
        return {"mlflow.parentRunId": parent, "role": "trial", "sweep_id": self.sweep_id, "trial_id": rec.trial_id,
                "attack": rec.attack, "defense": rec.defense, "study": rec.study, "status": rec.status,
                "tuned": str(rec.tuned).lower(), "order": str(rec.order), "params_json": json.dumps(rec.params)[:5000],
                **({GIT_COMMIT_TAG: commit} if commit else {}),
                # stopped after CA and ASR: no R-ASR, Q-ASR or BEC was measured
                **({"gate_reason": (rec.error or "")[:5000]} if rec.status == "gated" else {})}

    @staticmethod
    def _trial_params(rec: TrialRecord) -> dict[str, Any]:
        return {**flatten(rec.config), **{f"{HP_PREFIX}{k}": v for k, v in rec.params.items()}}

    def open_trial(self, rec: TrialRecord, start_ms: int | None = None) -> str:
        """The run of a trial Tune has just started: RUNNING, its tags and params, its start time."""
        state = self.state()
        parent = state["attack_runs"][rec.attack]
        run_id = self.client.create_run(state["experiment_id"], run_name=f"{rec.study}/{rec.trial_id}",
                                        start_time=start_ms or _ms(), tags=self._trial_tags(rec, parent)).info.run_id
        self._log_batch(run_id, params=self._trial_params(rec))
        return run_id

    def log_trial(self, rec: TrialRecord, report: dict, history: list, run_id: str | None = None,
                  files: dict[str, Path] | None = None, start_ms: int | None = None, end_ms: int | None = None) -> str:
        """The trial's child run under the attack's run, completed: ``run_id`` is the run opened when the
        trial started (or one a dead driver left unfinished; same params, so re-logging them is
        allowed), else one is created now with ``start_ms``. ``files``: artifact path -> local file
        (``results.json``, ``trial.log``, ``model/...``); the config is always logged from ``rec``."""
        state = self.state()
        parent = state["attack_runs"][rec.attack]
        tags = self._trial_tags(rec, parent)
        if run_id is None:
            run_id = self.client.create_run(state["experiment_id"], run_name=f"{rec.study}/{rec.trial_id}",
                                            start_time=start_ms or _ms(), tags=tags).info.run_id
        else:
            self._log_batch(run_id, tags=tags)
        metrics = {k: v for k, v in report.items()
                   if k not in _TUNE_KEYS and k not in _TIME_KEYS and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)}
        steps = []
        for i, entry in enumerate(history or []):
            if not isinstance(entry, dict):
                continue
            step = int(entry.get("epoch", i)) if isinstance(entry.get("epoch", i), (int, float)) else i
            stage = str(entry.get("stage", "defense"))
            for k, v in entry.items():
                if k not in ("epoch", "stage") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    steps.append((f"curve/{stage}/{k}", v, step))
        self._log_batch(run_id, metrics=metrics, params=self._trial_params(rec), steps=steps)
        self.client.log_dict(run_id, rec.config, "config.json")
        self.client.log_text(run_id, runnable_yaml(rec), "config.yaml")
        files = dict(files or {})
        if "results.json" not in files:  # a backend that wrote none: what the trial reported
            self.client.log_dict(run_id, {**metrics, "status": rec.status}, "results.json")
        for name, path in sorted(files.items()):
            folder = str(Path(name).parent)
            self.client.log_artifact(run_id, str(path), None if folder == "." else folder)
        if rec.error and rec.status != "gated":
            self.client.log_text(run_id, rec.error, "error.txt")
        # a gated trial did what it was asked (its tag says it stopped early); only failures are FAILED
        self.client.set_terminated(run_id, "FINISHED" if rec.status in ("completed", "gated") else "FAILED",
                                   end_time=end_ms)
        return run_id

    def log_growth(self, attack: str, step: int, hypervolume: float, front_size: int) -> None:
        run = self.state()["attack_runs"][attack]
        self._log_batch(run, steps=[("hypervolume", hypervolume, step), ("pareto_size", front_size, step)])

    def finish(self, records: list[TrialRecord], objectives: Sequence, *, attack_info: dict[str, dict] | None = None,
               export_file: Path | None = None, status: str = "FINISHED", rule=None,
               extra_metrics: dict[str, float] | None = None,
               failed_attacks: dict[str, str] | None = None) -> dict[str, list[TrialRecord]]:
        """Tag the Pareto trials, log each attack's front, plots and hypervolume; with the export
        ``rule``, tag its picks and write the runs' descriptions (warnings in ``pick_warnings``);
        close the runs (an attack whose attack stage failed, in ``failed_attacks`` with its reason,
        as FAILED)."""
        import tempfile

        from .export import DEFAULT_RULE, parse_rule

        rule = rule or parse_rule(DEFAULT_RULE)
        state = self.state()
        views = []
        metrics = [o.metric for o in objectives]
        modes = [o.mode for o in objectives]
        ref = [o.reference for o in objectives]
        fronts: dict[str, list[TrialRecord]] = {}
        for attack, run in state["attack_runs"].items():
            recs = [r for r in records if r.attack == attack]
            front = front_of(recs, metrics, modes)
            fronts[attack] = front
            on_front = {r.trial_id for r in front}
            for r in recs:
                if r.run_id:
                    self.client.set_tag(r.run_id, "pareto", "true" if r.trial_id in on_front else "false")
            curve = growth(recs, metrics, modes, ref)
            self.client.log_text(run, records_csv(front, metrics), "pareto/front.csv")
            self.client.log_text(run, records_csv(recs, metrics), "pareto/trials.csv")
            self.client.log_text(run, "trials,hypervolume\n" + "".join(f"{k},{v:.6g}\n" for k, v in curve),
                                 "pareto/hypervolume.csv")
            view = attack_view(attack, recs, dict(self.client.get_run(run).data.metrics), rule, objectives)
            views.append(view)
            with tempfile.TemporaryDirectory() as d:
                for name, fig in attack_figures(view, objectives, rule).items():
                    save(fig, Path(d) / name)  # PNG at 200 dpi and PDF
                fig = plot_growth(attack, curve)
                if fig is not None:
                    save(fig, Path(d) / "hypervolume", formats=("png",))
                self.client.log_artifacts(run, d, "pareto")
            self._log_batch(run, metrics={
                "pareto_size": len(front), "hypervolume_final": curve[-1][1] if curve else 0.0,
                "trials_completed": sum(r.status == "completed" for r in recs),
                "trials_gated": sum(r.status == "gated" for r in recs),
                "trials_failed": sum(r.status not in ("completed", "gated") for r in recs)})
            if attack in (failed_attacks or {}):  # its studies never ran: not a finished attack
                self.client.set_tag(run, "status", "failed")
                self.client.set_tag(run, "failure", failed_attacks[attack][:5000])
                self.client.set_terminated(run, "FAILED")
            else:
                self.client.set_terminated(run, status)
        parent = state["parent_run_id"]
        self.pick_warnings = tag_picks(self.client, views, rule.text, state["attack_runs"], parent, objectives,
                                       experiment_id=state.get("experiment_id"), sweep_id=self.sweep_id)
        allf = [r for f in fronts.values() for r in f]
        self.client.log_text(parent, records_csv(allf, metrics), "pareto/fronts.csv")
        if export_file is not None and Path(export_file).is_file():
            from .export import add_warnings, read_export, write_export

            doc = read_export(export_file)  # the same warning: lines as `bibau export` writes
            if add_warnings(doc, {v.attack: v for v in views}):
                write_export(doc, export_file)
            self.client.log_artifact(parent, str(export_file), "export")
        self._log_batch(parent, metrics={"trials": len(records),
                                         "trials_gated": sum(r.status == "gated" for r in records),
                                         "trials_failed": sum(r.status not in ("completed", "gated") for r in records),
                                         **(extra_metrics or {})})
        self.client.set_terminated(parent, status)
        self.save_state(status="finished" if status == "FINISHED" else "failed")
        return fronts


def open_sweep(uri: str, experiment: str, sweep_id: str | None = None,
               fingerprint: str | None = None) -> tuple[SweepTracker, dict]:
    """A tracker on an existing sweep and the spec it logged: ``sweep_id``, else the newest sweep of
    ``experiment`` started from the spec with ``fingerprint`` (else the newest of all). Its state
    comes from MLflow, so this works away from the storage path."""
    import tempfile

    import yaml
    from mlflow.tracking import MlflowClient

    if sweep_id is not None and not re.fullmatch(r"[A-Za-z0-9_.+-]+", sweep_id):
        raise ValueError(f"--sweep: {sweep_id!r} is not a sweep id (letters, digits and _ . + -)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        # opening it would create an empty database
        raise ValueError(f"MLflow {uri}: no such database (no sweep has run with this storage or tracking URI)")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"MLflow {uri}: no experiment {experiment!r}")
    query = "tags.role = 'sweep'" + (f" and tags.sweep_id = '{sweep_id}'" if sweep_id else "")
    if fingerprint is not None and sweep_id is None:
        query += f" and params.spec_fingerprint = '{fingerprint}'"
    parents = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if not parents:
        if sweep_id:
            raise ValueError(f"MLflow {uri}, experiment {experiment!r}: no sweep {sweep_id!r}")
        others = client.search_runs([exp.experiment_id], filter_string="tags.role = 'sweep'",
                                    order_by=["attributes.start_time DESC"], max_results=5)
        listed = ", ".join(r.data.tags.get("sweep_id", "?") for r in others) or "none"
        what = f"of this spec (fingerprint {fingerprint})" if fingerprint else ""
        raise ValueError(f"MLflow {uri}, experiment {experiment!r}: no sweep {what}; newest sweeps there: {listed}; "
                         "name one with --sweep SWEEP_ID")
    parent = parents[0]
    sid = parent.data.tags["sweep_id"]
    attacks = client.search_runs([exp.experiment_id], filter_string=f"tags.role = 'attack' and tags.sweep_id = '{sid}'",
                                 max_results=10000)
    with tempfile.TemporaryDirectory() as d:
        spec = yaml.safe_load(Path(client.download_artifacts(parent.info.run_id, "spec.yaml", d)).read_text())
    state = {"sweep_id": sid, "experiment_id": exp.experiment_id, "parent_run_id": parent.info.run_id,
             "attack_runs": {r.data.tags["attack"]: r.info.run_id for r in attacks},
             "code_version": parent.data.tags.get("code_version", "")}
    return SweepTracker(uri, experiment, sid, None, state=state), spec


def runnable_yaml(rec: TrialRecord) -> str:
    """The trial's resolved run config as YAML, with a header saying where it came from and how to
    re-run it (``bibau run config.yaml``)."""
    import yaml

    head = (f"# trial {rec.trial_id} of study {rec.study} (status {rec.status})\n"
            "# re-run: bibau run config.yaml --out DIR\n")
    return head + yaml.safe_dump(rec.config, sort_keys=False)


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


def record_from_run(run) -> TrialRecord:
    tags = run.data.tags
    try:
        params = json.loads(tags.get("params_json", "{}"))
    except json.JSONDecodeError:
        params = {}
    return TrialRecord(trial_id=tags["trial_id"], study=tags.get("study", ""), attack=tags.get("attack", ""),
                       defense=tags.get("defense", ""), status=tags.get("status", "failed"),
                       metrics=dict(run.data.metrics), params=params, tuned=tags.get("tuned", "true") == "true",
                       order=int(tags.get("order", 0)), run_id=run.info.run_id)


def records_csv(records: Sequence[TrialRecord], metrics: Sequence[str]) -> str:
    keys = sorted({k for r in records for k in r.params})
    extra = sorted({k for r in records for k in r.metrics} - set(metrics))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["attack", "defense", "trial_id", "run_id", "status", "order", *metrics, *keys, *extra])
    for r in sorted(records, key=lambda r: r.order):
        w.writerow([r.attack, r.defense, r.trial_id, r.run_id or "", r.status, r.order,
                    *(_fmt(r.metrics.get(m)) for m in metrics), *(r.params.get(k, "") for k in keys),
                    *(_fmt(r.metrics.get(m)) for m in extra)])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)


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

        from .search import MLFLOW_RUN_ATTR, TUNE_TRIAL_ATTR

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


def ui_url(base: str, experiment_id: str | None, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (its runs, in the model-training view) or of one run."""
    base = base.rstrip("/")
    if not experiment_id:
        return f"{base}/#/experiments?{UI_VIEW}"
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{base}/#/experiments/{experiment_id}/{page}?{UI_VIEW}"


def ui_lines(tracking_uri: str, experiment: str, experiment_id: str | None) -> list[str]:
    """What the sweep prints to open its results in MLflow: the server command for a local store,
    and the experiment's URL in the model-training view."""
    import shlex

    if tracking_uri.startswith(("http://", "https://")):
        return [f"MLflow:    {ui_url(tracking_uri, experiment_id)}  (experiment {experiment!r})"]
    return [f"MLflow UI: mlflow ui --backend-store-uri {shlex.quote(tracking_uri)} --port {UI_PORT}",
            f"           then open {ui_url(f'http://127.0.0.1:{UI_PORT}', experiment_id)}  (experiment "
            f"{experiment!r}; each attack run's page: its Pareto front, figure and table)"]
