"""The end of a sweep in MLflow: per attack, the Pareto trials tagged, the front and every trial
as CSV, the figures (``figures.py``) and the hypervolume curve as artifacts, the export rule's
picks tagged with the runs' descriptions (``results.py``), the export file's warnings; then the
runs closed. Works on any tracker with a client and the sweep's state (``tracking_write.SweepTracker``).
"""
from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .export_file import read_export, write_export
from .figures import attack_figures, plot_growth, save
from .pareto import TrialRecord, front_of, growth
from .results import add_warnings, attack_view, tag_picks
from .rules import DEFAULT_RULE, parse_rule


def finish_sweep(tracker, records: list[TrialRecord], objectives: Sequence, *, export_file: Path | None = None,
                 status: str = "FINISHED", rule=None, extra_metrics: dict[str, float] | None = None,
                 failed_attacks: dict[str, str] | None = None) -> dict[str, list[TrialRecord]]:
    """Tag the Pareto trials, log each attack's front, plots and hypervolume; with the export
    ``rule``, tag its picks and write the runs' descriptions (warnings in ``tracker.pick_warnings``);
    close the runs (an attack whose attack stage failed, in ``failed_attacks`` with its reason,
    as FAILED). Returns attack -> its Pareto front."""
    rule = rule or parse_rule(DEFAULT_RULE)
    state = tracker.state()
    views = []
    metrics = [o.metric for o in objectives]
    modes = [o.mode for o in objectives]
    ref = [o.reference for o in objectives]
    fronts: dict[str, list[TrialRecord]] = {}
    for attack, run in state["attack_runs"].items():
        recs = [r for r in records if r.attack == attack]
        front = front_of(recs, metrics, modes)
        fronts[attack] = front
        on_front = {r.trial_id for r in front}
        for r in recs:
            if r.run_id:
                tracker.client.set_tag(r.run_id, "pareto", "true" if r.trial_id in on_front else "false")
        curve = growth(recs, metrics, modes, ref)
        tracker.client.log_text(run, records_csv(front, metrics), "pareto/front.csv")
        tracker.client.log_text(run, records_csv(recs, metrics), "pareto/trials.csv")
        tracker.client.log_text(run, "trials,hypervolume\n" + "".join(f"{k},{v:.6g}\n" for k, v in curve),
                                "pareto/hypervolume.csv")
        view = attack_view(attack, recs, dict(tracker.client.get_run(run).data.metrics), rule, objectives)
        views.append(view)
        with tempfile.TemporaryDirectory() as d:
            for name, fig in attack_figures(view, objectives, rule).items():
                save(fig, Path(d) / name)  # PNG at 200 dpi and PDF
            fig = plot_growth(attack, curve)
            if fig is not None:
                save(fig, Path(d) / "hypervolume", formats=("png",))
            tracker.client.log_artifacts(run, d, "pareto")
        tracker.log_batch(run, metrics={
            "pareto_size": len(front), "hypervolume_final": curve[-1][1] if curve else 0.0,
            "trials_completed": sum(r.status == "completed" for r in recs),
            "trials_gated": sum(r.status == "gated" for r in recs),
            "trials_failed": sum(r.status not in ("completed", "gated") for r in recs)})
        if attack in (failed_attacks or {}):  # its studies never ran: not a finished attack
            tracker.client.set_tag(run, "status", "failed")
            tracker.client.set_tag(run, "failure", failed_attacks[attack][:5000])
            tracker.client.set_terminated(run, "FAILED")
        else:
            tracker.client.set_terminated(run, status)
    parent = state["parent_run_id"]
    tracker.pick_warnings = tag_picks(tracker.client, views, rule.text, state["attack_runs"], parent, objectives,
                                      experiment_id=state.get("experiment_id"), sweep_id=tracker.sweep_id)
    allf = [r for f in fronts.values() for r in f]
    tracker.client.log_text(parent, records_csv(allf, metrics), "pareto/fronts.csv")
    if export_file is not None and Path(export_file).is_file():
        doc = read_export(export_file)  # the same warning: lines as `bibau export` writes
        if add_warnings(doc, {v.attack: v for v in views}):
            write_export(doc, export_file)
        tracker.client.log_artifact(parent, str(export_file), "export")
    tracker.log_batch(parent, metrics={"trials": len(records),
                                       "trials_gated": sum(r.status == "gated" for r in records),
                                       "trials_failed": sum(r.status not in ("completed", "gated") for r in records),
                                       **(extra_metrics or {})})
    tracker.client.set_terminated(parent, status)
    tracker.save_state(status="finished" if status == "FINISHED" else "failed")
    return fronts


def records_csv(records: Sequence[TrialRecord], metrics: Sequence[str]) -> str:
    keys = sorted({k for r in records for k in r.params})
    extra = sorted({k for r in records for k in r.metrics} - set(metrics))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["attack", "defense", "trial_id", "run_id", "status", "order", *metrics, *keys, *extra])
    for r in sorted(records, key=lambda r: r.order):
        w.writerow([r.attack, r.defense, r.trial_id, r.run_id or "", r.status, r.order,
                    *(_fmt(r.metrics.get(m)) for m in metrics), *(r.params.get(k, "") for k in keys),
                    *(_fmt(r.metrics.get(m)) for m in extra)])
    return buf.getvalue()


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v)
