"""Cheap-first evaluation: the sweep's gate stops a trial after CA and ASR, and what it did not
measure appears nowhere (report, results.json, Tune, MLflow, Optuna).

The trial-level tests run the real trial on the offline digits data at smoke-test sizes; the
sweep-level test uses the stand-in backend of ``test_sweep`` (whose gate decision is the
product's own ``GateConfig.margin``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from orchestrator.search import STATUS_KEY, StudySearcher
from orchestrator.spec import load_spec
from trainables.config import ConfigError, build, to_dict
from trainables.schema import GateConfig, RunConfig

from test_sweep import StandIn, mlflow_runs, spec_dict, write_spec

SKIPPED = ("r_asr", "q_asr", "bec", "ra_clean_asr")


# -- the spec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate, field", [
    ({}, "gate"),
    ({"ca_min": 1.5}, "gate.ca_min"),
    ({"ca_drop_max": -0.1}, "gate.ca_drop_max"),
    ({"asr_max": 1.5}, "gate.asr_max"),
    ({"ca_mn": 0.3}, "gate.ca_mn"),
    ({"ca_min": "high"}, "gate.ca_min"),
])
def test_a_bad_gate_fails_naming_the_field(tmp_path, gate, field):
    data = {**spec_dict(tmp_path / "store"), "gate": gate}
    with pytest.raises(ConfigError) as err:
        load_spec(write_spec(tmp_path, data))
    assert str(err.value).startswith(field) or f" {field}" in str(err.value) or f"{field}:" in str(err.value), err.value


def test_the_spec_gate_reaches_every_defense_trial_and_no_attack_stage(tmp_path):
    data = {**spec_dict(tmp_path / "store"), "gate": {"ca_drop_max": 0.2}}
    data["base"]["evaluation"]["gate"] = {"ca_min": 0.9}  # the spec-level gate wins
    spec, plan = load_spec(write_spec(tmp_path, data))
    assert spec.gate == GateConfig(ca_min=None, ca_drop_max=0.2)
    for s in plan.studies:
        assert s.config["evaluation"]["gate"] == to_dict(GateConfig(ca_drop_max=0.2))
    _, plan = load_spec(write_spec(tmp_path, spec_dict(tmp_path / "store")))
    assert all(s.config["evaluation"]["gate"] is None for s in plan.studies)  # no gate: full evaluation


def test_asr_max_spares_the_baselines_their_reactivation(tmp_path):
    """A searched trial whose backdoor survived skips RA and QRA; a baseline keeps them: its R-ASR is
    what the searched defense is compared with."""
    data = {**spec_dict(tmp_path / "store"), "gate": {"ca_drop_max": 0.3, "asr_max": 0.2}}
    data["defenses"] = [{"name": "bibau_u", "fixed": {"epochs": 1}, "space": {"theta": {"low": 0.0, "high": 1.0}},
                         "trials": 2}, {"name": "ft", "fixed": {"epochs": 1}}]
    _, plan = load_spec(write_spec(tmp_path, data))
    gates = {s.defense: s.config["evaluation"]["gate"] for s in plan.studies}
    assert gates["bibau_u"]["asr_max"] == 0.2 and gates["bibau_u"]["ca_drop_max"] == 0.3
    assert gates["ft"]["asr_max"] is None and gates["ft"]["ca_drop_max"] == 0.3
    data["gate"] = {"asr_max": 0.2}
    _, plan = load_spec(write_spec(tmp_path, data))
    assert {s.defense: s.config["evaluation"]["gate"] is None for s in plan.studies} == {"bibau_u": False, "ft": True}


def test_gate_margin_names_the_rule_that_failed():
    g = GateConfig(ca_min=0.5, ca_drop_max=0.2)
    assert g.margin(0.75, 0.9) == (pytest.approx(-0.05), "")
    margin, why = g.margin(0.6, 0.9)
    assert margin == pytest.approx(0.1) and "ca_drop_max" in why and "ca_min" not in why
    margin, why = g.margin(0.3, 0.9)
    assert margin == pytest.approx(0.4) and "ca_min" in why and "ca_drop_max" in why
    assert GateConfig(ca_min=0.5).margin(0.3, None)[0] == pytest.approx(0.2)
    # a backdoor still in place fails asr_max; without an ASR (the check during the defense) it is not judged
    g = GateConfig(ca_drop_max=0.2, asr_max=0.2)
    margin, why = g.margin(0.85, 0.9, asr=0.95)
    assert margin == pytest.approx(0.75) and "asr_max" in why and "ca_drop_max" not in why
    assert g.margin(0.85, 0.9, asr=0.1) == (pytest.approx(-0.1), "")
    assert g.margin(0.85, 0.9) == (pytest.approx(-0.15), "")
    assert GateConfig(asr_max=0.2).margin(0.1, None, asr=0.3)[0] == pytest.approx(0.1)


# -- one real trial ---------------------------------------------------------------------------------


def digits_trial(tmp_path: Path, gate: dict | None, metrics=("ca", "asr", "ra", "qra", "bec")) -> RunConfig:
    return build(RunConfig, {
        "seed": 0, "device": "cpu", "threads": 1, "cache_dir": str(tmp_path / "cache"),
        "data": {"name": "digits", "clean_fraction": 0.1},
        "model": {"name": "small_resnet", "width": 4, "depth": 1},
        "train": {"epochs": 1, "batch_size": 64, "crop_padding": 0},
        "attack": {"name": "badnets", "target": 0, "poison_rate": 0.1},
        "defense": {"name": "ft", "epochs": 1, "crop_padding": 0},
        "evaluation": {"metrics": list(metrics), "gate": gate},
    })


def test_a_gated_trial_stops_after_ca_and_asr_and_reports_nothing_it_did_not_measure(tmp_path, monkeypatch):
    from trainables.tasks import ClassifierTask
    from trainables.trial import run_trial

    calls = []
    real_retune = ClassifierTask.retune
    monkeypatch.setattr(ClassifierTask, "retune", lambda *a, **k: calls.append(1) or real_retune(*a, **k))
    lines: list[str] = []
    gated = run_trial(digits_trial(tmp_path, {"ca_min": 1.0 - 1e-9, "ca_drop_max": None}), tmp_path / "gated",
                      log=lines.append, smoke_test=True)
    assert gated["evaluation_status"] == "gated" and gated["gate_margin"] > 0
    assert "ca_min" in gated["gate_reason"] and gated["evaluations_skipped"] == ["ra", "qra", "bec"]
    assert 0.0 <= gated["ca"] <= 1.0 and 0.0 <= gated["asr"] <= 1.0
    assert calls == []  # no retuning, no QRA generator, no BEC
    for key in (*SKIPPED, "time_eval_ra_s", "time_eval_qra_s", "time_eval_bec_s"):
        assert key not in gated
    saved = json.loads((tmp_path / "gated" / "results.json").read_text())
    assert not set(SKIPPED) & set(saved) and saved["evaluation_status"] == "gated"
    assert any("[eval] gated" in line for line in lines)

    # asr_max alone gates on the ASR the defended model keeps
    by_asr = run_trial(digits_trial(tmp_path, {"ca_min": None, "ca_drop_max": None, "asr_max": 0.0}), None,
                       log=lines.append, smoke_test=True)
    assert (by_asr["evaluation_status"] == "gated") == (by_asr["asr"] > 0.0)
    if by_asr["asr"] > 0.0:
        assert "asr_max" in by_asr["gate_reason"] and "r_asr" not in by_asr

    # a gate the model passes: the full evaluation, its cost per metric, RA's retuned model shared with QRA
    full = run_trial(digits_trial(tmp_path, {"ca_min": 0.0, "ca_drop_max": None}), None, log=lines.append,
                     smoke_test=True)
    assert full["evaluation_status"] == "full" and full["gate_margin"] <= 0
    for key in ("r_asr", "q_asr", "bec"):
        assert isinstance(full[key], float)
    for name in ("ca_asr", "ra", "qra", "bec"):
        assert full[f"time_eval_{name}_s"] > 0
    assert full["time_eval_s"] >= full["time_eval_ra_s"] + full["time_eval_qra_s"] + full["time_eval_bec_s"]
    # one retuning of the purified model (RA, and QRA's teacher) and one of the clean reference (ra_on_clean)
    assert len(calls) == 2
    assert full["ca"] == gated["ca"]  # the same model: only the gate differed


# -- the gate during the defense ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gate-cache")


def stoppable_trial(cache: Path, defense: str, gate: dict) -> RunConfig:
    extra = {"pgd_steps": 1, "fisher_samples": 64} if defense.startswith("bibau") else {}
    return build(RunConfig, {
        "seed": 0, "device": "cpu", "threads": 1, "cache_dir": str(cache),
        "data": {"name": "digits", "clean_fraction": 0.1, "test_size": 300},
        "model": {"name": "small_resnet", "width": 4, "depth": 1},
        "train": {"epochs": 2, "batch_size": 64, "crop_padding": 0, "eval_every": 0},
        "attack": {"name": "badnets", "target": 0, "poison_rate": 0.1},
        "defense": {"name": defense, "epochs": 4, "crop_padding": 0, **extra},
        "evaluation": {"metrics": ["ca", "asr", "ra"], "ra_size": 100, "ra_epochs": 1, "ra_on_clean": False,
                       "gate": gate},
    })


@pytest.mark.parametrize("defense", ["ft", "ibu", "bibau_u"])
def test_the_gate_during_the_defense_stops_it_and_the_trial_is_gated(tmp_path, shared_cache, defense):
    from trainables.trial import run_trial

    lines: list[str] = []
    gate = {"ca_min": 1.0 - 1e-9, "during_defense": True, "check_from": 0.5, "slack": 0.0, "eval_size": 100}
    out = run_trial(stoppable_trial(shared_cache, defense, gate), tmp_path / "stopped", log=lines.append)
    defense_history = out["history"]["defense"]
    assert out["evaluation_status"] == "gated" and out["gate_stopped_epoch"] == 2, out.get("gate_reason")
    assert len(defense_history) == 2 and "gate_ca" in defense_history[-1]  # epochs 3 and 4 never ran
    assert "defense epoch 2/4" in out["gate_reason"] and "on 100 test images" in out["gate_reason"]
    assert out["gate_margin"] > 0 and out["evaluations_skipped"] == ["ra"]
    assert not {"r_asr", "q_asr"} & set(out)
    saved = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert saved["evaluation_status"] == "gated" and "r_asr" not in saved
    assert (tmp_path / "stopped" / "purified.safetensors").exists()  # the model as it was when stopped

    # a gate the model passes: every epoch runs; epochs 2 and 3 are checked, the last is the final gate's
    passing = {**gate, "ca_min": 0.0}
    full = run_trial(stoppable_trial(shared_cache, defense, passing), None, log=lines.append)
    history = full["history"]["defense"]
    assert full["evaluation_status"] == "full" and isinstance(full["r_asr"], float)
    assert [("gate_ca" in row) for row in history] == [False, True, True, False]
    assert "gate_stopped_epoch" not in full


def test_slack_keeps_a_model_just_below_the_gate_running(tmp_path, shared_cache):
    from trainables.trial import run_trial

    # a floor no model meets, by less than the slack: the defense runs to its end, the final gate decides
    gate = {"ca_min": 1.0 - 1e-9, "during_defense": True, "check_from": 0.0, "slack": 1.0, "eval_size": 100}
    out = run_trial(stoppable_trial(shared_cache, "ft", gate), None, log=lambda m: None)
    assert len(out["history"]["defense"]) == 4 and "gate_stopped_epoch" not in out
    assert out["evaluation_status"] == "gated" and "ca_min" in out["gate_reason"]


@pytest.mark.parametrize("gate, field", [
    ({"ca_min": 0.5, "check_from": 1.5}, "check_from"),
    ({"ca_min": 0.5, "slack": -0.1}, "slack"),
    ({"ca_min": 0.5, "eval_size": 0}, "eval_size"),
    ({"ca_min": 0.5, "during_defense": "sometimes"}, "during_defense"),
])
def test_a_bad_in_defense_gate_fails_naming_the_field(gate, field):
    with pytest.raises(ConfigError, match=rf"gate\.{field}"):
        build(GateConfig, gate, "gate")


@pytest.mark.parametrize("check_from, epochs, first", [(0.25, 20, 5), (0.0, 20, 1), (0.5, 2, 1), (1.0, 4, 4),
                                                        (0.3, 10, 3)])
def test_the_first_checked_epoch(check_from, epochs, first):
    assert GateConfig(ca_min=0.5, check_from=check_from).first_checked_epoch(epochs) == first


# -- what Tune, Optuna and MLflow are told -------------------------------------------------------------

OBJECTIVES = [{"metric": "ca", "mode": "max", "ref": 0.0}, {"metric": "r_asr", "mode": "min", "ref": 1.0},
              {"metric": "q_asr", "mode": "min", "ref": 1.0}]


def test_a_gated_report_carries_no_stand_in_objectives():
    from trainables.ray_adapters import make_report

    report = make_report({"ca": 0.2, "asr": 0.9, "r_asr": None, "evaluation_status": "gated", "gate_margin": 0.3,
                          "gate_reason": "CA 0.2 < ca_min 0.5", "time_eval_ca_asr_s": 0.1}, OBJECTIVES)
    assert report[STATUS_KEY] == "gated" and report["ca"] == 0.2 and report["gate_margin"] == 0.3
    assert "r_asr" not in report and "q_asr" not in report and "raw_r_asr" not in report
    assert report["gate_reason"] == "CA 0.2 < ca_min 0.5"


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_optuna_sees_a_gated_trial_as_pruned_and_infeasible(tmp_path, sampler):
    import optuna

    data = {**spec_dict(tmp_path / "store", trials=4), "attacks": ["badnets"], "gate": {"ca_min": 0.5}}
    data["defenses"] = [{**data["defenses"][0], "sampler": sampler,
                         **({"population": 2} if sampler == "nsga2" else {})}]
    spec, plan = load_spec(write_spec(tmp_path, data))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=url, prefix="unit", trials_dir=tmp_path)
    for t in ("t0", "t1", "t2"):
        assert searcher.suggest(t)["study"] == "badnets/bibau_u"
    searcher.on_trial_complete("t0", {"ca": 0.8, "r_asr": 0.1, "q_asr": 0.2, "gate_margin": -0.3,
                                      STATUS_KEY: "completed"})
    searcher.on_trial_complete("t1", {"ca": 0.2, "asr": 0.9, "gate_margin": 0.3, STATUS_KEY: "gated"})
    searcher.on_trial_complete("t2", None, error=True)
    assert searcher.done == {"t0": "completed", "t1": "gated", "t2": "failed"}
    study = optuna.load_study(study_name="unit/badnets/bibau_u", storage=url)
    t0, t1, t2 = sorted(study.trials, key=lambda t: t.number)
    assert t0.state.name == "COMPLETE" and t0.constraints == {"gate": pytest.approx(-0.3)}
    assert t1.state.name == "PRUNED" and t1.values is None and t1.constraints == {"gate": pytest.approx(0.3)}
    assert t2.state.name == "FAIL"
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score

    assert _get_infeasible_trial_score(t1) > 0 and _get_infeasible_trial_score(t0) == 0  # TPE ranks it bad
    assert isinstance(searcher.suggest("t3"), dict)  # the sampler still samples after a gated trial


def test_mlflow_records_a_gated_trial_as_gated_off_the_front_and_counts_it(tmp_path):
    from orchestrator.tracking import SweepTracker, TrackingCallback

    spec, plan = load_spec(write_spec(tmp_path, {**spec_dict(tmp_path / "store"), "gate": {"ca_min": 0.5}}))
    tracker = SweepTracker(spec.tracking_uri, spec.experiment, "s1", tmp_path / "state.json",
                           artifact_root=tmp_path / "artifacts")
    tracker.start(name="s", attacks=["badnets"], spec={"name": "s"}, code_version="v", summary={})
    study = plan.study("badnets/bibau_u")
    cfg = {"study": study.key, "attack": "badnets", "defense": "bibau_u", "tuned": True, "run": study.config}
    callback = TrackingCallback(tracker, spec.objectives)
    callback.setup()
    callback.log("t1", {**cfg, "params": {"theta": 0.1}},
                 {"ca": 0.2, "asr": 0.9, "gate_margin": 0.3, "gate_reason": "CA 0.2000 < ca_min 0.5",
                  STATUS_KEY: "gated"}, None)
    callback.log("t2", {**cfg, "params": {"theta": 0.9}},
                 {"ca": 0.8, "r_asr": 0.4, "q_asr": 0.3, "gate_margin": -0.3, STATUS_KEY: "completed"}, None)
    runs = tracker.trial_runs()
    gated = runs["t1"]
    assert gated.data.tags["status"] == "gated" and gated.info.status == "FINISHED"
    assert "ca_min" in gated.data.tags["gate_reason"]
    assert gated.data.metrics["ca"] == 0.2 and not set(SKIPPED) & set(gated.data.metrics)
    fronts = tracker.finish(tracker.records(), spec.objectives)
    assert [r.trial_id for r in fronts["badnets"]] == ["t2"]
    runs = tracker.trial_runs()
    assert runs["t1"].data.tags["pareto"] == "false"
    parent = tracker.client.get_run(tracker.state()["parent_run_id"])
    assert parent.data.metrics["trials_gated"] == 1 and parent.data.metrics["trials_failed"] == 0


# -- a real sweep on a local Ray --------------------------------------------------------------------


class Gated(StandIn):
    """The stand-in with the product's gate decision: a model whose CA fails the gate returns CA
    and ASR only, as ``trainables.trial.evaluation_stage`` does."""

    def run(self, cfg: dict, out_dir: Path, log) -> dict:
        out = super().run(cfg, out_dir, log)
        gate = cfg["evaluation"].get("gate")
        if gate and math.isfinite(out["ca"]):
            margin, why = GateConfig(**gate).margin(out["ca"], 0.9)
            out["gate_margin"] = margin
            if margin > 0:
                return {"ca": out["ca"], "asr": out["asr"], "evaluation_status": "gated", "gate_margin": margin,
                        "gate_reason": why}
        return out


def test_a_gated_sweep_tells_tune_optuna_mlflow_and_the_summary(tmp_path, local_ray):
    import optuna

    from orchestrator.sweep import run_sweep

    # the stand-in's CA is 0.6 + 0.3 theta - ...: a floor of 0.75 gates roughly half the thetas
    data = {**spec_dict(tmp_path / "store", trials=6), "attacks": ["badnets"], "gate": {"ca_min": 0.75}}
    data["defenses"] = [data["defenses"][0], {"name": "ft"}]
    spec, plan = load_spec(write_spec(tmp_path, data))
    lines: list[str] = []
    out = run_sweep(spec, plan, backend=Gated(str(tmp_path / "markers")), log=lines.append, verbose=0)
    gated = [r for r in out.records if r.status == "gated"]
    assert gated and out.count("completed") + len(gated) == 7
    runs = [r for r in mlflow_runs(out.tracking_uri, "stand-in") if r.data.tags.get("role") == "trial"]
    for r in runs:
        if r.data.tags["status"] == "gated":
            assert not set(SKIPPED) & set(r.data.metrics) and r.data.metrics["ca"] < 0.75
            assert r.data.tags["pareto"] == "false"
        else:
            assert {"ca", "r_asr", "q_asr"} <= set(r.data.metrics)
    study = optuna.load_study(study_name=f"{out.sweep_id}/badnets/bibau_u", storage=f"sqlite:///{out.folder / 'optuna.db'}")
    states = sorted(t.state.name for t in study.trials)
    assert states.count("PRUNED") == len([r for r in gated if r.defense == "bibau_u"]) and "FAIL" not in states
    text = "\n".join(lines)
    assert f"{len(gated)} gated after CA/ASR" in text
    assert "attack stage:" in text and "s wall" in text
    assert out.attack_timing["attack_stage_tasks"] == 2  # the attack and the clean reference
    parent = [r for r in mlflow_runs(out.tracking_uri, "stand-in") if r.data.tags.get("role") == "sweep"][0]
    assert parent.data.metrics["trials_gated"] == len(gated)
    assert parent.data.metrics["attack_stage_wall_s"] > 0
    # the gated trials' own results say so, and hold no R-ASR or Q-ASR anywhere on disk
    for r in gated:
        result = json.loads((out.folder / "tune").glob(f"*{r.trial_id}/result.json").__next__().read_text().splitlines()[-1])
        assert result[STATUS_KEY] == "gated" and not set(SKIPPED) & set(result)


# -- the attack stage at scale: a grid of attacks x data sets x models ------------------------------


def test_a_grid_makes_one_attack_stage_per_attack_data_set_and_model(tmp_path):
    data = {**spec_dict(tmp_path / "store"), "attacks": ["badnets", {"name": "blended", "model": {"depth": 2}}],
            "grid": {"data": [{"name": "digits"}, {"name": "digits", "train_size": 300, "test_size": 100}],
                     "model": [{"name": "small_resnet"}, {"name": "vgg19_bn"}]}}
    data["defenses"] = [{"name": "ft"}]
    with pytest.raises(ConfigError) as err:  # the entry's depth reaches a VGG: the error names the cell
        load_spec(write_spec(tmp_path, data))
    assert "blended+data0+vgg19_bn" in str(err.value) and "depth" in str(err.value)
    data["attacks"][1] = {"name": "blended", "poison_rate": 0.05}
    spec, plan = load_spec(write_spec(tmp_path, data))
    cells = {a.label: a.config for a in plan.attacks}
    assert sorted(cells) == sorted(f"{a}+data{i}+{m}" for a in ("badnets", "blended") for i in (0, 1)
                                   for m in ("small_resnet", "vgg19_bn"))
    assert cells["badnets+data1+vgg19_bn"]["data"]["train_size"] == 300
    vgg = cells["badnets+data1+vgg19_bn"]["model"]  # another model: base's options do not carry over
    assert vgg["name"] == "vgg19_bn" and all(v is None for k, v in vgg.items() if k != "name")
    assert cells["blended+data0+small_resnet"]["model"]["width"] == 4  # base's width kept for the same model
    assert cells["blended+data0+small_resnet"]["attack"]["poison_rate"] == 0.05
    assert {s.attack for s in plan.studies} == set(cells) and len(plan.studies) == 8
    data["grid"] = {"model": [{"name": "resnet 18"}]}
    with pytest.raises(ConfigError, match=r"grid.model\[0\].name"):
        load_spec(write_spec(tmp_path, data))


def test_an_attack_entry_trains_longer_in_its_own_train_section(tmp_path):
    """WaNet's warp is learned late: its entry lengthens the training for its stage and its studies only."""
    data = {**spec_dict(tmp_path / "store"), "attacks": ["badnets", {"name": "wanet", "train": {"epochs": 7}}]}
    data["defenses"] = [{"name": "ft"}]
    spec, plan = load_spec(write_spec(tmp_path, data))
    stages = {a.label: a.config for a in plan.attacks}
    base_train = spec_dict(tmp_path / "store")["base"].get("train", {})
    assert stages["wanet"]["train"]["epochs"] == 7
    assert stages["badnets"]["train"]["epochs"] == base_train.get("epochs", to_dict(RunConfig().train)["epochs"]) != 7
    for key in set(base_train) - {"epochs"}:  # the rest of base's training carries over
        assert stages["wanet"]["train"][key] == stages["badnets"]["train"][key]
    assert {s.attack: s.config["train"]["epochs"] for s in plan.studies}["wanet"] == 7
    data["attacks"][1] = {"name": "wanet", "train": {"epoch": 7}}
    with pytest.raises(ConfigError, match=r"attacks\[1\] \(wanet\).*train.*epoch"):
        load_spec(write_spec(tmp_path, data))
    data["attacks"][1] = {"name": "wanet", "train": 7}
    with pytest.raises(ConfigError, match=r"attacks\[1\]\.train: expected a train section"):
        load_spec(write_spec(tmp_path, data))


def test_stage_timing_compares_the_wall_with_the_sum_of_its_tasks():
    from orchestrator.sweep import stage_timing

    t = stage_timing({"a": {"seconds": 30.0, "cached": False}, "b": {"seconds": 20.0, "cached": True},
                      "c": {"ok": False}}, 25.0)
    assert t["attack_stage_tasks_s"] == 50.0 and t["attack_stage_parallelism"] == 2.0
    assert t["attack_stage_tasks"] == 3 and t["attack_stage_cached"] == 1
