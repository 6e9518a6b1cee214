"""``bibau report``: the paper's tables (Table 1: CA / ASR, Table 2: R-ASR / Q-ASR, and BEC) and
a figure grid from what one or more sweeps recorded in MLflow.

Rows are the undefended model, each fixed baseline as it ran, and each tuned defense at the
export rule's pick among its own trials; columns are the attacks (grouped by sweep, e.g. one
per data set, when several are combined) and their average. A rate above the failure
threshold is marked (a failed defense), so is a CA below the attack's collapse floor
(``results.ca_floor``: the gate's, else half way from chance to the undefended model), and a
pick the rule was not met for. The best value of each column is bold, chosen only among the
cells that carry no failure mark: a collapsed model's low ASR is never "best". Rows and columns
use the display names of ``names.py``. Written as Markdown, LaTeX (booktabs) and CSV (one row
per cell, the metrics at full precision, with the MLflow run they come from), plus the grid
(attacks x the objectives after CA) as PNG and PDF, and attached to each sweep's parent run.
The tables are built in ``report_tables.py`` and written in ``report_formats.py``; this module
finds the sweeps, writes the files and attaches them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from trainables.config import ConfigError

from .figures import grid_figure, save
from .mlflow_client import RetryingClient
from .report_formats import spread_notes, tex_escape, to_csv, to_latex, to_markdown
from .report_tables import (FAIL_ASR, NAMES, TABLES, UNDEFENDED_ROW, Cell, SweepResults, Table, build_tables,
                            cell, load_sweep, tuning_line)
from .results import AttackView, fallback_warning, gate_of, glance
from .spec import load_spec, spec_fingerprint
from .tracking_read import read_state

# the tables' names (tests and tools import them from here): built in report_tables.py, written in report_formats.py
__all__ = ["Cell", "FAIL_ASR", "NAMES", "SweepResults", "TABLES", "Table", "UNDEFENDED_ROW", "add_report", "build_tables",
           "cell", "cmd_report", "grid_rows", "load_sweep", "report", "resolve_source", "spread_notes", "tex_escape",
           "to_csv", "to_latex", "to_markdown", "tuning_line", "write_report"]


# -- sources, writing, attaching ----------------------------------------------------------------------------


def resolve_source(source: str, *, tracking_uri: str | None = None, overrides: Sequence[str] = ()) -> dict:
    """A spec file, a sweep folder (or the folder of a spec's sweeps) or an MLflow experiment name ->
    where its sweep lives: uri, experiment, sweep_id / fingerprint, folder."""
    path = Path(source)
    if path.is_file():
        spec, _ = load_spec(str(path), list(overrides))
        return {"uri": tracking_uri or spec.tracking_uri, "experiment": spec.experiment, "sweep_id": None,
                "fingerprint": spec_fingerprint(spec), "folder": None, "storage": spec.storage_path / spec.name}
    if path.is_dir():
        states = [path / "state.json"] if (path / "state.json").is_file() else sorted(
            path.glob("*/state.json"), key=lambda p: p.stat().st_mtime)
        states = [s for s in states if read_state(s).get("status") == "finished"] or states
        if not states:
            raise ConfigError(f"{source}: not a sweep folder (no state.json in it or in its subfolders)")
        state = read_state(states[-1])
        missing = [k for k in ("tracking_uri", "experiment", "sweep_id") if not state.get(k)]
        if missing:
            raise ConfigError(f"{states[-1]}: no {missing[0]}; the sweep never reached MLflow")
        return {"uri": tracking_uri or state["tracking_uri"], "experiment": state["experiment"],
                "sweep_id": state["sweep_id"], "fingerprint": None, "folder": states[-1].parent}
    if source.endswith((".yaml", ".yml")) or "/" in source:
        raise ConfigError(f"{source}: no such spec file or sweep folder")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{source}: not a file or folder, so read as an MLflow experiment name; give its "
                          "--tracking-uri (or set MLFLOW_TRACKING_URI)")
    return {"uri": uri, "experiment": source, "sweep_id": None, "fingerprint": None, "folder": None}


def _groups(sweeps: list[SweepResults]) -> None:
    """Column groups: the data set, unless two sweeps share one (then the sweep's name or id)."""
    datasets = [s.dataset for s in sweeps]
    for s in sweeps:
        s.group = s.dataset if datasets.count(s.dataset) == 1 else s.spec.get("name", s.sweep_id)
    names = [s.group for s in sweeps]
    for s in sweeps:
        if names.count(s.group) > 1:
            s.group = s.sweep_id


def grid_rows(sweeps: Sequence[SweepResults]) -> list[tuple]:
    return [(f"{s.group}: {a}" if len(sweeps) > 1 else a, v, s.objectives, s.rule)
            for s in sweeps for a, v in s.views.items()]


def write_report(sweeps: list[SweepResults], out: Path, fail_asr: float = FAIL_ASR) -> list[Path]:
    _groups(sweeps)
    tables = build_tables(sweeps, fail_asr)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    md = [f"# Results: {', '.join(f'{s.sweep_id} ({s.dataset})' for s in sweeps)}", ""]
    for s in sweeps:
        md.append(f"- sweep `{s.sweep_id}`: experiment `{s.experiment}` at `{s.uri}`, parent run `{s.parent_run_id}`, "
                  f"export rule `{s.rule.text}`")
        md.append(f"  - {tuning_line(s.spec)}")
    md += ["", "### At a glance", ""]
    md += [f"- {glance(v, gate_of(s.spec), fail_asr)}" for s in sweeps for v in s.views.values()]
    md.append("")
    for t in tables:
        md.append(to_markdown(t))
        path = out / f"{t.stem}.tex"
        path.write_text(to_latex(t))
        files.append(path)
    gated = sum(1 for s in sweeps for v in s.views.values() for r in v.records
                if r.status in ("completed", "gated") and any(o.metric not in r.metrics for o in s.objectives[1:]))
    if gated:
        md.append(f"{gated} trial(s) stopped before R-ASR/Q-ASR (gated) are in no R-ASR/Q-ASR cell or panel.")
    notes = [w for s in sweeps for v in s.views.values() for w in [_warn(v)] if w]
    md += [*notes, "", "![Pareto fronts](pareto_grid.png)", ""]
    path = out / "tables.md"
    path.write_text("\n".join(md))
    files.insert(0, path)
    path = out / "tables.csv"
    path.write_text(to_csv(tables, sweeps))
    files.append(path)
    files += save(grid_figure(grid_rows(sweeps)), out / "pareto_grid")
    return files


def _warn(view: AttackView) -> str | None:
    return fallback_warning(view)


def attach(sweeps: Sequence[SweepResults], out: Path) -> None:
    """The report's files as artifacts of each sweep's parent run (``report/``)."""
    from mlflow.tracking import MlflowClient

    for s in sweeps:
        client = RetryingClient(MlflowClient(tracking_uri=s.uri))
        client.log_artifacts(s.parent_run_id, str(out), "report")
        client.set_tag(s.parent_run_id, "report", "report/tables.md")


def report(sources: Sequence[str], *, out: str | Path | None = None, tracking_uri: str | None = None,
           overrides: Sequence[str] = (), sweep_id: str | None = None, rule: str | None = None,
           fail_asr: float = FAIL_ASR, upload: bool = True, log=print) -> list[Path]:
    if sweep_id and len(sources) != 1:
        raise ConfigError(f"--sweep {sweep_id}: names one sweep; give one source with it")
    sweeps = []
    for source in sources:
        where = resolve_source(source, tracking_uri=tracking_uri, overrides=overrides)
        sweeps.append(load_sweep(where["uri"], where["experiment"], sweep_id=sweep_id or where["sweep_id"],
                                 fingerprint=where["fingerprint"], rule=rule, folder=where["folder"]))
        if sweeps[-1].folder is None and where.get("storage") and (where["storage"] / sweeps[-1].sweep_id).is_dir():
            sweeps[-1].folder = where["storage"] / sweeps[-1].sweep_id
    if out is None:
        out = sweeps[0].folder / "report" if len(sweeps) == 1 and sweeps[0].folder else \
            Path("reports") / "+".join(s.sweep_id for s in sweeps)
    out = Path(out)
    files = write_report(sweeps, out, fail_asr)
    for f in files:
        log(f"wrote {f}")
    for s in sweeps:
        for v in s.views.values():
            w = _warn(v)
            if w:
                log(w)
    if upload:
        attach(sweeps, out)
        log("attached to the parent run(s) in MLflow under report/: "
            + ", ".join(f"{s.sweep_id} ({s.parent_run_id})" for s in sweeps))
    return files


def cmd_report(args) -> int:
    if not 0.0 <= args.fail_asr <= 1.0:
        raise ConfigError(f"--fail-asr: {args.fail_asr}; a rate in [0, 1] (e.g. 0.2 for 20%)")
    # -o DIR: the report goes to DIR only, unless --upload; the default folder is also attached to MLflow
    upload = args.upload if args.upload is not None else args.out is None
    report(args.sources, out=args.out, tracking_uri=args.tracking_uri, overrides=args.overrides,
           sweep_id=args.sweep, rule=args.rule, fail_asr=args.fail_asr, upload=upload)
    return 0


def add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="the paper's tables (CA/ASR, R-ASR/Q-ASR, BEC) and a Pareto figure grid from sweeps",
        description="Rows: the undefended model, each fixed baseline as run, each tuned defense at the export "
        "rule's pick; columns: the attacks of each sweep and their average. Written as Markdown, LaTeX (booktabs) "
        "and CSV, with the figure grid as PNG and PDF, and attached to each sweep's parent run in MLflow. "
        "Several sources make one table (e.g. one sweep per data set).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a sweep spec YAML (its newest sweep), a sweep folder (<storage>/<name>/<sweep id>, or "
                   "<storage>/<name> for its newest), or an MLflow experiment name (with --tracking-uri)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="spec overrides the sweep ran with (e.g. storage)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the spec's or the sweep's)")
    p.add_argument("--sweep", help="sweep id (one source only; default: the newest sweep of the source)")
    p.add_argument("--rule", help="export rule that picks each tuned defense's row (default: the spec's export_rule)")
    p.add_argument("--fail-asr", type=float, default=FAIL_ASR,
                   help=f"ASR, R-ASR or Q-ASR above this marks a failed defense (default {FAIL_ASR})")
    p.add_argument("-o", "--out", help="folder to write, and the only place written unless --upload (default: "
                   "<sweep folder>/report, else reports/<sweep ids>, also attached to MLflow)")
    up = p.add_mutually_exclusive_group()
    up.add_argument("--upload", dest="upload", action="store_true", default=None,
                    help="also attach the report to the parent run(s) in MLflow (under report/); the default "
                    "without -o")
    up.add_argument("--no-upload", dest="upload", action="store_false",
                    help="do not attach the report to MLflow (the default with -o)")
    p.set_defaults(func=cmd_report)
