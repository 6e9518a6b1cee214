"""One Table 1 / Table 2 row at the paper's scale, side by side with the paper's numbers.

ResNet-18 on all 50,000 CIFAR-10 training images (10,000 test), the attack at the paper's settings
(10% poison, target 0; SIG and the others at their registered rates), trained with a fast schedule
(batch 512, one-cycle-like warm-up and cosine decay, label smoothing, bf16 autocast and channels_last
on CUDA) to the clean accuracy a ResNet-18 reaches; then BI-BAU(U) at METHOD's defaults (20 epochs over
the defender's 2,500 clean images, 20 PGD steps of 2/255 at ε 25/255, per-sample Fisher) and FT, each
evaluated by METHOD's protocol (CA, ASR, RA with its clean-model counterpart, QRA). The clean reference
model (RA on clean, QRA) is trained once with the same schedule. BI-BAU's seconds are set beside 20
plain epochs of the same model over the whole training set (the paper: 418 s against 308 s).

    benchmarks/paper_scale.sh                    # on one H100/H200: BadNets, under 9 minutes
    benchmarks/paper_scale.sh --attack wanet
    benchmarks/paper_scale.sh --tiny             # CPU, about two minutes: checks the script (CI)

Rows go to the doc given by ``--doc`` (default docs/benchmarks.md; ``--tiny`` writes only where told).
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DOC, append_rows, load_average, machine  # noqa: E402

# The paper's Table 1 (CA, ASR) and Table 2 (CA, ASR, R-ASR, Q-ASR) for BI-BAU(U), CIFAR-10, ResNet-18;
# "none" is the undefended model. Table 2's text lost Blended's and Narcissus's Q-ASR.
PAPER = {
    "badnets": {"none": (90.00, 99.70), "table1": (88.06, 1.10), "table2": (83.74, 2.70, 3.60, 2.80)},
    "blended": {"none": (90.98, 100.00), "table1": (88.27, 0.20), "table2": (86.78, 0.10, 4.30, None)},
    "wanet": {"none": (89.54, 99.90), "table1": (86.63, 1.20), "table2": (86.05, 1.30, 12.80, 0.10)},
    "refool": {"none": (91.25, 99.30), "table1": (87.24, 4.10), "table2": (86.38, 1.40, 11.60, 2.90)},
    "sig": {"none": (88.81, 99.44), "table1": None, "table2": (82.29, 0.46, 33.77, 2.40)},
    "adaptive_blend": {"none": (90.64, 84.90), "table1": None, "table2": (82.84, 2.50, 4.90, 2.70)},
    "adaptive_patch": {"none": (90.73, 88.00), "table1": None, "table2": (80.45, 14.90, 19.00, 14.20)},
}
PAPER_TIME = (418.0, 308.0)  # BI-BAU's 20 epochs against 20 epochs of standard training, seconds

# the attacked model's training: ~93% CA for a clean ResNet-18 in well under 2 minutes on an H100
FAST_TRAIN = ["train.epochs=18", "train.batch_size=512", "train.lr=0.2", "train.momentum=0.9", "train.nesterov=true",
              "train.weight_decay=0.0005", "train.schedule=cosine", "train.warmup_epochs=2", "train.label_smoothing=0.1",
              "train.crop_padding=4", "train.hflip=true", "train.eval_every=6", "train.eval_size=2000"]
FULL = ["data.name=cifar10", "data.clean_fraction=0.05", "model.name=resnet18", *FAST_TRAIN,
        "evaluation.metrics=[ca,asr,ra,qra]"]
# --tiny: the same code path on a CPU in about two minutes
TINY = ["data.name=cifar10", "data.train_size=1500", "data.test_size=300", "data.clean_fraction=0.1",
        "model.name=small_resnet", "model.width=8", "train.epochs=2", "train.batch_size=128", "train.lr=0.05",
        "train.crop_padding=0", "train.eval_every=0", "evaluation.metrics=[ca,asr,ra,qra]",
        "evaluation.ra_epochs=1", "evaluation.qra_epochs=2", "evaluation.qra_clean_size=50",
        "evaluation.qra_poison_size=50", "evaluation.ra_size=200", "evaluation.qra_hidden=64"]
DEFENSES = {"bibau_u": ["fisher_batch_size=256"],  # speed only: the same per-sample Fisher in larger chunks
            "ft": []}
TINY_DEFENSES = {"bibau_u": ["epochs=1", "pgd_steps=2"], "ft": ["epochs=1"]}

SECTION = "## Paper scale: one row of Tables 1 and 2 (benchmarks/paper_scale.sh)"
HEADER = ("| date | machine | attack | model | train images | row | CA | ASR | R-ASR | RA on clean | Q-ASR "
          "| paper CA | paper ASR | paper R-ASR | paper Q-ASR | seconds | load | command |")
SECTION_TEXT = f"""{SECTION}

ResNet-18 on all 50,000 CIFAR-10 training images, the attack at the paper's settings, a fast schedule (18
epochs, batch 512, bf16); BI-BAU(U) at METHOD's defaults (20 epochs over 2,500 clean images, 20 PGD steps),
FT; METHOD's RA and QRA. Paper: Table 2's BI-BAU(U) (CA/ASR/R-ASR/Q-ASR; its undefended row for "none").
The "time" row: BI-BAU(U)'s defense seconds against 20 plain epochs of the attack stage's training (the
paper: 418 s against 308 s). Run it with `benchmarks/paper_scale.sh` in a session with a GPU.
"""


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def paper_cells(attack: str, row: str) -> list[str]:
    entry = PAPER.get(attack, {})
    values = entry.get("none") if row == "none" else entry.get("table2") if row == "bibau_u" else None
    values = list(values or ()) + [None] * 4
    return ["-" if v is None else f"{v:.1f}" for v in values[:4]]


def configs(attack: str, tiny: bool, device: str, data_root: str | None):
    """The run config of each row (validated before any work): the undefended model, then each defense."""
    from orchestrator.config import load_run_config

    base = [f"device={device}", f"attack.name={attack}", *(TINY if tiny else FULL)]
    if data_root:
        base.append(f"data.root={data_root}")
    if attack != "clean":
        base.append("attack.target=0")  # the paper's target for every attack
    rows = {"none": load_run_config(None, [*base, "defense=null"])}
    for name, settings in (TINY_DEFENSES if tiny else DEFENSES).items():
        rows[name] = load_run_config(None, [*base, f"defense.name={name}", *(f"defense.{s}" for s in settings)])
    return rows


def plain_epoch_seconds(report: dict) -> float | None:
    """The median epoch of the attack stage's training, as recorded with the model."""
    seconds = sorted(h["seconds"] for h in report["history"]["attack"] if isinstance(h, dict) and h.get("seconds"))
    return seconds[len(seconds) // 2] if seconds else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attack", default="badnets", help="a registered attack (default badnets)")
    ap.add_argument("--tiny", action="store_true", help="CPU, small data and model: checks the script")
    ap.add_argument("--device", default=None, help="auto, cpu, cuda (default: cuda, or cpu with --tiny)")
    ap.add_argument("--data", default=None, help="data.root: the CIFAR-10 archive or folder")
    ap.add_argument("--doc", type=Path, default=None, help="the doc the rows go to (default docs/benchmarks.md; "
                    "--tiny: none unless given)")
    ap.add_argument("--quiet", action="store_true", help="only the summary lines")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.tiny else "cuda")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        print("paper_scale: no CUDA device here; use --tiny on a CPU", file=sys.stderr)
        return 2
    from trainables.config import ConfigError
    from trainables.trial import run_trial

    try:
        rows = configs(args.attack, args.tiny, device, args.data)
    except ConfigError as exc:
        print(f"paper_scale: {exc}", file=sys.stderr)
        return 2
    doc = args.doc if args.doc is not None else (None if args.tiny else DOC)
    command = "benchmarks/paper_scale.sh " + shlex.join(argv if argv is not None else sys.argv[1:])
    log = (lambda line: None) if args.quiet else print
    start = time.perf_counter()
    lines, reports = [], {}
    for row, cfg in rows.items():
        t0 = time.perf_counter()
        report = run_trial(cfg, log=log)
        reports[row] = report
        seconds = report["time_attack_s"] if row == "none" else report["time_defense_s"]
        paper = paper_cells(args.attack, row)
        print(f"paper_scale {args.attack} {row}: CA {pct(report['ca'])} ASR {pct(report['asr'])} "
              f"R-ASR {pct(report.get('r_asr'))} (clean {pct(report.get('ra_clean_asr'))}) Q-ASR {pct(report.get('q_asr'))}"
              f" | paper {'/'.join(paper)} | {seconds:.0f} s ({time.perf_counter() - t0:.0f} s with evaluation)",
              flush=True)
        lines.append(f"| {datetime.date.today()} | {machine(device)} | {args.attack} | {cfg.model.name} "
                     f"| {report['n_train']} | {row} | {pct(report['ca'])} | {pct(report['asr'])} "
                     f"| {pct(report.get('r_asr'))} | {pct(report.get('ra_clean_asr'))} | {pct(report.get('q_asr'))} "
                     f"| {' | '.join(paper)} | {seconds:.0f} | {load_average()} | `{command}` |")
    epoch = plain_epoch_seconds(reports["none"])
    bibau_s = reports["bibau_u"]["time_defense_s"]
    if epoch:
        ratio = bibau_s / (20 * epoch)
        print(f"paper_scale time: BI-BAU(U) {bibau_s:.0f} s against 20 plain epochs {20 * epoch:.0f} s "
              f"(x{ratio:.2f}; the paper: {PAPER_TIME[0]:.0f} / {PAPER_TIME[1]:.0f} s = x{PAPER_TIME[0] / PAPER_TIME[1]:.2f})")
        lines.append(f"| {datetime.date.today()} | {machine(device)} | {args.attack} | {rows['none'].model.name} "
                     f"| {reports['none']['n_train']} | time: BI-BAU(U) s / 20 plain epochs s | {bibau_s:.0f} | {20 * epoch:.0f} "
                     f"| x{ratio:.2f} | - | - | {PAPER_TIME[0]:.0f} | {PAPER_TIME[1]:.0f} | x{PAPER_TIME[0] / PAPER_TIME[1]:.2f} | - "
                     f"| {bibau_s:.0f} | {load_average()} | `{command}` |")
    print(f"paper_scale: {len(reports)} rows in {time.perf_counter() - start:.0f} s"
          + (f"; recorded in {doc}" if doc else "; not recorded (--tiny without --doc)"))
    if doc is not None:
        append_rows(SECTION, SECTION_TEXT, HEADER, lines, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
