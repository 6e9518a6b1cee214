"""``bibau run`` end to end on the offline digits data (smoke-test sizes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.config import load_run_config
from trainables.checkpoint import load_checkpoint, load_tensors
from trainables.config import to_dict
from trainables.registry import ATTACKS
from trainables.data import load_dataset
from trainables.evaluation.metrics import clean_accuracy

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


# the example config (BadNets, then ft, CA and ASR): the test keeps it runnable
CONFIG = REPO / "search_spaces" / "run_digits_smoke.yaml"


@pytest.fixture(scope="module")
def config_file() -> Path:
    return CONFIG


@pytest.fixture(scope="module")
def overrides(workdir) -> list[str]:
    return [f"cache_dir={workdir / 'cache'}", "train.lr=0.04"]


def set_flags(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def first_run(workdir, config_file, overrides):
    out = workdir / "first"
    code = main(["run", str(config_file), "--smoke-test", "--out", str(out), *set_flags(overrides)])
    return code, out


def test_run_writes_results_config_and_checkpoints(first_run, config_file, overrides):
    code, out = first_run
    assert code == 0
    for name in ("results.json", "config.yaml", "backdoored.safetensors", "backdoored.json", "attack.safetensors",
                 "purified.safetensors", "purified.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "results.json").read_text())
    for key in ("ca", "asr", "backdoored_ca", "backdoored_asr", "wall_time_s", "time_attack_s", "time_defense_s",
                "time_eval_s", "data_fingerprint", "cache_hit"):
        assert key in report, key
    assert report["cache_hit"] is False and report["defense"] == "ft" and report["n_train"] == 400
    assert report["n_poisoned"] > 0 and 0.0 <= report["ca"] <= 1.0
    assert [row["epoch"] for row in report["history"]["attack"]] == [1]

    # the saved config is the resolved one: defaults, YAML, --set and the smoke-test sizes
    saved = yaml.safe_load((out / "config.yaml").read_text())
    cfg = load_run_config(str(config_file), overrides, smoke_test=True)
    assert saved == to_dict(cfg) and saved["train"]["lr"] == 0.04 and saved["train"]["epochs"] == 1

    # the checkpoints rebuild the models that were measured
    dataset = load_dataset(cfg.data)
    backdoored, meta = load_checkpoint(out / "backdoored.safetensors")
    assert meta["data_fingerprint"] == report["data_fingerprint"]
    assert clean_accuracy(backdoored, dataset.test, torch.device("cpu")) == pytest.approx(report["backdoored_ca"])
    purified, _ = load_checkpoint(out / "purified.safetensors")
    assert clean_accuracy(purified, dataset.test, torch.device("cpu")) == pytest.approx(report["ca"])
    assert set(load_tensors(out / "attack.safetensors")) == {"pattern", "mask"}


def test_second_run_hits_the_cache_in_a_subprocess(first_run, config_file, overrides, workdir):
    _, first = first_run
    out = workdir / "second"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(config_file), "--smoke-test",
                           "--out", str(out), *set_flags(overrides), "--set", "defense=null"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "cache hit" in proc.stdout
    report = json.loads((out / "results.json").read_text())
    before = json.loads((first / "results.json").read_text())
    assert report["cache_hit"] is True and report["cache_key"] == before["cache_key"]
    assert report["ca"] == before["backdoored_ca"] and report["asr"] == before["backdoored_asr"]
    assert not (out / "purified.safetensors").exists()


def test_bad_config_exits_2_naming_the_field_before_any_work(workdir, config_file, capsys):
    out = workdir / "bad"
    assert main(["run", str(config_file), "--out", str(out), "--set", "attack.poison_rate=2"]) == 2
    err = capsys.readouterr().err
    assert "attack.poison_rate: 2" in err and "out of range" in err
    assert not out.exists(), "nothing may be written before the config is valid"

    bad = workdir / "bad.yaml"
    bad.write_text("attack: {name: badnet}\n")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(bad), "--out", str(out)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert (f"attack.name: unknown attack 'badnet'; did you mean 'badnets'? known: {', '.join(ATTACKS.names())}"
            in proc.stderr)
    # sorted, and the registry really was filled in the subprocess (not an empty list)
    assert "known: adaptive_blend, " in proc.stderr and ", badnets, blended, " in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_print_config_and_export_selection(workdir, capsys):
    export = workdir / "export.yaml"
    export.write_text(yaml.safe_dump({"kind": "bibau-export", "version": 1, "selections": [
        {"attack": name, "defense": None, "config": {"attack": {"name": name}, "data": {"name": "digits"}},
         "metrics": {}, "provenance": {}} for name in ("badnets", "blended")]}))
    assert main(["run", str(export), "--print-config"]) == 2
    assert "choices (attack/defense): badnets/none, blended/none" in capsys.readouterr().err
    assert main(["run", str(export), "--attack", "blended", "--print-config", "--set", "seed=3"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["attack"]["name"] == "blended" and printed["seed"] == 3 and printed["data"]["name"] == "digits"


def test_cache_key_covers_what_changes_the_model():
    from trainables.cache import content_hash
    from trainables.trial import attack_key

    cfg = load_run_config(None, ["data.name=digits", "data.train_size=200", "data.test_size=100"])
    dataset = load_dataset(cfg.data)
    cpu = torch.device("cpu")

    def key(*overrides: str) -> str:
        changed = load_run_config(None, ["data.name=digits", "data.train_size=200", "data.test_size=100", *overrides])
        return content_hash(attack_key(changed, dataset, cpu))

    base = key()
    assert base == content_hash(attack_key(cfg, dataset, cpu))
    for same in ("train.eval_every=3", "defense=null", "evaluation.ra_epochs=2", "threads=1"):
        assert key(same) == base, same
    # where the data was read from does not matter (digits refuses a root, so set it past the checks)
    import dataclasses

    moved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root="/elsewhere"))
    assert content_hash(attack_key(moved, dataset, cpu)) == base
    for different in ("attack.target=1", "attack.name=blended", "train.epochs=2", "model.width=4", "seed=1",
                      "data.clean_fraction=0.1"):
        assert key(different) != base, different
    other = load_dataset(load_run_config(None, ["data.name=digits", "data.train_size=200", "data.test_size=100",
                                                "data.seed=1"]).data)
    assert content_hash(attack_key(cfg, other, cpu)) != base  # other images: another data fingerprint


def test_attack_stage_is_deterministic_on_cpu(tmp_path):
    from trainables.trial import attack_stage

    cfg = load_run_config(None, ["data.name=digits", "data.train_size=200", "data.test_size=100",
                                 "model.width=4", "model.depth=2", "train.epochs=1", "train.batch_size=32",
                                 "train.eval_every=0", "attack.name=blended", "device=cpu"])
    dataset = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    a = attack_stage(cfg.replace(cache_dir=str(tmp_path / "a")), dataset, cpu, log=lambda _: None)
    b = attack_stage(cfg.replace(cache_dir=str(tmp_path / "b")), dataset, cpu, log=lambda _: None)
    assert not a.cache_hit and not b.cache_hit
    assert torch.equal(a.poison_index, b.poison_index) and torch.equal(a.poisoned_train.x, b.poisoned_train.x)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.metrics == b.metrics
