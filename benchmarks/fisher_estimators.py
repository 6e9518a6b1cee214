"""BI-BAU's two Fisher estimators on a trained model: the cost and the difference.

    python benchmarks/fisher_estimators.py --record

METHOD.md asks for the diagonal empirical Fisher, the mean over samples of squared per-sample
gradients (``fisher_estimator: sample``, the default). The cheaper ``batch`` estimator squares
the gradient of each mini-batch's mean loss. Both are divided by their maximum before use, which
removes a global scale but not a different weighting of the parameters: this script measures how
different they are on the model BI-BAU actually purifies.

The model is the attack stage of ``search_spaces/run_<attack>_cifar10.yaml`` (from the cache when
``bibau run`` or cifar10_small.py trained it); the images are the defender's clean split (F^C,
true labels). For each estimator: seconds (best of ``--repeats``), then between the two
max-normalised Fishers: Spearman's rank correlation over all entries, the overlap of their top 1%
entries, the ratio batch/sample of each parameter tensor's mean (min and max over tensors), the
5th, 50th and 95th percentiles of the per-entry ratio batch/sample, and
the relative change of the EWC penalty Σ F Δ² for a random Δ drawn once.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, append_rows, load_average, machine  # noqa: E402
from orchestrator.config import load_run_config  # noqa: E402
from trainables.defenses.fisher import diagonal_fisher  # noqa: E402

SECTION = "## BI-BAU's Fisher estimators (benchmarks/fisher_estimators.py)"
HEADER = ("| date | machine | model | images | batch | sample s | batch s | ratio | Spearman | top-1% overlap "
          "| tensor mean ratio min-max | entry ratio 5/50/95% | EWC(random Δ) batch/sample | command |")
SECTION_TEXT = f"""{SECTION}

Both estimators on the backdoored model of the CPU-scale tables and its 1,000-image clean split (F^C).
`sample` is METHOD's per-sample empirical Fisher (the default), `batch` the squared mini-batch
gradient. Seconds are the best of the repeats; the comparison is between the two max-normalised
Fishers, the form the EWC terms use.

{HEADER}
|{'---|' * (HEADER.count('|') - 1)}
"""


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    def ranks(v: torch.Tensor) -> torch.Tensor:
        r = torch.empty_like(v, dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(sample: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Spearman, top-1% overlap, per-tensor mean ratios and the EWC change between two Fishers."""
    a = torch.cat([sample[n].flatten() for n in sample]).double()
    b = torch.cat([batch[n].flatten() for n in sample]).double()
    k = max(1, len(a) // 100)
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    ratios = [float(batch[n].double().mean() / sample[n].double().mean()) for n in sample
              if float(sample[n].double().mean()) > 0]
    live = a > 0
    entry = (b[live] / a[live]).float()
    q05, q50, q95 = (float(v) for v in torch.quantile(entry[torch.randperm(len(entry))[:1_000_000]],
                                                      torch.tensor([0.05, 0.5, 0.95])))
    delta = torch.randn(len(a), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e-2
    ewc_a, ewc_b = float((a * delta ** 2).sum()), float((b * delta ** 2).sum())
    return {"spearman": spearman(a, b), "top_overlap": len(top_a & top_b) / k, "ratio_min": min(ratios),
            "entry_q05": q05, "entry_q50": q50, "entry_q95": q95,
            "ratio_max": max(ratios), "ewc_ratio": ewc_b / ewc_a if ewc_a > 0 else float("nan")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--attack", default="badnets", help="the run config search_spaces/run_<attack>_cifar10.yaml")
    ap.add_argument("--images", type=int, default=None, help="clean-split images to use (default: all)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per gradient (batch) or per chunk of per-sample gradients (sample)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of the run config")
    ap.add_argument("--record", action="store_true", help="append the row to docs/benchmarks.md")
    args = ap.parse_args(argv)
    cfg = load_run_config(str(ROOT / "search_spaces" / f"run_{args.attack}_cifar10.yaml"), args.set)

    from trainables.data import load_dataset
    from trainables.trial import attack_stage

    device = torch.device(args.device)
    dataset = load_dataset(cfg.data)
    stage = attack_stage(cfg, dataset, device, log=print)
    clean = dataset.train.subset(stage.clean_index)
    n = len(clean) if args.images is None else min(args.images, len(clean))
    x, y = clean.x[:n], clean.y[:n]
    fishers, seconds = {}, {}
    for estimator in ("sample", "batch"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fishers[estimator] = diagonal_fisher(stage.model, x, y, device, batch_size=args.batch_size,
                                                 estimator=estimator, normalize="max")
            times.append(time.perf_counter() - t0)
        seconds[estimator] = min(times)
        print(f"{estimator}: {seconds[estimator]:.2f} s on {n} images")
    c = compare(fishers["sample"], fishers["batch"])
    print(f"sample/batch time {seconds['sample'] / seconds['batch']:.2f}x; Spearman {c['spearman']:.3f}; "
          f"top-1% overlap {c['top_overlap']:.2f}; per-tensor mean ratio batch/sample {c['ratio_min']:.3g}-"
          f"{c['ratio_max']:.3g}; per-entry ratio 5/50/95% {c['entry_q05']:.3g}/{c['entry_q50']:.3g}/"
          f"{c['entry_q95']:.3g}; EWC(random Δ) batch/sample {c['ewc_ratio']:.3g}")
    if args.record:
        command = "python benchmarks/fisher_estimators.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        model = f"{cfg.model.name} w{getattr(cfg.model, 'width', '-')} ({args.attack})"
        row = (f"| {datetime.date.today()} | {machine(device)}, load {load_average()} | {model} | {n} | {args.batch_size} "
               f"| {seconds['sample']:.2f} | {seconds['batch']:.2f} | {seconds['sample'] / seconds['batch']:.2f} "
               f"| {c['spearman']:.3f} | {c['top_overlap']:.2f} | {c['ratio_min']:.3g}-{c['ratio_max']:.3g} "
               f"| {c['entry_q05']:.3g}/{c['entry_q50']:.3g}/{c['entry_q95']:.3g} | {c['ewc_ratio']:.3g} | `{command}` |")
        append_rows(SECTION, SECTION_TEXT, HEADER, [row])
        print("recorded 1 row in docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
