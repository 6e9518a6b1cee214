"""The only trial-side module that imports Ray: thin Tune trainables around ``trial.py``.

``defense_trainable`` runs one trial of a sweep (attack stage from the cache, defense,
evaluation) and reports once, with every objective: a trial whose objectives are not finite
numbers is reported as ``diverged`` with the objectives' worst values, so no NaN ever reaches
Optuna. A trial the sweep's gate stopped after CA and ASR is reported as ``gated`` with only
what it measured. An exception propagates: Tune retries the trial (``FailureConfig``) and then records it
as failed. The final report carries a checkpoint holding ``results.json``, so a trial that is
restarted after it finished (a restored driver) reports again without recomputing.

``run_attack_stages`` trains (or finds in the cache) every attack's backdoored model and the
clean reference as Ray tasks, before any defense trial starts.

How a trial runs is a :class:`TrialBackend`; the sweep's tests substitute a cheap stand-in.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .checkpoint import json_safe

STATUS_KEY = "trial_status"


def _use_threads(cfg) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)


class TrialBackend:
    """The product path: ``trainables.trial``. Methods take and return plain data (picklable)."""

    def __init__(self, save_models: bool = False):
        self.save_models = save_models

    def run(self, cfg: dict, out_dir: Path, log: Callable[[str], None]) -> dict:
        """One trial; ``out_dir`` gets the resolved config and results (and the models with
        ``save_models``: a sweep of hundreds of trials would otherwise fill the disk)."""
        from .config import build
        from .schema import RunConfig
        from .trial import resolved_yaml, run_trial

        run_cfg = build(RunConfig, cfg)
        if self.save_models:
            return run_trial(run_cfg, out_dir, log=log)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(resolved_yaml(run_cfg))
        report = run_trial(run_cfg, None, log=log)
        (out_dir / "results.json").write_text(json.dumps(json_safe(report), indent=1))
        return report

    def attack_stage(self, cfg: dict, log: Callable[[str], None]) -> dict:
        """Train the attack's backdoored model (or find it in the cache); what the driver logs."""
        from .config import build
        from .runtime import resolve_device
        from .schema import RunConfig
        from .attack_stage import attack_stage, trial_dataset

        run_cfg = build(RunConfig, cfg)
        _use_threads(run_cfg)
        stage = attack_stage(run_cfg, trial_dataset(run_cfg), resolve_device(run_cfg.device), log)
        info = {k: float(v) for k, v in stage.metrics.items() if isinstance(v, (int, float))}
        return {**info, "num_classes": stage.dataset.num_classes,  # the chance level of CA, for the figures
                "cached": bool(stage.cache_hit), "cache_key": stage.cache_key, "source": stage.source,
                "cache_dir": str(stage.cache_dir), "n_poisoned": int(len(stage.poison_index)),
                "history": json_safe(stage.history)}

    def clean_reference(self, cfg: dict, log: Callable[[str], None]) -> dict:
        """Train the clean reference model (or find it in the cache) before the trials need it."""
        from .config import build
        from .runtime import resolve_device
        from .schema import RunConfig
        from .attack_stage import clean_reference, trial_dataset

        run_cfg = build(RunConfig, cfg)
        _use_threads(run_cfg)
        lines: list[str] = []

        def keep(msg: str) -> None:
            lines.append(msg)
            log(msg)

        clean_reference(run_cfg, trial_dataset(run_cfg), keep, resolve_device(run_cfg.device))
        return {"cached": any("cache hit" in line for line in lines)}  # for the driver's message only


def make_report(result: dict, objectives: list[dict]) -> dict:
    """The Tune report of a finished trial: every finite numeric metric, every objective as a
    finite number (the objective's worst value, its reference, when the trial diverged), the
    trial's status and its per-epoch history."""
    report: dict[str, Any] = {k: float(v) for k, v in result.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    bad = [o["metric"] for o in objectives if o["metric"] not in report]
    if result.get("evaluation_status") == "gated":
        # stopped by the sweep's gate after CA and ASR: what it did not measure stays absent, no
        # stand-in values; the searcher tells Optuna it was pruned (and by how much it missed the gate)
        report[STATUS_KEY] = "gated"
        report["gate_reason"] = str(result.get("gate_reason", ""))[:1000]
    elif bad:
        for o in objectives:
            if o["metric"] in report:
                report[f"raw_{o['metric']}"] = report[o["metric"]]
            report[o["metric"]] = float(o["ref"])
        report[STATUS_KEY] = "diverged"
        report["diverged_objectives"] = ",".join(bad)
    else:
        report[STATUS_KEY] = "completed"
    # one JSON string: Tune's loggers (TensorBoard, CSV) take numbers and strings, not lists
    report["history_json"] = json.dumps(json_safe(defense_history(result.get("history"))))
    return report


def invalid_report(message: str, objectives: list[dict]) -> dict:
    """A trial whose sampled combination breaks a rule between fields (no retry can help)."""
    return {**{o["metric"]: float(o["ref"]) for o in objectives}, STATUS_KEY: "invalid", "error_message": message[:4000],
            "history_json": "[]"}


def defense_history(history: Any) -> list[dict]:
    """The per-epoch records a trial run logs: the defense's (the attack's belong to the
    attack's own run), each tagged with its stage."""
    if isinstance(history, dict):
        history = [{**e, "stage": "defense"} for e in history.get("defense", []) if isinstance(e, dict)]
    return [e for e in history if isinstance(e, dict)] if isinstance(history, list) else []


def defense_trainable(config: dict, backend: TrialBackend | None = None) -> None:
    """Tune function trainable of one defense trial (``config`` comes from StudySearcher)."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = Path(d) / "report.json"
            if saved.is_file():
                tune.report(json.loads(saved.read_text()), checkpoint=checkpoint)
                return
    backend = backend or TrialBackend()
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    logfile = open(out_dir / "trial.log", "a", buffering=1)

    def log(msg: str) -> None:  # the driver prints one line per finished trial; the details go here
        logfile.write(msg + "\n")

    from .config import ConfigError

    started, cpu_started = time.perf_counter(), time.process_time()
    started_at = time.time()  # wall clock: the trial's MLflow run starts and ends when the trial did
    try:
        report = make_report(backend.run(config["run"], out_dir, log), config["objectives"])
    except ConfigError as exc:
        log(f"invalid configuration: {exc}")
        report = invalid_report(f"invalid configuration: {exc}", config["objectives"])
    finally:
        logfile.close()
    report.setdefault("time_trial_s", time.perf_counter() - started)
    # CPU seconds of this worker (all its threads): the trial's compute, whatever else loads the machine
    report.setdefault("cpu_trial_s", time.process_time() - cpu_started)
    report.update(trial_start_ts=started_at, trial_end_ts=time.time())
    report = json_safe(report)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "report.json").write_text(json.dumps(report))
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(d))


def run_attack_stages(jobs: list[tuple[str, str, dict]], *, cpus: float, gpus: float,
                      backend: TrialBackend | None = None, log: Callable[[str], None] = print,
                      retries: int = 3) -> dict[str, dict]:
    """Run ``(label, kind, cfg)`` jobs (kind: ``attack`` or ``clean``) as parallel Ray tasks.

    A task whose worker or node dies (a preempted spot node) is rerun up to ``retries`` times on
    another node; an exception raised by the stage itself is not retried (it would raise again).
    Returns label -> the stage's info plus ``ok``, ``seconds`` and, on failure, ``error``.
    """
    import ray

    backend = backend or TrialBackend()

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    def stage(label: str, kind: str, cfg: dict) -> dict:
        t0 = time.perf_counter()
        lines: list[str] = []

        def say(msg: str) -> None:
            lines.append(msg)
            print(f"[{label}] {msg}", flush=True)

        fn = backend.clean_reference if kind == "clean" else backend.attack_stage
        info = fn(cfg, say)
        return {**info, "ok": True, "seconds": time.perf_counter() - t0, "log_tail": "\n".join(lines[-20:])}

    futures = {label: stage.remote(label, kind, cfg) for label, kind, cfg in jobs}
    out: dict[str, dict] = {}
    for label, fut in futures.items():
        try:
            out[label] = ray.get(fut)
        except Exception as exc:  # one failed attack does not stop the others
            # a RayTaskError wraps what the stage raised; its own text opens with the worker's pid
            cause = getattr(exc, "cause", None) or exc
            out[label] = {"ok": False, "error": f"{type(cause).__name__}: {cause}"[:4000],
                          "reason": (f"{type(cause).__name__}: {str(cause).strip()}".splitlines() or [""])[0][:500]}
            log(f"attack stage {label} failed: {out[label]['reason']}")
    return out


def run_trials(jobs: list[tuple[str, dict, str]], *, cpus: float, gpus: float, objectives: list[dict],
               backend: TrialBackend | None = None, log: Callable[[str], None] = print,
               retries: int = 3) -> dict[str, dict]:
    """Run ``(label, run config, out_dir)`` trials as parallel Ray tasks, outside any Tune search
    (a sweep's seed replicates). Returns label -> the trial's Tune-style report (``make_report``),
    or ``{"error": ...}`` for one that raised; each trial's log goes to ``<out_dir>/trial.log``."""
    import ray

    backend = backend or TrialBackend()

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=retries, retry_exceptions=False)
    def trial(cfg: dict, out_dir: str) -> dict:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "trial.log", "a", buffering=1) as fh:
            report = backend.run(cfg, out, lambda msg: fh.write(msg + "\n"))
        return json_safe(make_report(report, objectives))

    futures = {label: trial.remote(cfg, out_dir) for label, cfg, out_dir in jobs}
    out: dict[str, dict] = {}
    for label, fut in futures.items():
        try:
            out[label] = ray.get(fut)
        except Exception as exc:  # one failed replicate does not stop the others
            out[label] = {"error": f"{type(exc).__name__}: {exc}"[:4000]}
            log(f"replicate {label} failed: {out[label]['error'].splitlines()[0]}")
    return out
