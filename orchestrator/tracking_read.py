"""Reading a sweep back from MLflow: its trial runs as records, their configs, the seed
replicates, a finished sweep found by id or by its spec's fingerprint (``open_sweep``), the
sweep's ``state.json``, the MLflow UI's addresses. What ``bibau export`` and ``bibau report``
need; the sweep's writing side is ``tracking_write.py`` (:class:`SweepTracker` extends
:class:`SweepReader`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from trainables.config import ConfigError

from .mlflow_client import RetryingClient
from .pareto import TrialRecord

UI_PORT = 5000  # ``mlflow ui``'s default port
# MLflow 3 opens an experiment in the GenAI or the model-training view by this query parameter
# (it overrides the choice the browser remembers; the experiment's kind tag only sets a default)
UI_VIEW = "workflowType=machine_learning"


class SweepReader:
    """A sweep's MLflow runs, read. Picklable (the client is rebuilt after unpickling), because
    Tune stores its callbacks, and with them the tracker, with the experiment for ``Tuner.restore``."""

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


def read_state(state_file: Path) -> dict:
    """A sweep's ``state.json`` (JSON data only); a ConfigError when it is not readable as such."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{state_file}: not a readable sweep state ({type(exc).__name__}); "
                          "start a new sweep or remove that folder") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{state_file}: not a sweep state (expected a JSON object)")
    return state


def open_sweep(uri: str, experiment: str, sweep_id: str | None = None,
               fingerprint: str | None = None) -> tuple[SweepReader, dict]:
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
    return SweepReader(uri, experiment, sid, None, state=state), spec


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
