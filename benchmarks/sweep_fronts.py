"""What a sweep found, per attack and study, read back from MLflow: trials run (completed, gated,
failed), the best CA among trials that meet a rule (default: R-ASR and Q-ASR <= 20%, BI-BAU-cost's
question) with that trial's settings, and the CA, ASR, R-ASR and Q-ASR of a fixed study (the
registered defaults) beside it. Works on a finished sweep and on one still running or stopped
(the rows say how many trials each study had); a later ``bibau sweep SPEC --resume`` completes it.

    python benchmarks/sweep_fronts.py search_spaces/cifar10_cpu_bibau.yaml --set storage=/work/sweep/runs/sweeps
    python benchmarks/sweep_fronts.py search_spaces/cifar10_cpu_bibau.yaml --record
    python benchmarks/sweep_fronts.py search_spaces/cifar10_cpu_bibau.yaml --trials docs/data/SWEEP-trials.jsonl

``--trials`` writes every trial (attack, study, status, sampled settings, metrics) as JSON lines: a
sweep's raw numbers outlive the machine its MLflow store was on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from benchmarks.common import DOC, append_rows, machine  # noqa: E402

SECTION = "## BI-BAU's sweep at the CPU scale (benchmarks/sweep_fronts.py)"
SECTION_TEXT = f"""{SECTION}

Per attack and study of a sweep: the trials it ran (completed / gated by the cheap-first gate /
failed), the best CA among the trials meeting the rule, that trial's CA drop from the undefended
model and its settings; the fixed studies (the registered defaults, FT) as they ran. A miss is a
miss: "none" where no trial meets the rule.
"""
HEADER = ("| date | sweep | attack | study | trials (done / gated / failed) | rule | best CA | CA drop | ASR | R-ASR | "
          "Q-ASR | settings | command |")


def _pct(v) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def trial_rows(records, sweep_id: str) -> list[dict]:
    """One plain mapping per trial, in completion order (``--trials``)."""
    return [{"sweep": sweep_id, "attack": r.attack, "study": r.study.split("/", 1)[-1], "order": r.order,
             "status": r.status, "tuned": r.tuned, "params": r.params,
             "metrics": {k: v for k, v in sorted(r.metrics.items()) if isinstance(v, (int, float)) and math.isfinite(v)},
             **({"error": r.error} if r.error else {})}
            for r in sorted(records, key=lambda r: (r.attack, r.study, r.order))]


def rows_of(spec_path: str, overrides: list[str], rule_text: str, sweep_id: str | None,
            trials_out: Path | None = None) -> list[dict]:
    from orchestrator.objectives import Objective
    from orchestrator.rules import parse_rule
    from orchestrator.search import default_params
    from orchestrator.spec import load_spec
    from orchestrator.tracking_read import open_sweep

    spec, plan = load_spec(spec_path, overrides)
    # what each tuned study enqueued as its first trial (the registered defaults, fitted to the space)
    defaults = {st.key: default_params(st) for st in plan.studies if st.space}
    tracker, logged = open_sweep(spec.tracking_uri, spec.experiment, sweep_id)
    objectives = [Objective(**o) for o in logged["objectives"]]
    metrics = [o.metric for o in objectives]
    rule = parse_rule(rule_text, metrics)
    records = tracker.records()
    if trials_out is not None:
        trials_out.parent.mkdir(parents=True, exist_ok=True)
        trials_out.write_text("".join(json.dumps(t, default=str) + "\n" for t in trial_rows(records, tracker.sweep_id)))
    state = tracker.state()
    undefended = {a: dict(tracker.client.get_run(run).data.metrics) for a, run in state.get("attack_runs", {}).items()}
    out = []
    for attack in sorted({r.attack for r in records}):
        base_ca = undefended.get(attack, {}).get("attack_stage/backdoored_ca")
        for study in sorted({r.study for r in records if r.attack == attack}, key=lambda s: (s.endswith("ft"), s)):
            recs = [r for r in records if r.attack == attack and r.study == study]
            meeting = [r for r in recs if r.status == "completed" and rule.feasible(r)]
            tuned = any(r.tuned for r in recs)
            best = max(meeting, key=lambda r: r.metrics.get("ca", -1.0)) if meeting else None
            shown = best if best is not None or tuned else (recs[0] if recs else None)
            rows = [(study.split("/", 1)[-1], shown, best is not None)]
            first = defaults.get(study)
            default = next((r for r in recs if first and r.params and all(
                math.isclose(float(r.params.get(k, math.nan)), float(v), rel_tol=1e-6) for k, v in first.items())),
                None) if len(recs) > 1 else None
            if default is not None:  # the study's first trial: the registered defaults, the row to beat
                rows.append((study.split("/", 1)[-1] + " (defaults)", default, default.status == "completed"
                             and rule.feasible(default)))
            for label, shown, met in rows:
                out.append(_row(tracker.sweep_id, attack, label, recs if "(defaults)" not in label else [shown],
                                rule, shown, met, base_ca, tuned and "(defaults)" not in label))
    return out


def _row(sweep, attack, label, recs, rule, shown, met, base_ca, tuned) -> dict:
    m = shown.metrics if shown is not None else {}
    done = sum(r.status == "completed" for r in recs)
    gated = sum(r.status == "gated" for r in recs)
    running = sum(r.status == "running" for r in recs)
    failed = len(recs) - done - gated - running
    settings = ""
    if shown is not None and tuned:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(shown.params.items()))
    return {"sweep": sweep, "attack": attack, "study": label,
            "trials": f"{done} / {gated} / {failed}" + (f" (+{running} running)" if running else ""),
            "rule": rule.text, "best_ca": _pct(m.get("ca")) if shown is not None else "none", "met": met,
            "ca_drop": _pct(base_ca - m["ca"]) if base_ca is not None and m.get("ca") is not None else "-",
            "asr": _pct(m.get("asr")), "r_asr": _pct(m.get("r_asr")), "q_asr": _pct(m.get("q_asr")),
            "settings": settings or ("registered defaults" if label.endswith("(defaults)") else "(fixed)" if not tuned else "")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="the sweep spec (gives the tracking URI and experiment)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec overrides (e.g. storage)")
    p.add_argument("--sweep", help="sweep id (default: the newest of the experiment)")
    p.add_argument("--rule", default="max ca; r_asr <= 0.2; q_asr <= 0.2", help="what a trial must meet")
    p.add_argument("--record", action="store_true", help="append the rows to the results page")
    p.add_argument("--doc", type=Path, default=DOC, help="results page (default docs/benchmarks.md)")
    p.add_argument("--trials", type=Path, metavar="FILE", help="also write every trial (status, settings, metrics) "
                   "to FILE as JSON lines")
    args = p.parse_args(argv)
    rows = rows_of(args.spec, args.set, args.rule, args.sweep, args.trials)
    for r in rows:
        best = r["best_ca"] if r["met"] or not r["settings"].count("=") else f"none ({r['best_ca']})"
        print(f"{r['attack']:10s} {r['study']:18s} {r['trials']:>12s}  CA {best:>12s}  drop {r['ca_drop']:>5s}  "
              f"ASR {r['asr']:>5s}  R-ASR {r['r_asr']:>5s}  Q-ASR {r['q_asr']:>5s}  {r['settings']}")
    if args.record:
        # the spec path and --sweep, never the machine's storage folder, make the command others can run
        command = "python benchmarks/sweep_fronts.py " + shlex.join([args.spec] + (["--sweep", args.sweep] if args.sweep else [])
                                                                    + (["--rule", args.rule] if args.rule != p.get_default("rule") else []))
        today = datetime.date.today().isoformat()
        lines = [f"| {today} | {r['sweep']} | {r['attack']} | {r['study']} | {r['trials']} | {r['rule']} | "
                 f"{r['best_ca'] if r['met'] or r['settings'] == '(fixed)' else 'none'} | {r['ca_drop']} | {r['asr']} | "
                 f"{r['r_asr']} | {r['q_asr']} | {r['settings']} | `{command}` |" for r in rows]
        append_rows(SECTION, SECTION_TEXT, HEADER, lines, args.doc)
        print(f"recorded {len(lines)} row(s) ({machine()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
