"""The report's marks on a hand-built sweep result: a collapsed model (CA near chance) is marked as a
failure and never bold, bold and a failure mark never share a cell, each mark sits on the number
it qualifies, the gate's floor wins over the default one, display names everywhere a person reads."""
from __future__ import annotations

import re

import pytest

from orchestrator.export import parse_rule
from orchestrator.pareto import TrialRecord
from orchestrator.report import SweepResults, build_tables, to_csv, to_latex, to_markdown
from orchestrator.results import attack_view, ca_floor
from orchestrator.spec import Objective

OBJECTIVES = [Objective("ca", "max"), Objective("r_asr", "min"), Objective("q_asr", "min")]
RULE = parse_rule("max ca; r_asr <= 0.1; q_asr <= 0.1")


def _rec(i, attack, defense, ca, asr, r_asr, q_asr, tuned):
    return TrialRecord(trial_id=f"t{i}", study=f"{attack}/{defense}", attack=attack, defense=defense,
                       status="completed", tuned=tuned, order=i, run_id=f"run{i}",
                       metrics={"ca": ca, "asr": asr, "r_asr": r_asr, "q_asr": q_asr,
                                "backdoored_ca": 0.9, "backdoored_asr": 1.0})


def _sweep(gate=None):
    # badnets: BI-BAU(U) collapsed (CA 25.9%, chance 10%) with the lowest rates; FT keeps CA but
    # leaves the backdoor (ASR 65.02%: the lowest ASR among the honest cells, still failed); NC sound
    # blended: every defense either collapsed or failed: no bold anywhere in the column
    recs = [_rec(1, "badnets", "bibau_u", 0.259, 0.01, 0.02, 0.03, True),
            _rec(2, "badnets", "ft", 0.85, 0.6502, 0.9, 0.8, False),
            _rec(3, "badnets", "nc", 0.80, 0.70, 0.5, 0.4, False),
            _rec(4, "blended", "bibau_u", 0.142, 0.0, 0.01, 0.0, True),
            _rec(5, "blended", "ft", 0.86, 0.9, 0.95, 0.9, False),
            _rec(6, "blended", "nc", 0.87, 0.5, 0.6, 0.7, False)]
    recs[2].metrics["asr"] = 0.05  # nc on badnets: a sound defense
    views = {a: attack_view(a, recs, {"attack_stage/num_classes": 10.0, "attack_stage/backdoored_ca": 0.9,
                                      "attack_stage/backdoored_asr": 1.0}, RULE, OBJECTIVES)
             for a in ("badnets", "blended")}
    spec = {"name": "marks", "attacks": ["badnets", "blended"], "gate": gate}
    return SweepResults("file:///nowhere", "marks", "s1", "p1", spec, OBJECTIVES, RULE, views,
                        [("ft", "baseline"), ("nc", "baseline"), ("bibau_u", "tuned")], "digits")


def _row(md: str, name: str) -> list[str]:
    (line,) = [x for x in md.splitlines() if x.startswith(f"| {name} |")]
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_a_collapsed_model_is_marked_failed_and_never_best():
    sweep = _sweep()
    assert ca_floor(sweep.views["badnets"]) == pytest.approx(0.1 + 0.5 * (0.9 - 0.1))
    table1, table2 = build_tables([sweep])[:2]
    md = to_markdown(table1)
    bibau, ft, nc = _row(md, "BI-BAU (U)"), _row(md, "FT"), _row(md, "NC")
    assert bibau[0] == "25.90✗ / 1.00" and bibau[1] == "14.20✗ / 0.00"  # the cross on CA, no bold
    assert ft[0] == "85.00 / 65.02†"  # the lowest ASR of the honest cells is still a failure: not bold
    assert nc[0] == "**80.00** / **5.00**"  # the only sound defense is the best of its column
    assert "**" not in nc[1] + ft[1] + bibau[1]  # blended: every defense failed or collapsed
    assert "| defense | BadNets | Blended | Avg |" in md
    for md_text in (md, to_markdown(table2)):
        for line in (x for x in md_text.splitlines() if x.startswith("| ")):
            for cell in line.split("|"):
                assert not ("**" in cell and re.search("[†✗]", cell)), cell
    md2 = to_markdown(table2)
    assert _row(md2, "BI-BAU (U)")[0] == "2.00 / 3.00 ✗"  # no CA here: the cross after the cell
    assert "**" not in _row(md2, "BI-BAU (U)")[0] and "**" not in "".join(_row(md2, "FT"))
    rows = {(r.split(",")[0], r.split(",")[3], r.split(",")[4]): r for r in to_csv([table1], [sweep]).splitlines()[1:]}
    assert ",true,true," in rows[("table1_ca_asr", "badnets", "bibau_u")]  # failed and collapsed
    assert ",false,false,ca asr" in rows[("table1_ca_asr", "badnets", "nc")]


def test_the_gates_floor_wins_and_the_latex_caption_is_not_numbered_twice():
    sweep = _sweep(gate={"ca_min": 0.2})
    assert ca_floor(sweep.views["badnets"], sweep.spec["gate"]) == 0.2
    table1 = build_tables([sweep])[0]
    bibau = _row(to_markdown(table1), "BI-BAU (U)")
    assert bibau[0] == "25.90 / **1.00**" and bibau[1] == "14.20✗ / 0.00"  # above 20% on badnets only
    tex = to_latex(table1)
    assert r"\caption{clean accuracy" in tex and "Table 1:" not in tex
    assert r"25.90 / \textbf{1.00}" in tex and r"14.20$^{\times}$" in tex and "BI-BAU (U)" in tex


def test_the_grid_is_camera_ready_one_legend_outside_one_front_per_panel_truetype_pdf(tmp_path):
    from matplotlib.lines import Line2D

    from orchestrator.figures import grid_figure, save
    from orchestrator.report import grid_rows

    sweep = _sweep()
    fig = grid_figure(grid_rows([sweep]))
    axes = [ax for ax in fig.axes if ax.axison]
    assert len(axes) == 4 and len(fig.legends) == 1
    assert all(ax.get_legend() is None for ax in axes)  # no legend over the data
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(labels) == len(set(labels))
    assert "BI-BAU (U) trials" in labels and "FT (baseline)" in labels and "NC (baseline)" in labels
    assert "undefended model" in labels and "chance-level CA" in labels and any(t.startswith("picked") for t in labels)
    for ax in axes:
        fronts = [ln for ln in ax.get_lines() if isinstance(ln, Line2D) and ln.get_drawstyle().startswith("steps")]
        assert len(fronts) == 1  # the 2-D front of this panel's objectives, nothing else
        assert ax.get_title().startswith(("BadNets", "Blended"))
        assert ax.xaxis.label.get_size() >= 8 and min(t.get_size() for t in ax.get_xticklabels()) >= 7
    # the legend sits below every panel, outside the data
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(legend_box.y1 <= ax.get_window_extent().y0 for ax in axes)
    (pdf,) = [f for f in save(fig, tmp_path / "grid") if f.suffix == ".pdf"]
    data = pdf.read_bytes()
    assert b"/Type3" not in data and (b"/TrueType" in data or b"/CIDFontType2" in data)


def test_replicated_cells_are_mean_std_n_and_the_report_says_which_differ_beyond_their_spread(tmp_path):
    from orchestrator.figures import grid_figure
    from orchestrator.report import grid_rows, spread_notes
    from orchestrator.report_tables import _spread
    from orchestrator.replicates import differ, replicate_config, spread

    assert spread([0.1, 0.3]) == pytest.approx((0.2, 0.1414213, 2))
    assert differ((0.8, 0.01, 3), (0.5, 0.02, 3)) and not differ((0.8, 0.1, 3), (0.75, 0.1, 3))
    cfg = replicate_config({"seed": 3, "evaluation": {"seed": 42}, "data": {"seed": 1}}, 2)
    assert cfg["defense_seed"] == 5 and cfg["evaluation"]["seed"] == 44 and cfg["seed"] == 3 and cfg["data"]["seed"] == 1
    sweep = _sweep()
    # nc and ft on badnets, three seeds each: nc's ASR 5, 7, 3 (%), ft's 65.02, 60, 70
    sweep.replicates = {"run3": {1: {"ca": 0.84, "asr": 0.07, "r_asr": 0.52, "q_asr": 0.41},
                                 2: {"ca": 0.76, "asr": 0.03, "r_asr": 0.48, "q_asr": 0.39}},
                        "run2": {1: {"ca": 0.86, "asr": 0.60, "r_asr": 0.91, "q_asr": 0.8},
                                 2: {"ca": 0.84, "asr": 0.70, "r_asr": 0.89, "q_asr": 0.8}}}
    view = sweep.views["badnets"]
    view.spread = {r.run_id: _spread(r.metrics, sweep.replicates[r.run_id]) for r in view.records
                   if r.run_id in sweep.replicates}
    table1 = build_tables([sweep])[0]
    md = to_markdown(table1)
    assert _row(md, "NC")[0] == "**80.00 ± 4.00** / **5.00 ± 2.00** (n=3)"
    assert _row(md, "FT")[0] == "85.00 ± 1.00 / 65.01 ± 5.00† (n=3)"
    notes = spread_notes(table1)
    assert any("BadNets, ASR: FT 65.01 ± 5.00 (n=3) vs NC 5.00 ± 2.00 (n=3): differ beyond their spread" in n
               for n in notes), notes
    assert any("BadNets, CA: FT" in n and "within their spread" in n for n in notes), notes
    assert "differ beyond their spread" in md
    fig = grid_figure(grid_rows([sweep]))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "mean ± std over the seeds" in labels
