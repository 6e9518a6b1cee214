"""``benchmarks/gpu_check.sh``, the one call to make when a GPU is lent, runs on a CPU with
``--tiny``: every step records its row into the doc it is given (a copy here, never the real
docs/benchmarks.md) and everything lands in ``$OUT``."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT))
from benchmarks import bibau_epoch, gpu_packing, train_throughput  # noqa: E402


def env(out: Path) -> dict:
    return {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}


def table_rows(text: str, section: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(section)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| 20")]


def test_an_unknown_argument_fails_before_any_work(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--tiny", "--gpus", "2"], env=env(tmp_path / "out"), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--gpus'" in proc.stderr
    assert not (tmp_path / "out" / "environment.txt").exists()


@pytest.mark.slow
def test_gpu_check_tiny_records_every_step_into_the_given_doc_and_out(tmp_path, cifar10_archive):
    real = ROOT / "docs" / "benchmarks.md"
    before = real.read_text()
    doc = tmp_path / "benchmarks.md"
    shutil.copy(real, doc)
    out = tmp_path / "out"
    proc = subprocess.run([str(SCRIPT), "--tiny", "--doc", str(doc), "--data", str(cifar10_archive)], env=env(out),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "3 of 3 steps recorded" in proc.stdout
    text = doc.read_text()
    assert real.read_text() == before  # the real doc is left alone
    mods = {"throughput": train_throughput, "bibau": bibau_epoch, "packing": gpu_packing}
    for name, mod in mods.items():  # one new row at the end of each step's own table
        had = table_rows(before, mod.SECTION) if mod.SECTION in before else []
        assert table_rows(text, mod.SECTION)[:-1] == had, name
    new = {name: table_rows(text, mod.SECTION)[-1] for name, mod in mods.items()}
    assert "| cpu | small_resnet | 64 |" in new["throughput"]
    bibau = [c.strip() for c in new["bibau"].split("|")]
    assert bibau[3] == "cpu" and bibau[7] == "2"  # two BI-BAU epochs measured (the tiny run's cap)
    assert float(bibau[13]) > 0 and float(bibau[14]) > 0  # the ratio to plain training, per image too
    packing = [c.strip() for c in new["packing"].split("|")]
    assert "tiny, logical GPU" in packing[3] and float(packing[8]) > 0
    # everything is in $OUT, the only folder a GPU machine hands back
    for name in ("environment.txt", "throughput.log", "bibau_epoch.log", "gpu_packing.log", "benchmarks.md"):
        assert (out / name).is_file(), name
    assert (out / "benchmarks.md").read_text() == text
    rows = (out / "rows.md").read_text().splitlines()
    assert set(new.values()) <= set(rows)
    log = (out / "gpu_packing.log").read_text()
    assert "packed:" in log and "alone:" in log and log.count("4/4 trials completed") == 2
