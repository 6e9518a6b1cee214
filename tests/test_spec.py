"""The sweep spec (orchestrator/spec.py): typed, validated, and every error names its field
before anything starts. The shipped specs in search_spaces/ must all load."""
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SweepSpec, load_spec, plan
from trainables.config import ConfigError, build

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "unit",
    "base": {"data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 8},
             "train": {"epochs": 1}, "evaluation": {"metrics": ["ca", "asr", "ra", "qra"]}},
    "attacks": ["badnets", {"name": "blended", "label": "blended5", "poison_rate": 0.05}],
    "defenses": [
        {"name": "bibau_u", "fixed": {"epochs": 2},
         "space": {"theta": {"low": 0.0, "high": 1.0},
                   "lr": {"low": 1e-4, "high": 5e-2, "log": True},
                   "pgd_steps": {"type": "int", "low": 2, "high": 10},
                   "preset": {"type": "categorical", "choices": ["full", "base_at"]}},
         "trials": 6, "concurrency": 2},
        {"name": "ft", "fixed": {"epochs": 3, "lr": 0.01}},
    ],
}


def write(tmp_path, data, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def edited(change):
    data = yaml.safe_load(yaml.safe_dump(SPEC))
    change(data)
    return data


def test_a_valid_spec_plans_one_study_per_attack_and_defense(tmp_path):
    spec, p = load_spec(write(tmp_path, {**SPEC, "storage": str(tmp_path / "store")}))
    assert [a.label for a in p.attacks] == ["badnets", "blended5"]
    assert [s.key for s in p.studies] == ["badnets/bibau_u", "blended5/bibau_u", "badnets/ft", "blended5/ft"]
    tuned, baseline = p.study("blended5/bibau_u"), p.study("badnets/ft")
    assert tuned.tuned and tuned.trials == 6 and tuned.concurrency == 2
    assert not baseline.tuned and baseline.trials == 1  # a baseline runs once per attack
    # every study config is a fully resolved RunConfig: attack, fixed defense settings, shared cache
    assert tuned.config["attack"]["name"] == "blended" and tuned.config["attack"]["poison_rate"] == 0.05
    assert tuned.config["defense"]["epochs"] == 2 and "lambda1" in tuned.config["defense"]
    assert baseline.config["defense"] == {**baseline.config["defense"], "name": "ft", "epochs": 3, "lr": 0.01}
    assert tuned.config["cache_dir"] == str(tmp_path / "store" / "cache")
    assert len({s.seed for s in p.studies}) == len(p.studies)  # each study samples with its own seed
    assert [o.metric for o in spec.objectives] == ["ca", "r_asr", "q_asr"]
    assert spec.modes == ["max", "min", "min"]
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


@pytest.mark.parametrize("change, field, detail", [
    (lambda d: d["defenses"][0]["space"].update(gamma={"low": 0, "high": 1}),
     "defenses[0].space.gamma", "its parameters: alpha"),
    (lambda d: d["defenses"][0]["space"].update(theta={"low": 0, "high": 1.5}),
     "defenses[0].space.theta.high", "allowed: in [0.0, 1.0]"),
    (lambda d: d["defenses"][0]["space"].update(lambda1={"low": -1, "high": 1}),
     "defenses[0].space.lambda1.low", "out of range"),
    (lambda d: d["defenses"][0]["space"].update(lr={"low": 0.0, "high": 0.1, "log": True}),
     "defenses[0].space.lr.low", "log: true"),
    (lambda d: d["defenses"][0]["space"].update(theta={"low": 0.5, "high": 0.1}),
     "defenses[0].space.theta.high", "greater than low"),
    (lambda d: d["defenses"][0]["space"].update(pgd_steps={"low": 2, "high": 10}),
     "defenses[0].space.pgd_steps.type", "use type: int"),
    (lambda d: d["defenses"][0]["space"].update(preset={"type": "categorical", "choices": ["full", "nope"]}),
     "defenses[0].space.preset.choices[1]", "'nope' is not allowed"),
    (lambda d: d["defenses"][0]["space"].update(epochs={"type": "int", "low": 1, "high": 3}),
     "defenses[0].space.epochs", "either fixed or searched"),
    (lambda d: d["defenses"][0].update(sampler="random"), "defenses[0].sampler", "'tpe', 'nsga2'"),
    (lambda d: d["defenses"][0].update(trials=0), "defenses[0].trials", "out of range"),
    (lambda d: d["defenses"][1].update(name="nope"), "defenses[1].name", "known: anp, bibau_clip_t, bibau_clip_u, bibau_t"),
    (lambda d: d["defenses"][1]["fixed"].update(lrr=1), "defenses[1].fixed.lrr", "unknown key"),
    (lambda d: d["defenses"].append({"name": "ft"}), "defenses[2]", "label 'ft' is used twice"),
    (lambda d: d["attacks"].append("trojannn"), "attacks[2] (trojannn): attack.name", "known: adaptive_blend"),
    (lambda d: d["attacks"].append("badnets"), "attacks[2]", "label 'badnets' is used twice"),
    (lambda d: d["base"]["train"].update(epochz=3), "train.epochz", "unknown key"),
    (lambda d: d.update(objectives=[{"metric": "ca", "mode": "up"}]), "objectives[0].mode", "'max', 'min'"),
    (lambda d: d.update(objectives=[{"metric": "ca", "mode": "max"}, {"metric": "bec", "mode": "min"}],
                        export_rule="max ca"),
     "objectives[1].metric", "'bec' is not reported"),
    (lambda d: d.update(export_rule="maximise ca"), "export_rule", "not understood"),
    (lambda d: d.update(concurrency=0), "concurrency", "out of range"),
    (lambda d: d.update(resources={"cpus": 1, "gpus": -0.5}), "resources.gpus", "out of range"),
    (lambda d: d.update(name="a b"), "name", "letters, digits"),
    (lambda d: d.update(defenses=[]), "defenses", "at least one defense"),
    (lambda d: d.update(storge="/tmp"), "storge", "unknown key"),
])
def test_errors_name_the_field(tmp_path, change, field, detail):
    with pytest.raises(ConfigError) as err:
        load_spec(write(tmp_path, edited(change)))
    msg = str(err.value)
    assert field in msg and detail in msg, msg


def test_overrides_reach_list_entries_by_index_or_label(tmp_path):
    path = write(tmp_path, SPEC)
    spec, p = load_spec(path, ["defenses.bibau_u.trials=3", "defenses.1.fixed.epochs=5",
                               "attacks.badnets.poison_rate=0.2", "base.train.epochs=2", "concurrency=4"])
    assert p.study("badnets/bibau_u").trials == 3
    assert p.study("blended5/ft").config["defense"]["epochs"] == 5
    assert p.study("badnets/ft").config["attack"]["poison_rate"] == 0.2
    assert p.study("blended5/ft").config["attack"]["poison_rate"] == 0.05
    assert all(s.config["train"]["epochs"] == 2 for s in p.studies) and spec.concurrency == 4
    with pytest.raises(ConfigError, match="no entry labelled or named 'nope'"):
        load_spec(path, ["defenses.nope.trials=3"])
    with pytest.raises(ConfigError, match=r"defenses\[0\]\.space\.theta\.high: 2.0 is not allowed"):
        load_spec(path, ["defenses.bibau_u.space.theta.high=2"])


def test_an_export_file_becomes_fixed_runs(tmp_path):
    _, p = load_spec(write(tmp_path, SPEC))
    cfg = p.study("badnets/bibau_u").config
    export = {"kind": "bibau-export", "version": 1, "selections": [
        {"attack": "badnets", "defense": "bibau_u", "config": {**cfg, "defense": {**cfg["defense"], "theta": 0.25}},
         "metrics": {"ca": 0.9}, "provenance": {"run_id": "abc", "experiment": "unit"}}]}
    spec, p2 = load_spec(write(tmp_path, export, "export.yaml"), [f"storage={tmp_path / 'replay'}"])
    assert spec.replay and [s.key for s in p2.studies] == ["badnets/bibau_u"]
    study = p2.studies[0]
    assert not study.tuned and study.trials == 1 and study.config["defense"]["theta"] == 0.25
    assert [a.label for a in p2.attacks] == ["badnets"] and p2.attacks[0].config["defense"] is None
    bad = {**export, "selections": [{"attack": "badnets", "config": {**cfg, "model": {"name": "resnet99"}}}]}
    with pytest.raises(ConfigError, match=r"replay\[0\]\.config: model.name: unknown model 'resnet99'"):
        load_spec(write(tmp_path, bad, "bad.yaml"))


SWEEP_SPECS = [p for p in sorted((ROOT / "search_spaces").glob("*.yaml"))
               if "defenses" in (yaml.safe_load(p.read_text()) or {})]  # the folder also holds run configs


def test_the_paper_scale_specs_and_the_quickstart_are_there():
    assert {p.name for p in SWEEP_SPECS} >= {"quickstart.yaml", "cifar10_resnet18.yaml", "gtsrb_vgg19.yaml",
                                              "tinyimagenet_resnet18.yaml", "cifar10_cpu.yaml"}


@pytest.mark.parametrize("path", SWEEP_SPECS, ids=lambda p: p.name)
def test_shipped_specs_are_valid(path):
    spec, p = load_spec(str(path))
    assert p.studies and all(s.trials >= 1 for s in p.studies)
    assert any(s.tuned for s in p.studies)
    bibau = [s for s in p.studies if s.tuned and s.config["defense"]["name"].startswith("bibau")]
    for s in bibau:  # the BI-BAU hyperparameters METHOD.md asks a sweep to search
        assert {"theta", "alpha", "beta", "lambda1", "lambda2", "lr"} <= set(s.space)


def test_spec_defaults():
    spec = build(SweepSpec, {"name": "x", "attacks": ["badnets"], "defenses": [{"name": "ft"}],
                             "base": {"data": {"name": "digits"}}})
    assert spec.concurrency == 2 and spec.max_failures == 1 and spec.resources.gpus == 0.0
    assert spec.export_rule.startswith("max ca")
    assert [o.reference for o in spec.objectives] == [0.0, 1.0, 1.0]
    assert plan(spec).studies[0].key == "badnets/ft"


def test_tracking_falls_back_to_the_mlflow_environment_then_to_sqlite(monkeypatch):
    data = {"name": "x", "storage": "/tmp/bibau-store", "attacks": ["badnets"], "defenses": [{"name": "ft"}],
            "base": {"data": {"name": "digits"}}}
    spec = build(SweepSpec, data)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert spec.tracking_uri == "sqlite:////tmp/bibau-store/mlflow.db" and spec.experiment == "x"
    # a cluster node names its server in the environment (cluster.env, the KubeRay pod's env)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.svc:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert spec.tracking_uri == "http://mlflow.svc:5000" and spec.experiment == "from-env"
    # the spec's own values win over the environment
    spec = build(SweepSpec, {**data, "tracking": {"uri": "sqlite:////tmp/own.db", "experiment": "own"}})
    assert spec.tracking_uri == "sqlite:////tmp/own.db" and spec.experiment == "own"


def test_equal_budget_gives_every_tuned_defense_the_named_defenses_trials(tmp_path):
    from orchestrator.report import tuning_line
    from orchestrator.spec import tuned_trials
    from trainables.config import to_dict

    def change(d):
        d["defenses"].append({"label": "ft_tuned", "name": "ft", "space": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}},
                              "trials": 3})
        d["equal_budget"] = "bibau_u"

    spec, p = load_spec(write(tmp_path, {**edited(change), "storage": str(tmp_path / "store")}))
    assert p.study("badnets/ft_tuned").trials == 6 == p.study("badnets/bibau_u").trials
    assert p.study("badnets/ft").trials == 1  # a fixed baseline still runs once
    assert tuned_trials(to_dict(spec)) == {"bibau_u": 6, "ft_tuned": 6}
    line = tuning_line(to_dict(spec))
    assert "bibau_u 6, ft_tuned 6" in line and "bibau_u's budget" in line and "one run per attack: ft" in line
    # without it each keeps its own trials
    spec, p = load_spec(write(tmp_path, {**edited(lambda d: change(d) or d.pop("equal_budget")),
                                         "storage": str(tmp_path / "store")}, "own.yaml"))
    assert p.study("badnets/ft_tuned").trials == 3


@pytest.mark.parametrize("label", ["ft", "nope"])
def test_equal_budget_must_name_a_tuned_defense(tmp_path, label):
    with pytest.raises(ConfigError, match=rf"equal_budget: '{label}' is not a tuned defense.*allowed: bibau_u"):
        load_spec(write(tmp_path, edited(lambda d: d.update(equal_budget=label))))
