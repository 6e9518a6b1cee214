"""``benchmarks/paper_scale.sh``, the paper-scale row to run when a GPU is lent, checked on a CPU with
``--tiny``: the same code path (attack stage, clean reference, BI-BAU(U), FT, RA, QRA) records its rows
beside the paper's numbers into the doc it is given, never into the real docs/benchmarks.md."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_scale.sh"
sys.path.insert(0, str(ROOT))
from benchmarks import paper_scale  # noqa: E402


def env(out: Path) -> dict:
    return {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_unknown_argument_and_attack_fail_before_any_work(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--tiny", "--gpus", "2"], env=env(tmp_path / "out"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--gpus'" in proc.stderr
    assert paper_scale.main(["--tiny", "--attack", "badnetz"]) == 2  # a ConfigError, before any training


def test_full_scale_is_the_papers_setting():
    rows = paper_scale.configs("badnets", tiny=False, device="cpu", data_root=None)
    none, bibau = rows["none"], rows["bibau_u"]
    assert none.model.name == "resnet18" and none.data.train_size is None and none.data.clean_fraction == 0.05
    assert none.attack.poison_rate == 0.1 and none.attack.target == 0 and none.defense is None
    d = bibau.defense  # METHOD's defaults: nothing but the Fisher's chunk size (speed only) is set
    assert (d.epochs, d.pgd_steps, round(d.pgd_eps * 255), round(d.pgd_step * 255), d.lr) == (20, 20, 25, 2, 0.01)
    assert set(rows) == {"none", "bibau_u", "ft"}


@pytest.mark.slow
def test_tiny_run_records_rows_beside_the_papers(tmp_path, cifar10_archive):
    real = ROOT / "docs" / "benchmarks.md"
    before = real.read_text()
    doc = tmp_path / "benchmarks.md"
    out = tmp_path / "out"
    proc = subprocess.run([str(SCRIPT), "--tiny", "--quiet", "--doc", str(doc), "--data", str(cifar10_archive)],
                          env=env(out), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert real.read_text() == before
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| 20")]
    cells = [[c.strip() for c in row.split("|")] for row in rows]
    assert [c[6] for c in cells] == ["none", "bibau_u", "ft", "time: BI-BAU(U) s / 20 plain epochs s"]
    assert cells[1][12:16] == ["83.7", "2.7", "3.6", "2.8"]  # the paper's Table 2 row beside ours
    assert all(0 <= float(c[7]) <= 100 for c in cells[:3])  # CA measured on each model
    assert all(c[9] != "-" and c[11] != "-" for c in cells[:3])  # R-ASR and Q-ASR measured
    assert (out / "environment.txt").is_file() and "bibau_u" in (out / "rows.md").read_text()
