"""Tables 1 and 2 of the paper at CPU scale: CIFAR-10, the small ResNet, every registered attack, each
purified by every registered defense: BI-BAU(T), BI-BAU(U) (the paper's method), this project's
extension of them (bibau_t_kd, bibau_u_kd: + the M-step distillation), FT, the IBU reference and
the baselines NC, BTI-DBF(U), ANP, EP, RNP, CLP, I-BAU, SAU, PAM, FST (every registered defense of the
classifier setting), evaluated by CA, ASR, R-ASR, Q-ASR, BEC.

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

Each row gives the data the defense used (its declared ``data_use``; EP's batch of the poisoned
training set is outside the post-training threat model) and its cost in seconds and in training-epoch
equivalents (defense seconds / seconds of one epoch of the attack stage's training, the median
epoch of that training as recorded with the model).

Checks the Done-when targets and prints them: the backdoored model's ASR >= 0.85 (0.60 for the
adaptive attacks at their low rates) with CA within 3 points of BadNets'; for each BI-BAU variant run, ASR <= 0.10, R-ASR <= 0.20,
Q-ASR <= 0.20, and its CA drop (at most 8 points for the extension; recorded only for the paper's
method); FT's R-ASR above BI-BAU(U)'s; then issue 13's comparisons: each baseline's worst of R-ASR
and Q-ASR against BI-BAU(U)'s, and the paper's §5.8 cost ordering (trigger synthesis, NC and
BTI-DBF(U), costlier than pruning, ANP, EP, RNP, CLP).
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
from trainables.defenses.bibau import BiBauConfig  # noqa: E402
from trainables.registry import ATTACKS as ATTACK_REGISTRY  # noqa: E402
from trainables.registry import DEFENSES as REGISTERED  # noqa: E402
from trainables.trial import run_trial  # noqa: E402

# every registered attack and defense of the classifier setting (clip_figure3.py: the contrastive one)
ATTACKS = tuple(name for name in ATTACK_REGISTRY.names() if name != "clean" and ATTACK_REGISTRY.get(name).serves(False))
DEFENSES = ("none", *(n for n in REGISTERED.names() if not REGISTERED.get(n).contrastive))  # "none": the backdoored model
BIBAU = ("bibau_u", "bibau_t", "bibau_u_kd", "bibau_t_kd")
PAPER_METHOD = ("bibau_u", "bibau_t")  # the registered defaults run METHOD.md; the _kd ones are the extension
SYNTHESIS, PRUNING = ("nc", "btidbf_u"), ("anp", "ep", "rnp", "clp")  # the paper's §5.8 families
METRICS = ("ca", "asr", "ra", "qra", "bec")
# BI-BAU at the registered defaults (METHOD: 20 epochs, 20 PGD steps) takes about an hour per model
# on one CPU core; the CPU scale runs 5 epochs (METHOD's own first run) of 5 PGD steps of ε/4 at
# METHOD's ε (25/255). It shortens the cost only: until 2026-12-01 it also lowered ε to 16/255, chosen
# on BadNets for CA, a method setting picked by looking at the poisoned test set (docs/benchmarks.md).
_CPU_BIBAU = ("epochs=5", "pgd_steps=5", f"pgd_step={BiBauConfig().pgd_eps / 4:.4g}")
# The baselines' registered defaults are their references' (NC: <= 80 search epochs per class and 100
# unlearning epochs; BTI-DBF(U): 5 rounds of 20 + 30 + 30 epochs; ANP: 2000 iterations; SAU: 100 epochs
# of 5 shared-PGD steps; PAM: BTI-DBF's inversion, 3 rounds of 20 + 30 + 30 epochs). The CPU scale
# shortens the costly ones by about 4x, the cheap ones (EP, RNP, CLP, I-BAU: 5 rounds, FST: 10 epochs)
# run their defaults.
CPU_SCALE = {**{name: _CPU_BIBAU for name in BIBAU},
             "nc": ("search_epochs=20", "early_stop_patience=10", "epochs=25"),
             "btidbf_u": ("rounds=3", "pretrain_epochs=10", "mask_epochs=10", "invert_epochs=10", "epochs=10"),
             "anp": ("iterations=500",),
             "sau": ("epochs=25",),
             "pam": ("rounds=3", "pretrain_epochs=10", "mask_epochs=10", "invert_epochs=10", "epochs=10")}
TARGETS = {"asr": 0.10, "r_asr": 0.20, "q_asr": 0.20, "ca_drop": 0.08}
# the backdoored model (issue 12): ASR at least this (the adaptive attacks run at the paper's 0.3%),
# CA at most this far below the BadNets model's
ATTACK_ASR = {"adaptive_blend": 0.60, "adaptive_patch": 0.60}
ATTACK_ASR_DEFAULT = 0.85
ATTACK_CA_GAP = 0.03

SECTION = "## CIFAR-10 at CPU scale: Tables 1 and 2 with the baselines (benchmarks/cifar10_small.py)"
HEADER = ("| date | machine | attack | defense | data | settings | CA | ASR | R-ASR | RA on clean | Q-ASR | BEC "
          "| attack s | defense s | defense E | eval s | load | command |")
SECTION_TEXT = f"""{SECTION}

One `run_trial` per row on CIFAR-10 (20,000 training / 2,000 test images, small ResNet width 16,
depth 4, 20 epochs with flips, 10% poison, target 0; defender's clean split 1,000 images): the attack stage
from the cache, the defense, then CA, ASR, R-ASR (RA: 5 poisoned among 1,000 images for BadNets,
1 for Blended; 5 epochs), RA on the clean reference model, Q-ASR (QRA, 50 generator epochs on
500 + 500 images, 16/255) and BEC. "none" is the backdoored model (no QRA: its backdoor fires
unaided). Data: what the defense saw (clean_split; none; poisoned_batch, EP's batch of the poisoned
training set, which the post-training threat model does not give). Settings: the defense's
non-default values (BI-BAU's CPU scale: 5 epochs of 5 PGD steps of ε/4 at METHOD's ε 25/255, 16/255
before 2026-12-01; the baselines' CPU scale in `CPU_SCALE`). Times in seconds: attack (0 on a cache hit), defense, evaluation; defense E: the
defense's time in epochs of the attack stage's training.

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


# --set keys that say where things are, not what was measured: left out of a row's settings
WHERE_KEYS = ("cache_dir", "data.root", "data.cache_dir")


def settings(defense: str, args, cfg) -> str:
    """The defense's non-default settings, then the clean split's augmentation as resolved, then
    every --set that changed the run (another width, schedule or evaluation: the row says so)."""
    items = ", ".join(defense_items(defense, args)) or "defaults"
    d = cfg.defense
    if d is not None and hasattr(d, "crop_padding"):
        items = f"{items}; crop {d.crop_padding}, {'flips' if d.hflip else 'no flips'}"
    run = [item for item in args.set if item.split("=", 1)[0].strip() not in WHERE_KEYS]
    return f"{items}; run: {', '.join(run)}" if run else items


def epoch_seconds(report: dict) -> float | None:
    """Seconds of one training epoch of the attack stage (the median recorded epoch)."""
    rows = [r.get("seconds") for r in (report.get("history") or {}).get("attack", []) if isinstance(r, dict)]
    rows = sorted(s for s in rows if isinstance(s, (int, float)) and s > 0)
    return rows[len(rows) // 2] if rows else None


def epochs_equivalent(report: dict) -> float | None:
    per_epoch = report.get("epoch_seconds")
    return None if not per_epoch or report.get("defense") is None else report["time_defense_s"] / per_epoch


def compare_baselines(reports: dict[tuple[str, str], dict]) -> list[str]:
    """Issue 13's comparisons: each baseline's worst reactivated ASR against BI-BAU(U)'s, and the
    §5.8 cost ordering (every trigger-synthesis defense costlier than every pruning one)."""
    lines = []
    worst = lambda r: max((r.get(k) for k in ("r_asr", "q_asr") if r.get(k) is not None), default=None)  # noqa: E731
    for attack in ATTACKS:
        bibau = reports.get((attack, "bibau_u"))
        ref = worst(bibau) if bibau else None
        for d in (*SYNTHESIS, *PRUNING):
            r = reports.get((attack, d))
            if r is None or ref is None or worst(r) is None:
                continue
            ok = worst(r) > ref + 0.10
            lines.append(f"{attack} {d} max(R-ASR, Q-ASR) {pct(worst(r))} well above BI-BAU(U)'s {pct(ref)}: "
                         f"{'PASS' if ok else 'MISS'}")
        costs = {d: epochs_equivalent(reports[(attack, d)]) for d in (*SYNTHESIS, *PRUNING) if (attack, d) in reports}
        syn = [c for d, c in costs.items() if d in SYNTHESIS and c is not None]
        pru = [c for d, c in costs.items() if d in PRUNING and c is not None]
        if syn and pru:
            order = ", ".join(f"{d} {c:.2f}E" for d, c in sorted(costs.items(), key=lambda kv: -(kv[1] or 0)))
            lines.append(f"{attack} cost order {order}; synthesis > pruning: {'PASS' if min(syn) > max(pru) else 'MISS'}")
    return lines


def check(reports: dict[tuple[str, str], dict]) -> list[str]:
    """The Done-when lines, each with its numbers and PASS or MISS."""
    lines = []
    badnets = reports.get(("badnets", "none"))
    for attack in ATTACKS:
        base, ft = reports.get((attack, "none")), reports.get((attack, "ft"))
        if base is not None:
            need = ATTACK_ASR.get(attack, ATTACK_ASR_DEFAULT)
            lines.append(f"{attack} backdoored ASR {pct(base['asr'])} >= {pct(need)}: "
                         f"{'PASS' if base['asr'] >= need else 'MISS'}")
            if badnets is not None and attack != "badnets":
                gap = badnets["ca"] - base["ca"]
                lines.append(f"{attack} backdoored CA {pct(base['ca'])} within {pct(ATTACK_CA_GAP)} of BadNets' "
                             f"{pct(badnets['ca'])}: {'PASS' if gap <= ATTACK_CA_GAP else 'MISS'}")
        for defense in BIBAU:
            bibau = reports.get((attack, defense))
            if bibau is None:
                continue
            conds = [("ASR", bibau["asr"], TARGETS["asr"]), ("R-ASR", bibau.get("r_asr"), TARGETS["r_asr"]),
                     ("Q-ASR", bibau.get("q_asr"), TARGETS["q_asr"])]
            if base is not None:
                # the paper's method: any CA drop, recorded; the extension exists to keep CA
                conds.append(("CA drop", base["ca"] - bibau["ca"], None if defense in PAPER_METHOD else TARGETS["ca_drop"]))
            for name, value, limit in conds:
                if limit is None:
                    lines.append(f"{attack} {defense} {name} {pct(value)} (recorded)")
                    continue
                ok = value is not None and value <= limit
                lines.append(f"{attack} {defense} {name} {pct(value)} <= {pct(limit)}: {'PASS' if ok else 'MISS'}")
            if ft is not None and ft.get("r_asr") is not None and bibau.get("r_asr") is not None:
                ok = ft["r_asr"] > bibau["r_asr"]
                lines.append(f"{attack} FT R-ASR {pct(ft['r_asr'])} > {defense} R-ASR {pct(bibau['r_asr'])}: "
                             f"{'PASS' if ok else 'MISS'}")
    return lines


def parse_grid(argv: list[str] | None, doc: str, attacks: tuple[str, ...], defenses: tuple[str, ...],
               metrics: tuple[str, ...], set_example: str, full_scale_help: str,
               checked_defense_set: tuple[str, ...] = ()) -> argparse.Namespace:
    """The options of a benchmark over an attack x defense grid (this one and clip_vit_cifar10.py), parsed:
    ``attacks``, ``defenses`` and ``metrics`` as lists, unknown names and malformed overrides refused before
    any work; ``--defense-set`` items checked against ``checked_defense_set`` where it is given."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attacks", default=",".join(attacks), help=f"comma list of {', '.join(attacks)}")
    ap.add_argument("--defenses", default=",".join(defenses), help=f"comma list of {', '.join(defenses)}")
    ap.add_argument("--metrics", default=",".join(metrics), help="evaluations to run (ca and asr always run)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override of every trial's run config, e.g. {set_example}")
    ap.add_argument("--defense-set", action="append", default=[], metavar="DEFENSE.KEY=VALUE",
                    help="override of one defense's settings, e.g. bibau_u.pgd_eps=0.0314")
    ap.add_argument("--full-scale", action="store_true", help=full_scale_help)
    ap.add_argument("--out", type=Path, default=None, help="folder for each trial's checkpoints and results.json")
    ap.add_argument("--json", type=Path, default=None, help="write every report (history left out) to this file")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    ap.add_argument("--quiet", action="store_true", help="only the summary, not each trial's progress")
    args = ap.parse_args(argv)
    args.metrics = [m for m in args.metrics.split(",") if m]
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.defenses = [d for d in args.defenses.split(",") if d]
    for name, given, allowed in (("--attacks", args.attacks, attacks), ("--defenses", args.defenses, defenses)):
        if unknown := [g for g in given if g not in allowed]:
            ap.error(f"{name}: unknown {unknown}; known: {', '.join(allowed)}")
    for item in args.defense_set if checked_defense_set else ():
        if item.split(".", 1)[0] not in checked_defense_set or "=" not in item:
            ap.error(f"--defense-set {item!r}: expected DEFENSE.KEY=VALUE with DEFENSE in {', '.join(checked_defense_set)}")
    parse_overrides(args.set)  # malformed overrides fail here, before any work
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_grid(argv, __doc__, ATTACKS, DEFENSES, METRICS, "evaluation.qra_epochs=20",
                      "the defenses' registered defaults, without the CPU scale's shorter BI-BAU",
                      checked_defense_set=DEFENSES[1:])
    attacks, defenses = args.attacks, args.defenses
    configs = {(a, d): trial_config(a, d, args) for a in attacks for d in defenses}  # every config validated first

    command = "python benchmarks/cifar10_small.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    log = (lambda line: None) if args.quiet else print
    reports: dict[tuple[str, str], dict] = {}
    rows = []
    for (attack, defense), cfg in configs.items():
        out = args.out / f"{attack}-{defense}" if args.out else None
        report = run_trial(cfg, out, log=log)
        report["epoch_seconds"] = report["attack_s_per_epoch"] = epoch_seconds(report)
        report.pop("history", None)
        report["settings"] = settings(defense, args, cfg)
        reports[(attack, defense)] = report
        line = (f"{attack:8s} {defense:8s} CA {pct(report['ca'])} ASR {pct(report['asr'])} "
                f"R-ASR {pct(report.get('r_asr'))} (clean {pct(report.get('ra_clean_asr'))}) "
                f"Q-ASR {pct(report.get('q_asr'))} BEC {num(report.get('bec'))} "
                f"times {report['time_attack_s']:.0f}/{report['time_defense_s']:.0f}/{report['time_eval_s']:.0f}s "
                f"(attack {num(report['attack_s_per_epoch'])} s/epoch)")
        print(line, flush=True)
        cost = epochs_equivalent(report)
        rows.append(
            f"| {datetime.date.today()} | {machine()} | {attack} | {defense} | {report.get('defense_data_use') or '-'} "
            f"| {report['settings']} "
            f"| {pct(report['ca'])} | {pct(report['asr'])} | {pct(report.get('r_asr'))} | {pct(report.get('ra_clean_asr'))} "
            f"| {pct(report.get('q_asr'))} | {num(report.get('bec'))} "
            f"| {report['time_attack_s']:.0f} | {report['time_defense_s']:.0f} | {'-' if cost is None else f'{cost:.2f}'} "
            f"| {report['time_eval_s']:.0f} | {load_average()} | `{command}` |")
        if args.record:  # each row lands as its trial ends: a long command killed midway keeps what it measured
            append_rows(SECTION, SECTION_TEXT, HEADER, rows[-1:])
    print("\n".join(check(reports) + compare_baselines(reports)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({f"{a}/{d}": r for (a, d), r in reports.items()}, indent=1, default=str))
    if args.record:
        print(f"recorded {len(rows)} rows in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
