"""``bibau sweep search_spaces/clip_cpu.yaml --smoke-test``: the contrastive setting through the whole
sweep (attack stage with the CLIP pre-training, a BI-BAU-CLIP study, BI-BAU-CLIP(T) and CleanCLIP,
zero-shot CA and R-ASR on the Pareto front, the export), on the offline digits data at the smoke
test's sizes, with a local Ray and MLflow on SQLite."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SPEC = "search_spaces/clip_cpu.yaml"
SETTINGS = ["base.data={name: digits, clean_fraction: 0.1}", "base.train.crop_padding=0",
            "attacks=[{name: badnets, target: 0, poison_rate: 0.1}]", "defenses.bibau_clip_u.trials=1",
            "concurrency=2", "max_failures=0"]


def test_clip_sweep_smoke_test_runs_end_to_end(tmp_path):
    storage = tmp_path / "storage"
    args = [sys.executable, "-m", "orchestrator.cli", "sweep", SPEC, "--smoke-test",
            *(a for s in [*SETTINGS, f"storage={storage}"] for a in ("--set", s))]
    env = dict(os.environ, PYTHONPATH=str(REPO), BIBAU_LOG_DIR=str(tmp_path / "logs"),
               HOME=os.environ.get("HOME", str(tmp_path)))
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout  # the per-trial progress lines: the user's console, not only sweep.log
    assert "badnets" in out and "bibau_clip_u" in out and "cleanclip" in out, out[-4000:]
    exports = list(storage.rglob("export*.yaml"))
    assert exports, f"no export under {storage}: {out[-2000:]}"
