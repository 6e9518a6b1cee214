"""``bibau sweep``: the driver.

Stages, all on one Ray cluster:
1. MLflow: the experiment, the sweep's parent run and one run per attack, created here once.
2. Attack stage: every attack's backdoored model and the clean reference, as parallel Ray
   tasks, cached by content hash under ``<storage>/cache`` (a later sweep reuses them).
3. Defense stage: one ``Tuner`` whose :class:`~orchestrator.search.StudySearcher` interleaves
   every attack x defense study (Optuna, RDB storage) and the fixed baselines; trials report
   every objective, failed ones are retried and then recorded as failed.
4. Fronts: Pareto tags, plots and hypervolumes in MLflow, the export file, a printed summary.

``resume=True`` continues the newest unfinished sweep of the spec (``Tuner.restore`` from the
sweep's folder, the same MLflow runs).
"""
from __future__ import annotations

import datetime as _dt
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from trainables.cache import code_version as _training_code_version
from trainables.cache import content_hash
from trainables.config import to_dict

from .export_file import build_export, write_export
from .plan import Plan, smoke_plan
from .progress import quiet_frameworks
from .resume import check_resumable, find_resumable
from .rules import parse_rule
from .spec import spec_fingerprint
from .spec_sections import SweepSpec
from .summary import SweepOutcome, summary_text, tuning_text
from .tracking_read import read_state

# the names tests and tools import from here: the sweep's pieces now live in the modules above
__all__ = ["SweepOutcome", "add_sweep", "check_resumable", "cmd_sweep", "code_version", "find_resumable",
           "needs_clean_reference", "read_state", "run_sweep", "smoke_plan", "spec_fingerprint", "sqlite_path",
           "stage_timing", "summary_text", "tuning_text"]

def code_version() -> str:
    """The training code's version (package + source hash), plus the git commit when known."""
    version = _training_code_version()
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            version += f" git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def stage_timing(infos: dict[str, dict], wall_s: float) -> dict[str, float]:
    """The attack stage's wall time against the sum of its tasks' own times: how much running
    them as parallel Ray tasks saved (1.0: none; a cache hit costs its task little)."""
    tasks = sum(float(i.get("seconds", 0.0)) for i in infos.values())
    return {"attack_stage_wall_s": wall_s, "attack_stage_tasks_s": tasks,
            "attack_stage_parallelism": tasks / wall_s if wall_s > 0 else 0.0,
            "attack_stage_tasks": float(len(infos)), "attack_stage_cached": float(sum(bool(i.get("cached")) for i in infos.values()))}


def needs_clean_reference(cfg: dict) -> bool:
    ev = cfg["evaluation"]
    metrics = set(ev["metrics"])
    return bool(metrics & {"qra", "bec"}) or ("ra" in metrics and ev.get("ra_on_clean", False))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for a server)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):] or ".")


def _start_tracking(tracker, spec: SweepSpec, plan: Plan, version: str, summary: dict, fingerprint: str) -> dict:
    from contextlib import nullcontext

    from .locks import file_lock

    db = sqlite_path(tracker.uri)
    # several sweeps sharing a storage folder create (and migrate) one SQLite file: one at a time
    with file_lock(db.with_name(db.name + ".lock")) if db is not None else nullcontext():
        tracker.client.search_experiments(max_results=1)  # creates the schema under the lock
        return _start_runs(tracker, spec, plan, version, summary, fingerprint)


def _start_runs(tracker, spec: SweepSpec, plan: Plan, version: str, summary: dict, fingerprint: str) -> dict:
    tracker.start(name=spec.name, attacks=[a.label for a in plan.attacks], spec=to_dict(spec), code_version=version,
                  summary=summary)
    return tracker.save_state(spec_fingerprint=fingerprint, code_version=version)


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # each trial checkpoints once, at its end, and Tune then snapshots the experiment: on purpose
    # (a resumed sweep loses as little as possible), so its warning about frequent snapshots is noise
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _ray_init(address: str | None, num_cpus: int | None, num_gpus: float | None) -> bool:
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):  # a cluster (ray job submit sets RAY_ADDRESS)
        ray.init(address=address or os.environ["RAY_ADDRESS"])
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False)
    return True


def run_sweep(spec: SweepSpec, plan: Plan, *, resume: bool | str = False, backend=None, log: Callable[[str], None] = print,
              address: str | None = None, num_cpus: int | None = None, num_gpus: float | None = None,
              verbose: int = 0) -> SweepOutcome:
    """Run (or resume) the sweep of ``spec``; see the module docstring."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    from trainables.ray_adapters import TrialBackend, defense_trainable, run_attack_stages

    from .search import StudySearcher, trial_dirname
    from .tracking_callback import TrackingCallback
    from .tracking_write import SweepTracker

    from .capacity import PendingLimit, node_fit_warnings
    from .preflight import check_sweep, remote_cluster

    # storage, tracking, resources, data, trigger files: before any lock, run or training
    check_sweep(spec, plan, address=address, num_cpus=num_cpus, num_gpus=num_gpus)
    storage = spec.storage_path
    folder = storage / spec.name
    fingerprint = spec_fingerprint(spec)
    from .integrity import SigningCallback, StateSigner, register, state_files
    from .locks import DriverLease

    if resume:
        sweep_dir = find_resumable(folder, spec.name, resume, fingerprint)
        check_resumable(sweep_dir, fingerprint)
        sweep_id = sweep_dir.name
        lease = DriverLease(sweep_dir).acquire()  # refuses while the first driver lives
        signer = StateSigner(sweep_dir, sweep_id, fingerprint)
        try:
            if (sweep_dir / "tune").is_dir():
                signer.verify(sweep_dir / "tune")  # before Tune unpickles anything
        except BaseException:
            lease.release()
            raise
        log(f"resuming sweep {sweep_id} from {sweep_dir}")
    else:
        sweep_id = f"{spec.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = folder / sweep_id
        n = 1
        while True:
            try:
                sweep_dir.mkdir(parents=True)  # atomic: two drivers started together get two folders
                break
            except FileExistsError:
                n += 1
                sweep_dir = folder / f"{sweep_id}-{n}"
        sweep_id = sweep_dir.name
        lease = DriverLease(sweep_dir).acquire()
        signer = StateSigner(sweep_dir, sweep_id, fingerprint)
    try:
        register(signer)
        _quiet()
        version = code_version()
        uri = spec.tracking_uri
        local_store = uri.startswith("sqlite:")
        tracker = SweepTracker(uri, spec.experiment, sweep_id, sweep_dir / "state.json",
                               artifact_root=storage / "mlartifacts" if local_store else None)
        summary = {"sweep_id": sweep_id, "spec_fingerprint": fingerprint, "code_version": version,
                   "studies": ", ".join(s.key for s in plan.studies),
                   "objectives": ", ".join(f"{o.mode} {o.metric}" for o in spec.objectives),
                   "budget": sum(s.trials for s in plan.studies), "concurrency": spec.concurrency,
                   "tuned_trials": tuning_text(spec)}
        clock = _Clock()
        backend = backend or TrialBackend(save_models=spec.save_models)
        # MLflow's first use (imports, schema migration of a new SQLite file) takes seconds; it runs in a
        # thread while Ray starts and the attack stage trains or loads its models
        pool = ThreadPoolExecutor(max_workers=1)
        mlflow_ready = pool.submit(_start_tracking, tracker, spec, plan, version, summary, fingerprint)
        started_ray = False
        quiet = ExitStack()
        try:
            started_ray = _ray_init(address, num_cpus, num_gpus)
            clock.lap("ray start")
            if remote_cluster(address):  # a local Ray's size was checked before anything was created
                import ray

                for line in node_fit_warnings(spec, ray.nodes()):
                    log(line)
            # -- attack stage ------------------------------------------------------------------------
            res = spec.attack_resources or spec.resources
            jobs = [(a.label, "attack", a.config) for a in plan.attacks]
            clean_needed = [a for a in plan.attacks if needs_clean_reference(a.config)]
            seen_clean = set()
            for a in clean_needed:
                key = content_hash({k: a.config[k] for k in ("seed", "data", "model", "train", "cache_dir")})
                if key not in seen_clean:
                    seen_clean.add(key)
                    jobs.append((f"clean-reference-{key[:6]}", "clean", a.config))
            log(f"attack stage: {len(jobs)} model(s) ({', '.join(j[0] for j in jobs)}), cache {plan.attacks[0].config['cache_dir']}")
            stage_start = time.perf_counter()
            infos = run_attack_stages(jobs, cpus=res.cpus, gpus=res.gpus, backend=backend, log=log)
            attack_timing = stage_timing(infos, time.perf_counter() - stage_start)
            log(f"attack stage: {len(jobs)} task(s) ({res.cpus:g} CPU, {res.gpus:g} GPU each) in "
                f"{attack_timing['attack_stage_wall_s']:.1f}s wall, {attack_timing['attack_stage_tasks_s']:.1f}s "
                f"summed over the tasks (x{attack_timing['attack_stage_parallelism']:.2f} in parallel)")
            state = mlflow_ready.result()
            log(f"sweep {sweep_id}: {len(plan.studies)} studies, {summary['budget']} trials, "
                f"MLflow {uri} experiment {spec.experiment!r} (parent run {state['parent_run_id']})")
            for label, info in infos.items():
                where = "reused from the cache" if info.get("cached") else "trained"
                if info.get("ok"):
                    log(f"  {label}: {where} ({info.get('seconds', 0.0):.1f}s)"
                        + "".join(f", {k}={info[k]:.4f}" for k in ("backdoored_ca", "backdoored_asr", "ca", "asr")
                                  if isinstance(info.get(k), float)))
                if label in state["attack_runs"]:
                    tracker.log_attack_stage(label, info)
            broken = {label for label, info in infos.items() if not info.get("ok")}
            if broken:
                log(f"attack stage failed for {', '.join(sorted(broken))}: their studies are skipped "
                    "(reasons above and in MLflow)")
            studies = [s for s in plan.studies if s.attack not in broken]
            clock.lap("attack stage")

            # -- defense stage -------------------------------------------------------------------------
            if verbose == 0:  # Tune's tables and hints, Optuna's INFO lines: to <sweep>/sweep.log
                quiet.enter_context(quiet_frameworks(sweep_dir / "sweep.log", log))
            tune_dir = sweep_dir / "tune"
            trainable = tune.with_parameters(defense_trainable, backend=backend)
            trainable = tune.with_resources(trainable, {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus})
            restored = bool(resume) and tune.Tuner.can_restore(str(tune_dir))
            if restored:
                signer.verify(tune_dir)  # again, just before loading: the attack stage may have taken minutes
                for stale in tune_dir.glob("*/error.pkl"):  # never loaded by this code; planted ones go
                    stale.unlink()
                tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable)
            elif studies:
                optuna_url = f"sqlite:///{sweep_dir / 'optuna.db'}"
                searcher = StudySearcher(studies, spec.objectives, storage_url=optuna_url,
                                         prefix=sweep_id, trials_dir=sweep_dir / "trials")
                tuner = tune.Tuner(
                    trainable,
                    param_space={},
                    tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=spec.concurrency),
                                                num_samples=-1, reuse_actors=True,
                                                trial_dirname_creator=trial_dirname, trial_name_creator=trial_dirname),
                    run_config=tune.RunConfig(
                        name=tune_dir.name, storage_path=str(sweep_dir), verbose=verbose,
                        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                        callbacks=[SigningCallback(sweep_id),
                                   TrackingCallback(tracker, spec.objectives, total=sum(s.trials for s in studies),
                                                    optuna_url=optuna_url)]
                        + ([PendingLimit(spec.pending_timeout_s, spec.resources)]
                           if spec.pending_timeout_s is not None else [])))
            else:
                tuner = None
            configs: dict[str, dict] = {}
            stopped: str | None = None
            if tuner is not None:
                signer.sign(state_files(tune_dir), tune_dir)  # tuner.pkl, written by the constructor
                try:
                    results = tuner.fit()
                except Exception as exc:  # noqa: BLE001 - only the pending limit is handled here
                    stopped = _pending_cause(exc)
                    if stopped is None:
                        raise
                    results = None
                    log(f"defense stage stopped: {stopped}")
                quiet.close()
                signer.sign(state_files(tune_dir), tune_dir)  # the final snapshot, synced to the storage
                clock.lap("defense stage")
                if results is not None:
                    fixed = TrackingCallback(tracker, spec.objectives).reconcile(results)
                    if fixed:
                        log(f"{fixed} trial(s) finished in Tune but missing or unfinished in MLflow were logged now")
                    for res in results:
                        if isinstance((res.config or {}).get("run"), dict):
                            configs[_trial_id(res)] = res.config["run"]

            # -- fronts, export, summary -----------------------------------------------------------------
            records = tracker.records()
            orphans = [r for r in records if configs and r.trial_id not in configs]
            if orphans:
                # logged by a driver that died before Tune saved them: not part of this experiment
                for r in orphans:
                    tracker.client.set_tag(r.run_id, "status", "orphaned")
                    if tracker.client.get_run(r.run_id).info.status == "RUNNING":  # opened when it started
                        tracker.client.set_terminated(r.run_id, "KILLED")
                    r.status = "orphaned"
                log(f"{len(orphans)} MLflow trial run(s) of the previous driver were lost by Tune; tagged status=orphaned")
            export_file = None
            rule = parse_rule(spec.export_rule, spec.metrics)
            for r in records:
                if r.usable(spec.metrics):
                    r.config = configs.get(r.trial_id) or tracker.load_config(r.run_id)
            doc = build_export([r for r in records if r.usable(spec.metrics)], rule, spec.metrics, spec.modes,
                               [o.best for o in spec.objectives],
                               {"experiment": spec.experiment, "sweep": sweep_id, "code_version": version,
                                "tracking_uri": uri})
            if doc["selections"]:
                export_file = write_export(doc, sweep_dir / "export.yaml")
            failed_attacks = {label: str(infos[label].get("reason") or infos[label].get("error"))
                              for label in broken if label in state["attack_runs"]}
            fronts = tracker.finish(records, spec.objectives, export_file=export_file, rule=rule,
                                    extra_metrics=attack_timing, failed_attacks=failed_attacks,
                                    status="FAILED" if stopped else "FINISHED")  # a stopped sweep stays resumable
            if spec.replicates > 1 and not stopped:  # seed replicates of the picks and baselines (replicates.py)
                from .replicates import run_replicates

                run_replicates(spec, tracker, records, sweep_dir, backend, log)
                clock.lap("replicates")
            clock.lap("fronts and export")
            log("time: " + clock.text())
            outcome = SweepOutcome(sweep_id, sweep_dir, uri, spec.experiment, state["parent_run_id"], records, fronts,
                                   export_file, infos, bool(resume), warnings=list(tracker.pick_warnings),
                                   attack_timing=attack_timing,
                                   exported=list(dict.fromkeys(str(s["attack"]) for s in doc["selections"])),
                                   stopped=stopped)
            log(summary_text(outcome, spec))
            return outcome
        finally:
            quiet.close()
            pool.shutdown(wait=True)
            if started_ray:
                import ray

                ray.shutdown()

    finally:
        lease.release()

class _Clock:
    def __init__(self):
        self.t = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, now - self.t))
        self.t = now

    def text(self) -> str:
        return ", ".join(f"{name} {sec:.1f}s" for name, sec in self.laps)


def _pending_cause(exc: BaseException | None) -> str | None:
    """The reason of a :class:`~orchestrator.capacity.PendingTooLong` behind what ``Tuner.fit`` raised."""
    from .capacity import PendingTooLong

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PendingTooLong):
            return str(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _trial_id(result) -> str:
    """Tune's trial id of a ``Result`` (its folder, ``<study>-<trial id>``, when it never reported)."""
    return (result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("-", 1)[-1]


# -- bibau sweep ----------------------------------------------------------------------------------


def cmd_sweep(args) -> int:
    from .spec import load_spec

    spec, plan = load_spec(args.spec, args.overrides)  # every spec error surfaces here, before Ray starts
    if args.smoke_test:
        plan = smoke_plan(plan)
    if args.check:
        from .preflight import check_sweep
        from .search import describe

        for line in check_sweep(spec, plan, address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus):
            print(f"checked {line}")
        for row in describe(plan.studies):
            print(f"{row['study']}: {row['trials']} trial(s), sampler {row['sampler']}, space {row['space']}")
        print(f"spec {args.spec} is valid: {len(plan.attacks)} attack(s), {len(plan.studies)} studies")
        return 0
    resume: bool | str = False
    if args.resume is not None:
        resume = True if args.resume == "latest" else args.resume
    out = run_sweep(spec, plan, resume=resume, address=args.address, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                    verbose=args.verbose)
    if out.failed_stages or out.stopped:  # partial results are kept, but the sweep did not do what it was asked
        return 1
    return 0 if any(r.status == "completed" for r in out.records) else 1


def add_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="run a sweep spec (or an export file) on Ray Tune + Optuna, tracked in MLflow",
        description="Attack stage (cached), then one Optuna study per attack x tuned defense and the fixed "
        "baselines, all sharing the cluster; Pareto fronts, plots and hypervolumes in MLflow; an export of "
        "the configurations the spec's export_rule picks.")
    p.add_argument("spec", help="sweep spec YAML (see search_spaces/), or an export file written by bibau export")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field; lists by index or label, e.g. --set defenses.bibau_u.trials=8 "
                   "--set base.train.epochs=3 (repeatable)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_ID",
                   help="continue the newest unfinished sweep of this spec (or SWEEP_ID) whose driver died; "
                   "finished trials are neither rerun nor logged twice")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray (default: all)")
    p.add_argument("--num-gpus", type=float, help="GPUs of a local Ray (default: all)")
    p.add_argument("--smoke-test", action="store_true", help="at most 2 trials per study on tiny sizes")
    p.add_argument("--check", action="store_true", help="validate the spec, list the studies and exit")
    p.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2),
                   help="Ray Tune's own progress tables (default 0: one line per finished trial)")
    p.set_defaults(func=cmd_sweep)
