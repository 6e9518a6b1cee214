"""Resume runs no planted code, and one sweep has one driver.

Planted files are real pickles whose unpickling would write a marker file: a test passes only
when the resume is refused with a clear message and the marker never appears.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.integrity import StateSigner, state_key
from orchestrator.locks import DriverLease
from orchestrator.search import StudySearcher
from orchestrator.spec import load_spec
from orchestrator.sweep import run_sweep, spec_fingerprint
from trainables.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


class Planted:
    """Unpickling this runs ``open(marker, 'w')``: what an attacker's file would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def spec_file(tmp_path: Path) -> str:
    data = {"name": "secure", "storage": str(tmp_path / "store"),
            "base": {"data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 4, "depth": 1},
                     "evaluation": {"metrics": ["ca", "asr", "ra"]}},
            "attacks": ["badnets"], "objectives": [{"metric": "ca", "mode": "max"}, {"metric": "r_asr", "mode": "min"}],
            "defenses": [{"name": "ft"}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("BIBAU_STATE_KEY", "test-secret")
    return state_key()


def fake_sweep(tmp_path: Path, marker: Path, fingerprint: str | None) -> tuple[Path, Path]:
    """A sweep folder as a dead driver leaves it, with Tune's state files, plus a planted pickle."""
    spec, _ = load_spec(spec_file(tmp_path))
    sweep_dir = spec.storage_path / spec.name / "secure-20260101-000000"
    tune_dir = sweep_dir / "tune"
    tune_dir.mkdir(parents=True)
    state = {"sweep_id": sweep_dir.name, "status": "running"}
    if fingerprint is not None:
        state["spec_fingerprint"] = fingerprint
    (sweep_dir / "state.json").write_text(json.dumps(state))
    (tune_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": []}))
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps({"ok": 1}))
    return sweep_dir, tune_dir


def resume(tmp_path: Path, which: str | bool = True):
    spec, plan = load_spec(spec_file(tmp_path))
    return run_sweep(spec, plan, resume=which, log=lambda m: None)


def test_a_planted_tuner_pkl_is_refused_and_runs_nothing(tmp_path, key):
    marker = tmp_path / "PWNED"
    spec, _ = load_spec(spec_file(tmp_path))
    sweep_dir, tune_dir = fake_sweep(tmp_path, marker, spec_fingerprint(spec))
    signer = StateSigner(sweep_dir, sweep_dir.name, spec_fingerprint(spec), key)
    signer.sign(list(tune_dir.iterdir()), tune_dir)  # what the driver signed
    assert signer.verify(tune_dir) == 2
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))  # then someone replaced it
    with pytest.raises(ConfigError, match="tuner.pkl is not a file this sweep's driver wrote"):
        resume(tmp_path)
    assert not marker.exists()
    # a planted newer experiment state (Tune loads the newest) is refused the same way
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps({"ok": 1}))
    (tune_dir / "experiment_state-2099-01-01_00-00-00.json").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ConfigError, match="experiment_state-2099"):
        resume(tmp_path)
    assert not marker.exists()
    assert not (sweep_dir / "driver.lease").exists()  # a refused resume leaves no lease behind


def test_unsigned_or_foreign_signed_state_is_refused(tmp_path, key, monkeypatch):
    marker = tmp_path / "PWNED"
    spec, _ = load_spec(spec_file(tmp_path))
    sweep_dir, tune_dir = fake_sweep(tmp_path, marker, spec_fingerprint(spec))
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ConfigError, match="tune-state.sig.json is missing"):
        resume(tmp_path)
    # the attacker signs with their own key: the driver's key does not accept it
    StateSigner(sweep_dir, sweep_dir.name, spec_fingerprint(spec), b"attacker-key-0123456789").sign(
        list(tune_dir.iterdir()), tune_dir)
    with pytest.raises(ConfigError, match="signature .* does not match"):
        resume(tmp_path)
    assert not marker.exists()


def test_resume_requires_the_spec_fingerprint(tmp_path, key):
    sweep_dir, _ = fake_sweep(tmp_path, tmp_path / "PWNED", None)
    with pytest.raises(ConfigError, match="no unfinished sweep of this spec"):
        resume(tmp_path)  # the newest unfinished sweep *of this spec*: one without a fingerprint is none
    with pytest.raises(ConfigError, match="names no spec fingerprint"):
        resume(tmp_path, sweep_dir.name)
    (sweep_dir / "state.json").write_text(json.dumps({"status": "running", "spec_fingerprint": "0" * 16}))
    with pytest.raises(ConfigError, match="different spec"):
        resume(tmp_path, sweep_dir.name)
    (sweep_dir / "state.json").write_bytes(b"\x80\x04K\x01.")  # a pickle where JSON belongs
    with pytest.raises(ConfigError, match="not a readable sweep state"):
        resume(tmp_path, sweep_dir.name)


def test_the_searcher_state_is_json_and_a_pickle_there_is_refused(tmp_path):
    spec, plan = load_spec(spec_file(tmp_path))
    searcher = StudySearcher(plan.studies, spec.objectives, storage_url=None, prefix="p", trials_dir=tmp_path)
    searcher.suggest("t0")
    path = tmp_path / "searcher-state.pkl"
    searcher.save(str(path))
    assert json.loads(path.read_text())["own"]["launched"] == {"badnets/ft": 1}
    marker = tmp_path / "PWNED"
    path.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ValueError, match="not a JSON searcher state"):
        searcher.restore(str(path))
    assert not marker.exists()


def test_a_concurrent_driver_is_refused_and_a_dead_ones_lease_is_taken_over(tmp_path):
    first = DriverLease(tmp_path, heartbeat_s=0.2).acquire()
    with pytest.raises(ConfigError, match="being run by another driver .*pid %d" % os.getpid()):
        DriverLease(tmp_path).acquire()
    time.sleep(0.5)  # heartbeats keep it alive
    with pytest.raises(ConfigError, match="another driver"):
        DriverLease(tmp_path, stale_s=0.3).acquire()
    first.release()
    assert not (tmp_path / "driver.lease").exists()
    # a holder on this host whose process is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lease = DriverLease(tmp_path)
    (tmp_path / "driver.lease").write_text(json.dumps({"host": lease.host, "pid": gone.pid, "token": "x",
                                                       "heartbeat": time.time()}))
    lease.acquire()
    assert json.loads((tmp_path / "driver.lease").read_text())["token"] == lease.token
    lease.release()
    # a holder on another node that stopped beating
    (tmp_path / "driver.lease").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y",
                                                       "heartbeat": time.time() - 120}))
    with DriverLease(tmp_path, stale_s=60) as taken:
        assert json.loads((tmp_path / "driver.lease").read_text())["token"] == taken.token


def test_cli_resume_of_a_planted_state_exits_2_without_traceback(tmp_path):
    marker = tmp_path / "PWNED"
    spec, _ = load_spec(spec_file(tmp_path))
    sweep_dir, tune_dir = fake_sweep(tmp_path, marker, spec_fingerprint(spec))
    (tune_dir / "tuner.pkl").write_bytes(pickle.dumps(Planted(marker)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BIBAU_STATE_KEY": "cli-secret", "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", spec_file(tmp_path), "--resume"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "refusing to load" in proc.stderr or "never signed" in proc.stderr
    assert not marker.exists()
