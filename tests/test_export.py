"""``bibau export``: selection rules on the Pareto front, the export file, and a real sweep on
the offline digits data whose export ``bibau run`` reproduces on the CPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.export import (DEFAULT_RULE, EXPORT_KIND, build_export, parse_rule, read_export, select,
                                 write_export)
from orchestrator.pareto import TrialRecord

ROOT = Path(__file__).resolve().parents[1]
METRICS, MODES, IDEAL = ["ca", "r_asr", "q_asr"], ["max", "min", "min"], [1.0, 0.0, 0.0]


def rec(i, ca, r, q, attack="badnets", defense="bibau_u", status="completed"):
    return TrialRecord(trial_id=f"t{i}", study=f"{attack}/{defense}", attack=attack, defense=defense, status=status,
                       metrics={"ca": ca, "r_asr": r, "q_asr": q, "asr": r / 2}, params={"theta": i / 10},
                       config={"seed": 0, "attack": {"name": attack}, "defense": {"name": defense, "theta": i / 10}},
                       order=i, run_id=f"run{i}")


def test_rules_parse_and_errors_say_what_is_allowed():
    rule = parse_rule(DEFAULT_RULE, METRICS)
    assert (rule.direction, rule.metric, rule.fallback) == ("max", "ca", "nearest")
    assert rule.constraints == [("r_asr", "<=", 0.1), ("q_asr", "<=", 0.1)]
    assert parse_rule("min r_asr, ca >= 0.8, fallback none").constraints == [("ca", ">=", 0.8)]
    for text, msg in [("maximise ca", "not understood"), ("r_asr <= 0.1", "no target"),
                      ("max ca; min r_asr", "two targets"), ("max bec", "not an objective")]:
        with pytest.raises(ValueError, match=msg):
            parse_rule(text, METRICS)


def test_selection_takes_the_highest_ca_within_the_limits_else_the_point_nearest_the_ideal():
    recs = [rec(1, 0.95, 0.80, 0.70),   # best CA, backdoor alive
            rec(2, 0.85, 0.08, 0.09),   # within the limits
            rec(3, 0.80, 0.02, 0.03),   # within the limits, lower CA
            rec(4, 0.84, 0.09, 0.10),   # dominated by 2
            rec(5, 0.99, 0.05, 0.05, status="failed")]  # failed: never selected
    picked, how = select(recs, parse_rule(DEFAULT_RULE), METRICS, MODES, IDEAL)
    assert (picked.trial_id, how) == ("t2", "rule")
    strict = parse_rule("max ca; r_asr <= 0.01; q_asr <= 0.01")
    picked, how = select(recs, strict, METRICS, MODES, IDEAL)
    # nothing meets 1%: the front point nearest (CA 1, R-ASR 0, Q-ASR 0) is t2 (0.15, .08, .09) vs t3 (0.2, .02, .03)
    d = {r.trial_id: math.dist(r.values(METRICS), IDEAL) for r in recs[:3]}
    assert how == "fallback" and picked.trial_id == min(d, key=d.get)
    assert select(recs, parse_rule("max ca; r_asr <= 0.01; fallback none"), METRICS, MODES, IDEAL) is None
    assert select([recs[-1]], parse_rule(DEFAULT_RULE), METRICS, MODES, IDEAL) is None


def test_export_document_round_trip_and_bibau_run_reads_it(tmp_path):
    from orchestrator.config import load_run_config

    from trainables.config import ConfigError, to_dict

    recs = [rec(1, 0.9, 0.05, 0.05), rec(2, 0.7, 0.5, 0.5, attack="blended"), rec(3, 0.95, 0.9, 0.9, attack="blended")]
    for r in recs:  # resolved configs, as a sweep's trials have them
        r.config = to_dict(load_run_config(None, ["data.name=digits", f"attack.name={r.attack}",
                                                  "defense.name=bibau_u", f"defense.theta={r.params['theta']}"]))
    doc = build_export(recs, parse_rule(DEFAULT_RULE), METRICS, MODES, IDEAL,
                       {"experiment": "e", "sweep": "s1", "code_version": "v"})
    path = write_export(doc, tmp_path / "best.yaml")
    back = read_export(path)
    assert back["kind"] == EXPORT_KIND and back["version"] == 1 and list(back) == ["kind", "version", "selections"]
    by_attack = {s["attack"]: s for s in back["selections"]}
    assert set(by_attack) == {"badnets", "blended"}
    assert by_attack["badnets"]["provenance"] == {"experiment": "e", "sweep": "s1", "code_version": "v",
                                                   "run_id": "run1", "trial_id": "t1", "rule": DEFAULT_RULE,
                                                   "picked_by": "rule"}
    assert by_attack["blended"]["provenance"]["picked_by"] == "fallback"
    assert by_attack["badnets"]["metrics"]["ca"] == 0.9
    cfg = load_run_config(str(path), attack="blended")  # what `bibau run FILE --attack blended` runs
    assert to_dict(cfg) == by_attack["blended"]["config"]
    with pytest.raises(ConfigError, match="2 selections match"):
        load_run_config(str(path))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**back, "version": 7}))
    with pytest.raises(ValueError, match="version 7"):
        read_export(tmp_path / "bad.yaml")


# -- the real path: trials from trainables.trial, on a local Ray -------------------------------------

TINY = {
    "name": "digits-export",
    "base": {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "train_size": 600, "test_size": 200, "clean_fraction": 0.1},
        "model": {"name": "small_resnet", "width": 4, "depth": 2},
        "train": {"epochs": 2, "batch_size": 64, "crop_padding": 0, "eval_every": 0},
        "evaluation": {"metrics": ["ca", "asr", "ra"], "ra_size": 100, "ra_epochs": 1, "ra_on_clean": False},
    },
    "attacks": ["badnets"],
    "defenses": [{"name": "bibau_u", "fixed": {"epochs": 1, "pgd_steps": 2, "batch_size": 64},
                  "space": {"theta": {"low": 0.0, "high": 1.0}}, "trials": 2, "startup_trials": 2}],
    "objectives": [{"metric": "ca", "mode": "max"}, {"metric": "r_asr", "mode": "min"}],
    "export_rule": "max ca; r_asr <= 0.1; fallback nearest",
    "concurrency": 2,
}


def test_a_real_sweep_exports_a_configuration_that_bibau_run_and_bibau_sweep_reproduce(tmp_path, local_ray):
    from orchestrator.cli import main
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**TINY, "storage": str(tmp_path / "store")}))
    spec, plan = load_spec(str(spec_file))
    out = run_sweep(spec, plan, verbose=0, log=lambda m: None)
    assert [r.status for r in out.records] == ["completed", "completed"], out.records
    assert out.attack_stage["badnets"]["ok"] and out.attack_stage["badnets"]["backdoored_asr"] > 0.5
    # bibau export, by a rule of its own, from MLflow alone
    export_file = tmp_path / "picked.yaml"
    assert main(["export", str(spec_file), "--rule", "min r_asr", "-o", str(export_file)]) == 0
    (sel,) = read_export(export_file)["selections"]
    assert sel["metrics"]["r_asr"] == min(r.metrics["r_asr"] for r in out.records)
    (picked,) = [r for r in out.records if r.run_id == sel["provenance"]["run_id"]]
    assert sel["config"]["defense"]["theta"] == picked.params["theta"]
    assert sel["metrics"]["ca"] == picked.metrics["ca"]
    # bibau run of the export reproduces the trial's metrics exactly, with no thread setting in the
    # environment: the exported config holds the trial's thread count
    assert sel["config"]["threads"] == 1
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(export_file), "--attack", "badnets",
                    "--out", str(tmp_path / "rerun")], check=True, env=env, cwd=str(tmp_path),
                   stdout=subprocess.DEVNULL)
    again = json.loads((tmp_path / "rerun" / "results.json").read_text())
    assert again["cache_hit"] is True  # the sweep's attack-stage model, not a new one
    for m in ("ca", "asr", "r_asr"):
        assert again[m] == sel["metrics"][m], m
    # bibau sweep of the export replays the selection as a fixed run, with the same metrics
    replay_spec, replay_plan = load_spec(str(export_file), [f"storage={tmp_path / 'replay'}"])
    replay = run_sweep(replay_spec, replay_plan, verbose=0, log=lambda m: None)
    (r,) = replay.records
    assert r.status == "completed" and not r.tuned and r.study == "badnets/bibau_u"
    for m in ("ca", "asr", "r_asr"):
        assert r.metrics[m] == sel["metrics"][m], m
