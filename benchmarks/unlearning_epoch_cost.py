"""One epoch of BI-BAU(U) against one of SAU and one round of I-BAU, on the same model and the same
clean split, at the same PGD steps, from one run: the cost ratios of issue 30 (BI-BAU(U)'s epoch should
cost no more than SAU's at the same PGD steps).

Each defense runs for ``--epochs`` epochs (I-BAU: rounds) from the registered defaults, with the PGD
steps of BI-BAU and SAU both set to ``--pgd-steps`` (SAU's early exit off, ``pgd_early_exit: false``, so
both do the same number of steps; ``--early-exit`` measures SAU as it runs). Seconds per epoch are read from each defense's history (BI-BAU's includes
its Fishers; epoch 1 has no unlearning Fisher, so the last epoch is the steady state and is the one
compared). Weights are a fresh model's: the cost of an epoch does not depend on them.

    python benchmarks/unlearning_epoch_cost.py --device cuda --record   # ResNet-18, 2,500 images
    python benchmarks/unlearning_epoch_cost.py --tiny --doc /tmp/u.md   # CPU, seconds: checks the script
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from benchmarks.common import DOC, append_rows, load_average, machine  # noqa: E402

SECTION = "## Epoch cost of BI-BAU(U), SAU and I-BAU (benchmarks/unlearning_epoch_cost.py)"
SECTION_TEXT = f"""{SECTION}

One epoch of each on the same model and clean split, at the same PGD steps (BI-BAU(U) and SAU;
SAU without its early exit unless the row says so), the last epoch of each run (steady state);
I-BAU's epoch is one round (universal perturbation pass + one hypergradient step per batch, K = 5).
Ratios are SAU / BI-BAU(U) and I-BAU / BI-BAU(U): above 1, BI-BAU(U) is the cheaper. "Fishers s" is the
part of BI-BAU(U)'s epoch spent on METHOD's two per-sample Fishers (F^C on the clean split, F^U on the
previous epoch's x'); "BI-BAU(U) settings" names a non-default setting it ran with (an extension's
cost, measured beside the method's).
"""
HEADER = ("| date | machine | model | images | batch | PGD steps | BI-BAU(U) settings | BI-BAU(U) s | Fishers s | SAU s | "
          "I-BAU s | SAU / BI-BAU | I-BAU / BI-BAU | load | command |")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--width", type=int, default=None, help="model width (the small ResNet's; None: its default)")
    p.add_argument("--images", type=int, default=2500, help="clean split size (METHOD: 5%% of CIFAR-10)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pgd-steps", type=int, default=5, help="PGD steps of both BI-BAU(U) and SAU (SAU's default 5)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of each (the last is compared)")
    p.add_argument("--early-exit", action="store_true", help="let SAU's shared PGD exit early, as it runs")
    p.add_argument("--bibau-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a non-default BI-BAU(U) setting (e.g. fisher_estimator=batch), repeatable; the row names it")
    p.add_argument("--tiny", action="store_true", help="CPU, a small ResNet and 64 images: seconds")
    p.add_argument("--record", action="store_true", help="append the row to --doc")
    p.add_argument("--doc", type=Path, default=DOC)
    args = p.parse_args(argv)
    if args.tiny:
        args.device, args.model, args.width, args.images, args.size, args.batch_size = "cpu", "small_resnet", 8, 64, 16, 32
        args.epochs, args.record = 2, True
    if args.pgd_steps < 1 or args.epochs < 1 or args.images < 2:
        p.error("--pgd-steps, --epochs must be >= 1 and --images >= 2")
    for item in args.bibau_set:
        key = item.partition("=")[0]
        if "=" not in item or key in ("pgd_steps", "epochs", "batch_size"):
            p.error(f"--bibau-set {item!r}: KEY=VALUE of a BI-BAU setting other than pgd_steps, epochs, batch_size "
                    "(those are the comparison's own options)")
    return args


def main(argv=None) -> int:
    import trainables  # noqa: F401  (fill the registries)
    from trainables.config import build
    from trainables.data.base import ImageSet
    from trainables.defenses import DefenseConfig, DefenseContext, build_defense
    from trainables.models import ModelConfig, create_model
    from trainables.registry import DEFENSES

    args = parse(argv)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (args.images, 3, args.size, args.size), generator=g, dtype=torch.uint8),
                     torch.arange(args.images) % 10)
    model_cfg = {"name": args.model, **({"width": args.width} if args.width else {})}
    model = create_model(ModelConfig(**model_cfg), 10, generator=torch.Generator().manual_seed(0)).to(device)
    bibau_extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.bibau_set)}
    common = {"epochs": args.epochs, "batch_size": args.batch_size, "crop_padding": 0, "hflip": False}
    settings = {
        "bibau_u": {**common, "pgd_steps": args.pgd_steps, **bibau_extra},
        "sau": {**common, "pgd_steps": args.pgd_steps, "pgd_early_exit": args.early_exit},
        "ibau": common,
    }
    seconds = {}
    for name, s in settings.items():
        defense = build_defense(build(DefenseConfig, {"name": name, **s}, "defense", registry=DEFENSES))
        ctx = DefenseContext(device=device, num_classes=10, seed=0, hflip=False, log=lambda line: None)
        result = defense.purify(model, clean, ctx)
        seconds[name] = result.history[-1]["seconds"]  # BI-BAU's includes its Fishers
        if name == "bibau_u":
            fisher_s = result.history[-1].get("fisher_seconds", 0.0)
        print(f"{name}: epoch {len(result.history)} in {seconds[name]:.3f}s", flush=True)
    sau, ibau = seconds["sau"] / seconds["bibau_u"], seconds["ibau"] / seconds["bibau_u"]
    print(f"SAU / BI-BAU(U) = {sau:.2f}; I-BAU / BI-BAU(U) = {ibau:.2f} "
          f"({'BI-BAU(U) no costlier than SAU' if sau >= 1 else 'BI-BAU(U) costlier than SAU'})")
    if args.record:
        command = "python benchmarks/unlearning_epoch_cost.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        row = (f"| {datetime.date.today()} | {machine(device)} | {args.model}{f' w{args.width}' if args.width else ''} | "
               f"{args.images} | {args.batch_size} | {args.pgd_steps}{'' if not args.early_exit else ' (SAU early exit)'} | "
               f"{', '.join(args.bibau_set) or 'defaults'} | {seconds['bibau_u']:.2f} | {fisher_s:.2f} | {seconds['sau']:.2f} | {seconds['ibau']:.2f} | {sau:.2f} | {ibau:.2f} | "
               f"{load_average()} | `{command}` |")
        append_rows(SECTION, SECTION_TEXT, HEADER, [row], args.doc)
        print(f"recorded in {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
