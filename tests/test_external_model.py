"""A suspicious model trained elsewhere (``attack.external_model``): ``bibau run`` checks a safetensors
``small_resnet`` file with BI-BAU and RA under the BadNets trigger its attack section describes, with
no attack stage; a pickled file and a file of another architecture are refused before any work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from orchestrator.cli import main

RUN = {
    "seed": 0, "device": "cpu",
    # run_digits_smoke.yaml's attack (measured there: CA 0.967, ASR 0.981), on a smaller test split
    "data": {"name": "digits", "test_size": 300, "clean_fraction": 0.1},
    "model": {"name": "small_resnet", "width": 8, "depth": 3},
    "train": {"epochs": 15, "batch_size": 64, "lr": 0.05, "crop_padding": 0, "eval_every": 0},
    "attack": {"name": "badnets", "target": 0, "poison_rate": 0.1},
    "defense": {"name": "bibau_u", "epochs": 2, "pgd_steps": 2, "batch_size": 64, "crop_padding": 0},
    "evaluation": {"metrics": ["ca", "asr", "ra"], "ra_size": 100, "ra_epochs": 1, "ra_on_clean": False},
}


@pytest.fixture(scope="module")
def suspect(tmp_path_factory):
    """A backdoored small_resnet trained apart from any bibau run (its own cache), saved as a bare
    safetensors state dict, as another code base would."""
    from trainables.attack_stage import attack_stage
    from trainables.config import build
    from trainables.data import load_dataset
    from trainables.schema import RunConfig

    tmp = tmp_path_factory.mktemp("external")
    cfg = build(RunConfig, {**RUN, "defense": None, "cache_dir": str(tmp / "elsewhere")})
    stage = attack_stage(cfg, load_dataset(cfg.data), torch.device("cpu"), log=lambda m: None)
    assert stage.metrics["backdoored_asr"] > 0.8 and stage.metrics["backdoored_ca"] > 0.8  # a real, backdoored model (chance 10%)
    path = tmp / "suspect.safetensors"
    save_file({k: v.contiguous() for k, v in stage.model.state_dict().items()}, str(path))
    return tmp, path, stage.metrics


def _config(tmp: Path, **attack) -> Path:
    path = tmp / f"run-{len(list(tmp.glob('run-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**RUN, "cache_dir": str(tmp / "cache"), "attack": {**RUN["attack"], **attack}}))
    return path


def test_bibau_run_checks_a_safetensors_model_with_bibau_and_ra_under_the_badnets_trigger(suspect, capsys):
    tmp, path, measured = suspect
    out = tmp / "checked"
    assert main(["run", str(_config(tmp, external_model=str(path))), "--out", str(out)]) == 0
    text = capsys.readouterr()
    report = json.loads((out / "results.json").read_text())
    assert report["attack_source"] == "external" and report["cache_hit"] is False
    # the same model under the same trigger: the undefended numbers are the ones measured where it was made
    assert report["backdoored_ca"] == pytest.approx(measured["backdoored_ca"])
    assert report["backdoored_asr"] == pytest.approx(measured["backdoored_asr"])
    assert not (tmp / "cache").exists() or not any((tmp / "cache").iterdir())  # nothing trained or cached
    assert "attack stage skipped" in text.out + text.err
    assert report["asr"] < report["backdoored_asr"] / 2, report  # BI-BAU really lowered it
    assert 0.0 <= report["r_asr"] <= 1.0  # RA ran on the purified model


def test_a_pickled_file_or_another_architecture_is_refused_before_any_work(suspect, capsys):
    tmp, path, _ = suspect
    from safetensors.torch import load_file

    pickled = tmp / "suspect.pt"
    torch.save(load_file(str(path)), pickled)
    assert main(["run", str(_config(tmp, external_model=str(pickled))), "--out", str(tmp / "no1")]) == 2
    err = capsys.readouterr().err
    assert "attack.external_model" in err and "pickle" in err and "Traceback" not in err
    wide = dict(RUN["model"], width=16)
    cfg = _config(tmp, external_model=str(path))
    assert main(["run", str(cfg), "--set", f"model.width={wide['width']}", "--out", str(tmp / "no2")]) == 2
    err = capsys.readouterr().err
    assert "does not fit model small_resnet" in err and "width=16" in err
    assert not (tmp / "no1" / "results.json").exists() and not (tmp / "no2" / "results.json").exists()


@pytest.mark.parametrize("name", sorted(__import__("trainables").registry.MODELS))
def test_every_registered_classifier_loads_from_a_safetensors_file(name, tmp_path):
    from trainables.external import load_external
    from trainables.models.base import ModelConfig, create_model

    cfg = ModelConfig(name=name, width=4, depth=2) if name == "small_resnet" else ModelConfig(name=name)
    made = create_model(cfg, 10, 3, (0.5,) * 3, (0.25,) * 3, generator=torch.Generator().manual_seed(0)).eval()
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in made.state_dict().items()}, str(path))
    loaded = load_external(str(path), cfg, 10, 3, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(x), made(x), atol=1e-5)
