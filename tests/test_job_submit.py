"""``ray job submit --working-dir .`` end to end, on this machine only.

Module-scoped fixtures start one Ray head on 127.0.0.1 (token auth, free ports, its own temp
dir) and one real ``mlflow server`` on 127.0.0.1. Each runs in a session of its own and is
stopped through the process ids of that session, never by ``ray stop``: other Ray instances
on the machine are not ours to stop. Every job gets the tracking URI through the runtime
env's ``env_vars``, because the submitting shell's environment never reaches a job.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"


def _missing_tools() -> str | None:
    for tool in ("ray", "mlflow"):
        if shutil.which(tool) is None:
            return f"the {tool!r} command is not on PATH"
    try:
        import aiohttp_cors  # noqa: F401  (ray[default]: without it the head has no Jobs API)
        import grpc  # noqa: F401
    except ImportError:
        return "ray[default] is not installed: the head would have no Jobs API (pip install 'ray[default,tune]==2.60.0')"
    return None


if (_why := _missing_tools()) is not None:
    pytest.skip(_why, allow_module_level=True)


# -- processes we start, and how we stop exactly those ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # fields after the parenthesised command: state ppid pgrp session ...
    return int(stat.rsplit(")", 1)[1].split()[3])


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _session_of(int(entry.name)) == sid:
            pids.append(int(entry.name))
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_session(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop ``proc`` and every process left in the session it leads (started with
    ``start_new_session``): Ray's agents outlive their parent otherwise."""
    sid = proc.pid
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    deadline = time.monotonic() + grace
    while (left := _session_pids(sid)) and time.monotonic() < deadline:
        _signal(left, signal.SIGTERM)
        time.sleep(0.5)
    _signal(_session_pids(sid), signal.SIGKILL)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


# -- the Ray head ---------------------------------------------------------------------------------------
class RayHead:
    def __init__(self, proc: subprocess.Popen, env: dict, dashboard: str, temp_dir: Path, log: Path):
        self.proc, self.env, self.dashboard, self.temp_dir, self.log = proc, env, dashboard, temp_dir, log

    def submit(self, entrypoint: list[str], *, runtime_env: dict, working_dir: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
        """``ray job submit`` and wait: its exit status is the job's (0 only when it SUCCEEDED)."""
        cmd = ["ray", "job", "submit", "--address", self.dashboard, "--runtime-env-json", json.dumps(runtime_env)]
        if working_dir is not None:
            cmd += ["--working-dir", str(working_dir)]
        return subprocess.run(cmd + ["--", *entrypoint], env=self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=working_dir or REPO)


def _client_env(token: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        RAY_AUTH_MODE="token",  # the head and every client: Ray 2.60 turns token auth on for local clusters
        RAY_AUTH_TOKEN=token,  # this head's own token; ~/.ray/auth_token is neither read nor written
        # no multi-node: every address Ray resolves stays on the loopback interface
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def ray_head():
    # a short path: Ray's Unix sockets live under it and must fit in 107 characters
    tmp = Path(tempfile.mkdtemp(prefix="bibau-ray-", dir="/tmp"))
    env = _client_env(secrets.token_hex(32))
    ports = {name: _free_port() for name in (
        "port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
        "node-manager-port", "object-manager-port")}
    cmd = ["ray", "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--dashboard-host={LOOPBACK}",
           "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0", "--disable-usage-stats",
           f"--temp-dir={tmp}", *(f"--{k}={v}" for k, v in ports.items())]
    log = tmp / "head.log"
    with log.open("w") as fh:
        # --block keeps `ray start` as the parent; its session holds every process the head starts
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(proc, env, f"http://{LOOPBACK}:{ports['dashboard-port']}", tmp, log)
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{_tail(log)}")
            ok = subprocess.run(["ray", "job", "list", "--address", head.dashboard], env=env,
                                capture_output=True, text=True, timeout=60)
            if ok.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray Jobs API at {head.dashboard} never answered:\n{ok.stderr[-2000:]}\n{_tail(log)}")
            time.sleep(1.0)
        yield head
    finally:
        stop_session(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# -- the MLflow server ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # the GenAI job runners would cost ~0.9 GB and serve nothing here
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--host", LOOPBACK, "--port", str(port),
           "--workers", "1"]
    log = root / "server.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    uri = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server at {uri} never became healthy:\n{_tail(log)}")
            time.sleep(0.5)
        yield uri
    finally:
        stop_session(proc)


def _job_failure(result: subprocess.CompletedProcess, head: RayHead) -> str:
    return (f"ray job submit exited with {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n"
            f"--- stderr ---\n{result.stderr[-3000:]}\n--- head ---\n{_tail(head.log, 1500)}")


# -- tests ------------------------------------------------------------------------------------------------
SMOKE_JOB = r"""
import os, mlflow
import orchestrator, trainables  # the shipped working dir is importable
mlflow.set_experiment("job-smoke")
with mlflow.start_run(run_name="smoke") as run:
    mlflow.log_params({
        "has_code": os.path.isfile("orchestrator/__init__.py"),
        "has_git": os.path.exists(".git"),
        "has_cluster_dir": os.path.exists("cluster"),
        "ray_address": os.environ.get("RAY_ADDRESS", ""),
    })
    mlflow.log_metric("answer", 42)
print("SMOKE_RUN_ID", run.info.run_id)
"""


def test_trivial_job_logs_to_mlflow_through_runtime_env(ray_head, mlflow_uri):
    """The harness itself: a job shipped with --working-dir . finds MLflow only through
    runtime_env.env_vars, imports the project from the shipped copy, and .rayignore kept
    .git and the deployment files out of the upload."""
    from mlflow.tracking import MlflowClient

    result = ray_head.submit(["python", "-c", SMOKE_JOB], working_dir=REPO,
                             runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}})
    assert result.returncode == 0, _job_failure(result, ray_head)
    run_id = next((line.split()[-1] for line in result.stdout.splitlines() if line.startswith("SMOKE_RUN_ID")), None)
    assert run_id, f"the job printed no run id:\n{result.stdout[-3000:]}"

    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["answer"] == 42
    assert run.data.params["has_code"] == "True"
    assert run.data.params["has_git"] == "False"
    assert run.data.params["has_cluster_dir"] == "False"
    # the job driver reached the head on the loopback address, not the machine's routable one
    assert run.data.params["ray_address"].startswith(f"{LOOPBACK}:"), run.data.params["ray_address"]


# -- the quickstart sweep, submitted as the README says -------------------------------------------------------
SUBMIT = REPO / "cluster" / "submit.sh"
QUICKSTART = "search_spaces/quickstart.yaml"
# what cluster/submit.sh (and the RayJob) run; tests/test_cluster_files.py checks they agree
SWEEP_COMMAND = "python -m orchestrator.cli sweep"
# the tiniest sweep that still runs every stage (attack stage, a tuned study, a baseline, fronts,
# export): --smoke-test sizes, one attack, one trial per study, both studies at once
TINY_BUDGET = ["attacks=[{name: badnets, target: 0, poison_rate: 0.1}]", "defenses.bibau_u.trials=1",
               "concurrency=2", "max_failures=0"]


@pytest.mark.skipif(not (REPO / QUICKSTART).is_file(), reason=f"{QUICKSTART} is not in this checkout")
def test_quickstart_sweep_runs_as_a_ray_job(ray_head, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.spec import load_spec

    storage = tmp_path / "storage"
    experiment = "job-quickstart"
    settings = [*TINY_BUDGET, f"tracking.experiment={experiment}"]
    args = ["--smoke-test", *(a for s in settings for a in ("--set", s))]
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.dashboard, MLFLOW_TRACKING_URI=mlflow_uri,
               BIBAU_STORAGE=str(storage))
    shared_data = REPO.parent / "shared" / "data"
    if shared_data.is_dir():  # the job runs from a copy of the repo, so ../shared is not beside it
        env["BIBAU_DATA"] = str(shared_data)
    # from another folder: submit.sh makes the repository root the working dir itself
    result = subprocess.run(["bash", str(SUBMIT), QUICKSTART, *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, _job_failure(result, ray_head)
    ran = next((line for line in result.stdout.splitlines() if line.startswith("Running entrypoint for job")), "")
    assert SWEEP_COMMAND in ran, ran

    # what the sweep was asked to do, read as the driver read it
    spec, plan = load_spec(str(REPO / QUICKSTART), settings)
    attacks = {a.label for a in plan.attacks}

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {mlflow_uri}: the job did not log to the server"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("role"), []).append(r)
    (sweep,) = by_role.get("sweep", [])
    assert sweep.info.status == "FINISHED"
    attack_runs = {r.data.tags["attack"]: r for r in by_role.get("attack", [])}
    assert set(attack_runs) == attacks
    for r in attack_runs.values():
        assert r.data.tags["mlflow.parentRunId"] == sweep.info.run_id
        assert r.info.status == "FINISHED"
        assert "pareto/front.csv" in {a.path for a in client.list_artifacts(r.info.run_id, "pareto")}
    trials = by_role.get("trial", [])
    completed = [t for t in trials if t.data.tags.get("status") == "completed"]
    assert completed, f"no completed trial among {[t.data.tags.get('status') for t in trials]}"
    parents = {r.info.run_id for r in attack_runs.values()}
    for t in trials:
        assert t.data.tags["mlflow.parentRunId"] in parents
    for t in completed:
        for metric in spec.metrics:
            assert 0.0 <= t.data.metrics[metric] <= 1.0, (metric, t.data.metrics.get(metric))

    # the sweep's own state went to the storage it was given, and it finished
    states = [json.loads(p.read_text()) for p in storage.glob(f"{spec.name}/*/state.json")]
    assert [s["status"] for s in states] == ["finished"], states
    assert states[0]["tracking_uri"] == mlflow_uri
    # and nothing fell back to a throwaway SQLite store inside the job's working dir
    assert not list(ray_head.temp_dir.rglob("mlflow.db"))
