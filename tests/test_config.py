"""Loading a run config: defaults < YAML < --set, every error names its field, exports."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_run_config
from trainables.registry import ATTACKS
from trainables.config import ConfigError, build, to_dict
from trainables.schema import RunConfig
from trainables.trial import resolved_yaml


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def fails(tmp_path, data, overrides=(), match=""):
    with pytest.raises(ConfigError, match=match) as info:
        load_run_config(write(tmp_path, data), list(overrides))
    return str(info.value)


def test_unknown_key_names_the_field_and_lists_allowed_keys(tmp_path):
    message = fails(tmp_path, {"train": {"epochz": 3}}, match=r"^train\.epochz: unknown key")
    assert "epochs" in message and "batch_size" in message
    fails(tmp_path, {"traning": {"epochs": 3}}, match=r"^traning: unknown key; did you mean 'train'\? allowed keys")
    fails(tmp_path, {"attack": {"name": "blended", "size": 3}}, match=r"^attack\.size: unknown key.*alpha_train")


def test_unknown_name_lists_the_known_ones(tmp_path):
    # every registered attack, sorted (the registry grows: the list is read from it, not copied here)
    known = ", ".join(sorted(ATTACKS.names()))
    assert known.startswith("adaptive_blend, ") and ", badnets, blended, " in known
    fails(tmp_path, {"attack": {"name": "badnet"}},
          match=r"^attack\.name: unknown attack 'badnet'; did you mean 'badnets'\? known: " + re.escape(known) + "$")
    fails(tmp_path, {"model": {"name": "resnet1"}},
          match=r"^model\.name: unknown model 'resnet1'; did you mean 'resnet18'\? known: .*small_resnet")
    fails(tmp_path, {"data": {"name": "mnist"}}, match=r"^data\.name: unknown dataset 'mnist'; known: .*digits")


def test_out_of_range_and_wrong_type_name_the_field(tmp_path):
    fails(tmp_path, {"attack": {"poison_rate": 1.5}}, match=r"^attack\.poison_rate: 1\.5 is out of range; allowed: in \[0\.0, 1\.0\]")
    fails(tmp_path, {}, ["train.lr=0"], match=r"^train\.lr: 0\.0 is out of range")
    fails(tmp_path, {"train": {"epochs": "three"}}, match=r"^train\.epochs: expected an integer, got 'three'")
    fails(tmp_path, {"attack": {"name": "blended", "alpha_test": "high"}}, match=r"^attack\.alpha_test: expected a number")
    fails(tmp_path, {"attack": {"position": "centre"}}, match=r"^attack\.position: 'centre' is not allowed")
    fails(tmp_path, {"device": "tpu"}, match=r"device: 'tpu' is not allowed")


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    path = write(tmp_path, {"train": {"epochs": 7, "lr": 0.2}, "attack": {"name": "badnets", "size": 5}})
    cfg = load_run_config(path, ["train.epochs=3", "attack.target=2"])
    assert cfg.train.epochs == 3  # --set beats YAML
    assert cfg.train.lr == 0.2  # YAML beats the default
    assert cfg.train.batch_size == RunConfig().train.batch_size  # the default where nobody set it
    assert (cfg.attack.size, cfg.attack.target) == (5, 2)
    # a different attack replaces the section: BadNets' keys mean nothing to Blended
    cfg = load_run_config(path, ["attack.name=blended"])
    assert cfg.attack.name == "blended" and not hasattr(cfg.attack, "size") and cfg.attack.alpha_train == 0.2
    # no file: defaults and overrides only
    assert load_run_config(None, ["seed=4"]).seed == 4


def test_bad_override_and_bad_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_run_config(str(tmp_path / "list.yaml"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_run_config(write(tmp_path, {"data": {"name": "digits"}, "attack": {"name": "blended", "alpha_train": 0.3}}),
                          ["defense=null", "train.epochs=2"])
    again = build(RunConfig, yaml.safe_load(resolved_yaml(cfg)))
    assert again == cfg and to_dict(again)["attack"]["alpha_train"] == 0.3


def test_smoke_test_shrinks_sizes_but_keeps_smaller_ones(tmp_path):
    cfg = load_run_config(write(tmp_path, {"data": {"name": "digits", "test_size": 50}, "train": {"epochs": 30}}),
                          smoke_test=True)
    assert cfg.train.epochs == 1 and cfg.data.train_size == 400 and cfg.data.test_size == 50
    assert cfg.evaluation.qra_epochs == 1 and cfg.evaluation.ra_size <= 100


def export_doc(*pairs):
    return {"kind": "bibau-export", "version": 1, "selections": [
        {"attack": attack, "defense": defense,
         "config": {"attack": {"name": attack}, "data": {"name": "digits"}, "train": {"epochs": 2}},
         "metrics": {"ca": 0.9}, "provenance": {"run_id": "abc", "experiment": "e", "sweep": "s",
                                                "code_version": "0.1.0", "rule": "max ca"}}
        for attack, defense in pairs]}


def test_export_with_one_selection_runs_it(tmp_path):
    cfg = load_run_config(write(tmp_path, export_doc(("blended", None))), ["train.epochs=4"])
    assert cfg.attack.name == "blended" and cfg.data.name == "digits" and cfg.train.epochs == 4


def test_export_with_several_selections_needs_attack(tmp_path):
    path = write(tmp_path, export_doc(("badnets", None), ("blended", None)))
    with pytest.raises(ConfigError, match=r"pick one with --attack NAME; choices \(attack/defense\): badnets/none, blended/none"):
        load_run_config(path)
    assert load_run_config(path, attack="blended").attack.name == "blended"
    with pytest.raises(ConfigError, match=r"no selection for 'wanet'; choices"):
        load_run_config(path, attack="wanet")
    with pytest.raises(ConfigError, match="--attack/--defense choose a selection of an export file"):
        load_run_config(write(tmp_path, {"seed": 1}, "plain.yaml"), attack="badnets")


def test_export_errors_name_the_field(tmp_path):
    doc = export_doc(("badnets", None))
    doc["selections"][0]["config"]["train"]["epochs"] = -1
    with pytest.raises(ConfigError, match=r"^train\.epochs: -1 is out of range"):
        load_run_config(write(tmp_path, doc))
    with pytest.raises(ConfigError, match="version: 2 is not supported"):
        load_run_config(write(tmp_path, {**export_doc(("badnets", None)), "version": 2}))
    with pytest.raises(ConfigError, match=r"selections\[0\]\.config: expected the mapping"):
        load_run_config(write(tmp_path, {"kind": "bibau-export", "version": 1, "selections": [{"attack": "x"}]}))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("run_*.yaml")),
                         ids=lambda p: p.name)
def test_example_run_configs_are_valid(path):
    try:
        cfg = load_run_config(str(path))
    except ConfigError as exc:
        # Narcissus' POOD (Tiny-ImageNet) is checked on disk and is not on every machine: the refusal
        # must name the field, and the rest of the file must be valid with a POOD that is here
        if not re.match(r"attack\.pood: .* is not on disk", str(exc)):
            raise
        cfg = load_run_config(str(path), ["attack.pood=digits"])
    assert cfg.attack.name in ATTACKS and cfg.attack.name != "clean" and cfg.train.epochs >= 1
    if path.name.endswith("_cifar10.yaml"):  # the benchmark's run files: named for their attack
        assert path.name == f"run_{cfg.attack.name}_cifar10.yaml"


def test_defense_augmentation_follows_the_training_unless_set():
    crop0 = build(RunConfig, {"train": {"crop_padding": 0, "hflip": False}, "defense": {"name": "ft"}})
    assert (crop0.defense.crop_padding, crop0.defense.hflip) == (0, False)
    crop4 = build(RunConfig, {"train": {"crop_padding": 4}, "defense": {"name": "bibau_u"}})
    assert (crop4.defense.crop_padding, crop4.defense.hflip) == (4, True)
    own = build(RunConfig, {"train": {"crop_padding": 0}, "defense": {"name": "ft", "crop_padding": 2, "hflip": False}})
    assert (own.defense.crop_padding, own.defense.hflip) == (2, False)
    # the saved config holds the values used, and reloading it changes nothing
    again = build(RunConfig, to_dict(crop0))
    assert to_dict(again) == to_dict(crop0) and again.defense.crop_padding == 0
