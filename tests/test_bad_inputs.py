"""The bad-input corpus: every input a user can get wrong, through the command line.

Each case asserts exit code 2, one message on stderr that names the field (or file), no
traceback, and that nothing was created in MLflow (no database file, no run). ``bibau sweep``
cases run both with ``--check`` and for real: the real start must refuse before any training.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]

VALID = {
    "name": "corpus",
    "base": {"data": {"name": "digits", "train_size": 200, "test_size": 100},
             "model": {"name": "small_resnet", "width": 4, "depth": 1}, "train": {"epochs": 1},
             "evaluation": {"metrics": ["ca", "asr", "ra"]}},
    "attacks": ["badnets"],
    "defenses": [{"name": "bibau_u", "space": {"theta": {"low": 0.1, "high": 0.9}}, "trials": 2}, {"name": "ft"}],
    "objectives": [{"metric": "ca", "mode": "max"}, {"metric": "r_asr", "mode": "min"}],
}


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    parts = dotted.split(".")
    for k in parts[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return data


def _not_an_image(tmp: Path) -> str:
    p = tmp / "trigger.png"
    p.write_text("this is not a PNG")
    return str(p)


def _a_file(tmp: Path) -> Path:
    p = tmp / "plain-file"
    p.write_text("x")
    return p


# (id, change to the valid spec, text the message must contain)
SWEEP_CASES = [
    ("unknown-attack", lambda d, t: _set(d, "attacks", ["badnetz"]), "unknown attack 'badnetz'"),
    ("unknown-defense", lambda d, t: _set(d, "defenses.1", {"name": "fine_tune"}), "defenses[1].name"),
    ("unknown-key", lambda d, t: _set(d, "base.train.epoch", 3), "train.epoch"),
    ("out-of-range", lambda d, t: _set(d, "base.train.epochs", 0), "train.epochs"),
    ("wrong-type", lambda d, t: _set(d, "base.train.lr", "fast"), "train.lr"),
    ("bad-space-bound", lambda d, t: _set(d, "defenses.0.space.theta.high", 5.0), "defenses[0].space.theta.high"),
    ("bad-fixed-of-tuned", lambda d, t: _set(d, "defenses.0.fixed", {"lr": -1.0}), "defenses[0].fixed.lr"),
    ("objective-not-reported", lambda d, t: _set(d, "objectives.1.metric", "q_asr"), "objectives[1].metric"),
    ("unreachable-tracking", lambda d, t: _set(d, "tracking", {"uri": "http://127.0.0.1:9"}), "tracking.uri"),
    ("sqlite-under-a-file", lambda d, t: _set(d, "tracking", {"uri": f"sqlite:///{_a_file(t)}/mlflow.db"}),
     "tracking.uri"),
    ("unwritable-storage", lambda d, t: _set(d, "storage", str(_a_file(t) / "store")), "storage"),
    ("unwritable-cache", lambda d, t: _set(d, "base.cache_dir", str(_a_file(t) / "cache")), "cache_dir"),
    ("missing-data-root", lambda d, t: _set(d, "base.data", {"name": "cifar10", "root": str(t / "nowhere")}),
     "data.root"),
    ("root-given-to-digits", lambda d, t: _set(d, "base.data.root", str(t)), "data.root"),
    ("trigger-not-an-image", lambda d, t: _set(d, "attacks", [{"name": "blended", "image": _not_an_image(t)}]),
     "attack.image"),
    ("trigger-missing", lambda d, t: _set(d, "attacks", [{"name": "blended", "image": str(t / "nope.png")}]),
     "attack.image"),
    ("trigger-is-a-device", lambda d, t: _set(d, "attacks", [{"name": "blended", "image": "/dev/zero"}]),
     "attack.image: '/dev/zero' is not a regular file"),
    ("trigger-is-a-folder", lambda d, t: _set(d, "attacks", [{"name": "blended", "image": str(t)}]),
     "is a folder"),
    # ranges that depend on the data set: digits has 10 classes
    ("target-not-a-class", lambda d, t: _set(d, "attacks", [{"name": "badnets", "target": 99}]),
     "attack.target: 99 is not a class of digits (10 classes); allowed: 0..9"),
    ("target-one-past-the-last-class", lambda d, t: _set(d, "attacks", [{"name": "blended", "target": 10}]),
     "attack.target: 10"),
    ("poison-every-image", lambda d, t: _set(d, "attacks", [{"name": "badnets", "poison_rate": 1.0}]),
     "attack.poison_rate: 1.0 relabels every training image"),
    ("nan-space-bound", lambda d, t: _set(d, "defenses.0.space.theta.low", float("nan")),
     "defenses[0].space.theta.low: nan is not a finite number; allowed: a finite number"),
    ("infinite-lr", lambda d, t: _set(d, "base.train.lr", float("inf")),
     "train.lr: inf is not a finite number; allowed: a finite number in (0.0, inf)"),
    ("resources-beyond-the-local-cluster", lambda d, t: _set(d, "resources", {"cpus": 4096}),
     "resources.cpus: 4096"),
    ("attack-resources-beyond-the-local-cluster", lambda d, t: _set(d, "attack_resources", {"cpus": 1, "gpus": 64}),
     "attack_resources.gpus: 64"),
    ("bad-name", lambda d, t: _set(d, "name", "a/b"), "name"),
    ("bad-export-rule", lambda d, t: _set(d, "export_rule", "maximise ca"), "export_rule"),
]


def assert_refused(capsys, code: int, field: str, storage: Path) -> str:
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in out + err
    assert field in lines[0], lines[0]
    assert not (storage / "mlflow.db").exists()  # nothing created in MLflow
    assert not list(storage.glob("*/*/state.json"))  # no sweep started
    return lines[0]


@pytest.mark.parametrize("check", [True, False], ids=["check", "start"])
@pytest.mark.parametrize("case, change, field", SWEEP_CASES, ids=[c[0] for c in SWEEP_CASES])
def test_sweep_refuses_bad_input(tmp_path, capsys, monkeypatch, case, change, field, check):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")  # a mistaken real start must not reach a cluster
    import copy

    data = copy.deepcopy(VALID)
    data["storage"] = str(tmp_path / "store")
    data = change(data, tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(data))
    code = main(["sweep", str(spec)] + (["--check"] if check else []))
    storage = Path(data["storage"]) if Path(data["storage"]).parent.is_dir() else tmp_path / "store"
    assert_refused(capsys, code, field, storage)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


def test_the_valid_spec_passes_the_check(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**VALID, "storage": str(tmp_path / "store")}))
    assert main(["sweep", str(spec), "--check"]) == 0
    out = capsys.readouterr().out
    assert "checked storage" in out and "checked tracking: SQLite" in out and "checked data digits" in out
    assert not (tmp_path / "store" / "mlflow.db").exists()


FILE_CASES = [
    ("yaml-syntax", b"name: [unclosed\n", "not valid YAML"),
    ("binary", bytes(range(256)) * 4, "not a text (YAML) file"),
    ("top-level-list", b"- a\n- b\n", "expected a mapping"),
]


@pytest.mark.parametrize("command", ["sweep", "run"])
@pytest.mark.parametrize("case, content, text", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_unreadable_config_files(tmp_path, capsys, monkeypatch, command, case, content, text):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert_refused(capsys, main([command, str(path)]), text, tmp_path)
    assert_refused(capsys, main([command, str(tmp_path / "missing.yaml")]), "does not exist", tmp_path)
    assert_refused(capsys, main([command, str(tmp_path)]), "cannot be read", tmp_path)


RUN_BASE = {"data": {"name": "digits", "train_size": 200, "test_size": 100},
            "model": {"name": "small_resnet", "width": 4, "depth": 1}, "train": {"epochs": 1},
            "evaluation": {"metrics": ["ca", "asr"]}}

RUN_CASES = [
    ("unwritable-out", [], lambda t: ["--out", str(_a_file(t) / "out")], "--out"),
    ("unwritable-cache", ["cache_dir={}/plain-file/cache"], lambda t: _a_file(t) and [], "cache_dir"),
    ("missing-data-root", ["data.name=cifar10", "data.root={}/nowhere"], lambda t: [], "data.root"),
    ("root-given-to-digits", ["data.root={}"], lambda t: [], "data.root"),
    ("trigger-not-an-image", ["attack.name=blended", "attack.image={}/trigger.png"],
     lambda t: _not_an_image(t) and [], "attack.image"),
    ("cuda-without-cuda", ["device=cuda:0"], lambda t: [], "device"),
    ("threads-zero", ["threads=0"], lambda t: [], "threads"),
    ("bad-override", ["train.epochs"], lambda t: [], "train.epochs"),
]


@pytest.mark.parametrize("case, sets, extra, field", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_refuses_bad_input_before_training(tmp_path, capsys, monkeypatch, case, sets, extra, field):
    if case == "cuda-without-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**RUN_BASE, "cache_dir": str(tmp_path / "cache")}))
    args = ["run", str(cfg), "--out", str(tmp_path / "out")] + extra(tmp_path)
    for s in sets:
        args += ["--set", s.format(tmp_path)]
    assert_refused(capsys, main(args), field, tmp_path)
    assert not (tmp_path / "cache").exists()  # nothing trained
    assert not (tmp_path / "out" / "results.json").exists()


def test_export_of_an_unknown_sweep_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**VALID, "storage": str(tmp_path / "store")}))
    code = main(["export", str(spec), "--sweep", "nope'; drop"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and "--sweep" in err, err


def test_checkpoints_pickled_corrupt_or_of_another_architecture_are_refused(tmp_path):
    """No command takes a model file from the user; the loader every cached model goes through
    refuses these with a message naming the file (test_checkpoint.py has the details)."""
    from trainables.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from trainables.models.base import ModelConfig, create_model

    marker = tmp_path / "PWNED"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Planted()))
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    model = create_model(ModelConfig(name="small_resnet", width=4, depth=1), 10, 3, None, None)
    meta = {"model": {"name": "small_resnet", "width": 4, "depth": 1}, "num_classes": 10, "in_channels": 3,
            "mean": [0.5] * 3, "std": [0.25] * 3, "image_shape": [3, 32, 32], "classes": [str(i) for i in range(10)]}
    path = save_checkpoint(tmp_path, model, meta, "m")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    (tmp_path / "corrupt.json").write_text((tmp_path / "m.json").read_text())
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(corrupt)
    (tmp_path / "m.json").write_text(json.dumps({**meta, "model": {"name": "small_resnet", "width": 8, "depth": 1}}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path)


def test_an_unexpected_error_is_one_line_with_the_log_path(tmp_path, monkeypatch):
    """Not an input error: one line on stderr naming the traceback's file, exit code 1."""
    script = ("import sys; from orchestrator import cli\n"
              "def boom(args): raise RuntimeError('disk on fire')\n"
              "cli.cmd_config = boom\n"
              "sys.exit(cli.main(['config']))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BIBAU_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "RuntimeError: disk on fire" in lines[0]
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in lines[0] and "Traceback" in log.read_text()


def test_pickled_weights_are_refused_in_one_sentence_without_torch_warnings(tmp_path, capsys, monkeypatch):
    """torch's weights-only loader warns about the pickle protocol before it refuses, and its
    refusal opens with a request to file an issue: neither is the user's message."""
    import warnings

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Planted(), protocol=4))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**RUN_BASE, "cache_dir": str(tmp_path / "cache"),
                                   "model": {"name": "clip_vit", "weights": str(tmp_path / "evil.pt")}}))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code = main(["run", str(cfg), "--out", str(tmp_path / "out")])
    line = assert_refused(capsys, code, "model.weights", tmp_path)
    assert not [w for w in seen if "pickle" in str(w.message).lower()], [str(w.message) for w in seen]
    assert "file an issue" not in line.lower() and "(Unsupported " in line, line
    assert not marker.exists()


def test_a_poisoning_that_leaves_a_class_without_clean_images_is_refused_or_warned():
    """Known only with the labels (a small stratified subset, a rare class): dirty-label poisoning
    that takes every image of a class is refused; a clean-label one that takes every target image
    is what a researcher may mean, and is warned about."""
    from trainables.attacks.base import check_clean_left
    from trainables.config import ConfigError

    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    check_clean_left(labels, torch.tensor([0, 2, 4, 6]), target=0, clean_label=False)  # each class keeps one
    with pytest.raises(ConfigError, match=r"attack\.poison_rate: poisoning 3 of 9 .* class\(es\) 1 without a clean"):
        check_clean_left(labels, torch.tensor([0, 2, 3]), target=0, clean_label=False)
    with pytest.warns(UserWarning, match="every training image of the target class 0 is poisoned"):
        check_clean_left(labels, torch.tensor([0, 1]), target=0, clean_label=True)


def test_an_attack_stage_poisoning_every_image_of_a_class_fails_before_training(tmp_path):
    """The attack's own poisoning (what the attack stage runs before training) on a training set with
    a one-image class: refused, naming the field, exactly for the draws that poison that image."""
    from trainables.attacks import build_attack
    from trainables.config import ConfigError, build
    from trainables.data.base import ImageSet
    from trainables.schema import RunConfig

    cfg = build(RunConfig, {"data": {"name": "digits"}, "attack": {"name": "badnets", "poison_rate": 0.3}})
    x = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])  # class 2 has one image; 3 of 10 are poisoned

    class Shape:
        image_shape, num_classes = (3, 32, 32), 10

    attack = build_attack(cfg.attack, Shape)
    outcomes = set()
    for seed in range(20):
        try:
            attack.poison_trainset(ImageSet(x, y), torch.Generator().manual_seed(seed))
            outcomes.add("ok")
        except ConfigError as exc:
            assert "leaves class(es)" in str(exc) and str(exc).startswith("attack.poison_rate")
            outcomes.add("refused")
    assert outcomes == {"ok", "refused"}  # refused exactly when the draw empties a class
