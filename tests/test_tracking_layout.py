"""What a sweep leaves in MLflow and Optuna, read back through their clients: the experiment's kind,
each trial run's real start and end, its artifacts (a config ``bibau run`` accepts, the results, the
trial's log, the purified model), the searched values under ``hp.``, the git commit; the Optuna
studies' metric names and run ids; a tuned study's first trial at the defense's defaults; the
progress lines and where Ray's and Optuna's chatter went.

The trial is ``test_sweep.StandIn`` (cheap, deterministic), sleeping long enough that a run which
was created after the fact could not show the trial's duration.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sweep import ROOT, StandIn, spec_dict, write_spec  # noqa: E402

from orchestrator.spec import load_spec  # noqa: E402

SLEEP_S = 0.6


class SavesModels(StandIn):
    """StandIn that also writes a purified model where the product's ``save_models`` writes one."""

    def run(self, cfg: dict, out_dir: Path, log) -> dict:
        report = super().run(cfg, out_dir, log)
        import torch

        from trainables.checkpoint import save_checkpoint
        from trainables.models.base import ModelConfig, create_model

        model = create_model(ModelConfig(name="small_resnet", width=4, depth=1), 10, 3,
                             generator=torch.Generator().manual_seed(0))
        save_checkpoint(out_dir, model, {"model": {"name": "small_resnet", "width": 4, "depth": 1}, "num_classes": 10,
                                         "in_channels": 3, "mean": None, "std": None, "stage": "defense"}, "purified")
        return report


def test_the_first_trial_of_a_tuned_study_runs_the_defense_defaults(tmp_path):
    from orchestrator.search import StudySearcher, default_params, fit_to_space
    from orchestrator.spec import ParamSpace

    data = spec_dict(tmp_path / "store", trials=3)
    # one searched value whose default lies outside its space: it is clipped into it
    data["defenses"][0]["space"]["epochs"] = {"type": "int", "low": 1, "high": 2}
    spec, plan = load_spec(write_spec(tmp_path, data))
    study = plan.study("badnets/bibau_u")
    defaults = study.config["defense"]
    assert defaults["epochs"] > 2  # the premise of the clipping check
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=f"sqlite:///{tmp_path / 'optuna.db'}",
                             prefix="unit", trials_dir=tmp_path / "trials")
    first = searcher.suggest("t0")
    assert first["study"] == "badnets/bibau_u"
    assert first["params"] == {"theta": defaults["theta"], "lr": defaults["lr"], "epochs": 2}
    assert first["run"]["defense"]["theta"] == defaults["theta"]
    second = searcher.suggest("t1")  # the other attack's study starts from its defaults too
    assert second["study"] == "blended/bibau_u" and second["params"]["theta"] == defaults["theta"]
    ot = searcher.optuna["badnets/bibau_u"]._ot_study
    assert ot.trials[0].user_attrs == {"origin": "defaults", "tune_trial_id": "t0"}
    assert ot.metric_names == ["ca", "r_asr", "q_asr"]
    # the next trial of the study is the sampler's, not the defaults again
    searcher.on_trial_complete("t0", {"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2, "trial_status": "completed"})
    for i in range(2, 8):  # round the studies until this one gets its second trial
        searcher.suggest(f"t{i}")
    later = [t.params for t in ot.trials[1:]]
    assert later and all(p != ot.trials[0].params for p in later)
    # a categorical default not among the choices is left to the sampler; steps snap; bad types drop
    assert fit_to_space(ParamSpace(type="categorical", choices=["a", "b"]), "c") is None
    assert fit_to_space(ParamSpace(type="float", low=0.0, high=1.0, step=0.25), 0.3) == 0.25
    assert fit_to_space(ParamSpace(type="float", low=0.0, high=1.0), "x") is None
    assert default_params(plan.study("badnets/ft")) == {}  # a fixed baseline searches nothing


def test_mlflow_and_optuna_layout_of_a_sweep(tmp_path, local_ray):
    import optuna
    import yaml
    from mlflow.tracking import MlflowClient

    from orchestrator.config import load_run_config
    from orchestrator.sweep import run_sweep
    from trainables.checkpoint import load_checkpoint

    data = {**spec_dict(tmp_path / "store", trials=2), "attacks": ["badnets"], "save_models": True}
    spec, plan = load_spec(write_spec(tmp_path, data))
    lines: list[str] = []
    out = run_sweep(spec, plan, backend=SavesModels(str(tmp_path / "markers"), sleep=SLEEP_S), log=lines.append,
                    verbose=0)
    client = MlflowClient(out.tracking_uri)
    exp = client.get_experiment_by_name("stand-in")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    parent = client.get_run(out.parent_run_id)
    if commit:
        assert parent.data.tags["mlflow.source.git.commit"] == commit
    trials = client.search_runs([exp.experiment_id], "tags.role = 'trial'", max_results=100)
    assert len(trials) == 2 + 1 + 1
    for r in trials:
        tags, info = r.data.tags, r.info
        if commit:
            assert tags["mlflow.source.git.commit"] == commit
        assert info.status in ("FINISHED", "FAILED") and info.end_time >= info.start_time
        duration_ms = info.end_time - info.start_time
        files = {a.path for a in client.list_artifacts(info.run_id)}
        assert {"config.yaml", "config.json", "results.json", "trial.log"} <= files, files
        got = Path(client.download_artifacts(info.run_id, "config.yaml", str(tmp_path / info.run_id)))
        assert load_run_config(str(got)).defense.name == tags["defense"]  # bibau run accepts it as it is
        saved = Path(client.download_artifacts(info.run_id, "config.json", str(tmp_path / info.run_id)))
        assert yaml.safe_load(got.read_text()) == yaml.safe_load(saved.read_text())
        if tags["status"] != "completed":
            continue
        # the run lasted as long as the trial itself measured (not the 33-76 ms of a run made afterwards)
        trial_ms = r.data.metrics["time_trial_s"] * 1000
        assert duration_ms >= trial_ms - 5 and trial_ms >= SLEEP_S * 1000, (duration_ms, trial_ms)
        assert duration_ms <= trial_ms + 60_000
        log = Path(client.download_artifacts(info.run_id, "trial.log", str(tmp_path / info.run_id))).read_text()
        assert "stand-in trial" in log
        model_files = {a.path for a in client.list_artifacts(info.run_id, "model")}
        assert model_files == {"model/purified.safetensors", "model/purified.json"}
        local = client.download_artifacts(info.run_id, "model", str(tmp_path / info.run_id))
        model, meta = load_checkpoint(Path(local) / "purified.safetensors")
        assert meta["stage"] == "defense" and sum(p.numel() for p in model.parameters()) > 0
    tuned = [r for r in trials if r.data.tags["defense"] == "bibau_u"]
    for r in tuned:  # the searched values, apart from the fixed ones
        hp = {k[3:]: v for k, v in r.data.params.items() if k.startswith("hp.")}
        assert set(hp) == {"theta", "lr"}
        assert float(hp["theta"]) == pytest.approx(float(r.data.params["defense.theta"]))
    assert not any(k.startswith("hp.") for r in trials if r.data.tags["defense"] == "ft" for k in r.data.params)
    # Optuna: metric names, each trial's MLflow run, the defaults first
    study = optuna.load_study(study_name=f"{out.sweep_id}/badnets/bibau_u", storage=f"sqlite:///{out.folder / 'optuna.db'}")
    assert study.metric_names == ["ca", "r_asr", "q_asr"]
    by_trial = {r.data.tags["trial_id"]: r.info.run_id for r in tuned}
    assert {t.user_attrs["tune_trial_id"]: t.user_attrs["mlflow_run_id"] for t in study.trials} == by_trial
    defaults = plan.study("badnets/bibau_u").config["defense"]
    assert study.trials[0].params == {"theta": defaults["theta"], "lr": defaults["lr"]}
    # progress: one line per finished trial with the count, running, failed and an ETA
    progress = [line for line in lines if line.startswith("[sweep] ") and " done, " in line]
    assert len(progress) == 4 and progress[-1].startswith("[sweep] 4/4 done, 0 running, failed 1, ETA 0s"), progress
    assert any("1/4 done" in line and "ETA " in line for line in progress)
    # Ray's and Optuna's chatter went to the sweep's log file, not to the user
    text = "\n".join(lines)
    assert "Number of trials" not in text and "tensorboard" not in text.lower()
    assert (out.folder / "sweep.log").is_file() and "[sweep] 4/4 done" in (out.folder / "sweep.log").read_text()


class FakeTrial:
    """What TrackingCallback reads of a Tune trial (Tune calls it the same way; no Ray started here)."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config = trial_id, config
        self.status, self.last_result, self.error_file = "RUNNING", None, None


def test_trial_runs_open_when_tune_starts_them_and_close_when_they_end(tmp_path):
    """The callback's side of the layout, driven as Tune drives it: the run exists (RUNNING) from the
    trial's start, the Optuna trial gets its id before the result is told, and the run ends at the
    trial's own end time with the artifacts of its folder."""
    import json
    import time

    import optuna
    from mlflow.tracking import MlflowClient

    from orchestrator.search import StudySearcher
    from orchestrator.tracking import SweepTracker, TrackingCallback
    from trainables.ray_adapters import make_report

    data = {**spec_dict(tmp_path / "store", trials=2), "attacks": ["badnets"]}
    spec, plan = load_spec(write_spec(tmp_path, data))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=url, prefix="s1", trials_dir=tmp_path / "trials")
    tracker = SweepTracker(spec.tracking_uri, spec.experiment, "s1", tmp_path / "state.json",
                           artifact_root=tmp_path / "artifacts")
    tracker.start(name="s", attacks=["badnets"], spec={"name": "s"}, code_version="v", summary={})
    lines: list[str] = []
    import orchestrator.console as console

    console.CONSOLE = lines.append
    try:
        callback = TrackingCallback(tracker, spec.objectives, total=4, optuna_url=url)
        callback.setup()
        trials = [FakeTrial(f"t{i}", searcher.suggest(f"t{i}")) for i in range(3)]  # bibau_u, ft, ibu
        assert [t.config["study"] for t in trials] == ["badnets/bibau_u", "badnets/ft", "badnets/ibu"]
        for t in trials:
            callback.on_trial_start(0, trials, t)
        client = MlflowClient(spec.tracking_uri)
        running = callback.unfinished["t0"]
        assert client.get_run(running).info.status == "RUNNING"
        assert client.get_run(running).data.params["hp.theta"] == str(trials[0].config["params"]["theta"])
        ot = optuna.load_study(study_name="s1/badnets/bibau_u", storage=url)
        assert ot.trials[0].user_attrs["mlflow_run_id"] == running  # set while it could still be
        # the trial runs (its folder as the trainable leaves it), then ends
        t0 = trials[0]
        out = Path(t0.config["out_dir"])
        out.mkdir(parents=True)
        (out / "trial.log").write_text("[trial] started\n[trial] done\n")
        (out / "results.json").write_text(json.dumps({"ca": 0.8}))
        begin = time.time()
        time.sleep(0.3)
        t0.last_result = {**make_report({"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2}, searcher.objectives),
                          "trial_start_ts": begin, "trial_end_ts": time.time(), "time_trial_s": 0.3}
        searcher.on_trial_complete("t0", t0.last_result)  # Tune tells the searcher first, then the callbacks
        callback.on_trial_complete(0, trials, t0)
        t0.status = "TERMINATED"
        trials[1].error_file = None
        callback.on_trial_error(0, trials, trials[1])
        trials[1].status = "ERROR"
        callback.drain()
    finally:
        console.CONSOLE = None
    run = client.get_run(running)
    assert run.info.status == "FINISHED" and run.info.end_time == int(t0.last_result["trial_end_ts"] * 1000)
    assert run.info.start_time <= int(begin * 1000) and run.info.end_time - run.info.start_time >= 300
    assert "trial_start_ts" not in run.data.metrics and run.data.metrics["ca"] == 0.8
    files = {a.path for a in client.list_artifacts(running)}
    assert {"config.yaml", "config.json", "results.json", "trial.log"} <= files
    failed = client.get_run(callback.records["t1"].run_id)
    assert failed.info.status == "FAILED" and failed.info.run_id == callback.records["t1"].run_id
    assert lines[0].startswith("[sweep] 1/4 done, 2 running, failed 0, ETA ") and "badnets/bibau_u t0: completed" in lines[0]
    assert lines[1].startswith("[sweep] 2/4 done, 1 running, failed 1, ETA ") and "t1: failed" in lines[1]
    # the one still running stays RUNNING in MLflow until it ends
    assert client.get_run(callback.unfinished["t2"]).info.status == "RUNNING"
