"""The results page: every benchmark's history as data (docs/results/<slug>.jsonl), its notebook as prose
(<slug>.md), docs/benchmarks.md generated from them with the current rows only; the old notebook page
moved there without losing a row; ``append_rows`` records into the history for the real page and into a
Markdown table for any other file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common, docs_page, paper_scale  # noqa: E402

RESULTS = ROOT / "docs" / "results"
# the rows of the old notebook page (commit 770fc2f), per history: the migration moved all 143
MIGRATED = {"train-throughput": 9, "attack-stage": 8, "orchestration-overhead": 4, "cifar10-cpu-tables-first": 29,
            "quickstart-sweep": 3, "fisher-estimators": 1, "bibau-epoch": 3, "gpu-packing": 1, "sweep-efficiency": 15,
            "clip-figure3": 13, "clip-vit-table3": 17, "cifar10-cpu-tables": 40}
OLD_PAGE_COMMIT = "770fc2f"


def test_the_committed_page_is_the_generated_one():
    assert docs_page.PAGE.read_text() == docs_page.render_page(), "run python benchmarks/docs_page.py"
    assert docs_page.main(["--check"]) == 0


def test_the_histories_hold_every_row_of_the_old_notebook_page():
    assert sum(MIGRATED.values()) == 143
    for slug, count in MIGRATED.items():
        records = docs_page.read_history(RESULTS / f"{slug}.jsonl")
        assert len(records) >= count, slug  # later runs only append
        section = docs_page.declared(records[0]["section"])
        assert section is not None and section.slug == slug
        assert all(r["section"] == section.heading and r["row"]["date"].startswith("20") for r in records[:count])
    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_PAGE_COMMIT}:docs/benchmarks.md"],
                         capture_output=True, text=True)
    if old.returncode != 0:
        pytest.skip(f"the old page's commit {OLD_PAGE_COMMIT} is not in this clone's history")
    _, _, sections = docs_page.split_notebook(old.stdout)
    moved = {docs_page.slug_of(heading): (header, rows) for heading, _, header, rows in sections if rows}
    assert {slug: len(rows) for slug, (_, rows) in moved.items()} == MIGRATED
    for slug, (header, rows) in moved.items():  # cell for cell, in order
        records = docs_page.read_history(RESULTS / f"{slug}.jsonl")[:len(rows)]
        assert [docs_page.join_row(r["row"][c] for c in header) for r in records] == rows, slug
        assert all(list(r["row"]) == header for r in records), slug


OLD = """# Benchmarks

Results of the scripts.

## Current summary (2026-12-01)

| what | result |
|---|---|
| speed | fast |

## Speed (benchmarks/speed.py)

What it measures, in words.

| date | machine | device | img/s | command |
|---|---|---|---|---|
| 2026-11-01 | m1 | cpu | 10 | `python benchmarks/speed.py` |
| 2026-11-02 | m1 | cpu | 12 | `python benchmarks/speed.py` |

**Reading.** A hand table stays in the notebook:

| try | value |
|---|---|
| A | 1 |

## Tries by hand (benchmarks/tries.py)

Only prose.
"""


def test_the_migration_moves_rows_and_prose_and_gives_the_old_page_back(tmp_path):
    page = tmp_path / "docs" / "benchmarks.md"
    page.parent.mkdir()
    page.write_text(OLD)
    assert docs_page.migrate(page, page) == {"speed": 2, "tries-by-hand": 0}
    results = tmp_path / "docs" / "results"
    records = docs_page.read_history(results / "speed.jsonl")
    assert [r["row"] for r in records] == [
        {"date": "2026-11-01", "machine": "m1", "device": "cpu", "img/s": "10", "command": "`python benchmarks/speed.py`"},
        {"date": "2026-11-02", "machine": "m1", "device": "cpu", "img/s": "12", "command": "`python benchmarks/speed.py`"}]
    notebook = (results / "speed.md").read_text()
    assert notebook.startswith("# Speed (benchmarks/speed.py)\n\nWhat it measures, in words.\n")
    assert "| A | 1 |" in notebook and "2026-11-01" not in notebook
    assert (results / "summary.md").read_text().startswith("## Current summary (2026-12-01)")
    assert not (results / "tries-by-hand.jsonl").exists() and "Only prose." in (results / "tries-by-hand.md").read_text()
    # the parts give the old page back, and a second migration refuses to append the rows twice
    assert docs_page.reassemble(*docs_page.split_notebook(OLD)) == OLD
    with pytest.raises(SystemExit, match="already holds"):
        docs_page.migrate(page, page)
    text = page.read_text()
    assert text.index("## Current summary") < text.index("## Speed") < text.index("## Tries by hand")
    assert "| 2026-11-01 |" in text and "| 2026-11-02 |" in text  # no key declared: the newest 5
    assert "No recorded rows" in text.split("## Tries by hand")[1]


def row(*cells) -> str:
    return docs_page.join_row(cells)


def test_append_rows_into_the_page_records_data_and_regenerates_it(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "benchmarks.md"
    monkeypatch.setattr(common, "DOC", page)
    # a section no script declared yet: created from its text, described by its first sentences
    heading = "## Widgets per second (benchmarks/widgets.py)"
    text = f"{heading}\n\nWidgets made per second. Nothing else. More words.\n\n| date | n | command |\n|---|---|---|\n"
    common.append_rows(heading, text, "| date | n | command |", [row("2026-12-02", "1", "`python w.py`")], page)
    common.append_rows(heading, text, "| date | n | command |", [row("2026-12-03", "2", "`python w.py`")], page)
    results = tmp_path / "docs" / "results"
    assert [r["row"]["n"] for r in docs_page.read_history(results / "widgets-per-second.jsonl")] == ["1", "2"]
    notebook = (results / "widgets-per-second.md").read_text()
    assert notebook.startswith("# Widgets per second") and "| date" not in notebook
    assert "widgets-per-second.jsonl" in notebook
    out = page.read_text()
    assert "Widgets made per second. Nothing else." in out and "More words" not in out
    assert "| 2026-12-02 | 1 |" in out and "| 2026-12-03 | 2 |" in out  # no key declared: the newest 5
    assert "(results/widgets-per-second.jsonl) (2 rows; shown: the newest 2)" in out
    # the paper-scale section (declared, keyed by attack, model and row): a re-run replaces its rows in place
    cells = ["-"] * (paper_scale.HEADER.count("|") - 1)

    def paper_row(date, which, ca):
        c = list(cells)
        c[0], c[2], c[3], c[5], c[6] = date, "badnets", "resnet18", which, ca
        return row(*c)

    for date, ca in (("2026-12-02", "90.1"), ("2026-12-03", "91.5")):
        common.append_rows(paper_scale.SECTION, paper_scale.SECTION_TEXT, paper_scale.HEADER,
                           [paper_row(date, "none", ca), paper_row(date, "bibau_u", "80.0")], page)
    assert len(docs_page.read_history(results / "paper-scale.jsonl")) == 4
    assert (results / "paper-scale.md").read_text().startswith("# Paper scale")
    section = page.read_text().split(paper_scale.SECTION)[1].split("\n## ")[0]
    shown = [line for line in section.splitlines() if line.startswith("| 20")]
    assert [line.split(" | ")[5] for line in shown] == ["none", "bibau_u"] and "91.5" in shown[0]
    assert "90.1" not in section
    assert docs_page.render_page(page) == page.read_text()


def test_append_rows_into_another_file_writes_markdown_and_no_history(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    common.append_rows(paper_scale.SECTION, paper_scale.SECTION_TEXT, paper_scale.HEADER,
                       [row(*["x"] * (paper_scale.HEADER.count("|") - 1))], doc)
    assert paper_scale.HEADER in doc.read_text().splitlines()
    assert not (tmp_path / "docs" / "results").exists()


def test_a_row_that_does_not_fit_its_header_is_refused_naming_the_section(tmp_path):
    with pytest.raises(ValueError, match="Widgets.*2 cells under a header of 3"):
        docs_page.record("## Widgets", "## Widgets\n", "| a | b | c |", ["| 1 | 2 |"], tmp_path / "benchmarks.md")


def test_the_key_keeps_the_newest_row_of_each_in_its_first_place():
    section = docs_page.Section("## S", "s", key=("attack", docs_page.OPTIONS))

    def rec(attack, value, command):
        return {"section": "## S", "row": {"attack": attack, "value": value, "command": command}}

    records = [rec("a", "1", "`python x.py --record --json /tmp/a.json`"),
               rec("b", "2", "`python x.py --record`"),
               rec("a", "3", "`python x.py --record --data /elsewhere --doc docs/benchmarks.md`"),
               rec("a", "4", "`python x.py --set defense.lr=0.1 --record`")]
    assert [r["value"] for r in docs_page.current_rows(records, section)] == ["3", "2", "4"]
    assert docs_page.command_options("`OMP_NUM_THREADS=1 python b.py --images 2000 --doc d.md --compile` (note)") \
        == "OMP_NUM_THREADS=1 --images 2000 --compile"


def test_gpu_check_tiny_without_doc_records_into_a_copy_in_out(tmp_path):
    """The shell's part only (each step's Python is a stub here; the slow test runs the real steps)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\ncase "$1" in benchmarks/docs_page.py|-c) exec python3 "$@";; esac\nexit 0\n')
    stub.chmod(0o755)
    before = {p.name: p.read_text() for p in [docs_page.PAGE, *RESULTS.iterdir()]}
    out = tmp_path / "out"
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "PYTHON": str(stub)}, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 of 3 steps recorded" in proc.stdout and f"the doc in {out}/benchmarks.md" in proc.stdout
    assert (out / "benchmarks.md").read_text() == before["benchmarks.md"]  # the copy the tiny rows would go to
    assert not (out / "rows.jsonl").exists()
    assert {p.name: p.read_text() for p in [docs_page.PAGE, *RESULTS.iterdir()]} == before


def test_history_prints_every_row_as_a_table(capsys):
    assert docs_page.main(["--history", "gpu-packing"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("## Fractional GPUs") and lines[2].startswith("| date |")
    assert len([line for line in lines if line.startswith("| 20")]) == len(docs_page.read_history(RESULTS / "gpu-packing.jsonl"))


def test_records_from_a_gpu_machine_are_added_to_their_histories(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "benchmarks.md"
    monkeypatch.setattr(common, "DOC", page)
    snapshot = tmp_path / "before"
    snapshot.mkdir()
    common.append_rows("## A", "## A\n\nWords.\n", "| date | v |", ["| 2026-12-01 | 1 |"], page)
    (snapshot / "a.jsonl").write_text((tmp_path / "docs" / "results" / "a.jsonl").read_text())
    common.append_rows("## A", "## A\n\nWords.\n", "| date | v |", ["| 2026-12-02 | 2 |"], page)
    new = docs_page.new_since(snapshot, page)
    assert [r["row"]["v"] for r in new] == ["2"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in new))
    assert docs_page.add(rows, page) == 1
    assert [r["row"]["v"] for r in docs_page.read_history(tmp_path / "docs" / "results" / "a.jsonl")] == ["1", "2", "2"]


def test_a_row_at_another_width_stands_beside_the_scales_own_row_not_in_its_place():
    """cifar10_small rows run with --set (settings ending "; run: model.width=8") are their own rows;
    a newer row at the script's scale still replaces the older one."""
    section = docs_page.Section("## S", "s", key=("attack", "defense", docs_page.RUN))

    def rec(value, settings):
        return {"section": "## S", "row": {"attack": "sig", "defense": "bibau_u", "settings": settings,
                                             "value": value}}

    records = [rec("w16 old", "epochs=5; crop 0, flips"),
               rec("w8", "epochs=5, alpha=4.25; crop 0, flips; run: model.width=8"),
               rec("w16 new", "epochs=5; crop 0, flips")]
    assert [r["value"] for r in docs_page.current_rows(records, section)] == ["w16 new", "w8"]
