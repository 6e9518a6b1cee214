"""Multi-node faults on one machine: a Ray head (no CPUs) and two worker nodes started with
``ray start`` on 127.0.0.1, the storage a folder all of them share, MLflow as a server.

Mid-sweep a worker node running a trial is killed (its trial reruns on the other node) and the
MLflow server is restarted; the sweep must end complete, every trial logged exactly once.
Trials are the stand-in of test_sweep.py (sleeping, so the faults land mid-trial); each writes a
marker naming the node it ran on.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY = shutil.which("ray")
MLFLOW = shutil.which("mlflow")

pytestmark = [pytest.mark.cluster,
              pytest.mark.skipif(not (RAY and MLFLOW), reason="needs the ray and mlflow command-line tools")]

DRIVER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import ray
    import test_sweep
    from ray import cloudpickle

    class NodeMarking(test_sweep.StandIn):
        def run(self, cfg, out_dir, log):
            Path(self.marker_dir).mkdir(parents=True, exist_ok=True)
            node = os.environ.get("BIBAU_TEST_NODE", "?")
            (Path(self.marker_dir) / f"start-{{out_dir.name}}-{{node}}-{{time.time():.3f}}").write_text("")
            return super().run(cfg, out_dir, log)

    cloudpickle.register_pickle_by_value(test_sweep)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address=sys.argv[2], log_to_driver=False)
    deadline = time.time() + 300
    while sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]) < 2:
        assert time.time() < deadline, "the two worker nodes never joined"
        time.sleep(0.5)
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep
    spec, plan = load_spec(sys.argv[1])
    out = run_sweep(spec, plan, backend=NodeMarking(sys.argv[3], sleep=12.0), verbose=0)
    print("SWEEP", out.sweep_id, len(out.records), flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process we started and its whole process group (a Ray node: raylet, workers;
    each was started in a session of its own, so the group is exactly its processes)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_started(proc: subprocess.Popen, log: Path, timeout_s: float = 400) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "Ray runtime started" in text:
            return
        assert proc.poll() is None, f"ray start ended: {text[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"ray start did not finish: {log.read_text(errors='replace')[-3000:]}")


def start_mlflow(tmp: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp / "mlartifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=open(tmp / "mlflow.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    deadline = time.time() + 400
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    kill_tree(proc)
    raise AssertionError("the MLflow server did not start: " + (tmp / "mlflow.log").read_text()[-2000:])


def test_a_killed_worker_node_and_a_restarted_mlflow_server_lose_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray_port, ml_port = free_port(), free_port()
    uri = f"http://127.0.0.1:{ml_port}"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    base_env["RAY_AUTH_MODE"] = "disabled"  # a throwaway cluster on 127.0.0.1: no token to share
    base_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job workers would only take CPU here
    common = ["--node-ip-address=127.0.0.1", "--block", "--disable-usage-stats", "--object-store-memory=80000000"]
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["head"] = subprocess.Popen(
            [RAY, "start", "--head", f"--port={ray_port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
             "--include-dashboard=false", *common], env=base_env, start_new_session=True,
            stdout=open(tmp_path / "head.log", "wb"), stderr=subprocess.STDOUT)
        wait_started(procs["head"], tmp_path / "head.log")
        for node in ("a", "b"):  # one at a time: on 2 cores, nodes starting together time out
            procs[node] = subprocess.Popen(
                [RAY, "start", f"--address=127.0.0.1:{ray_port}", "--num-cpus=1", *common],
                env={**base_env, "BIBAU_TEST_NODE": node}, start_new_session=True,
                stdout=open(tmp_path / f"node-{node}.log", "wb"), stderr=subprocess.STDOUT)
            wait_started(procs[node], tmp_path / f"node-{node}.log")
        procs["mlflow"] = start_mlflow(tmp_path, ml_port)
        spec = {"name": "multinode", "storage": str(tmp_path / "shared"),
                "base": {"data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 4, "depth": 1},
                         "evaluation": {"metrics": ["ca", "asr", "ra"]}},
                "attacks": ["badnets"], "objectives": [{"metric": "ca", "mode": "max"}, {"metric": "r_asr", "mode": "min"}],
                "defenses": [{"name": "bibau_u", "space": {"theta": {"low": 0.1, "high": 0.9}}, "trials": 3},
                             {"name": "ft"}],
                "concurrency": 2, "max_failures": 2}
        spec_file = tmp_path / "spec.yaml"
        spec_file.write_text(yaml.safe_dump(spec))
        markers = tmp_path / "markers"
        script = tmp_path / "driver.py"
        script.write_text(DRIVER.format(tests=str(ROOT / "tests")))
        driver = subprocess.Popen(
            [sys.executable, str(script), str(spec_file), f"127.0.0.1:{ray_port}", str(markers)],
            env={**base_env, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "BIBAU_STATE_KEY": "multinode"},
            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs["driver"] = driver
        # 1. kill the worker node a trial is running on, mid-trial
        deadline = time.time() + 900
        victim = started = None
        while time.time() < deadline and driver.poll() is None:
            starts = sorted(markers.glob("start-*")) if markers.is_dir() else []
            if starts:
                started = starts[0].name.split("-")
                victim = started[-2]
                break
            time.sleep(0.3)
        assert victim in ("a", "b"), f"no trial started: {driver.poll()} {driver.stderr.read() if driver.poll() is not None else ''}"
        time.sleep(2)  # well inside its 12 s
        kill_tree(procs.pop(victim))
        killed_trial = "-".join(started[1:-2])
        # 2. restart the MLflow server while trials run and finish
        time.sleep(8)
        kill_tree(procs.pop("mlflow"))
        time.sleep(6)
        procs["mlflow"] = start_mlflow(tmp_path, ml_port)
        out, err = driver.communicate(timeout=1200)
        assert driver.returncode == 0, err[-4000:]
        assert "SWEEP" in out, (out[-2000:], err[-4000:])
        sweep_id, n = out.split("SWEEP ")[1].split()[:2]
        assert int(n) == 4
        # the killed trial ran again, on the surviving node
        reruns = [m.name for m in markers.glob(f"start-{killed_trial}-*")]
        survivor = "b" if victim == "a" else "a"
        assert any(f"-{survivor}-" in r for r in reruns), (victim, reruns)
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("multinode")
        runs = client.search_runs([exp.experiment_id], filter_string="tags.role = 'trial'", max_results=1000)
        ids = [r.data.tags["trial_id"] for r in runs]
        assert len(ids) == len(set(ids)) == 4, ids  # every trial once: none lost, none twice
        assert {r.data.tags["status"] for r in runs} == {"completed"}
        assert all(r.info.status == "FINISHED" for r in runs)
        assert killed_trial.rsplit("-", 1)[-1] in ids
        (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.role = 'sweep'")
        assert parent.info.status == "FINISHED" and parent.data.tags["sweep_id"] == sweep_id
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                kill_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
