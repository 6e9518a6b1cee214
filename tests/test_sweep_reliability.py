"""What a sweep does when part of it fails or stops: a failed attack stage fails its attack (and
the sweep's exit code), a resumed search proposes nothing it already proposed, a second driver's
refusal says what it is, and resources no node has are refused or warned about.

The trials are ``test_sweep.StandIn`` (a test fixture: a cheap function of the config), so what is
measured is the orchestration. What costs time here is starting processes (Ray, its workers, a
second driver), so the file starts one local Ray, runs each sweep scenario once and asserts
everything that scenario shows on it, and proves arithmetic (the reseeding, the pending rule, the
searcher's restore) without Ray; exactly one test kills a real driver and resumes its sweep.
"""
from __future__ import annotations

import json
import os
import sqlite3
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml

from test_sweep import StandIn, mlflow_runs, spec_dict, write_spec

from orchestrator.search import STATUS_KEY, StudySearcher

from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


class BlendedStageFails(StandIn):
    """Stand-in whose blended attack stage raises what the real one raises for a bad setting."""

    def attack_stage(self, cfg: dict, log) -> dict:
        if cfg["attack"]["name"] == "blended":
            from trainables.config import ConfigError

            raise ConfigError("attack.target: 99 is not a class; allowed: 0..9")
        return super().attack_stage(cfg, log)


def test_a_failed_attack_stage_fails_its_attack_and_the_sweep(tmp_path, local_ray, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main
    from trainables import ray_adapters

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")
    # one sweep for every sign of the failure; the smallest that has another attack whose results
    # must be kept: one baseline trial, one trial actor
    data = {**spec_dict(tmp_path / "store"), "defenses": [{"name": "ft"}], "concurrency": 1}
    path = write_spec(tmp_path, data)
    backend = BlendedStageFails(str(tmp_path / "markers"))
    monkeypatch.setattr(ray_adapters, "TrialBackend", lambda **kw: backend)
    code = main(["sweep", path])
    out = capsys.readouterr().out
    assert code == 1  # partial results, but not the sweep that was asked for
    reason = "ConfigError: attack.target: 99 is not a class; allowed: 0..9"
    # one line with the reason, not Ray's wrapper
    assert f"attack stage blended failed: {reason}" in out, out
    assert "RayTaskError" not in out
    assert f"FAILED attack stage blended: {reason}" in out
    assert "1 attack stage(s) failed, their studies not run" in out
    reproduce = [line for line in out.splitlines() if line.startswith("reproduce:")]
    assert reproduce and reproduce[0].endswith("--attack badnets"), reproduce  # never the failed attack
    spec, _ = load_spec(path)
    runs = mlflow_runs(spec.tracking_uri, spec.experiment)
    attacks = {r.data.tags["attack"]: r for r in runs if r.data.tags.get("role") == "attack"}
    assert attacks["blended"].info.status == "FAILED" and attacks["blended"].data.tags["status"] == "failed"
    assert attacks["blended"].data.tags["failure"] == reason
    assert attacks["badnets"].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert trials and {r.data.tags["attack"] for r in trials} == {"badnets"}  # kept: the other attack's results
    assert MlflowClient(spec.tracking_uri).get_run(attacks["badnets"].info.run_id).data.metrics["pareto_size"] >= 1


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_sweep
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(test_sweep)
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep
    spec, plan = load_spec({spec!r})
    run_sweep(spec, plan, backend=test_sweep.StandIn({markers!r}, sleep=3.0), address={address!r}, verbose=0)
""")


def completed_optuna_trials(store: Path) -> int:
    """Trials the sweeps under ``store`` have told Optuna as complete (read-only, no MLflow)."""
    n = 0
    for db in store.glob("*/*/optuna.db"):
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)) as con:
                n += con.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.Error:  # not created yet, or being created
            pass
    return n


def test_a_resumed_search_repeats_no_parameters(tmp_path, local_ray):
    """The one real kill and resume: a driver (a process of its own, on this test's Ray, as a
    driver on a cluster) is killed with SIGKILL mid-search; the sweep is resumed here. Every trial
    of the study then has its own parameters (before, each sampler restarted its random stream and
    proposed trial #1's parameters again: the first trial is the defense's defaults, so any trial
    asked after the resume repeated an earlier one)."""
    import optuna
    import ray

    from orchestrator.sweep import run_sweep

    # 4 random trials, one at a time: killed after 2, the resumed driver asks at least one more
    tuned = {**spec_dict(tmp_path, 4)["defenses"][0], "startup_trials": 4}
    data = {**spec_dict(tmp_path / "store", trials=4), "attacks": ["badnets"], "defenses": [tuned], "concurrency": 1}
    path = write_spec(tmp_path, data)
    spec, plan = load_spec(path)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(ROOT / "tests"), spec=path, markers=str(tmp_path / "markers"),
                                    address=ray.get_runtime_context().gcs_address))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600  # only a bound: a loaded machine starts processes slowly
        done = 0
        while time.time() < deadline:  # kill the driver once two trials are told, mid-search
            done = completed_optuna_trials(tmp_path / "store")
            if done >= 2 or proc.poll() is not None:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the driver finished before it could be killed"
        assert done >= 2, "no trials were completed in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends its trials with it
        proc.wait()
    out = run_sweep(spec, plan, resume=True, backend=StandIn(str(tmp_path / "markers")), log=lambda m: None,
                    verbose=0)
    assert out.resumed
    study = optuna.load_study(study_name=f"{out.sweep_id}/badnets/bibau_u", storage=f"sqlite:///{out.folder / 'optuna.db'}")
    asked = [tuple(sorted(t.params.items())) for t in study.trials if t.params]
    assert len(study.trials) >= 4
    assert len(set(asked)) == len(asked), asked  # no parameter set proposed twice, over both drivers
    kept = [r for r in mlflow_runs(spec.tracking_uri, "stand-in")
            if r.data.tags.get("role") == "trial" and r.data.tags["status"] == "completed"]
    evaluated = [json.dumps(json.loads(r.data.tags["params_json"]), sort_keys=True) for r in kept]
    assert len(kept) >= 4 and len(set(evaluated)) == len(evaluated), evaluated


def test_a_restored_searcher_asks_no_parameters_it_asked_before(tmp_path):
    """The same at the searcher, without Ray: restored from its snapshot into a new searcher (its
    samplers rebuilt from their seeds), it proposes nothing the study already has."""
    data = spec_dict(tmp_path / "store", trials=6)
    data.update(attacks=["badnets"], defenses=[{**data["defenses"][0], "startup_trials": 6}])
    spec, plan = load_spec(write_spec(tmp_path, data))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ok = {"ca": 0.5, "r_asr": 0.5, "q_asr": 0.5, STATUS_KEY: "completed"}

    def searcher() -> StudySearcher:
        return StudySearcher(plan.studies, spec.objectives, storage_url=url, prefix="unit", trials_dir=tmp_path)

    first = searcher()
    before = []
    for i in range(3):  # the defaults, then two random draws
        before.append(first.suggest(f"t{i}")["params"])
        first.on_trial_complete(f"t{i}", ok)
    first.save(str(tmp_path / "searcher.json"))
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.json"))
    after = [restored.suggest(f"u{i}")["params"] for i in range(3)]
    seen = [tuple(sorted(p.items())) for p in before + after]
    assert len(set(seen)) == len(seen), seen


def test_the_resumed_stream_is_new_and_reproducible():
    """The reseeding itself: a stream from (seed, trials asked) differs from the fresh one, and is
    the same for the same resume point."""
    import optuna

    from orchestrator.search import continue_stream

    def draws(sampler) -> list[float]:
        study = optuna.create_study(sampler=sampler)
        return [study.ask().suggest_float("x", 0.0, 1.0) for _ in range(3)]

    for make in (lambda: optuna.samplers.TPESampler(seed=3), lambda: optuna.samplers.NSGAIISampler(seed=3)):
        fresh = draws(make())
        a, b = make(), make()
        continue_stream(a, 3, 2)
        continue_stream(b, 3, 2)
        resumed = draws(a)
        assert resumed == draws(b) and not set(resumed) & set(fresh)
        c = make()
        continue_stream(c, 3, 5)
        assert draws(c) != resumed


def test_a_second_driver_is_refused_as_busy_not_as_a_config_error(tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main
    from orchestrator.locks import DriverLease
    from orchestrator.sweep import spec_fingerprint

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")
    data = {**spec_dict(tmp_path / "store"), "attacks": ["badnets"], "defenses": [{"name": "ft"}]}
    path = write_spec(tmp_path, data)
    spec, _ = load_spec(path)
    sweep_dir = spec.storage_path / spec.name / "stand-in-1"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "state.json").write_text(json.dumps({"spec_fingerprint": spec_fingerprint(spec), "status": "running"}))
    lease = DriverLease(sweep_dir).acquire()  # the first driver, alive
    try:
        code = main(["sweep", path, "--resume", "stand-in-1"])
    finally:
        lease.release()
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bibau sweep: sweep busy: sweep stand-in-1 is being run by another driver"), err
    assert "config error" not in err


def test_resources_beyond_a_local_cluster_are_refused_with_its_size(tmp_path, capsys, monkeypatch):
    from orchestrator.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")
    data = {**spec_dict(tmp_path / "store"), "attacks": ["badnets"], "defenses": [{"name": "ft"}],
            "resources": {"cpus": 3}}
    path = write_spec(tmp_path, data)
    assert main(["sweep", path, "--check", "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "resources.cpus: 3 per trial, but the local Ray has 2" in err, err
    assert "bibau sweep SPEC --check --address HEAD" in err  # how a cluster spec is checked from a laptop
    assert main(["sweep", path, "--check", "--num-cpus", "4"]) == 0
    assert "fit the local Ray (4 CPU" in capsys.readouterr().out
    assert main(["sweep", path, "--check", "--num-cpus", "2", "--address", "ray://head:10001"]) == 0
    assert "resources: 3 CPU, 0 GPU per trial not checked here (a remote cluster" in capsys.readouterr().out
    assert main(["sweep", path, "--num-cpus", "2"]) == 2  # a real start: refused before anything
    assert not (tmp_path / "store" / "mlflow.db").exists()


def test_a_remote_cluster_without_a_node_that_size_is_warned_about():
    from orchestrator.capacity import node_fit_warnings
    from orchestrator.spec import Resources

    class Spec:
        resources = Resources(cpus=64, gpus=1)
        attack_resources = None
        pending_timeout_s = 600.0

    nodes = [{"Alive": True, "Resources": {"CPU": 16.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 128.0, "GPU": 8.0}}]  # a dead node holds nothing
    (line,) = node_fit_warnings(Spec, nodes)
    assert line.startswith("warning: resources asks 64 CPU, 1 GPU") and "largest: 16 CPU, 1 GPU" in line
    assert "after 600s" in line
    nodes.append({"Alive": True, "Resources": {"CPU": 64.0, "GPU": 2.0}})
    assert node_fit_warnings(Spec, nodes) == []


def _trainable(config):
    return {"x": 1.0}


def test_trials_pending_past_the_limit_stop_tune_with_the_reason(local_ray):
    """A real Tune run whose trials ask more CPUs than the cluster has: without the limit it would
    wait forever; with it, fit() ends with the reason the sweep reports."""
    from ray import tune

    from orchestrator.capacity import PendingLimit
    from orchestrator.spec import Resources
    from orchestrator.sweep import _pending_cause

    trainable = tune.with_resources(_trainable, {"cpu": 64})
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(num_samples=1),
                       run_config=tune.RunConfig(verbose=0, callbacks=[PendingLimit(2.0, Resources(cpus=64))]))
    start = time.monotonic()
    with pytest.raises(Exception) as info:
        tuner.fit()
    assert time.monotonic() - start < 120
    reason = _pending_cause(info.value)
    assert reason and "waited" in reason and "64 CPU" in reason and "pending_timeout_s 2" in reason, info.value


def test_a_pending_trial_queued_behind_running_ones_is_not_stopped():
    from types import SimpleNamespace

    from orchestrator.capacity import PendingLimit, PendingTooLong
    from orchestrator.spec import Resources

    now = [0.0]
    limit = PendingLimit(10.0, Resources(cpus=2), clock=lambda: now[0])
    running, pending = SimpleNamespace(status="RUNNING"), SimpleNamespace(status="PENDING")
    for t in range(0, 100, 5):  # queued behind a running trial: concurrency, not a missing node
        now[0] = float(t)
        limit.on_step_begin(t, [running, pending])
    now[0] = 100.0
    limit.on_step_begin(0, [pending])
    now[0] = 105.0
    limit.on_step_begin(0, [pending])  # alone for 5 s: still within the limit
    now[0] = 111.0
    with pytest.raises(PendingTooLong, match="1 trial\\(s\\) waited 11s for 2 CPU"):
        limit.on_step_begin(0, [pending])
