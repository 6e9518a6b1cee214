"""Tables 1 and 2 of the paper at CPU scale: CIFAR-10, the small ResNet, every registered attack, each
purified by BI-BAU(T), BI-BAU(U), FT and the IBU reference, evaluated by CA, ASR, R-ASR, Q-ASR, BEC.

    python benchmarks/cifar10_small.py --record                      # every registered attack
    python benchmarks/cifar10_small.py --attacks badnets,blended --record

The attack list is the attack registry (less ``clean``). The attack stage is
`search_spaces/run_<attack>_cifar10.yaml` (20,000 training images, small ResNet width 16 depth 4,
20 epochs, flips only): the same content hash as `bibau run` on that file, so the backdoored models
come from the cache when those runs were made; an attack without such a file runs at its registered
defaults on the training of run_badnets_cifar10.yaml. Each row is one `run_trial`
(attack from the cache -> defense -> every evaluation) with the defense's registered defaults
unless `--defense-set` changes them; the "none" row evaluates the backdoored model itself.
The clean reference model (RA on clean, QRA, BEC) is trained once, through the same cache.

Checks the Done-when targets of issues 3 and 12 and prints them: BI-BAU(U) ASR <= 0.10, R-ASR <= 0.20,
Q-ASR <= 0.20 at a CA drop of at most 8 points; FT's R-ASR above BI-BAU(U)'s; the backdoored model's
ASR >= 0.85 (0.60 for the adaptive attacks at their low rates) with CA within 3 points of BadNets'.
Each line also prints the attack stage's seconds per training epoch.
`--record` appends one row per trial to docs/benchmarks.md; `--json` writes every report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, append_rows, load_average, machine  # noqa: E402
from orchestrator.config import load_run_config  # noqa: E402
from trainables.config import parse_overrides  # noqa: E402
from trainables.registry import ATTACKS as ATTACK_REGISTRY  # noqa: E402
from trainables.trial import run_trial  # noqa: E402

ATTACKS = tuple(name for name in ATTACK_REGISTRY.names() if name != "clean")
DEFENSES = ("none", "bibau_t", "bibau_u", "ft", "ibu")
METRICS = ("ca", "asr", "ra", "qra", "bec")
# BI-BAU at the registered defaults (METHOD: 20 epochs, 20 PGD steps) takes about an hour per model
# on one CPU core; the CPU scale runs 5 epochs (METHOD's own first run) of 5 PGD steps of ε/4, and
# ε = 16/255, which kept more CA than 25/255 at equal R-ASR in the settings search (docs/benchmarks.md).
_CPU_BIBAU = ("epochs=5", "pgd_steps=5", "pgd_eps=0.0627", "pgd_step=0.0157")
CPU_SCALE = {"bibau_u": _CPU_BIBAU, "bibau_t": _CPU_BIBAU}
TARGETS = {"asr": 0.10, "r_asr": 0.20, "q_asr": 0.20, "ca_drop": 0.08}
# the backdoored model (issue 12): ASR at least this (the adaptive attacks run at the paper's 0.3%),
# CA at most this far below the BadNets model's
ATTACK_ASR = {"adaptive_blend": 0.60, "adaptive_patch": 0.60}
ATTACK_ASR_DEFAULT = 0.85
ATTACK_CA_GAP = 0.03

SECTION = "## CIFAR-10 at CPU scale: Tables 1 and 2 (benchmarks/cifar10_small.py)"
HEADER = ("| date | machine | attack | defense | settings | CA | ASR | R-ASR | RA on clean | Q-ASR | BEC "
          "| attack s | defense s | eval s | load | command |")
SECTION_TEXT = f"""{SECTION}

One `run_trial` per row on CIFAR-10 (20,000 training / 2,000 test images, small ResNet width 16,
depth 4, 20 epochs with flips, 10% poison, target 0; defender's clean split 1,000 images): the attack stage
from the cache, the defense, then CA, ASR, R-ASR (RA: 5 poisoned among 1,000 images for BadNets,
1 for Blended; 5 epochs), RA on the clean reference model, Q-ASR (QRA, 50 generator epochs on
500 + 500 images, 16/255) and BEC. "none" is the backdoored model (no QRA: its backdoor fires
unaided). Settings: the defense's
non-default values (BI-BAU's CPU scale: 5 epochs of 5 PGD steps, ε = 16/255). Times in seconds: attack (0 on a cache hit), defense, evaluation.

{HEADER}
|{'---|' * (HEADER.count('|') - 1)}
"""


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def defense_items(defense: str, args) -> list[str]:
    """KEY=VALUE settings of ``defense``: the CPU scale's (unless --full-scale), then --defense-set's."""
    items = [] if args.full_scale else list(CPU_SCALE.get(defense, ()))
    return items + [item.split(".", 1)[1] for item in args.defense_set if item.split(".", 1)[0] == defense]


def trial_config(attack: str, defense: str, args) -> object:
    # no QRA on the undefended model: its backdoor fires without help, and QRA is the costliest evaluation
    metrics = [m for m in args.metrics if defense != "none" or m != "qra"]
    overrides = [f"evaluation.metrics=[{','.join(metrics)}]", f"seed={args.seed}", *args.set]
    if defense != "none":
        overrides.append(f"defense.name={defense}")
        overrides += [f"defense.{item}" for item in defense_items(defense, args)]
    own = ROOT / "search_spaces" / f"run_{attack}_cifar10.yaml"
    if not own.is_file():  # a registered attack without its own run file: its defaults, BadNets' training
        overrides.insert(0, f"attack={{name: {attack}}}")
        own = ROOT / "search_spaces" / "run_badnets_cifar10.yaml"
    return load_run_config(str(own), overrides)


def seconds_per_epoch(report: dict) -> float | None:
    """Mean training seconds per epoch of the attack stage (from the cached history on a hit)."""
    rows = [row["seconds"] for row in report.get("history", {}).get("attack", []) if "seconds" in row]
    return sum(rows) / len(rows) if rows else None


def settings(defense: str, args, cfg) -> str:
    """The defense's non-default settings, then the clean split's augmentation as resolved."""
    items = ", ".join(defense_items(defense, args)) or "defaults"
    d = cfg.defense
    if d is None or not hasattr(d, "crop_padding"):
        return items
    return f"{items}; crop {d.crop_padding}, {'flips' if d.hflip else 'no flips'}"


def check(reports: dict[tuple[str, str], dict]) -> list[str]:
    """The Done-when lines of issue 3, each with its numbers and PASS or MISS."""
    lines = []
    badnets = reports.get(("badnets", "none"))
    for attack in ATTACKS:
        base, bibau, ft = (reports.get((attack, d)) for d in ("none", "bibau_u", "ft"))
        if base is not None:
            need = ATTACK_ASR.get(attack, ATTACK_ASR_DEFAULT)
            lines.append(f"{attack} backdoored ASR {pct(base['asr'])} >= {pct(need)}: "
                         f"{'PASS' if base['asr'] >= need else 'MISS'}")
            if badnets is not None and attack != "badnets":
                gap = badnets["ca"] - base["ca"]
                lines.append(f"{attack} backdoored CA {pct(base['ca'])} within {pct(ATTACK_CA_GAP)} of BadNets' "
                             f"{pct(badnets['ca'])}: {'PASS' if gap <= ATTACK_CA_GAP else 'MISS'}")
        if bibau is None:
            continue
        conds = [("ASR", bibau["asr"], TARGETS["asr"]), ("R-ASR", bibau.get("r_asr"), TARGETS["r_asr"]),
                 ("Q-ASR", bibau.get("q_asr"), TARGETS["q_asr"])]
        if base is not None:
            conds.append(("CA drop", base["ca"] - bibau["ca"], TARGETS["ca_drop"]))
        for name, value, limit in conds:
            ok = value is not None and value <= limit
            lines.append(f"{attack} BI-BAU(U) {name} {pct(value)} <= {pct(limit)}: {'PASS' if ok else 'MISS'}")
        if ft is not None and ft.get("r_asr") is not None and bibau.get("r_asr") is not None:
            ok = ft["r_asr"] > bibau["r_asr"]
            lines.append(f"{attack} FT R-ASR {pct(ft['r_asr'])} > BI-BAU(U) R-ASR {pct(bibau['r_asr'])}: "
                         f"{'PASS' if ok else 'MISS'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    ap.add_argument("--defenses", default=",".join(DEFENSES), help=f"comma list of {', '.join(DEFENSES)}")
    ap.add_argument("--metrics", default=",".join(METRICS), help="evaluations to run (ca and asr always run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of every trial's run config, e.g. evaluation.qra_epochs=20")
    ap.add_argument("--defense-set", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                    help="override of one defense's settings, e.g. bibau_u.pgd_eps=0.0314")
    ap.add_argument("--full-scale", action="store_true",
                    help="the defenses' registered defaults, without the CPU scale's shorter BI-BAU")
    ap.add_argument("--out", type=Path, default=None, help="folder for each trial's checkpoints and results.json")
    ap.add_argument("--json", type=Path, default=None, help="write every report (history left out) to this file")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    ap.add_argument("--quiet", action="store_true", help="only the summary, not each trial's progress")
    args = ap.parse_args(argv)
    args.metrics = [m for m in args.metrics.split(",") if m]
    attacks = [a for a in args.attacks.split(",") if a]
    defenses = [d for d in args.defenses.split(",") if d]
    for name, given, allowed in (("--attacks", attacks, ATTACKS), ("--defenses", defenses, DEFENSES)):
        if unknown := [g for g in given if g not in allowed]:
            ap.error(f"{name}: unknown {unknown}; known: {', '.join(allowed)}")
    for item in args.defense_set:
        if item.split(".", 1)[0] not in DEFENSES[1:] or "=" not in item:
            ap.error(f"--defense-set {item!r}: expected DEFENSE.KEY=VALUE with DEFENSE in {', '.join(DEFENSES[1:])}")
    parse_overrides(args.set)  # malformed overrides fail here, before any work
    configs = {(a, d): trial_config(a, d, args) for a in attacks for d in defenses}  # every config validated first

    command = "python benchmarks/cifar10_small.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    log = (lambda line: None) if args.quiet else print
    reports: dict[tuple[str, str], dict] = {}
    rows = []
    for (attack, defense), cfg in configs.items():
        out = args.out / f"{attack}-{defense}" if args.out else None
        report = run_trial(cfg, out, log=log)
        report["attack_s_per_epoch"] = seconds_per_epoch(report)
        report.pop("history", None)
        report["settings"] = settings(defense, args, cfg)
        reports[(attack, defense)] = report
        line = (f"{attack:8s} {defense:8s} CA {pct(report['ca'])} ASR {pct(report['asr'])} "
                f"R-ASR {pct(report.get('r_asr'))} (clean {pct(report.get('ra_clean_asr'))}) "
                f"Q-ASR {pct(report.get('q_asr'))} BEC {num(report.get('bec'))} "
                f"times {report['time_attack_s']:.0f}/{report['time_defense_s']:.0f}/{report['time_eval_s']:.0f}s "
                f"(attack {num(report['attack_s_per_epoch'])} s/epoch)")
        print(line, flush=True)
        rows.append(
            f"| {datetime.date.today()} | {machine()} | {attack} | {defense} | {report['settings']} "
            f"| {pct(report['ca'])} | {pct(report['asr'])} | {pct(report.get('r_asr'))} | {pct(report.get('ra_clean_asr'))} "
            f"| {pct(report.get('q_asr'))} | {num(report.get('bec'))} "
            f"| {report['time_attack_s']:.0f} | {report['time_defense_s']:.0f} | {report['time_eval_s']:.0f} "
            f"| {load_average()} | `{command}` |")
    print("\n".join(check(reports)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f"{a}/{d}": r for (a, d), r in reports.items()}, indent=1, default=str))
    if args.record:
        append_rows(SECTION, SECTION_TEXT, HEADER, rows)
        print(f"recorded {len(rows)} rows in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
