"""What a sweep ends with: :class:`SweepOutcome` (its records, fronts, export file, attack-stage
results and warnings) and the summary it prints (fronts, where the results are, how to open them
in MLflow and Optuna, how to reproduce a pick, the warnings last).
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from trainables.config import to_dict

from .pareto import TrialRecord
from .spec_sections import SweepSpec, tuned_trials
from .tracking_read import read_state, ui_lines

@dataclass
class SweepOutcome:
    sweep_id: str
    folder: Path
    tracking_uri: str
    experiment: str
    parent_run_id: str
    records: list[TrialRecord]
    fronts: dict[str, list[TrialRecord]]
    export_file: Path | None
    attack_stage: dict[str, dict] = field(default_factory=dict)
    resumed: bool = False
    warnings: list[str] = field(default_factory=list)  # attacks whose export rule no trial met
    attack_timing: dict[str, float] = field(default_factory=dict)  # see stage_timing
    exported: list[str] = field(default_factory=list)  # attacks with a selection in the export file
    stopped: str | None = None  # why the defense stage stopped early (trials pending past the limit)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def failed_stages(self) -> dict[str, str]:
        """Attack-stage tasks (attacks, clean references) that failed -> the reason, one line."""
        return {label: info.get("reason") or (str(info.get("error") or "failed").splitlines() or ["failed"])[0]
                for label, info in self.attack_stage.items() if not info.get("ok")}


def tuning_text(spec: SweepSpec) -> str:
    """Which defenses were tuned, with how many trials per attack (the fair-tuning budget)."""
    trials = tuned_trials(to_dict(spec))
    text = ", ".join(f"{k} {v}" for k, v in trials.items()) or "none"
    return text + (f" (equal budget: {spec.equal_budget}'s)" if spec.equal_budget else "")


def summary_text(out: SweepOutcome, spec: SweepSpec) -> str:
    metrics = spec.metrics
    failed = sum(r.status not in ("completed", "gated") for r in out.records)
    stopped = sum(r.status == "gated" and "gate_stopped_epoch" in r.metrics for r in out.records)
    broken = out.failed_stages
    lines = ["", f"=== sweep {out.sweep_id} finished: {len(out.records)} trials, {out.count('completed')} evaluated "
                 f"fully, {out.count('gated')} gated after CA/ASR (no RA, QRA, BEC"
                 + (f"; {stopped} of them stopped during the defense" if stopped else "")
                 + f"), {failed} failed or diverged"
                 + (f"; {len(broken)} attack stage(s) failed, their studies not run" if broken else "") + " ==="]
    lines.append(f"tuned defenses (trials per attack): {tuning_text(spec)}")
    lines += [f"FAILED attack stage {label}: {reason}" for label, reason in sorted(broken.items())]
    if out.stopped:
        lines.append(f"STOPPED defense stage: {out.stopped}")
    t = out.attack_timing
    if t:
        lines.append(f"attack stage: {int(t['attack_stage_tasks'])} task(s), {int(t['attack_stage_cached'])} from the "
                     f"cache, {t['attack_stage_wall_s']:.1f}s wall for {t['attack_stage_tasks_s']:.1f}s of tasks")
    for attack, front in out.fronts.items():
        if attack in broken:
            continue
        lines.append(f"Pareto front for {attack} ({len(front)} trials):")
        header = f"  {'defense':<14} {'trial':<14} " + " ".join(f"{m:>8}" for m in metrics) + "  params"
        lines.append(header)
        for r in sorted(front, key=lambda r: -r.metrics.get(metrics[0], 0.0)):
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.params.items())
            lines.append(f"  {r.defense:<14} {r.trial_id:<14} "
                         + " ".join(f"{r.metrics.get(m, float('nan')):8.4f}" for m in metrics) + f"  {params}")
    lines.append(f"results:   {out.folder}  (trial logs: trials/<trial id>/trial.log; Ray and Optuna: sweep.log)")
    optuna_db = shlex.quote(f"sqlite:///{out.folder / 'optuna.db'}")
    lines.append(f"Optuna:    optuna-dashboard {optuna_db}  (each trial's mlflow_run_id as a user attr)")
    state_file = out.folder / "state.json"
    lines += ui_lines(out.tracking_uri, out.experiment,
                      read_state(state_file).get("experiment_id") if state_file.is_file() else None)
    lines.append(f"exported:  {out.export_file if out.export_file else '(nothing on any front)'}")
    if out.export_file and out.exported:
        attack = out.exported[0]  # an attack with a selection: a failed one has none
        # the exported config holds the trial's thread count: the re-run uses it and matches bit for bit
        lines.append(f"reproduce: bibau run {shlex.quote(str(out.export_file))} --attack {shlex.quote(attack)}")
    lines.append(f"tables:    bibau report {shlex.quote(str(out.folder))}  (Tables 1 and 2, the figure grid; attached to the parent run)")
    if out.warnings:  # last, where nobody misses them
        lines += ["", *out.warnings, "(tagged export.rule_met=false on the sweep's parent run in MLflow)"]
    return "\n".join(lines)
