"""``bibau report``, the figures and the export's honesty, on real sweeps on the offline digits data
(two attacks, a tuned BI-BAU(U) and the FT baseline, CA, ASR, R-ASR and Q-ASR): the tables' numbers
are MLflow's metrics, the picks are tagged and described in MLflow, ``--strict`` fails when no
trial meets the rule. The figure tests use hand-made records (gated trials, a baseline on a trial)."""
from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.pareto import TrialRecord, pareto_front

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "digits-report",
    "base": {
        "seed": 0, "device": "cpu",
        "data": {"name": "digits", "train_size": 600, "test_size": 200, "clean_fraction": 0.1},
        "model": {"name": "small_resnet", "width": 4, "depth": 2},
        "train": {"epochs": 3, "batch_size": 64, "lr": 0.05, "crop_padding": 0, "eval_every": 0},
        "evaluation": {"metrics": ["ca", "asr", "ra", "qra"], "ra_size": 100, "ra_epochs": 1, "ra_on_clean": False,
                       "qra_epochs": 1, "qra_clean_size": 50, "qra_poison_size": 50, "qra_hidden": 32},
    },
    "attacks": ["badnets", "blended"],
    "defenses": [
        {"name": "bibau_u", "fixed": {"epochs": 1, "pgd_steps": 2, "batch_size": 64, "crop_padding": 0},
         "space": {"theta": {"low": 0.0, "high": 1.0}}, "trials": 2, "startup_trials": 2},
        {"name": "ft", "fixed": {"epochs": 1, "batch_size": 64, "crop_padding": 0}},
    ],
    "concurrency": 2,
}
IMPOSSIBLE = "max ca; r_asr < 0; q_asr < 0"  # no rate is below 0: no trial can meet it


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep (and a second, smaller one of another spec on the same storage) on a local Ray."""
    import ray

    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("report")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        spec_file = tmp / "spec.yaml"
        spec_file.write_text(yaml.safe_dump({**SPEC, "storage": str(tmp / "store")}))
        lines: list[str] = []
        out = run_sweep(*load_spec(str(spec_file)), verbose=0, log=lines.append)
        other_file = tmp / "other.yaml"
        other = {**SPEC, "name": "digits-report-ft", "storage": str(tmp / "store"), "attacks": ["badnets"], "export_rule": IMPOSSIBLE, "replicates": 3,
                 "defenses": [{"name": "ft", "fixed": {"epochs": 2, "batch_size": 64, "crop_padding": 0}}]}
        other_file.write_text(yaml.safe_dump(other))
        out2 = run_sweep(*load_spec(str(other_file)), verbose=0, log=lambda m: None)
    finally:
        if started:
            ray.shutdown()
    yield {"tmp": tmp, "spec": spec_file, "out": out, "lines": lines, "other": other_file, "out2": out2}


def display(name):
    from orchestrator.names import display as shown

    return shown(name)


def client_of(out):
    from mlflow.tracking import MlflowClient

    return MlflowClient(out.tracking_uri)


def test_the_sweep_tags_its_picks_and_describes_them_in_mlflow(sweep):
    from orchestrator.export import read_export

    out = sweep["out"]
    assert {r.status for r in out.records} == {"completed"}, [(r.study, r.status, r.error) for r in out.records]
    client = client_of(out)
    exp = client.get_experiment_by_name("digits-report")
    picked = client.search_runs([exp.experiment_id], filter_string="tags.picked = 'true'")  # the UI's one filter
    selections = read_export(out.export_file)["selections"]
    assert {r.info.run_id for r in picked} == {s["provenance"]["run_id"] for s in selections}
    assert len(picked) == 2
    for r in picked:
        assert r.data.tags["picked.rule"] == SPEC.get("export_rule", "max ca; r_asr <= 0.1; q_asr <= 0.1; fallback nearest")
        assert r.data.tags["picked.by"] in ("rule", "fallback")
    parent = client.get_run(out.parent_run_id)
    note = parent.data.tags["mlflow.note.content"]
    for r in picked:
        assert r.info.run_id in note
        # the picked run's own page opens on why it was picked, with its numbers
        assert r.data.tags["mlflow.note.content"].startswith(f"{r.data.tags['attack']}: picked ")
        assert "R-ASR" in r.data.tags["mlflow.note.content"]
    # what the parent's collapsed description shows first: per attack, a link to its front and to its pick
    state = json.loads((out.folder / "state.json").read_text())
    head = note.split("### Picks")[0]
    for attack, run_id in state["attack_runs"].items():
        line = next(line for line in head.splitlines() if line.startswith(f"- **{display(attack)}**"))
        assert f"[Pareto front](#/experiments/{exp.experiment_id}/runs/{run_id}?workflowType=machine_learning)" in line
        pick = next(r for r in picked if r.data.tags["attack"] == attack)
        assert f"runs/{pick.info.run_id}?workflowType=machine_learning" in line
    met = {s["attack"]: s["provenance"]["picked_by"] == "rule" for s in selections}
    for s in selections:  # the sweep's own export file warns as `bibau export` does
        assert ("warning" in s) == (s["provenance"]["picked_by"] == "fallback"), s
        if "warning" in s:
            assert s["warning"].startswith(f"WARNING: {s['attack']}: no trial meets the rule") and "chance level" in s["warning"]
    assert parent.data.tags["export.rule_met"] == str(all(met.values())).lower()
    # the warning is loud where the rule was not met: in the summary and on the parent run
    text = "\n".join(sweep["lines"])
    for attack, ok in met.items():
        assert (f"WARNING: {attack}: no trial meets the rule" in text) == (not ok), text[-3000:]
    state = json.loads((out.folder / "state.json").read_text())
    for attack, run_id in state["attack_runs"].items():
        run = client.get_run(run_id)
        assert "Pareto front" in run.data.tags["mlflow.note.content"]
        assert run.data.tags["export.rule_met"] == str(met[attack]).lower()
        assert run.data.metrics["attack_stage/num_classes"] == 10
        files = {a.path for a in client.list_artifacts(run_id, "pareto")}
        assert {"pareto/ca_vs_r_asr.png", "pareto/ca_vs_r_asr.pdf", "pareto/ca_vs_q_asr.png",
                "pareto/ca_vs_q_asr.pdf"} <= files
        png = client.download_artifacts(run_id, "pareto/ca_vs_r_asr.png", str(sweep["tmp"] / f"dl-{attack}"))
        from PIL import Image

        assert min(Image.open(png).info["dpi"]) >= 199


def test_the_sweeps_export_file_warns_as_bibau_export_does(sweep):
    from orchestrator.export import read_export

    (sel,) = read_export(sweep["out2"].export_file)["selections"]  # its spec's rule no trial can meet
    assert sel["provenance"]["picked_by"] == "fallback"
    assert sel["warning"].startswith("WARNING: badnets: no trial meets the rule") and "chance level 10.0%" in sel["warning"]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_report_tables_hold_mlflow_metrics_and_are_attached_to_the_parent_run(sweep, capsys):
    from orchestrator.cli import main

    out = sweep["out"]
    client = client_of(out)
    dest = sweep["tmp"] / "rep"
    assert main(["report", str(sweep["spec"]), "-o", str(dest), "--upload"]) == 0
    for name in ("tables.md", "tables.csv", "table1_ca_asr.tex", "table2_rasr_qasr.tex", "pareto_grid.png",
                 "pareto_grid.pdf"):
        assert (dest / name).is_file(), name
    from PIL import Image

    assert min(Image.open(dest / "pareto_grid.png").info["dpi"]) >= 199
    rows = _rows(dest / "tables.csv")
    state = json.loads((out.folder / "state.json").read_text())
    seen = set()
    for row in rows:
        if row["attack"] == "average":
            continue
        metrics = [m for m in ("ca", "asr", "r_asr", "q_asr") if row[m]]
        if row["kind"] == "undefended":  # the attack stage's model, from the attack run
            assert row["run_id"] == state["attack_runs"][row["attack"]]
            logged = client.get_run(row["run_id"]).data.metrics
            for m in metrics:
                assert float(row[m]) == logged[f"attack_stage/backdoored_{m}"]
            continue
        logged = client.get_run(row["run_id"]).data.metrics
        assert metrics, row
        for m in metrics:
            assert float(row[m]) == logged[m], (row, m)  # exactly MLflow's numbers
        rates_failed = any(float(row[m]) > 0.2 for m in metrics if m != "ca")
        assert row["failed"] == str(rates_failed or row["collapsed"] == "true").lower()
        seen.add((row["table"], row["attack"], row["defense"]))
    assert {(t, a, d) for t in ("table1_ca_asr", "table2_rasr_qasr") for a in ("badnets", "blended")
            for d in ("bibau_u", "ft")} <= seen
    # the tuned row is the rule's pick among BI-BAU(U)'s own trials, recomputed here from MLflow
    exp = client.get_experiment_by_name("digits-report")
    for attack in ("badnets", "blended"):
        trials = client.search_runs([exp.experiment_id], filter_string=f"tags.attack = '{attack}' and "
                                    "tags.defense = 'bibau_u' and tags.role = 'trial'")
        pts = [(t.data.metrics["ca"], t.data.metrics["r_asr"], t.data.metrics["q_asr"]) for t in trials]
        front = [trials[i] for i in pareto_front(pts, ["max", "min", "min"])]
        ok = [t for t in front if t.data.metrics["r_asr"] <= 0.1 and t.data.metrics["q_asr"] <= 0.1]
        if ok:
            expect = {max(ok, key=lambda t: t.data.metrics["ca"]).info.run_id}
        else:
            d = {t.info.run_id: math.dist([t.data.metrics[m] for m in ("ca", "r_asr", "q_asr")], [1, 0, 0])
                 for t in front}
            expect = {k for k, v in d.items() if v == min(d.values())}
        (row,) = [r for r in rows if r["table"] == "table1_ca_asr" and r["attack"] == attack
                  and r["defense"] == "bibau_u"]
        assert row["run_id"] in expect
        assert row["note"] == ("" if ok else "fallback")
    # the average column is the mean over the attacks
    for row in (r for r in rows if r["attack"] == "average" and r["ca"]):
        cells = [float(r["ca"]) for r in rows if r["table"] == row["table"] and r["defense"] == row["defense"]
                 and r["attack"] != "average" and r["ca"]]
        assert float(row["ca"]) == pytest.approx(sum(cells) / len(cells))
    md = (dest / "tables.md").read_text()
    assert "| No defense |" in md and "| BI-BAU (U) |" in md and "| FT |" in md
    for line in (x for x in md.splitlines() if x.startswith("| ")):  # bold never beside a failure mark
        assert not any("**" in c and re.search("[†✗]", c) for c in line.split("|")), line
    # attached to the sweep's parent run
    files = {a.path for a in client.list_artifacts(out.parent_run_id, "report")}
    assert {"report/tables.md", "report/tables.csv", "report/table1_ca_asr.tex", "report/pareto_grid.png",
            "report/pareto_grid.pdf"} <= files


def test_report_latex_compiles_or_has_the_booktabs_structure(sweep):
    from orchestrator.cli import main

    dest = sweep["tmp"] / "rep-tex"
    assert main(["report", str(sweep["out"].folder), "-o", str(dest), "--no-upload"]) == 0  # a sweep folder
    for tex in sorted(dest.glob("*.tex")):
        text = tex.read_text()
        body = text[text.index(r"\midrule"):text.index(r"\bottomrule")]
        columns = re.search(r"\\begin\{tabular\}\{(l c*)\}", text.replace("lc", "l c")).group(1)
        width = 1 + columns.count("c")
        for line in body.splitlines():
            if line.endswith(r"\\"):
                assert len(re.split(r"(?<!\\)&", line)) == width, line
        assert text.index(r"\toprule") < text.index(r"\midrule") < text.index(r"\bottomrule")
        assert text.count("{") == text.count("}") and "%" not in text.replace(r"\%", "")
        tex_bin = shutil.which("pdflatex")
        if tex_bin:
            doc = tex.with_name(tex.stem + "-doc.tex")
            doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + text
                           + "\\end{document}\n")
            subprocess.run([tex_bin, "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=dest, check=True,
                           stdout=subprocess.DEVNULL, timeout=120)


def test_several_sweeps_make_one_table(sweep):
    from orchestrator.cli import main

    out, out2 = sweep["out"], sweep["out2"]
    dest = sweep["tmp"] / "rep-two"
    assert main(["report", str(sweep["spec"]), str(sweep["other"]), "-o", str(dest), "--no-upload"]) == 0
    rows = _rows(dest / "tables.csv")
    cols = {(r["group"], r["attack"], r["sweep_id"]) for r in rows if r["attack"] != "average"}
    assert cols == {("digits-report", "badnets", out.sweep_id), ("digits-report", "blended", out.sweep_id),
                    ("digits-report-ft", "badnets", out2.sweep_id)}
    client = client_of(out2)
    (ft2,) = [r for r in rows if r["group"] == "digits-report-ft" and r["defense"] == "ft"
              and r["table"] == "table1_ca_asr"]
    exp = client.get_experiment_by_name(out2.experiment)  # the second spec's own experiment
    reps = client.search_runs([exp.experiment_id], filter_string=f"tags.sweep_id = '{out2.sweep_id}' and "
                              f"tags.role = 'replicate' and tags.of_run = '{ft2['run_id']}'")
    values = [client.get_run(ft2["run_id"]).data.metrics["ca"], *(r.data.metrics["ca"] for r in reps)]
    assert float(ft2["ca"]) == pytest.approx(sum(values) / len(values))  # replicates: 3, the mean of the seeds
    (gone,) = [r for r in rows if r["group"] == "digits-report-ft" and r["defense"] == "bibau_u"
               and r["table"] == "table1_ca_asr"]
    assert gone["note"] == "not run" and gone["ca"] == ""
    tex = (dest / "table1_ca_asr.tex").read_text()
    assert r"\multicolumn{2}{c}{digits-report}" in tex and r"\cmidrule(lr){2-3}" in tex


def test_replicates_rerun_the_baseline_with_other_seeds_and_the_report_gives_mean_std_n(sweep):
    from orchestrator.cli import main

    out2 = sweep["out2"]
    client = client_of(out2)
    exp = client.get_experiment_by_name(out2.experiment)  # the second spec's own experiment
    reps = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.sweep_id = '{out2.sweep_id}' and tags.role = 'replicate'")
    assert len(reps) == 2 and {r.data.tags["status"] for r in reps} == {"completed"}  # FT on BadNets, 2 more seeds
    assert {r.data.tags["replicate"] for r in reps} == {"1", "2"}
    assert len({r.data.params["defense_seed"] for r in reps}) == 2
    (searched,) = {r.data.tags["of_run"] for r in reps}
    assert client.get_run(searched).data.tags["defense"] == "ft"
    dest = sweep["tmp"] / "rep-seeds"
    assert main(["report", str(sweep["other"]), "-o", str(dest)]) == 0
    md = (dest / "tables.md").read_text()
    lines = [x for x in md.splitlines() if x.startswith("| FT |")]  # FT's row of each table
    assert lines and all("(n=3)" in x for x in lines) and lines[0].count(" ± ") >= 2, lines
    rows = [r for r in _rows(dest / "tables.csv") if r["defense"] == "ft" and r["attack"] == "badnets"]
    assert rows and all(r["n_seeds"] == "3" for r in rows)


def test_report_with_an_out_folder_writes_only_there_unless_upload(sweep, capsys):
    from orchestrator.cli import main

    out2 = sweep["out2"]
    dest = sweep["tmp"] / "rep-local"
    assert main(["report", str(sweep["other"]), "-o", str(dest)]) == 0
    assert (dest / "tables.md").is_file() and "attached" not in capsys.readouterr().out
    client = client_of(out2)
    assert not client.list_artifacts(out2.parent_run_id, "report")
    assert "report" not in client.get_run(out2.parent_run_id).data.tags


def test_export_says_loudly_when_no_trial_meets_the_rule_and_strict_fails(sweep, capsys):
    from orchestrator.cli import main
    from orchestrator.export import read_export

    out = sweep["out"]
    client = client_of(out)
    target = sweep["tmp"] / "strict.yaml"
    assert main(["export", str(sweep["spec"]), "--rule", IMPOSSIBLE, "--strict", "-o", str(target)]) == 1
    err = capsys.readouterr().err
    assert "no trial meets the rule" in err and "Traceback" not in err and "--strict" in err
    assert not target.exists()
    # without --strict: written, with the warning in the file, on stdout and as the parent's tag
    assert main(["export", str(sweep["spec"]), "--rule", IMPOSSIBLE, "-o", str(target)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("WARNING:") == 2 and "chance level 10.0%" in printed and "a drop of" in printed
    doc = read_export(target)
    assert all("no trial meets the rule" in s["warning"] for s in doc["selections"])
    parent = client.get_run(out.parent_run_id)
    assert parent.data.tags["export.rule_met"] == "false" and "WARNING" in parent.data.tags["export.warning"]
    # a rule every point meets: no warning, exit 0 with --strict, and the picked tag follows the new picks
    assert main(["export", str(sweep["spec"]), "--rule", "max ca", "--strict", "-o", str(target)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    doc = read_export(target)
    exp = client.get_experiment_by_name("digits-report")
    picked = client.search_runs([exp.experiment_id], filter_string="tags.picked = 'true'")
    assert {r.info.run_id for r in picked} == {s["provenance"]["run_id"] for s in doc["selections"]}
    assert {r.data.tags["picked.rule"] for r in picked} == {"max ca"}
    assert client.get_run(out.parent_run_id).data.tags["export.rule_met"] == "true"


def test_a_per_defense_export_tags_each_defenses_pick_and_a_later_per_attack_export_untags_them(sweep, capsys):
    from orchestrator.cli import main
    from orchestrator.export import read_export

    out = sweep["out"]
    client = client_of(out)
    exp = client.get_experiment_by_name("digits-report")
    target = sweep["tmp"] / "per-defense.yaml"

    def tagged() -> dict[str, dict]:
        runs = client.search_runs([exp.experiment_id], filter_string="tags.picked = 'true'")
        return {r.info.run_id: r.data.tags for r in runs}

    assert main(["export", str(sweep["spec"]), "--rule", "max ca", "--per-defense", "-o", str(target)]) == 0
    doc = read_export(target)
    assert {(s["attack"], s["defense"]) for s in doc["selections"]} == {
        (a, d) for a in ("badnets", "blended") for d in ("bibau_u", "ft")}
    tags = tagged()
    assert set(tags) == {s["provenance"]["run_id"] for s in doc["selections"]} and len(tags) == 4
    assert {t["picked.scope"] for t in tags.values()} == {"attack and defense"}
    # back to one pick per attack: the other defense's picks lose the tag
    assert main(["export", str(sweep["spec"]), "--rule", "max ca", "-o", str(target)]) == 0
    capsys.readouterr()
    doc = read_export(target)
    tags = tagged()
    assert set(tags) == {s["provenance"]["run_id"] for s in doc["selections"]} and len(tags) == 2
    assert {t["picked.scope"] for t in tags.values()} == {"attack"}


def test_report_errors_are_one_line(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["report", "no-such-experiment"]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    assert main(["report", "nowhere/spec.yaml"]) == 2
    assert "no such spec file" in capsys.readouterr().err


# -- the figures, on hand-made records ---------------------------------------------------------------------


def _rec(i, ca, r_asr=None, q_asr=None, defense="bibau_u", tuned=True, status="completed"):
    metrics = {"ca": ca, "asr": 0.05}
    if r_asr is not None:
        metrics |= {"r_asr": r_asr, "q_asr": q_asr}
    return TrialRecord(trial_id=f"t{i}", study=f"badnets/{defense}", attack="badnets", defense=defense,
                       status=status, metrics=metrics, tuned=tuned, order=i, run_id=f"run{i}")


def test_a_panel_skips_gated_trials_keeps_baselines_hollow_above_trials_and_draws_the_references(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from orchestrator.export import parse_rule
    from orchestrator.figures import draw_panel, save
    from orchestrator.results import attack_view
    from orchestrator.spec import Objective

    objectives = [Objective("ca", "max"), Objective("r_asr", "min"), Objective("q_asr", "min")]
    recs = [_rec(1, 0.8, 0.05, 0.04), _rec(2, 0.9, 0.5, 0.3), _rec(3, 0.7, status="gated"),
            _rec(4, 0.8, 0.05, 0.04, defense="ft", tuned=False)]  # the baseline exactly on trial 1
    for r in recs:
        r.metrics |= {"backdoored_ca": 0.92, "backdoored_asr": 0.99, "ra_clean_asr": 0.03}
    rule = parse_rule("max ca; r_asr <= 0.1; q_asr <= 0.1")
    view = attack_view("badnets", recs, {"attack_stage/num_classes": 10.0}, rule, objectives)
    assert view.pick.record.trial_id == "t1" and view.pick.rule_met
    assert view.chance == 0.1 and view.undefended == {"ca": 0.92, "asr": 0.99} and view.clean_reference == {"r_asr": 0.03}
    fig, ax = plt.subplots()
    left_out = draw_panel(ax, view, objectives[1], objectives[0], objectives, rule)
    assert left_out == 1  # the gated trial has no R-ASR
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "BI-BAU (U) trials" in labels and any(t.startswith("FT (baseline)") for t in labels)
    assert any("undefended model: CA 92.0%" in t for t in labels)
    assert "chance-level CA 10.0%" in labels and "clean reference model: R-ASR 3.0%" in labels
    assert any(t.startswith("rule: R-ASR") and "10.0%" in t for t in labels) and "picked (BI-BAU (U))" in labels
    assert ax.get_xlabel() == "ASR after the retuning attack, R-ASR (%)" and ax.get_ylabel() == "clean accuracy, CA (%)"
    by_label = {c.get_label(): c for c in ax.collections}
    trials, baseline = by_label["BI-BAU (U) trials"], next(c for k, c in by_label.items() if k.startswith("FT"))
    assert baseline.get_zorder() > trials.get_zorder()
    assert len(baseline.get_facecolors()) == 0 or baseline.get_facecolors()[0][3] == 0  # hollow: trial 1 shows
    assert [tuple(p) for p in trials.get_offsets()] == [(5.0, 80.0), (50.0, 90.0)]  # in %
    files = save(fig, tmp_path / "panel")
    assert [f.suffix for f in files] == [".png", ".pdf"] and all(f.stat().st_size > 0 for f in files)
    plt.close(fig)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (Debian: apt-get install chromium)")
def test_a_browser_reaches_the_front_and_the_pick_within_three_clicks(sweep, tmp_path):
    """The README's path through the MLflow UI, walked by headless Chromium from the URL the sweep
    prints: the attack's front (figure and linked table) in three clicks, the pick's metrics in two."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import mlflow_tour
    finally:
        sys.path.remove(str(ROOT / "docs"))
    db = Path(sweep["out"].tracking_uri.removeprefix("sqlite:///"))
    steps = mlflow_tour.tour(db, tmp_path, "badnets", "digits-report", "tour")
    clicks = [s for s in steps if s.startswith("click")]
    assert steps[0].startswith("open ") and "workflowType=machine_learning" in steps[0]
    assert max(int(s.split()[1].rstrip(":")) for s in clicks) <= 3, steps
    assert any("Pareto front" in s for s in clicks) and any("picked run" in s for s in clicks)
    for name in ("1-experiment", "2-sweep", "3-attack-front", "4-picked-trial"):
        png = tmp_path / f"tour-{name}.png"
        assert png.stat().st_size > 10_000  # a rendered page, not a blank one


def test_at_a_glance_says_kept_out_let_back_or_collapsed_with_the_numbers():
    """The report's first lines: per attack and defense, the verdict a reader takes away, which must
    agree with the numbers (a collapsed model is never 'keeps the backdoor out')."""
    from orchestrator.export import parse_rule
    from orchestrator.results import attack_view, glance
    from orchestrator.spec import Objective

    objectives = [Objective("ca", "max"), Objective("r_asr", "min"), Objective("q_asr", "min")]
    rule = parse_rule("max ca; r_asr <= 0.1; q_asr <= 0.1")
    undefended = {"attack_stage/num_classes": 10.0, "attack_stage/backdoored_ca": 0.9, "attack_stage/backdoored_asr": 0.99}

    def view_of(recs):
        for r in recs:
            r.metrics |= {"asr": r.metrics.get("q_asr", 0.0)}
        return attack_view("badnets", recs, undefended, rule, objectives)

    kept = glance(view_of([_rec(1, 0.85, 0.05, 0.02), _rec(2, 0.88, 0.6, 0.5),
                           _rec(3, 0.9, 0.97, 0.95, defense="ft", tuned=False)]))
    assert kept.startswith("BadNets: BI-BAU (U) (best of 2 trials by the rule) keeps the backdoor out after "
                           "reactivation (R-ASR 5.0%, Q-ASR 2.0%) at CA 85.0% (-5.0 points)"), kept
    assert "FT leaves the backdoor or lets it back (ASR 95.0%, R-ASR 97.0%, Q-ASR 95.0%)" in kept
    # every trial that removes the backdoor sits near chance: the nearest pick is called collapsed
    collapsed = glance(view_of([_rec(1, 0.12, 0.0, 0.0), _rec(2, 0.88, 0.6, 0.5)]))
    assert "collapses the model: CA 12.0%" in collapsed and "keeps the backdoor out" not in collapsed, collapsed
    missed = glance(view_of([_rec(1, 0.85, 0.5, 0.3)]))
    assert "(one trial, not meeting the rule) leaves the backdoor or lets it back" in missed, missed


def test_sweep_fronts_reads_each_studys_best_under_the_rule_and_the_defaults_row(sweep, tmp_path):
    """benchmarks/sweep_fronts.py: per attack and study, the best CA among the trials meeting the rule,
    recomputed here from the sweep's records; the defaults' trial of a tuned study as its own row;
    ``--trials`` keeps every trial's status, settings and metrics."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.sweep_fronts import rows_of

    dump = tmp_path / "trials.jsonl"
    rows = rows_of(str(sweep["spec"]), [], "max ca; r_asr <= 0.5; q_asr <= 0.5", None, dump)
    out = sweep["out"]
    trials = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(trials) == len(out.records)
    by_key = {(t["attack"], t["study"], t["order"]): t for t in trials}
    for r in out.records:
        t = by_key[(r.attack, r.study.split("/", 1)[-1], r.order)]
        assert t["status"] == r.status and t["params"] == pytest.approx(r.params)
        if r.status == "completed":
            assert t["metrics"]["ca"] == pytest.approx(r.metrics["ca"]) and "r_asr" in t["metrics"]
    for attack in ("badnets", "blended"):
        recs = [r for r in out.records if r.attack == attack and r.defense == "bibau_u"]
        ok = [r for r in recs if r.status == "completed" and r.metrics["r_asr"] <= 0.5 and r.metrics["q_asr"] <= 0.5]
        (row,) = [r for r in rows if r["attack"] == attack and r["study"] == "bibau_u"]
        assert row["met"] == bool(ok)
        if ok:
            assert row["best_ca"] == f"{100 * max(r.metrics['ca'] for r in ok):.1f}"
        assert row["trials"].startswith(f"{sum(r.status == 'completed' for r in recs)} / ")
        (ft,) = [r for r in rows if r["attack"] == attack and r["study"] == "ft"]
        assert ft["settings"] == "(fixed)"
