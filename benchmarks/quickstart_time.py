"""The README's first command, timed as a new user meets it: ``bibau sweep search_spaces/quickstart.yaml``
on a fresh storage folder (no model cache, no Optuna studies, a new MLflow SQLite file), end to end
as a command (interpreter start, Ray start, attack stage, both studies, fronts, export). Then it
reads back what landed in MLflow: the parent, attack and trial runs, the trials' status and
``pareto`` tags, each attack run's artifacts, and the export file. Target (issue 4): under 10
minutes on 2 cores.

    python benchmarks/quickstart_time.py            # about 5-10 minutes on 2 cores
    python benchmarks/quickstart_time.py --record   # append a row to docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

from benchmarks.common import append_rows, load_average, machine  # noqa: E402

TARGET_S = 600.0
SECTION = "## Quickstart sweep (benchmarks/quickstart_time.py)"
HEADER = ("| date | machine | wall s | target | attack stage: wall s / tasks' s (parallelism) | trials completed / failed | MLflow runs (sweep / attack / trial) "
          "| pareto trials | attack-run artifacts | export | load avg | command |")
SECTION_TEXT = f"""{SECTION}

`bibau sweep search_spaces/quickstart.yaml` (digits, BadNets and Blended, a BI-BAU(U) study of 8
trials and FT per attack, concurrency 2, one CPU per trial) on a fresh storage folder: the models
are trained, not taken from a cache, and MLflow starts from an empty SQLite file. Wall time of the
whole command; the other columns are read back from MLflow after it ends. The attack stage (each
attack model and the clean reference a Ray task of its own): its wall time against the sum of its
tasks' own times, from the sweep run's metrics. Target: under 600 s on 2 cores.

{HEADER}
|{'---|' * (HEADER.count('|') - 1)}
"""


def mlflow_contents(uri: str, experiment: str) -> dict:
    """What the sweep left in MLflow: runs per role, trial statuses, pareto tags, attack-run artifacts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"roles": Counter(), "status": Counter(), "pareto": 0, "artifacts": [], "stage": {}}
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    roles = Counter(r.data.tags.get("role", "?") for r in runs)
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    artifacts = sorted({a.path for r in runs if r.data.tags.get("role") == "attack"
                        for a in client.list_artifacts(r.info.run_id)})
    sweep = [r for r in runs if r.data.tags.get("role") == "sweep"]
    stage = {k: v for k, v in (sweep[0].data.metrics if sweep else {}).items() if k.startswith("attack_stage_")}
    return {"roles": roles, "status": Counter(r.data.tags.get("status", "?") for r in trials),
            "pareto": sum(r.data.tags.get("pareto") == "true" for r in trials), "artifacts": artifacts,
            "stage": stage}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default="search_spaces/quickstart.yaml", help="the spec to time (default: the quickstart)")
    ap.add_argument("--storage", type=Path, default=None, help="storage folder (default: a new temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override passed to bibau sweep")
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    args = ap.parse_args(argv)

    from orchestrator.spec import load_spec

    storage = (args.storage or Path(tempfile.mkdtemp(prefix="bibau-quickstart-"))).resolve()
    spec, _ = load_spec(str(ROOT / args.spec), [f"storage={storage}", *args.set])  # a bad spec fails here, before work
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", args.spec, "--set", f"storage={storage}"]
    for item in args.set:
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # the spec's own tracking
    print("$", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - start

    contents = mlflow_contents(spec.tracking_uri, spec.experiment)
    exports = sorted(storage.glob(f"{spec.name}/*/export.yaml"))  # <storage>/<name>/<sweep id>/
    roles, status = contents["roles"], contents["status"]
    failed = sum(n for s, n in status.items() if s != "completed")
    ok = proc.returncode == 0 and wall <= TARGET_S
    stage = contents["stage"]
    stage_text = (f"{stage['attack_stage_wall_s']:.0f} / {stage['attack_stage_tasks_s']:.0f} "
                  f"(x{stage.get('attack_stage_parallelism', 0.0):.2f})"
                  if {"attack_stage_wall_s", "attack_stage_tasks_s"} <= set(stage) else "-")
    print(f"\nquickstart: exit {proc.returncode}, {wall:.0f} s (target {TARGET_S:.0f} s: {'PASS' if ok else 'MISS'}); "
          f"MLflow {spec.tracking_uri}: {roles['sweep']} sweep / {roles['attack']} attack / {roles['trial']} trial runs, "
          f"trial status {dict(status)}, {contents['pareto']} on a front; attack-run artifacts "
          f"{contents['artifacts']}; export {exports[0] if exports else 'none'}; attack stage wall / tasks' s "
          f"{stage_text}")
    if args.record:
        command = "python benchmarks/quickstart_time.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        row = (f"| {datetime.date.today()} | {machine()} | {wall:.0f} | {'met' if ok else 'missed'} | {stage_text} "
               f"| {status.get('completed', 0)} / {failed} | {roles['sweep']} / {roles['attack']} / {roles['trial']} "
               f"| {contents['pareto']} | {', '.join(contents['artifacts']) or '-'} | {'yes' if exports else 'no'} "
               f"| {load_average()} | `{command.strip()}` |")
        append_rows(SECTION, SECTION_TEXT, HEADER, [row])
        print("recorded in docs/benchmarks.md")
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
