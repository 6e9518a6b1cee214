"""What sets BI-BAU's clean-accuracy cost: BI-BAU(U) on BadNets at the CPU scale, one factor
varied at a time from the CPU scale's settings, each row evaluated by CA, ASR, R-ASR, Q-ASR.

    python benchmarks/bibau_cost.py --rows base,base_at,bn_split --record   # run rows, append them
    python benchmarks/bibau_cost.py --list                                  # the rows and what they change
    python benchmarks/bibau_cost.py --plot                                  # the figure from the recorded rows

The CPU scale (`search_spaces/run_badnets_cifar10.yaml`: 20,000 CIFAR-10 training images, small
ResNet of width 16, 20 epochs; BI-BAU(U) with METHOD's defaults except 5 epochs of 5 PGD steps of
ε/4, as `benchmarks/cifar10_small.py` runs it) is the base row. The factors: model width (8, 16,
32; each width's attack model and clean reference trained once, through the cache), the defender's
clean split (1,000 or 2,500 images: another split is another attack model), BI-BAU's epochs x PGD
steps (5 x 5 against METHOD's 20 x 20), ε (8, 16, 25/255; steps of ε/4), how BatchNorm is treated
in the M-step (`defense.bn_stats`: train, split, frozen), and the paper's Base AT preset (Table 6).

Each row's CA after every defense epoch is measured on the whole test set through the gate's
``during_defense`` hook with a floor of 0 (it never stops a defense), so the 20-epoch row also gives
the CA-against-epochs curve. Rows go to `docs/data/bibau_cost.jsonl` (one JSON object per run, the
data the docs' table and figure are made from) and, with ``--record``, to docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, append_rows, load_average, machine  # noqa: E402

BASE = "search_spaces/run_badnets_cifar10.yaml"
DATA = ROOT / "docs" / "data" / "bibau_cost.jsonl"
FIGURE = ROOT / "docs" / "img" / "bibau_cost"
EPS = 25 / 255  # METHOD's ε
METRICS = "[ca,asr,ra,qra]"
TERMS = ("ce_clean", "ce_adv", "ewc", "inv_ewc", "l_trig", "l_kd", "l_prior", "delta_linf")
# CA after every defense epoch, on the whole test set, never stopping the defense
PER_EPOCH_CA = "{ca_min: 0.0, during_defense: true, check_from: 0.0, eval_size: 100000}"


@dataclass(frozen=True)
class Row:
    factor: str
    value: str
    run: tuple[str, ...] = ()  # overrides of the attack stage (model, data): another attack model
    defense: tuple[str, ...] = ()  # overrides of BI-BAU's CPU-scale settings

    def settings(self) -> dict[str, str]:
        """The factor columns of the table, as resolved for this row."""
        cfg = {"width": "16", "clean": "1,000", "schedule": "5 x 5", "eps": "25/255", "bn": "train", "preset": "full",
               "alpha": "1"}
        cfg.update({"width": self.value} if self.factor == "width" else {})
        cfg.update({"clean": self.value} if self.factor == "clean split" else {})
        cfg.update({"schedule": self.value} if self.factor == "epochs x PGD steps" else {})
        cfg.update({"eps": self.value} if self.factor == "ε" else {})
        cfg.update({"bn": self.value} if self.factor == "BatchNorm" else {})
        cfg.update({"preset": self.value} if self.factor == "preset" else {})
        cfg.update({"alpha": self.value} if self.factor == "α" else {})
        return cfg


def _eps(n: int) -> tuple[str, ...]:
    return (f"pgd_eps={n / 255:.6g}", f"pgd_step={n / 255 / 4:.6g}")


CPU_BIBAU = ("epochs=5", "pgd_steps=5", f"pgd_step={EPS / 4:.6g}")
ROWS: dict[str, Row] = {
    "base": Row("base", "CPU scale"),
    "base_at": Row("preset", "base_at", defense=("preset=base_at",)),
    "bn_split": Row("BatchNorm", "split", defense=("bn_stats=split",)),
    "bn_frozen": Row("BatchNorm", "frozen", defense=("bn_stats=frozen",)),
    "eps8": Row("ε", "8/255", defense=_eps(8)),
    "eps16": Row("ε", "16/255", defense=_eps(16)),
    # constraint A's weight at the top of METHOD's range: L_KD against the unbounded -CE of L_trig
    "alpha10": Row("α", "10", defense=("alpha=10",)),
    "width8": Row("width", "8", run=("model.width=8",)),
    "width32": Row("width", "32", run=("model.width=32",)),
    "clean2500": Row("clean split", "2,500", run=("data.clean_fraction=0.125",)),  # 2,500 of 20,000
    "steps20x20": Row("epochs x PGD steps", "20 x 20", defense=("epochs=20", "pgd_steps=20", f"pgd_step={2 / 255:.6g}")),
}

SECTION = "## BI-BAU's clean-accuracy cost, one factor at a time (benchmarks/bibau_cost.py)"
HEADER = ("| date | machine | row | width | clean | epochs x steps | ε | α | BN | preset | backdoored CA | CA | CA drop "
          "| ASR | R-ASR | RA on clean | Q-ASR | CA per defense epoch | defense s | s per defense epoch | load | command |")
SECTION_TEXT = f"""{SECTION}

BI-BAU(U) on BadNets at the CPU scale, one factor changed per row (`python benchmarks/bibau_cost.py --list`).
CA drop: the backdoored model's CA minus the purified one's (the paper: 4.31 points on average, ResNet-18).
CA per defense epoch: on the whole test set after each epoch (the last is the row's CA).
"""


def run_config(row: Row):
    from orchestrator.config import load_run_config

    overrides = [*row.run, "defense.name=bibau_u", *(f"defense.{d}" for d in (*CPU_BIBAU, *row.defense)),
                 f"evaluation.metrics={METRICS}", f"evaluation.gate={PER_EPOCH_CA}"]
    return load_run_config(str(ROOT / BASE), overrides)


def run_row(name: str, row: Row, command: str, log) -> dict:
    from trainables.trial import run_trial

    report = run_trial(run_config(row), log=log)
    epochs = [h for h in report["history"]["defense"] if isinstance(h, dict)]
    curve = [h.get("gate_ca") for h in epochs[:-1]] + [report["ca"]]
    return {"date": str(datetime.date.today()), "machine": machine(), "load": load_average(), "row": name,
            "factor": row.factor, "value": row.value, **row.settings(), "command": command,
            "backdoored_ca": report["backdoored_ca"], "backdoored_asr": report["backdoored_asr"],
            **{k: report.get(k) for k in ("ca", "asr", "r_asr", "ra_clean_asr", "q_asr")},
            "ca_per_epoch": curve, "defense_s": report["time_defense_s"],
            "s_per_epoch": [h.get("seconds") for h in epochs], "code_version": report["code_version"],
            # the M-step's and E-step's terms per epoch: where the clean accuracy goes
            "terms": [{k: h[k] for k in TERMS if isinstance(h.get(k), (int, float))} for h in epochs]}


def failed_row(name: str, row: Row, command: str, exc: Exception) -> dict:
    """A row whose defense broke (BI-BAU raises on a non-finite L_out): recorded as such, not dropped."""
    return {"date": str(datetime.date.today()), "machine": machine(), "load": load_average(), "row": name,
            "factor": row.factor, "value": row.value, **row.settings(), "command": command,
            "failed": f"{type(exc).__name__}: {exc}"}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table_row(r: dict) -> str:
    if r.get("failed"):
        return (f"| {r['date']} | {r['machine']} | {r['row']} | {r['width']} | {r['clean']} | {r['schedule']} | {r['eps']} "
                f"| {r.get('alpha', '1')} | {r['bn']} | {r['preset']} | - | **failed** | - | - | - | - | - "
                f"| {r['failed']} | - | - | {r['load']} | `{r['command']}` |")
    per_epoch = sorted(s for s in r["s_per_epoch"] if s) or [0.0]
    return (f"| {r['date']} | {r['machine']} | {r['row']} | {r['width']} | {r['clean']} | {r['schedule']} | {r['eps']} "
            f"| {r.get('alpha', '1')} "
            f"| {r['bn']} | {r['preset']} | {pct(r['backdoored_ca'])} | {pct(r['ca'])} "
            f"| {pct(r['backdoored_ca'] - r['ca'])} | {pct(r['asr'])} | {pct(r['r_asr'])} | {pct(r['ra_clean_asr'])} "
            f"| {pct(r['q_asr'])} | {' '.join(pct(c) for c in r['ca_per_epoch'])} | {r['defense_s']:.0f} "
            f"| {per_epoch[len(per_epoch) // 2]:.0f} | {r['load']} | `{r['command']}` |")


def load_rows(path: Path = DATA) -> list[dict]:
    """Every recorded run, the newest row of each name last."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(rows: list[dict], out: Path = FIGURE) -> list[Path]:
    """Two panels: CA drop against model width, and CA against BI-BAU epochs (5- and 20-epoch rows)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({"pdf.fonttype": 42, "ps.fonttype": 42, "font.size": 9})
    import matplotlib.pyplot as plt

    latest = {r["row"]: r for r in rows if not r.get("failed")}  # the newest run of each row
    fig, (left, right) = plt.subplots(1, 2, figsize=(7.0, 2.8), constrained_layout=True)
    widths = sorted((int(r["width"]), 100 * (r["backdoored_ca"] - r["ca"])) for r in latest.values()
                    if r["row"] in ("base", "width8", "width32"))
    if widths:
        left.plot([w for w, _ in widths], [d for _, d in widths], "o-", color="C0", label="BI-BAU(U), CPU scale")
    left.axhline(4.31, color="0.4", ls="--", lw=1, label="paper (ResNet-18): 4.3")
    left.set(xlabel="model width (channels of the first stage)", ylabel="CA drop (points)", xscale="log", ylim=(0, None))
    left.set_xticks([8, 16, 32], ["8", "16", "32"])
    left.legend(frameon=False, fontsize=8)
    for name, style in (("base", "o-"), ("steps20x20", "s-"), ("bn_frozen", "^-"), ("bn_split", "v-")):
        r = latest.get(name)
        if r is None:
            continue
        curve = [100 * c for c in r["ca_per_epoch"] if c is not None]
        label = {"base": "5 x 5 (CPU scale)", "steps20x20": "20 x 20 (METHOD)", "bn_frozen": "5 x 5, BN frozen",
                 "bn_split": "5 x 5, BN split"}[name]
        right.plot(range(1, len(curve) + 1), curve, style, ms=3, label=label)
    if latest:
        right.axhline(100 * next(iter(latest.values()))["backdoored_ca"], color="0.4", ls=":", lw=1,
                      label="backdoored model")
    right.set(xlabel="BI-BAU epoch (epochs x PGD steps)", ylabel="clean accuracy (%)")
    right.legend(frameon=False, fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=200)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--list", action="store_true", help="print the rows and their overrides")
    ap.add_argument("--record", action="store_true", help="append the rows to docs/benchmarks.md")
    ap.add_argument("--plot", action="store_true", help="draw docs/img/bibau_cost.{png,pdf} from the recorded rows")
    ap.add_argument("--data", type=Path, default=DATA, help="the JSON-lines file the rows go to")
    ap.add_argument("--quiet", action="store_true", help="only each row's summary line")
    args = ap.parse_args(argv)
    names = [n for n in args.rows.split(",") if n]
    if unknown := [n for n in names if n not in ROWS]:
        ap.error(f"--rows: unknown {unknown}; known: {', '.join(ROWS)}")
    if args.list:
        for name, row in ROWS.items():
            print(f"{name:11s} {row.factor}: {row.value}  run {list(row.run)} defense {list(row.defense)}")
    for name in names:
        run_config(ROWS[name])  # every config validated before any work
    command = "python benchmarks/bibau_cost.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    log = (lambda line: None) if args.quiet else print
    for name in names:
        try:
            r = run_row(name, ROWS[name], command, log)
        except FloatingPointError as exc:  # a diverged defense is a result of this study
            r = failed_row(name, ROWS[name], command, exc)
        args.data.parent.mkdir(parents=True, exist_ok=True)
        with open(args.data, "a") as f:
            f.write(json.dumps(r) + "\n")
        if r.get("failed"):
            print(f"{name}: {r['failed']}", flush=True)
            if args.record:
                append_rows(SECTION, SECTION_TEXT, HEADER, [table_row(r)])
            continue
        print(f"{name}: CA {pct(r['ca'])} (drop {pct(r['backdoored_ca'] - r['ca'])}) ASR {pct(r['asr'])} "
              f"R-ASR {pct(r['r_asr'])} Q-ASR {pct(r['q_asr'])} per epoch {[pct(c) for c in r['ca_per_epoch']]} "
              f"defense {r['defense_s']:.0f}s", flush=True)
        if args.record:
            append_rows(SECTION, SECTION_TEXT, HEADER, [table_row(r)])
    if args.plot:
        for p in plot(load_rows(args.data)):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
