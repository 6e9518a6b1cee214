"""Sweep efficiency: the same spec and seed with and without the cheap-first gate.

A BI-BAU(U) study on a CIFAR-10 spec reduced to fit a shared CPU (5,000 training images, a
narrow ResNet, RA and QRA shortened but still about half of a trial's time), run three times in one
command: without a gate, with ``gate: {ca_drop_max: D}`` checked after the defense, and with the same
gate also checked during the defense (``during_defense: true`` at its default ``check_from`` and
``slack``), which stops a collapsing defense early. Per side: wall time of the whole
``run_sweep`` (Ray start, trials, MLflow, fronts), the trials' own wall and CPU seconds, how many
trials were evaluated fully and how many gated, and the hypervolume of the front reached.

The hypervolume's reference point for CA is the gate's floor (backdoored CA - D) on both sides:
a model below it is worth nothing to the researcher who set the gate, so the gate may only lose
what the search did differently afterwards. The hypervolume with CA's default reference (0) is
printed and recorded too, so the cost of that choice is visible.

The model cache is warmed (attack stage and clean reference, untimed) and one local Ray is
started before either side runs; both sides use it.
Both sides run one after the other on a shared machine: the load average at each side's start
and end is recorded, and the CPU seconds of the trials (``cpu_trial_s``, each worker's own
process time) are a measure the machine's other load does not change.

    OMP_NUM_THREADS=1 python benchmarks/sweep_efficiency.py --record   # 12 trials per side
    OMP_NUM_THREADS=1 python benchmarks/sweep_efficiency.py --sweep-seed 2 --record   # another TPE path
    OMP_NUM_THREADS=1 python benchmarks/sweep_efficiency.py --evaluation protocol --calibrate   # RA, QRA at defaults
    python benchmarks/sweep_efficiency.py --smoke-test                  # tiny; records nothing
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a plain checkout

from benchmarks.common import append_rows, load_average, machine, start_ray  # noqa: E402

SECTION = "## Sweep efficiency: the cheap-first gate (benchmarks/sweep_efficiency.py)"
HEADER = """{section}

The same BI-BAU(U) study (CIFAR-10 reduced to fit: 5,000 training / 1,000 test images, a width-16
2-stage ResNet trained 20 epochs without flips, BadNets: CA 0.525, ASR 0.922; TPE on CA, R-ASR, Q-ASR; 2 trials at a time, 1 thread each) with and without
`gate: {{ca_drop_max: D}}`, same seed, one command, warm model cache. Wall: the whole sweep (Ray, trials,
MLflow, fronts). CPU: the trials' own CPU seconds (a measure the machine's other load does not change).
HV: hypervolume of the front with CA's reference at the gate's floor (backdoored CA - D), and with CA's
default reference 0 in brackets. Eval share: RA + QRA seconds over a fully evaluated trial's seconds.
Gate mode: checked after the defense only, or also during it (`during_defense`, with the check_from and
slack it ran with). One command runs the ungated side once and each gated side after it; a row per gated side.
Done when: gated wall <= 70% of ungated at an HV within 5%; no gated trial carries R-ASR or Q-ASR.

| date | machine | trials per side | D | gate mode | eval share | ungated: wall s / CPU s / full | gated: wall s / CPU s / full / gated | wall ratio | CPU ratio | HV ungated / gated (ref 0) | HV ratio | gated trials with R-ASR/Q-ASR | load avg (start-end per side) | command |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
"""

EPS = {"low": 4 / 255, "high": 32 / 255}


MODES = {"after": "after the defense", "during": "during the defense"}


def evaluation(smoke: bool, protocol: bool) -> dict:
    """RA and QRA shortened (``reduced``, the first rows) or at the evaluation protocol's defaults
    (``protocol``: what a researcher's sweep pays per trial; only the data and model are reduced)."""
    metrics = {"metrics": ["ca", "asr", "ra", "qra"], "ra_on_clean": False}
    if smoke:
        return {**metrics, "ra_size": 100, "ra_epochs": 1, "qra_epochs": 1, "qra_clean_size": 50,
                "qra_poison_size": 50, "qra_hidden": 64}
    if protocol:
        return metrics
    return {**metrics, "ra_size": 200, "ra_epochs": 5, "qra_epochs": 20, "qra_clean_size": 100,
            "qra_poison_size": 100, "qra_hidden": 256}


def spec(storage: Path, trials: int, smoke: bool, ca_ref: float = 0.0, gate: float | None = None,
         during: bool = False, during_settings: dict | None = None, sweep_seed: int = 0,
         protocol: bool = False) -> dict:
    """The benchmark's sweep spec; ``gate``: the side with ``ca_drop_max`` = gate, checked during
    the defense too with ``during``; ``protocol``: RA and QRA at their defaults."""
    # 5,000 images and a width-16 ResNet (the suggested size): BadNets implants (ASR 0.92) and
    # the backdoored CA (0.525) leaves room for the collapsed trials the gate exists for; on 2,000
    # images and width 8 (the first recorded row) the attack did not implant (ASR 0.27, CA 0.32)
    data = {"name": "cifar10", "train_size": 600 if smoke else 5000, "test_size": 200 if smoke else 1000,
            "clean_fraction": 0.1}
    out = {
        "name": ("efficiency-gated-during" if during else "efficiency-gated") if gate is not None else "efficiency",
        "storage": str(storage),
        "seed": sweep_seed,
        "base": {
            "seed": 0, "device": "cpu",
            # the default model cache: a second run of the benchmark reuses the attack models
            "cache_dir": str(Path("~/.cache/bibau/models").expanduser()) if not smoke else str(storage / "cache"),
            "data": data,
            "model": {"name": "small_resnet", "width": 8 if smoke else 16, "depth": 2},
            # no flips: a flipped corner patch halves what 5,000 images teach (ASR 0.65 with them)
            "train": {"epochs": 1 if smoke else 20, "batch_size": 64, "lr": 0.05, "crop_padding": 0,
                      "hflip": False, "eval_every": 0},
            "evaluation": evaluation(smoke, protocol),
        },
        "attacks": [{"name": "badnets", "target": 0, "poison_rate": 0.1}],
        "defenses": [{
            "name": "bibau_u",
            "fixed": {"epochs": 1 if smoke else 2, "pgd_steps": 2 if smoke else 3, "pgd_step": 4 / 255,
                      "batch_size": 64, "crop_padding": 0},
            # METHOD's ranges, lr and epsilon wide: the first look at a new setting, where some
            # trials lose their clean accuracy
            "space": {"theta": {"low": 0.0, "high": 1.0},
                      "alpha": {"low": 1e-2, "high": 10.0, "log": True},
                      "beta": {"low": 1e-2, "high": 10.0, "log": True},
                      "lambda1": {"low": 0.1, "high": 40.0, "log": True},
                      "lambda2": {"low": 1e-3, "high": 10.0, "log": True},
                      "lr": {"low": 1e-3, "high": 0.1, "log": True},
                      "pgd_eps": EPS},
            "trials": trials, "sampler": "tpe", "startup_trials": max(2, trials // 2),
        }],
        "objectives": [{"metric": "ca", "mode": "max", "ref": ca_ref},
                       {"metric": "r_asr", "mode": "min"}, {"metric": "q_asr", "mode": "min"}],
        "concurrency": 2,
        "resources": {"cpus": 1, "gpus": 0},
        "export_rule": "max ca; r_asr <= 0.2; q_asr <= 0.2; fallback nearest",
    }
    if gate is not None:
        out["gate"] = {"ca_drop_max": gate, **({"during_defense": True, **(during_settings or {})} if during else {})}
    return out


def hv(records, spec_obj, ca_ref: float) -> float:
    from orchestrator.pareto import hypervolume

    metrics, modes = spec_obj.metrics, spec_obj.modes
    ref = [ca_ref if o.metric == "ca" else o.reference for o in spec_obj.objectives]
    pts = [r.values(metrics) for r in records if r.usable(metrics)]
    return hypervolume(pts, modes, ref)


def leaks(out) -> list[str]:
    """Where a gated trial carries an R-ASR or Q-ASR: its MLflow metrics, its results.json, Tune's result."""
    bad = []
    for r in out.records:
        if r.status != "gated":
            continue
        if {"r_asr", "q_asr"} & set(r.metrics):
            bad.append(f"{r.trial_id}: MLflow")
        # the trial's results.json is one JSON document; Tune's result.json has one per line
        documents = [json.loads(p.read_text()) for p in (out.folder / "trials" / r.trial_id).glob("results.json")]
        documents += [json.loads(line) for p in (out.folder / "tune").glob(f"*{r.trial_id}/result.json")
                      for line in p.read_text().splitlines() if line.strip()]
        if any({"r_asr", "q_asr"} & set(doc) for doc in documents if isinstance(doc, dict)):
            bad.append(f"{r.trial_id}: results")
    return bad


def side(name: str, spec_dict: dict, tmp: Path) -> dict:
    import yaml

    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec_dict))
    spec_obj, plan = load_spec(str(path))
    load_start = load_average()
    print(f"{name}: {plan.studies[0].trials} trials, gate {spec_dict.get('gate')} (load {load_start}) ...", flush=True)
    t = time.perf_counter()
    out = run_sweep(spec_obj, plan, log=lambda m: None, verbose=0)
    wall = time.perf_counter() - t
    recs = out.records
    full = [r for r in recs if r.status == "completed"]
    gated = [r for r in recs if r.status == "gated"]
    stopped = [r for r in gated if "gate_stopped_epoch" in r.metrics]
    trial_s = sum(r.metrics.get("time_trial_s", 0.0) for r in recs)
    cpu_s = sum(r.metrics.get("cpu_trial_s", 0.0) for r in recs)
    share = [(r.metrics.get("time_eval_ra_s", 0.0) + r.metrics.get("time_eval_qra_s", 0.0)) / r.metrics["time_trial_s"]
             for r in full if r.metrics.get("time_trial_s")]
    res = {"name": name, "spec": spec_obj, "out": out, "wall": wall, "trial_s": trial_s, "cpu_s": cpu_s,
           "full": len(full), "gated": len(gated), "stopped": len(stopped),
           "failed": len(recs) - len(full) - len(gated),
           "eval_share": sum(share) / len(share) if share else float("nan"),
           "load": f"{load_start}-{load_average()}", "leaks": leaks(out),
           "ca": sorted(round(r.metrics.get("ca", float("nan")), 3) for r in recs)}
    print(f"  {wall:.1f} s wall, {trial_s:.1f} s in trials ({cpu_s:.1f} CPU s); {res['full']} evaluated fully, "
          f"{res['gated']} gated ({res['stopped']} during the defense), {res['failed']} failed; eval share {res['eval_share']:.2f}; CAs {res['ca']}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12, help="BI-BAU(U) trials per side")
    ap.add_argument("--gate", type=float, default=0.2, help="ca_drop_max of the gated side (fraction)")
    ap.add_argument("--mode", choices=("both", "after", "during"), default="both",
                    help="gated sides: checked after the defense, during it too, or both (default)")
    ap.add_argument("--slack", type=float, default=None, help="the during side's gate.slack (default: the product's)")
    ap.add_argument("--check-from", type=float, default=None,
                    help="the during side's gate.check_from (default: the product's)")
    ap.add_argument("--evaluation", choices=("reduced", "protocol"), default="reduced",
                    help="RA and QRA shortened (reduced, the default) or at the evaluation protocol's defaults")
    ap.add_argument("--sweep-seed", type=int, default=0, help="the sweep's seed (TPE); the base model's stays 0")
    ap.add_argument("--smoke-test", action="store_true", help="tiny sizes: checks the script, records nothing")
    ap.add_argument("--record", action="store_true", help="append the result to docs/benchmarks.md")
    ap.add_argument("--calibrate", action="store_true", help="warm the cache and time one ungated trial's stages; "
                    "no sweep")
    ap.add_argument("--doc", type=Path, default=None, help="record into this file instead of docs/benchmarks.md")
    ap.add_argument("--storage", type=Path, default=None, help="keep the sweeps here (default: a temporary folder)")
    args = ap.parse_args()

    from orchestrator.spec import load_spec
    from trainables.ray_adapters import TrialBackend
    from trainables.schema import GateConfig

    import yaml

    os.environ.setdefault("RAY_ADDRESS", "")
    with tempfile.TemporaryDirectory(prefix="bibau-efficiency-") as tmp:
        tmp = Path(tmp)
        if args.storage is not None:
            tmp = args.storage
            tmp.mkdir(parents=True, exist_ok=True)
        store = tmp / "store"
        probe = tmp / "probe.yaml"
        protocol = args.evaluation == "protocol"
        probe.write_text(yaml.safe_dump(spec(store, args.trials, args.smoke_test, protocol=protocol)))
        _, plan = load_spec(str(probe))
        print(f"warming the model cache (attack stage, clean reference) in {plan.attacks[0].config['cache_dir']} ...", flush=True)
        t = time.perf_counter()
        backend = TrialBackend()
        info = backend.attack_stage(plan.attacks[0].config, lambda m: None)
        backend.clean_reference(plan.attacks[0].config, lambda m: None)
        backdoored_ca = info["backdoored_ca"]
        floor = max(0.0, backdoored_ca - args.gate)
        print(f"  {time.perf_counter() - t:.1f} s; backdoored CA {backdoored_ca:.4f}, ASR {info['backdoored_asr']:.4f}; "
              f"gate floor (and CA's HV reference) {floor:.4f}", flush=True)
        if args.calibrate:
            from trainables.config import build
            from trainables.schema import RunConfig
            from trainables.trial import run_trial

            study = plan.studies[0]
            cfg = build(RunConfig, {**study.config, "defense": {**study.config["defense"], "theta": 0.5, "lr": 0.01,
                                                                "pgd_eps": 8 / 255}})
            r = run_trial(cfg, None, log=lambda m: None)
            ev = r["time_eval_ra_s"] + r["time_eval_qra_s"]
            print(f"one trial: {r['wall_time_s']:.1f} s; defense {r['time_defense_s']:.1f} s, RA {r['time_eval_ra_s']:.1f} s, "
                  f"QRA {r['time_eval_qra_s']:.1f} s, CA/ASR {r['time_eval_ca_asr_s']:.1f} s (RA + QRA {ev / r['wall_time_s']:.0%} "
                  f"of it); CA {r['ca']:.4f}, R-ASR {r['r_asr']:.4f}, Q-ASR {r['q_asr']:.4f}")
            return
        start_ray(attempts=6, num_cpus=2)  # one Ray for every side: none pays its start
        modes = ["after", "during"] if args.mode == "both" else [args.mode]
        during = {k: v for k, v in (("slack", args.slack), ("check_from", args.check_from)) if v is not None}
        u = side("ungated", spec(store, args.trials, args.smoke_test, floor, sweep_seed=args.sweep_seed,
                                 protocol=protocol), tmp)
        gated = [side(f"gated-{m}", spec(store, args.trials, args.smoke_test, floor, gate=args.gate,
                                         during=m == "during", during_settings=during, sweep_seed=args.sweep_seed,
                                         protocol=protocol), tmp)
                 for m in modes]
        for s in [u, *gated]:
            s["hv"] = hv(s["out"].records, s["spec"], floor)
            s["hv0"] = hv(s["out"].records, s["spec"], 0.0)
        rows = []
        for mode, g in zip(modes, gated):
            wall_ratio, cpu_ratio = g["wall"] / u["wall"], g["cpu_s"] / u["cpu_s"] if u["cpu_s"] else float("nan")
            hv_ratio = g["hv"] / u["hv"] if u["hv"] > 0 else float("nan")
            ok = wall_ratio <= 0.70 and abs(hv_ratio - 1) <= 0.05 and not g["leaks"]
            print(f"\ngate {MODES[mode]}: wall: ungated {u['wall']:.1f} s, gated {g['wall']:.1f} s (x{wall_ratio:.2f}); "
                  f"trials' CPU: {u['cpu_s']:.1f} s / {g['cpu_s']:.1f} s (x{cpu_ratio:.2f}); hypervolume {u['hv']:.4f} / "
                  f"{g['hv']:.4f} (x{hv_ratio:.3f}; with CA's reference 0: {u['hv0']:.4f} / {g['hv0']:.4f}); evaluation "
                  f"share of a full trial {u['eval_share']:.2f}; gated trials carrying R-ASR/Q-ASR: {len(g['leaks'])} "
                  f"{g['leaks']}")
            print("done-when (wall <= 0.70, HV within 5%, no leak): " + ("met" if ok else "NOT met"))
            settings = {"check_from": GateConfig.check_from, "slack": GateConfig.slack, **during}
            mode_text = MODES[mode] + (" (" + ", ".join(f"{k} {v:g}" for k, v in settings.items()) + ")"
                                       if mode == "during" else "")
            mode_text += f", sweep seed {args.sweep_seed}" if args.sweep_seed else ""
            mode_text += ", RA and QRA at the protocol's defaults" if protocol else ""
            rows.append(f"| {datetime.date.today()} | {machine()} | {args.trials} | {args.gate:g} | {mode_text} | "
                        f"{u['eval_share']:.2f} | {u['wall']:.0f} / {u['cpu_s']:.0f} / {u['full']} | {g['wall']:.0f} / "
                        f"{g['cpu_s']:.0f} / {g['full']} / {g['gated']}"
                        + (f" ({g['stopped']} stopped during the defense)" if mode == "during" else "")
                        + f" | {wall_ratio:.2f} | {cpu_ratio:.2f} | {u['hv']:.4f} / {g['hv']:.4f} ({u['hv0']:.4f} / "
                        f"{g['hv0']:.4f}) | {hv_ratio:.3f} | {len(g['leaks'])} | {u['load']}, {g['load']} | `{{cmd}}` |")
        if args.record and not args.smoke_test:
            cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
            text = HEADER.format(section=SECTION)
            header = next(line for line in text.splitlines() if line.startswith("| date"))
            append_rows(SECTION, text, header, [r.replace("{cmd}", cmd) for r in rows],
                        **({"doc": args.doc} if args.doc else {}))
            print(f"recorded in {args.doc or 'docs/benchmarks.md'}")


if __name__ == "__main__":
    main()
