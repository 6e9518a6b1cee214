"""Writing a sweep to MLflow; only the driver talks to MLflow, so trials never race on its DB.

One experiment per spec; per sweep a parent run, under it a run per attack, and under each
attack run a child run per trial. Runs are created by the driver: the parent and attack runs
before Ray starts, a trial's run when Tune starts the trial (``tracking_callback.py``: so it
shows as running, with its real start time), finished with the trial's own end time. It holds
the resolved config (every field as a param, the searched values again as ``hp.<name>``,
``config.yaml`` runnable by ``bibau run``, ``config.json``), every metric of the report,
per-epoch curves, the time per stage, ``results.json`` and ``trial.log``, the purified model
when the spec saves models, and tags ``attack``, ``defense``, ``status``, the git commit and,
once the sweep ends, ``pareto`` and, on the export rule's picks, ``picked`` (``fronts.py``,
``results.py``). The experiment is tagged as model development (MLflow 3 opens it in its
training view, not the GenAI one).

Run ids live in the sweep's ``state.json`` and trial runs are keyed by Tune's trial id, so a
resumed sweep reuses its runs instead of duplicating them. Reading is ``tracking_read.py``.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Sequence

from .fronts import finish_sweep
from .keys import STATUS_KEY
from .pareto import TrialRecord
from .tracking_read import SweepReader

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


class SweepTracker(SweepReader):
    """The sweep's MLflow runs, written (and read: :class:`~orchestrator.tracking_read.SweepReader`)."""

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
            self.log_batch(parent, params=params)
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
        self.log_batch(run, metrics=metrics, tags=tags, steps=steps)
        if info.get("log_tail") or info.get("error"):
            self.client.log_text(run, info.get("error") or info["log_tail"], "attack_stage.log")

    def log_batch(self, run_id: str, *, metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
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
        self.log_batch(run_id, metrics=metrics, params={"defense_seed": config.get("defense_seed"),
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
        self.log_batch(run_id, params=self._trial_params(rec))
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
            self.log_batch(run_id, tags=tags)
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
        self.log_batch(run_id, metrics=metrics, params=self._trial_params(rec), steps=steps)
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
        self.log_batch(run, steps=[("hypervolume", hypervolume, step), ("pareto_size", front_size, step)])

    def finish(self, records: list[TrialRecord], objectives: Sequence, *, attack_info: dict[str, dict] | None = None,
               export_file: Path | None = None, status: str = "FINISHED", rule=None,
               extra_metrics: dict[str, float] | None = None,
               failed_attacks: dict[str, str] | None = None) -> dict[str, list[TrialRecord]]:
        """Tag the Pareto trials, log each attack's front, plots and hypervolume; with the export
        ``rule``, tag its picks and write the runs' descriptions (warnings in ``pick_warnings``);
        close the runs (an attack whose attack stage failed, in ``failed_attacks`` with its reason,
        as FAILED). See :func:`orchestrator.fronts.finish_sweep`."""
        return finish_sweep(self, records, objectives, export_file=export_file, status=status, rule=rule,
                            extra_metrics=extra_metrics, failed_attacks=failed_attacks)


def runnable_yaml(rec: TrialRecord) -> str:
    """The trial's resolved run config as YAML, with a header saying where it came from and how to
    re-run it (``bibau run config.yaml``)."""
    import yaml

    head = (f"# trial {rec.trial_id} of study {rec.study} (status {rec.status})\n"
            "# re-run: bibau run config.yaml --out DIR\n")
    return head + yaml.safe_dump(rec.config, sort_keys=False)
