"""Model files: a safetensors round trip is exact; anything that needs pickle is refused, and
its payload never runs."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from trainables.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from trainables.models.base import ModelConfig, create_model


def small_model():
    cfg = ModelConfig(name="small_resnet", width=4, depth=2)
    model = create_model(cfg, num_classes=3, in_channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3),
                         generator=torch.Generator().manual_seed(0))
    meta = {"model": cfg.to_dict(), "num_classes": 3, "in_channels": 3, "mean": [0.5, 0.4, 0.3],
            "std": [0.2, 0.25, 0.3], "metrics": {"ca": 0.5}, "data_fingerprint": "abc"}
    return model, meta


def trained_a_little(model):
    # one step in train mode, so the BatchNorm running statistics differ from their init
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model.train()
    model(x).sum().backward()
    opt.step()
    return model.eval()


def test_round_trip_gives_identical_outputs(tmp_path):
    model, meta = small_model()
    model = trained_a_little(model)
    path = save_checkpoint(tmp_path, model, meta, name="backdoored")
    assert path == tmp_path / "backdoored.safetensors" and (tmp_path / "backdoored.json").is_file()
    loaded, loaded_meta = load_checkpoint(path, "cpu")
    assert loaded_meta == json.loads((tmp_path / "backdoored.json").read_text())
    assert loaded_meta["metrics"] == {"ca": 0.5} and loaded_meta["data_fingerprint"] == "abc"
    x = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert torch.equal(loaded.mean.flatten(), torch.tensor([0.5, 0.4, 0.3]))
    # the sidecar's path works as well
    again, _ = load_checkpoint(tmp_path / "backdoored.json")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_plain_state_dict_in_a_pt_file_loads(tmp_path):
    model, meta = small_model()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "weights.json").write_text(json.dumps(meta))
    loaded, _ = load_checkpoint(tmp_path / "weights.pt")
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


class Payload:
    """Unpickling this creates the marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch_save", "raw_pickle"])
def test_pickled_files_are_refused_and_never_executed(tmp_path, writer):
    model, meta = small_model()
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if writer == "torch_save":  # a whole module plus a malicious object, the way people share models
        torch.save({"model": model, "extra": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=2))
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"(?s)refusing to load .*pickle.*safetensors"):
        load_checkpoint(path)
    assert not marker.exists(), "the pickle payload ran"


def test_the_payload_is_live(tmp_path):
    """Control: the payload above really would run if unpickled (our own file, in tmp_path)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "payload.pkl"
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    with open(path, "rb") as fh:
        pickle.Unpickler(fh).load()
    assert marker.exists()


def test_pickle_suffix_and_missing_sidecar_are_clear_errors(tmp_path):
    model, meta = small_model()
    marker = tmp_path / "pwned"
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        load_checkpoint(tmp_path / "model.pkl")
    assert not marker.exists()
    save_checkpoint(tmp_path, model, meta)
    (tmp_path / "model.json").unlink()
    with pytest.raises(CheckpointError, match="sidecar model.json is missing"):
        load_checkpoint(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="meta lacks num_classes"):
        save_checkpoint(tmp_path, model, {k: v for k, v in meta.items() if k != "num_classes"})


def test_weights_that_do_not_fit_the_sidecar_are_refused(tmp_path):
    model, meta = small_model()
    save_checkpoint(tmp_path, model, {**meta, "model": {"name": "small_resnet", "width": 8, "depth": 2}})
    with pytest.raises(CheckpointError, match="do not fit small_resnet"):
        load_checkpoint(tmp_path / "model.safetensors")


# -- content hashes (the cache keys of trained models) ---------------------------------------------


def test_content_hash_is_canonical_and_sensitive():
    from trainables.cache import content_hash

    a = {"train": {"epochs": 3, "lr": 0.05}, "attack": {"name": "badnets", "position": (1, 2)}}
    b = {"attack": {"position": [1, 2], "name": "badnets"}, "train": {"lr": 0.05, "epochs": 3}}
    assert content_hash(a) == content_hash(b) and len(content_hash(a)) == 16
    assert content_hash(a) != content_hash({**a, "train": {"epochs": 3, "lr": 0.051}})
    assert content_hash({"x": 1}) != content_hash({"x": "1"}) != content_hash({"x": True})
    with pytest.raises(ValueError):
        content_hash({"x": float("nan")})


def test_code_version_follows_the_training_sources(tmp_path, monkeypatch):
    from trainables import cache

    for rel in ("data/base.py", "models/resnet.py", "attacks/badnets.py", "train.py", "defenses/bibau.py",
                "trial.py", "attack_stage.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(cache, "_ROOT", tmp_path)
    version = cache.code_version.__wrapped__
    before = version()
    (tmp_path / "defenses/bibau.py").write_text("# a defense does not change the attacked model\n")
    (tmp_path / "trial.py").write_text("# nor do the defense and evaluation stages of a trial\n")
    assert version() == before
    (tmp_path / "attack_stage.py").write_text("# how the attack stage splits and poisons does\n")
    assert version() != before
    before = version()
    (tmp_path / "attacks/badnets.py").write_text("# a changed trigger does\n")
    changed = version()
    assert changed != before and changed.startswith(cache.package_version() + "+")
    (tmp_path / "attacks/new_attack.py").write_text("# so does a new file\n")
    assert version() != changed
    # the CLIP-only sources change the contrastive key, not the classifiers'
    (tmp_path / "contrastive").mkdir()
    classifier, clip = version(contrastive=False), version()
    (tmp_path / "contrastive/train.py").write_text("# the contrastive loop changed\n")
    assert version(contrastive=False) == classifier and version() != clip
    # each setting's task is a source of its own models only; RA's fine-tuning is no source
    (tmp_path / "tasks").mkdir()
    classifier, clip = version(contrastive=False), version()
    (tmp_path / "tasks/contrastive.py").write_text("# the contrastive task changed\n")
    assert version(contrastive=False) == classifier and version() != clip
    classifier, clip = version(contrastive=False), version()
    (tmp_path / "tasks/classifier.py").write_text("# the classifier task changed\n")
    assert version(contrastive=False) != classifier and version() != clip
    classifier, clip = version(contrastive=False), version()
    (tmp_path / "retune.py").write_text("# RA's fine-tuning changed\n")
    assert version(contrastive=False) == classifier and version() == clip
