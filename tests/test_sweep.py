"""The sweep system: the searcher (no Ray needed), then small real sweeps on a local Ray with
MLflow on SQLite, with a stand-in for the trial so the orchestration is what is measured.

``StandIn`` below is a test fixture, never a product path: a cheap function of the config
that returns CA, R-ASR and Q-ASR, fails or diverges on purpose for some studies, and keeps
marker files where a real attack stage keeps its cache.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.pareto import pareto_front
from orchestrator.search import STATUS_KEY, StudySearcher
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


class StandIn:
    """Stand-in trial backend (a test fixture). ``blended`` x ``ft`` always raises; the first
    attempt of the first ``blended`` x ``bibau_u`` trial raises once (a retry must rescue it);
    ``ibu`` returns NaN (a diverged trial)."""

    def __init__(self, marker_dir: str, sleep: float = 0.0):
        self.marker_dir = marker_dir
        self.sleep = sleep

    def run(self, cfg: dict, out_dir: Path, log) -> dict:
        d, a = cfg["defense"], cfg["attack"]["name"]
        if d["name"] == "ft" and a == "blended":
            raise RuntimeError("stand-in: this study always fails")
        once = Path(self.marker_dir) / "crashed-once"
        if d["name"] == "bibau_u" and a == "blended" and not once.exists():
            once.parent.mkdir(parents=True, exist_ok=True)
            once.write_text(out_dir.name)
            raise RuntimeError("stand-in: a transient crash")
        time.sleep(self.sleep)
        if d["name"] == "ibu":
            return {"ca": float("nan"), "asr": 1.0, "r_asr": 0.5, "q_asr": 0.5}
        theta, lr = d.get("theta", 0.9), d.get("lr", 0.01)
        ca = 0.6 + 0.3 * theta - 0.02 * abs(math.log10(lr) + 2)
        log(f"stand-in trial: theta={theta:.3f}")
        return {"ca": ca, "asr": theta ** 2 / 2, "r_asr": theta ** 2, "q_asr": 0.5 * theta + 0.05,
                "time_attack_s": 0.0, "time_defense_s": self.sleep, "time_eval_s": 0.0,
                "history": {"attack": [], "defense": [{"epoch": e, "loss_out": 1.0 / e} for e in (1, 2)]}}

    def _stage(self, cfg: dict, name: str) -> dict:
        marker = Path(cfg["cache_dir"]) / f"{name}.stand-in"
        cached = marker.exists()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("x")
        return {"cached": cached, "backdoored_ca": 0.9, "backdoored_asr": 0.99,
                "history": [{"epoch": 1, "loss": 2.0}, {"epoch": 2, "loss": 1.0}]}

    def attack_stage(self, cfg: dict, log) -> dict:
        return self._stage(cfg, cfg["attack"]["name"])

    def clean_reference(self, cfg: dict, log) -> dict:
        return self._stage(cfg, "clean")


def spec_dict(storage: Path, trials: int = 3) -> dict:
    return {
        "name": "stand-in",
        "storage": str(storage),
        "base": {"data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 4, "depth": 1},
                 "evaluation": {"metrics": ["ca", "asr", "ra", "qra"]}},
        "attacks": ["badnets", "blended"],
        "defenses": [
            {"name": "bibau_u", "space": {"theta": {"low": 0.0, "high": 1.0},
                                          "lr": {"low": 1e-3, "high": 5e-2, "log": True}},
             "trials": trials, "startup_trials": 2},
            {"name": "ft"},
            {"name": "ibu"},
        ],
        "concurrency": 2,
        "max_failures": 1,
    }


def write_spec(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# -- what a trial reports ------------------------------------------------------------------------------


def test_a_trial_report_always_carries_every_objective_as_a_finite_number():
    from trainables.ray_adapters import invalid_report, make_report

    objectives = [{"metric": "ca", "mode": "max", "ref": 0.0}, {"metric": "r_asr", "mode": "min", "ref": 1.0},
                  {"metric": "q_asr", "mode": "min", "ref": 1.0}]
    history = {"attack": [{"epoch": 1, "loss": 2.0}], "defense": [{"epoch": 1, "loss_out": 0.5}]}
    ok = make_report({"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2, "bec": None, "cache_hit": True, "attack": "badnets",
                      "history": history}, objectives)
    assert ok[STATUS_KEY] == "completed" and (ok["ca"], ok["r_asr"], ok["q_asr"]) == (0.8, 0.1, 0.2)
    assert "bec" not in ok and "cache_hit" not in ok and "attack" not in ok
    assert json.loads(ok["history_json"]) == [{"epoch": 1, "loss_out": 0.5, "stage": "defense"}]
    bad = make_report({"ca": float("nan"), "r_asr": 0.3, "asr": float("inf")}, objectives)  # q_asr missing too
    assert bad[STATUS_KEY] == "diverged" and bad["diverged_objectives"] == "ca,q_asr"
    assert (bad["ca"], bad["r_asr"], bad["q_asr"]) == (0.0, 1.0, 1.0) and bad["raw_r_asr"] == 0.3
    assert all(math.isfinite(v) for v in bad.values() if isinstance(v, float)) and "asr" not in bad
    invalid = invalid_report("invalid configuration: defense.pgd_step: ...", objectives)
    assert invalid[STATUS_KEY] == "invalid" and invalid["ca"] == 0.0 and invalid["q_asr"] == 1.0


# -- the searcher, without Ray running -------------------------------------------------------------


def test_searcher_interleaves_attacks_respects_budgets_and_never_tells_optuna_nan(tmp_path):
    import optuna
    from ray.tune.search import Searcher

    data = spec_dict(tmp_path / "store", trials=3)
    data["defenses"][0]["concurrency"] = 1
    spec, plan = load_spec(write_spec(tmp_path, data))
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
                             prefix="unit", trials_dir=tmp_path / "trials")
    suggested = {}
    for i in range(4):
        suggested[f"t{i}"] = searcher.suggest(f"t{i}")
    # the first suggestions go round the studies: both attacks' studies start at once
    assert [c["study"] for c in suggested.values()] == ["badnets/bibau_u", "blended/bibau_u", "badnets/ft",
                                                          "blended/ft"]
    for cfg in suggested.values():
        assert cfg["run"]["attack"]["name"] == cfg["attack"]
        assert cfg["out_dir"].startswith(str(tmp_path / "trials"))
        assert [o["metric"] for o in cfg["objectives"]] == ["ca", "r_asr", "q_asr"]
    tuned = suggested["t0"]
    assert set(tuned["params"]) == {"theta", "lr"} and 0.0 <= tuned["params"]["theta"] <= 1.0
    assert tuned["run"]["defense"]["theta"] == tuned["params"]["theta"]  # sampled values land in the config
    # bibau_u runs one trial at a time per attack (its concurrency): next come the ibu baselines
    assert searcher.suggest("t4")["study"] == "badnets/ibu"
    assert searcher.suggest("t5")["study"] == "blended/ibu"
    assert searcher.suggest("t6") is None  # everything left is capped: wait, do not finish
    ok = {"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2, STATUS_KEY: "completed"}
    searcher.on_trial_complete("t0", ok)
    searcher.on_trial_complete("t1", {**ok, "ca": float("nan")})  # NaN: failed, Optuna is not told NaN
    searcher.on_trial_complete("t4", {**ok, STATUS_KEY: "diverged"})
    searcher.on_trial_complete("t2", None, error=True)
    seen = [searcher.suggest(f"u{i}") for i in range(10)]
    studies = [s["study"] for s in seen if isinstance(s, dict)]
    assert sorted(studies) == ["badnets/bibau_u", "blended/bibau_u"]  # one more each, the caps again
    for i, s in enumerate(seen):
        if isinstance(s, dict):
            searcher.on_trial_complete(f"u{i}", ok)
    last = [searcher.suggest(f"v{i}") for i in range(3)]
    assert [s["study"] for s in last[:2]] == ["badnets/bibau_u", "blended/bibau_u"]
    assert last[2] == Searcher.FINISHED  # every budget spent (3 + 3 + 1 + 1 + 1 + 1); Tune waits for the rest
    searcher.on_trial_complete("v0", ok)
    searcher.on_trial_complete("v1", ok)
    assert sum(searcher.launched.values()) == 10
    states = searcher.study_states()
    assert states["badnets/bibau_u"] == {"COMPLETE": 3}
    assert states["blended/bibau_u"] == {"FAIL": 1, "COMPLETE": 2}
    study = optuna.load_study(study_name="unit/blended/bibau_u", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert all(t.values is None or all(math.isfinite(v) for v in t.values) for t in study.trials)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE,
                                optuna.study.StudyDirection.MINIMIZE]


def test_nsga2_is_selectable_per_defense(tmp_path):
    import optuna

    data = spec_dict(tmp_path / "store", trials=3)
    data["defenses"][0].update(sampler="nsga2", population=4)
    spec, plan = load_spec(write_spec(tmp_path, data))
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=None, prefix="unit", trials_dir=tmp_path)
    sampler = searcher.optuna["badnets/bibau_u"]._ot_study.sampler
    assert isinstance(sampler, optuna.samplers.NSGAIISampler) and sampler._population_size == 4
    assert set(searcher.suggest("t0")["params"]) == {"theta", "lr"}


def test_searcher_restore_brings_back_its_counters_and_fails_trials_lost_with_the_driver(tmp_path):
    spec, plan = load_spec(write_spec(tmp_path, spec_dict(tmp_path / "store", trials=3)))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=url, prefix="unit", trials_dir=tmp_path)
    assert searcher.suggest("t0")["study"] == "badnets/bibau_u"
    snapshot = tmp_path / "searcher.pkl"
    searcher.save(str(snapshot))  # what Tune's experiment snapshot holds
    assert searcher.suggest("t1")["study"] == "blended/bibau_u"  # asked after it: the driver then dies
    assert searcher.study_states()["blended/bibau_u"] == {"RUNNING": 1}
    restored = StudySearcher(plan.studies, spec.objectives, storage_url=url, prefix="unit", trials_dir=tmp_path)
    restored.restore(str(snapshot))
    assert restored.launched["badnets/bibau_u"] == 1 and restored.launched["blended/bibau_u"] == 0
    assert restored.owner == {"t0": "badnets/bibau_u"}
    assert restored.study_states()["blended/bibau_u"] == {"FAIL": 1}  # nobody would ever tell it
    assert restored.study_states()["badnets/bibau_u"] == {"RUNNING": 1}  # Tune restarts t0 and tells it
    restored.on_trial_complete("t0", {"ca": 0.5, "r_asr": 0.5, "q_asr": 0.5, STATUS_KEY: "completed"})
    assert restored.study_states()["badnets/bibau_u"] == {"COMPLETE": 1}
    assert restored.suggest("t2")["study"] == "blended/bibau_u"


def test_a_trial_run_left_unfinished_by_a_dead_driver_is_completed_not_duplicated(tmp_path):
    from orchestrator.tracking import SweepTracker, TrackingCallback

    spec, plan = load_spec(write_spec(tmp_path, spec_dict(tmp_path / "store")))
    tracker = SweepTracker(spec.tracking_uri, spec.experiment, "s1", tmp_path / "state.json",
                           artifact_root=tmp_path / "artifacts")
    state = tracker.start(name="s", attacks=["badnets"], spec={"name": "s"}, code_version="v", summary={})
    study = plan.study("badnets/bibau_u")
    cfg = {"study": study.key, "attack": "badnets", "defense": "bibau_u", "tuned": True, "params": {"theta": 0.5},
           "run": study.config}
    result = {"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2, STATUS_KEY: "completed", "time_total_s": 3.0,
              "history_json": json.dumps([{"epoch": 1, "loss": 0.3, "stage": "defense"}])}
    # the dead driver had created the run (tags only) when it was killed
    half = tracker.client.create_run(state["experiment_id"], tags={
        "mlflow.parentRunId": state["attack_runs"]["badnets"], "role": "trial", "sweep_id": "s1", "trial_id": "t1",
        "attack": "badnets", "defense": "bibau_u", "study": study.key, "status": "completed"}).info.run_id
    callback = TrackingCallback(tracker, spec.objectives)
    callback.setup()
    rec = callback.log("t1", cfg, result, None)
    assert rec.run_id == half
    again = callback.log("t1", cfg, result, None)  # Tune reporting it twice logs nothing new
    assert again is rec
    runs = tracker.trial_runs()
    assert list(runs) == ["t1"] and runs["t1"].info.status == "FINISHED"
    assert runs["t1"].data.metrics["ca"] == 0.8 and "time_total_s" not in runs["t1"].data.metrics
    assert runs["t1"].data.params["defense.name"] == "bibau_u"
    curve = tracker.client.get_metric_history(half, "curve/defense/loss")
    assert [(m.step, m.value) for m in curve] == [(1, 0.3)]


# -- small real sweeps on a local Ray ----------------------------------------------------------------


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=10000) if exp else []


def test_sweep_lands_runs_metrics_tags_and_artifacts_in_mlflow(tmp_path, local_ray, capsys):
    from mlflow.tracking import MlflowClient

    from orchestrator.export import read_export
    from orchestrator.sweep import run_sweep

    spec, plan = load_spec(write_spec(tmp_path, spec_dict(tmp_path / "store", trials=2)))
    lines: list[str] = []
    out = run_sweep(spec, plan, backend=StandIn(str(tmp_path / "markers")), log=lines.append, verbose=0)
    assert all(info["ok"] for info in out.attack_stage.values()), out.attack_stage
    client = MlflowClient(out.tracking_uri)
    runs = mlflow_runs(out.tracking_uri, "stand-in")
    by_role: dict[str, list] = {}
    for r in runs:
        by_role.setdefault(r.data.tags.get("role"), []).append(r)
    (parent,) = by_role["sweep"]
    attacks = {r.data.tags["attack"]: r for r in by_role["attack"]}
    trials = by_role["trial"]
    assert set(attacks) == {"badnets", "blended"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in attacks.values())
    assert len(trials) == 2 * 2 + 2 + 2  # every trial of the budget, logged once
    assert len({r.data.tags["trial_id"] for r in trials}) == len(trials)
    for r in trials:
        t = r.data.tags
        assert t["mlflow.parentRunId"] == attacks[t["attack"]].info.run_id  # nested under its attack
        assert r.data.params["attack.name"] == t["attack"] and r.data.params["defense.name"] == t["defense"]
    status = {(r.data.tags["attack"], r.data.tags["defense"]): r for r in trials if r.data.tags["defense"] != "bibau_u"}
    failed = status[("blended", "ft")]
    assert failed.data.tags["status"] == "failed" and failed.info.status == "FAILED"
    error = Path(client.download_artifacts(failed.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "this study always fails" in error
    for attack in ("badnets", "blended"):  # NaN: recorded as diverged, never as a number on a front
        diverged = status[(attack, "ibu")]
        assert diverged.data.tags["status"] == "diverged" and "ca" not in diverged.data.metrics
        assert diverged.data.tags["pareto"] == "false"
    # the transient crash was retried: every BI-BAU trial completed, with metrics and curves
    bibau = [r for r in trials if r.data.tags["defense"] == "bibau_u"]
    assert {r.data.tags["status"] for r in bibau} == {"completed"}
    for r in bibau:
        assert {"ca", "r_asr", "q_asr", "time_defense_s"} <= set(r.data.metrics)
        curve = client.get_metric_history(r.info.run_id, "curve/defense/loss_out")
        assert [(m.step, m.value) for m in curve] == [(1, 1.0), (2, 0.5)]
        assert "theta" in json.loads(r.data.tags["params_json"])
    # pareto=true exactly on each attack's non-dominated completed trials
    for attack in ("badnets", "blended"):
        done = [r for r in trials if r.data.tags["attack"] == attack and r.data.tags["status"] == "completed"]
        pts = [(r.data.metrics["ca"], r.data.metrics["r_asr"], r.data.metrics["q_asr"]) for r in done]
        expected = {done[i].info.run_id for i in pareto_front(pts, ["max", "min", "min"])}
        assert {r.info.run_id for r in done if r.data.tags["pareto"] == "true"} == expected
        run = attacks[attack]
        files = {a.path for a in client.list_artifacts(run.info.run_id, "pareto")}
        assert {"pareto/front.csv", "pareto/trials.csv", "pareto/ca_vs_r_asr.png", "pareto/ca_vs_q_asr.png",
                "pareto/hypervolume.csv", "pareto/hypervolume.png"} <= files
        hv = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "hypervolume"), key=lambda m: m.step)]
        assert len(hv) == len([r for r in trials if r.data.tags["attack"] == attack])
        assert all(b >= a for a, b in zip(hv, hv[1:])) and hv[-1] > 0
        assert run.data.metrics["pareto_size"] == len(expected)
        assert run.data.metrics["attack_stage/backdoored_asr"] == pytest.approx(0.99)
    # the Optuna studies saw the retried trial complete and no NaN
    import optuna

    storage = f"sqlite:///{out.folder / 'optuna.db'}"
    for attack in ("badnets", "blended"):
        study = optuna.load_study(study_name=f"{out.sweep_id}/{attack}/bibau_u", storage=storage)
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    # the sweep's own export and its summary
    doc = read_export(out.export_file)
    assert {s["attack"] for s in doc["selections"]} == {"badnets", "blended"}
    for s in doc["selections"]:
        assert s["provenance"]["run_id"] in {r.info.run_id for r in trials}
        assert s["config"]["attack"]["name"] == s["attack"]
    text = "\n".join(lines)
    assert "Pareto front for badnets" in text and "mlflow ui --backend-store-uri" in text
    assert str(out.export_file) in text
    # a second sweep of the same spec reuses the attack stage and says so
    lines.clear()
    again = {**spec_dict(tmp_path / "store"), "attacks": ["badnets"], "defenses": [{"name": "ft"}]}
    out2 = run_sweep(*load_spec(write_spec(tmp_path, again)), backend=StandIn(str(tmp_path / "markers")),
                     log=lines.append, verbose=0)
    assert out2.sweep_id != out.sweep_id
    reused = [line for line in lines if "reused from the cache" in line]
    assert len(reused) == 2 and "badnets" in reused[0] and "clean-reference" in reused[1], lines


DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_sweep
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(test_sweep)
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep
    spec, plan = load_spec({spec!r})
    run_sweep(spec, plan, backend=test_sweep.StandIn({markers!r}, sleep=4.0), num_cpus=2, verbose=0)
""")


def test_resume_after_the_driver_is_killed_does_not_duplicate_runs(tmp_path, local_ray):
    from orchestrator.sweep import run_sweep

    data = {**spec_dict(tmp_path / "store", trials=3), "attacks": ["badnets"],
            "defenses": [spec_dict(tmp_path, 3)["defenses"][0], {"name": "ft"}]}
    path = write_spec(tmp_path, data)
    spec, plan = load_spec(path)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(ROOT / "tests"), spec=path, markers=str(tmp_path / "markers")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # kill the driver once two trials are logged, mid-sweep
            done = [r for r in mlflow_runs(spec.tracking_uri, "stand-in") if r.data.tags.get("role") == "trial"]
            if len(done) >= 2 or proc.poll() is not None:
                break
            time.sleep(1.0)
        assert proc.poll() is None, "the driver finished before it could be killed"
        assert len(done) >= 2, "no trial was logged in time"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    out = run_sweep(spec, plan, resume=True, backend=StandIn(str(tmp_path / "markers")), log=lambda m: None,
                    verbose=0)
    trials = [r for r in mlflow_runs(spec.tracking_uri, "stand-in") if r.data.tags.get("role") == "trial"]
    kept = [r for r in trials if r.data.tags["status"] != "orphaned"]
    assert len({r.data.tags["trial_id"] for r in trials}) == len(trials)  # no trial logged twice
    assert len(kept) == 3 + 1  # exactly the budget, counted over both drivers
    assert {r.data.tags["study"] for r in kept} == {"badnets/bibau_u", "badnets/ft"}
    assert len([r for r in mlflow_runs(spec.tracking_uri, "stand-in") if r.data.tags.get("role") == "sweep"]) == 1
    assert out.resumed and all(r.info.status == "FINISHED" for r in kept)


class DiesOnce(StandIn):
    """Stand-in whose first attack-stage attempt kills its worker process, as a lost node does."""

    def attack_stage(self, cfg: dict, log) -> dict:
        marker = Path(self.marker_dir) / "died-once"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("x")
            os._exit(1)
        return super().attack_stage(cfg, log)


def test_an_attack_stage_task_whose_worker_dies_is_rerun(tmp_path, local_ray):
    from trainables.ray_adapters import run_attack_stages

    spec, plan = load_spec(write_spec(tmp_path, spec_dict(tmp_path / "store")))
    jobs = [("badnets", "attack", plan.attacks[0].config)]
    out = run_attack_stages(jobs, cpus=1, gpus=0, backend=DiesOnce(str(tmp_path / "m1")), log=lambda m: None)
    assert (tmp_path / "m1" / "died-once").exists()  # the first attempt did die
    assert out["badnets"]["ok"], out
    # without retries the same loss fails the stage: the retry is what saved it
    out = run_attack_stages(jobs, cpus=1, gpus=0, backend=DiesOnce(str(tmp_path / "m2")), log=lambda m: None,
                            retries=0)
    assert not out["badnets"]["ok"] and "died" in out["badnets"]["error"].lower(), out
