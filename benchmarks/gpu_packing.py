"""Fractional GPUs: the same 4 trials packed 4 to a GPU (``resources.gpus: 0.25``, 4 at a time)
against one at a time (``resources.gpus: 1``), each side one ``run_sweep`` on the same local Ray.

The trials are fixed BI-BAU(U) settings (θ varied) on a ResNet-18 attacked with BadNets on 10,000
CIFAR-10 images, evaluated with CA, ASR, R-ASR and Q-ASR; the attack stage and the clean
reference are trained once, untimed, before either side. Ratio = one-at-a-time wall / packed
wall: how much more a GPU gives when 4 small trials share it (Ray does the bookkeeping only; GPU
memory is not isolated, so the trials must fit together: each reports its peak memory).

    python benchmarks/gpu_packing.py                          # needs a GPU; records a row
    python benchmarks/gpu_packing.py --tiny --doc /tmp/b.md   # CPU with a logical GPU: checks the plumbing
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from benchmarks.common import DOC, append_rows, load_average, machine, start_ray  # noqa: E402

SECTION = "## Fractional GPUs: 4 trials packed on one GPU (benchmarks/gpu_packing.py)"
SECTION_TEXT = f"""{SECTION}

The same 4 fixed BI-BAU(U) trials (ResNet-18, BadNets, 10,000 CIFAR-10 images; CA, ASR, R-ASR, Q-ASR)
through `run_sweep` twice on one local Ray: `resources.gpus: 0.25` with 4 at a time, and `resources.gpus: 1`
one at a time. Warm model cache. Ratio = one-at-a-time wall / packed wall (the sweep's wall, Ray's
start excluded: one Ray serves both sides). A `--tiny` row is the CPU plumbing check, not a GPU number.

| date | machine | device | trials | mean trial s (packed / alone) | packed wall s | one-at-a-time wall s | ratio | load avg | command |
|---|---|---|---|---|---|---|---|---|---|
"""
HEADER = next(line for line in SECTION_TEXT.splitlines() if line.startswith("| date"))


def spec(storage: Path, tiny: bool, gpus: float, concurrency: int, data_root: str | None) -> dict:
    data = {"name": "cifar10", "train_size": 300 if tiny else 10000, "test_size": 100 if tiny else 2000,
            "clean_fraction": 0.05, **({"root": data_root} if data_root else {})}
    return {
        "name": "packing", "storage": str(storage), "seed": 0,
        "base": {
            "seed": 0, "device": "auto", "data": data,
            "model": {"name": "small_resnet", "width": 4, "depth": 1} if tiny else {"name": "resnet18"},
            "train": {"epochs": 1 if tiny else 10, "batch_size": 128, "lr": 0.05, "crop_padding": 0, "eval_every": 0},
            "evaluation": {"metrics": ["ca", "asr", "ra", "qra"], "ra_size": 50 if tiny else 1000,
                           "ra_epochs": 1 if tiny else 3, "ra_on_clean": False, "qra_epochs": 1 if tiny else 20,
                           "qra_clean_size": 20 if tiny else 500, "qra_poison_size": 20 if tiny else 500,
                           "qra_hidden": 16 if tiny else 1024},
        },
        "attacks": [{"name": "badnets", "target": 0, "poison_rate": 0.1}],
        "defenses": [{"name": "bibau_u", "label": f"bibau-{i}",
                      "fixed": {"epochs": 1 if tiny else 3, "pgd_steps": 1 if tiny else 20, "crop_padding": 0,
                                **({"fisher_samples": 8, "batch_size": 16} if tiny else {}), "theta": round(i / 3, 3)}}
                     for i in range(4)],
        "concurrency": concurrency,
        "resources": {"cpus": 1, "gpus": gpus},
        "export_rule": "max ca; r_asr <= 0.2; q_asr <= 0.2; fallback nearest",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU-sized, with a logical GPU: checks the plumbing")
    p.add_argument("--data", default=None, help="CIFAR-10 source (data.root); default: the usual places")
    p.add_argument("--doc", default=str(DOC), help="markdown file that gets the row")
    p.add_argument("--no-record", action="store_true", help="print only")
    args = p.parse_args(argv)

    import ray
    import torch
    import yaml

    from orchestrator.spec import load_spec
    from orchestrator.sweep import run_sweep
    from trainables.ray_adapters import TrialBackend

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        raise SystemExit("gpu_packing: no CUDA device; run with --tiny to check the plumbing on a CPU")
    os.environ["RAY_ADDRESS"] = ""
    with tempfile.TemporaryDirectory(prefix="bibau-packing-") as tmp:
        tmp = Path(tmp)
        store = tmp / "store"
        sides = {"packed": (0.25, 4), "alone": (1.0, 1)}
        files = {}
        for name, (gpus, conc) in sides.items():
            files[name] = tmp / f"{name}.yaml"
            files[name].write_text(yaml.safe_dump(spec(store, args.tiny, gpus, conc, args.data)))
        _, plan = load_spec(str(files["packed"]))
        t = time.perf_counter()
        backend = TrialBackend()
        info = backend.attack_stage(plan.attacks[0].config, lambda m: None)
        backend.clean_reference(plan.attacks[0].config, lambda m: None)
        print(f"model cache warm ({time.perf_counter() - t:.1f}s): backdoored CA {info['backdoored_ca']:.4f}, "
              f"ASR {info['backdoored_asr']:.4f}", flush=True)
        # one GPU (a logical one on a CPU: Ray's bookkeeping is what the tiny run checks)
        start_ray(num_cpus=max(4, os.cpu_count() or 1), num_gpus=1)
        results = {}
        try:
            for name in ("packed", "alone"):
                s, pl = load_spec(str(files[name]))
                t = time.perf_counter()
                out = run_sweep(s, pl, log=lambda m: None, verbose=0)
                wall = time.perf_counter() - t
                trials = [r.metrics.get("time_trial_s", float("nan")) for r in out.records]
                done = sum(r.status == "completed" for r in out.records)
                peak = max((r.metrics.get("cuda_peak_memory_mb", 0.0) for r in out.records), default=0.0)
                results[name] = (wall, sum(trials) / max(len(trials), 1), done)
                print(f"{name}: {wall:.1f} s wall, {done}/{len(out.records)} trials completed, mean trial "
                      f"{results[name][1]:.1f} s, peak GPU memory of a trial {peak:.0f} MiB", flush=True)
        finally:
            ray.shutdown()
    (pw, pt, pd), (aw, at, ad) = results["packed"], results["alone"]
    ratio = aw / pw
    print(f"one at a time {aw:.1f} s / packed {pw:.1f} s = {ratio:.2f}x", flush=True)
    if pd != 4 or ad != 4:
        print("warning: not every trial completed; the ratio compares unequal work", flush=True)
    if not args.no_record:
        device = torch.device("cuda") if cuda else torch.device("cpu")
        command = " ".join(["python"] + [shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]])
        row = (f"| {datetime.date.today()} | {machine(device)} | {device.type}{' (tiny, logical GPU)' if args.tiny else ''} | "
               f"4 | {pt:.1f} / {at:.1f} | {pw:.1f} | {aw:.1f} | {ratio:.2f} | {load_average()} | `{command}` |")
        append_rows(SECTION, SECTION_TEXT, HEADER, [row], Path(args.doc))
        print(f"recorded in {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
