"""Extending without forking: the example plugin package (``docs/plugin-example``), installed with
pip into a temporary folder, registers its defense through the ``bibau.defenses`` entry point; the
registry finds it, the config validates its fields, ``bibau config --fields`` documents them and
``bibau run`` runs a trial with it in a fresh process. A plugin that fails to import is named in
the error of the look-up that needed it."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "plugin-example"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The example package installed (pip, no index, no build isolation) into its own folder."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src)  # setuptools writes build folders next to the sources
    site = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                           "--no-build-isolation", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (site / "bibau_bn_recalibrate.py").is_file()
    return site


@pytest.fixture
def registries(monkeypatch):
    """The registries as they are, restored after the test (a plugin registered here stays here)."""
    from trainables.registry import DEFENSES

    monkeypatch.setattr(DEFENSES, "_entries", dict(DEFENSES._entries))
    monkeypatch.setattr(DEFENSES, "plugin_errors", dict(DEFENSES.plugin_errors))
    yield DEFENSES
    DEFENSES._plugins_loaded = False  # the next look-up scans the entry points of sys.path as restored


def test_the_example_plugin_is_a_short_package():
    code = [line for line in (EXAMPLE / "bibau_bn_recalibrate.py").read_text().splitlines()
            if line.strip() and not line.strip().startswith(("#", '"""', "from ", "import "))]
    assert len(code) <= 16, len(code)  # the README shows it whole
    assert 'bn_recalibrate = "bibau_bn_recalibrate"' in (EXAMPLE / "pyproject.toml").read_text()


def test_a_plugin_defense_is_registered_and_runs_a_trial(plugin_site, registries, monkeypatch, tmp_path):
    from orchestrator.config import load_run_config

    assert "bn_recalibrate" not in registries  # not before the package is on the path
    monkeypatch.syspath_prepend(str(plugin_site))
    registries.load_plugins(force=True)
    assert "bn_recalibrate" in registries.names()
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 4, "depth": 1},
        "train": {"crop_padding": 0}, "attack": {"name": "badnets", "target": 0},
        "defense": {"name": "bn_recalibrate", "batch_size": 64}, "evaluation": {"metrics": ["ca", "asr"]},
        "cache_dir": str(tmp_path / "cache")}))
    cfg = load_run_config(str(cfg_file))
    assert cfg.defense.name == "bn_recalibrate" and cfg.defense.batch_size == 64
    with pytest.raises(Exception, match=r"defense\.batch_size: 0 .*allowed"):
        load_run_config(str(cfg_file), ["defense.batch_size=0"])
    # a fresh process finds the plugin through its entry point alone, and runs a whole trial with it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(REPO)]), "OMP_NUM_THREADS": "1"}
    fields = subprocess.run([sys.executable, "-m", "orchestrator.cli", "config", "--fields", "defense=bn_recalibrate"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert fields.returncode == 0, fields.stderr
    assert "defense.batch_size (int, default 256)" in fields.stdout
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(cfg_file), "--smoke-test",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["defense"] == "bn_recalibrate" and 0.0 <= results["ca"] <= 1.0
    assert (out / "purified.safetensors").is_file()
    from trainables.checkpoint import load_checkpoint, load_tensors

    purified, meta = load_checkpoint(out / "purified.safetensors")
    assert meta["defense"]["name"] == "bn_recalibrate"
    # the defense did what it says: BatchNorm statistics re-estimated, weights untouched
    before = load_tensors(out / "backdoored.safetensors")
    after = load_tensors(out / "purified.safetensors")
    means = [k for k in after if k.endswith("running_mean")]
    assert means and any(not before[k].equal(after[k]) for k in means)
    assert all(before[k].equal(after[k]) for k in after if k.endswith(".weight") and "bn" not in k
               and before[k].dim() == 4)


def test_a_plugin_that_fails_to_load_is_named_in_the_error(registries, monkeypatch, tmp_path):
    from orchestrator.config import load_run_config
    from trainables.config import ConfigError

    site = tmp_path / "site"
    (site / "broken_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "broken_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\n"
                                                                    "Version: 0.1\n")
    (site / "broken_plugin-0.1.dist-info" / "entry_points.txt").write_text("[bibau.defenses]\n"
                                                                          "half_done = broken_plugin_mod\n")
    (site / "broken_plugin_mod.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(site))
    registries.load_plugins(force=True)
    assert "bibau_bn_recalibrate" not in sys.modules or "half_done" not in registries
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"defense": {"name": "half_done"}}))
    with pytest.raises(ConfigError, match=r"unknown defense 'half_done'.*broken-plugin entry point half_done = "
                                          r"broken_plugin_mod in bibau\.defenses failed to load: ModuleNotFoundError"):
        load_run_config(str(cfg_file))
    assert "bibau_u" in registries  # the built-ins are all there
