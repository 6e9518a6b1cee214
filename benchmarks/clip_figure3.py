"""The paper's Figure 3 at CPU scale: a tiny CLIP pre-trained contrastively on CIFAR-10 captions,
backdoored by BadNets and BadCLIP, purified by CleanCLIP and BI-BAU-CLIP (T and U), evaluated
zero-shot by CA, ASR and R-ASR (RA on pairs; the same RA on the clean CLIP beside it).

    python benchmarks/clip_figure3.py --record
    python benchmarks/clip_figure3.py --attacks badnets --defenses none,bibau_clip_u --record

One ``run_trial`` per row on the config of ``search_spaces/clip_cpu.yaml``'s base (micro CLIP,
10,000 pairs, 2,000 test images); the clean pre-training and each attack's model are cached, so
every row after the first of an attack reuses them. The paper's ordering to look for: CleanCLIP's
R-ASR (BadNets) and ASR (BadCLIP) above BI-BAU-CLIP's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from benchmarks.common import append_rows, load_average, machine  # noqa: E402
from trainables.config import ConfigError, build, merge, parse_overrides  # noqa: E402
from trainables.schema import RunConfig  # noqa: E402
from trainables.trial import run_trial  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "search_spaces" / "clip_cpu.yaml"
ATTACKS = ("badnets", "badclip")
DEFENSES = ("none", "cleanclip", "bibau_clip_u", "bibau_clip_t")
SECTION = "## CLIP, Figure 3 at CPU scale (clip_figure3.py)"
HEADER = "| date | attack | defense | settings | zero-shot CA | ASR | R-ASR | RA on the clean CLIP: ASR | defense s | machine (load) | command |"
SECTION_TEXT = f"""{SECTION}

Tiny CLIP (`bibau-ViT-micro-8`) pre-trained contrastively on templated CIFAR-10 captions, backdoored by
fine-tuning on poisoned pairs, purified, evaluated zero-shot ("a photo of a {{class}}."); RA: 5 poisoned pairs
among the retuning pairs, contrastive fine-tuning. One row per `run_trial`.

{HEADER}
|---|---|---|---|---|---|---|---|---|---|---|"""


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def config(attack: str, defense: str, args) -> RunConfig:
    spec = yaml.safe_load(SPEC.read_text())
    base = spec["base"]
    attack_cfg = next(a for a in spec["attacks"] if a["name"] == attack)
    defense_cfg = None
    if defense != "none":
        entry = next(d for d in spec["defenses"] if d["name"] == defense)
        defense_cfg = {"name": defense, **entry.get("fixed", {})}
    data = {"seed": args.seed, "attack": attack_cfg, "defense": defense_cfg, "device": args.device}
    if args.train_size:
        data["data"] = {"train_size": args.train_size}
    cfg = merge(merge(base, data), {"data": {"name": "cifar10"}})
    return build(RunConfig, merge(cfg, parse_overrides(args.set)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--defenses", default=",".join(DEFENSES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-size", type=int, default=None, help="training pairs (default: the spec's 10,000)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change every row's run config (e.g. train.epochs=40); a reduced run says so in its command")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    ap.add_argument("--json", default=None, help="write every report to this file")
    args = ap.parse_args(argv)
    try:  # malformed overrides and bad configs fail here, before any work
        for attack in args.attacks.split(","):
            for defense in args.defenses.split(","):
                config(attack, defense, args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StopIteration:
        spec = yaml.safe_load(SPEC.read_text())
        print(f"error: --attacks {args.attacks} / --defenses {args.defenses}: allowed: attacks "
              f"{', '.join(a['name'] for a in spec['attacks'])}; defenses none, "
              f"{', '.join(d['name'] for d in spec['defenses'])} (those of {SPEC.name})", file=sys.stderr)
        return 2
    command = "python benchmarks/clip_figure3.py " + " ".join(argv if argv is not None else sys.argv[1:])
    reports = []
    for attack in args.attacks.split(","):
        for defense in args.defenses.split(","):
            cfg = config(attack, defense, args)
            t = time.perf_counter()
            report = run_trial(cfg, log=print)
            report["bench_seconds"] = time.perf_counter() - t
            reports.append(report)
            fixed = next((d.get("fixed", {}) for d in yaml.safe_load(SPEC.read_text())["defenses"]
                          if d["name"] == defense), {})
            fixed = {**fixed, **parse_overrides(args.set).get("defense", {})} if defense != "none" else {}
            settings = ", ".join(f"{k} {v}" for k, v in fixed.items()) or "-"
            row = (f"| {datetime.date.today()} | {attack} | {defense} | {settings} | {pct(report['ca'])} | "
                   f"{pct(report['asr'])} | {pct(report.get('r_asr'))} | {pct(report.get('ra_clean_asr'))} | "
                   f"{report['time_defense_s']:.0f} | {machine(cfg.device if cfg.device != 'auto' else None)} "
                   f"({load_average()}) | `{command}` |")
            print(row)
            if args.record:
                append_rows(SECTION, SECTION_TEXT, HEADER, [row])
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
