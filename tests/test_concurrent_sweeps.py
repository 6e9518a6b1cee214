"""Two drivers started together on one fresh storage folder (two specs sharing a name, so one
MLflow database, one experiment and one sweep folder): both finish, each exports its own sweep,
and a resume while they run is refused by the driver lease. Trials are the stand-in of
test_sweep.py, so the orchestration is what is tested."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.export import read_export
from orchestrator.spec import load_spec
from orchestrator.sweep import run_sweep, spec_fingerprint
from trainables.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import test_sweep
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(test_sweep)
    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep
    spec, plan = load_spec(sys.argv[1])
    out = run_sweep(spec, plan, backend=test_sweep.StandIn(sys.argv[2], sleep=3.0), num_cpus=1, verbose=0,
                    log=lambda m: None)
    print("SWEEP", out.sweep_id, len(out.records), flush=True)
""")


def spec(tmp_path: Path, tag: str, high: float) -> str:
    data = {"name": "shared", "storage": str(tmp_path / "store"),
            "base": {"data": {"name": "digits"}, "model": {"name": "small_resnet", "width": 4, "depth": 1},
                     "evaluation": {"metrics": ["ca", "asr", "ra"]}},
            "attacks": ["badnets"], "objectives": [{"metric": "ca", "mode": "max"}, {"metric": "r_asr", "mode": "min"}],
            "defenses": [{"name": "bibau_u", "space": {"theta": {"low": 0.1, "high": high}}, "trials": 2}],
            "concurrency": 1}
    path = tmp_path / f"spec-{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_two_sweeps_started_together_both_finish_and_each_exports_its_own(tmp_path):
    from orchestrator.cli import main

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "BIBAU_STATE_KEY": "concurrent-test"}
    specs = {"a": spec(tmp_path, "a", 0.5), "b": spec(tmp_path, "b", 0.9)}
    procs = {k: subprocess.Popen([sys.executable, str(script), p, str(tmp_path / f"markers-{k}")], cwd=str(tmp_path),
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, p in specs.items()}
    try:
        # while both run: a resume of spec a is refused, its driver being alive
        spec_a, plan_a = load_spec(specs["a"])
        fingerprint = spec_fingerprint(spec_a)
        deadline = time.time() + 900  # a fresh MLflow SQLite takes a minute on a loaded 2-core machine
        mine = None
        while time.time() < deadline and mine is None and all(p.poll() is None for p in procs.values()):
            for state_file in (tmp_path / "store" / "shared").glob("*/state.json"):
                try:
                    if json.loads(state_file.read_text()).get("spec_fingerprint") == fingerprint:
                        mine = state_file.parent
                except ValueError:
                    pass
            time.sleep(0.5)
        if mine is None:
            ended = {k: (p.returncode, p.communicate()[1][-3000:]) for k, p in procs.items() if p.poll() is not None}
            raise AssertionError(f"driver a never started its sweep; ended drivers: {ended}")
        assert procs["a"].poll() is None, "driver a ended before a resume could be tried against it"
        with pytest.raises(ConfigError, match="being run by another driver"):
            run_sweep(spec_a, plan_a, resume=True, log=lambda m: None)
        outs = {k: p.communicate(timeout=1200) for k, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for k, p in procs.items():
        assert p.returncode == 0, (k, outs[k][1][-3000:])
        assert "Traceback" not in outs[k][1], outs[k][1][-3000:]
    ids = {k: outs[k][0].split("SWEEP ")[1].split()[0] for k in procs}
    assert ids["a"] != ids["b"]
    for k in procs:
        assert outs[k][0].split("SWEEP ")[1].split()[1] == "2"  # every trial of its budget
    # each spec's export is its own sweep's, though they share the experiment
    for k, path in specs.items():
        out = tmp_path / f"export-{k}.yaml"
        assert main(["export", path, "-o", str(out)]) == 0
        (sel,) = read_export(out)["selections"]
        assert sel["provenance"]["sweep"] == ids[k]
        assert sel["config"]["defense"]["theta"] <= (0.5 if k == "a" else 0.9)
    assert not list((tmp_path / "store" / "shared").glob("*/driver.lease"))  # both released
