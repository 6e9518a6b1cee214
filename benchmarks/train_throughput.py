"""Training throughput: the project's loop (uint8 images on the device, batched tensor
augmentation) against the usual research pipeline (a torchvision DataLoader over PIL images
with RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor()), same model, same images,
same batch size, same optimiser step, on each device.

Only training epochs after one warm-up epoch are timed (the loop's own per-epoch timer, which
syncs once per epoch; the same for the DataLoader side). Pipelines alternate over
``--repeats`` rounds and the best round of each is kept, which damps the noise of a shared CPU.
The result is printed and appended as a row to the throughput table of docs/benchmarks.md.

Threads: both pipelines get torch's default (one per core), what a researcher runs without
setting anything. ``OMP_NUM_THREADS=1`` is the setting for a machine shared with other jobs,
but it is a different comparison: the loop then trains on one core while the DataLoader's
workers borrow the cores it leaves idle.

    python benchmarks/train_throughput.py                      # CPU (+ CUDA when present)
    python benchmarks/train_throughput.py --device cuda --model preact_resnet18 --images 20000
    python benchmarks/train_throughput.py --smoke-test         # seconds; records nothing

Target (the issue): ratio >= 1.0 on CPU, >= 3 on a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a plain checkout

from benchmarks.common import append_rows, machine  # noqa: E402
import trainables  # noqa: E402,F401  (fill the registries)
from trainables.data import DataConfig, ImageSet, load_dataset  # noqa: E402
from trainables.models import ModelConfig, create_model  # noqa: E402
from trainables.runtime import autocast, prepare_batch, prepare_model, resolve_device  # noqa: E402
from trainables.schema import TrainConfig  # noqa: E402
from trainables.optim import make_optimizer, make_scheduler  # noqa: E402
from trainables.train import train_model  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
SECTION = "## Training throughput (benchmarks/train_throughput.py)"
TABLE_HEAD = [
    "| date | machine | device | model | images | timed epochs | batch | workers | loop img/s | DataLoader img/s | ratio | loop CPU ms/img | DataLoader CPU ms/img | command |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]
SECTION_TEXT = f"""{SECTION}

Images per second of `trainables.train.train_model` (uint8 images on the device, crop and flip
as batched tensor ops) against the same model fed by a torchvision `DataLoader` over PIL
images with `RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()` (persistent
workers, pinned memory on CUDA): same images, batch size, optimiser step (SGD, autocast,
channels_last on CUDA); training epochs after one warm-up epoch, best of the alternating
rounds. Ratio = loop / DataLoader. Target: >= 1.0 on CPU, >= 3 on a GPU. CPU ms/img: CPU time
of the whole run (warm-up included; DataLoader workers included) per image trained, the
contention-proof measure of work on a shared machine.
Each run of the script appends one row per device.

{TABLE_HEAD[0]}
{TABLE_HEAD[1]}
"""


class PILImages(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does: HWC uint8 arrays, one PIL image per __getitem__."""

    def __init__(self, images: ImageSet, transform):
        self.x = images.x.permute(0, 2, 3, 1).contiguous().numpy()
        self.y = images.y.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), int(self.y[i])


def children_cpu() -> float:
    """CPU seconds of this process's finished (reaped) children: the DataLoader workers."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def dataloader_epochs(model, images: ImageSet, cfg: TrainConfig, device: torch.device, workers: int,
                      seed: int) -> tuple[list[float], float]:
    """Seconds of each epoch of the DataLoader pipeline, with the loop's own optimiser step, and
    the CPU seconds of the whole run (this process and its workers, warm-up included)."""
    cpu0, children0 = time.process_time(), children_cpu()
    from torchvision import transforms

    side = images.x.shape[-1]
    tf = transforms.Compose([transforms.RandomCrop(side, padding=cfg.crop_padding),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    loader = torch.utils.data.DataLoader(
        PILImages(images, tf), batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
    model = prepare_model(model, device)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    seconds = []
    for _ in range(cfg.epochs):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for x, y in loader:
            x = prepare_batch(x.to(device, non_blocking=True), device)
            y = y.to(device, non_blocking=True)
            with autocast(device):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * len(y)
        loss_sum.item()  # the same one sync per epoch as the loop
        seconds.append(time.perf_counter() - start)
    del loader
    gc.collect()  # shuts the persistent workers down and reaps them, so their CPU time is counted
    return seconds, time.process_time() - cpu0 + children_cpu() - children0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="'auto' (cpu, plus cuda when present), or a comma list: cpu,cuda")
    p.add_argument("--model", default="small_resnet", help="registered model")
    p.add_argument("--images", type=int, default=4000, help="CIFAR-10 training images (stratified subset)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds per pipeline; the best is kept")
    p.add_argument("--data", default=None, help="CIFAR-10 source (data.root); default: the usual places")
    p.add_argument("--doc", default=str(DOC), help="markdown file whose throughput table gets the result")
    p.add_argument("--no-record", action="store_true", help="print only; leave the doc alone")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (both pipelines); its "
                   "compilation falls in the untimed warm-up epoch")
    p.add_argument("--pipelines", default="loop,dataloader", help="which to measure: loop, dataloader or both")
    p.add_argument("--smoke-test", action="store_true", help="256 images, 1 timed epoch, 1 round, nothing recorded")
    args = p.parse_args(argv)
    if args.smoke_test:
        args.images, args.epochs, args.repeats, args.no_record = 256, 1, 1, True

    kinds = [k.strip() for k in args.pipelines.split(",") if k.strip()]
    if not kinds or set(kinds) - {"loop", "dataloader"}:
        p.error(f"--pipelines: {args.pipelines!r}; allowed: loop, dataloader or loop,dataloader")
    names = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.device == "auto" else args.device.split(",")
    devices = [resolve_device(n.strip()) for n in names]
    ds = load_dataset(DataConfig(name="cifar10", root=args.data, train_size=args.images, test_size=10))
    images = ds.train
    cfg = TrainConfig(epochs=args.epochs + 1, batch_size=args.batch_size, lr=0.05, crop_padding=4, hflip=True,
                      eval_every=0)
    timed = len(images) * args.epochs
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    command = " ".join(env + ["python"] + [shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]])
    print(f"{len(images)} CIFAR-10 images, {args.model}, batch {args.batch_size}, 1 warm-up + {args.epochs} "
          f"timed epochs, {args.repeats} round(s), DataLoader workers {args.workers}")
    rows = []
    for device in devices:
        best = {"loop": 0.0, "dataloader": 0.0}
        cpu_ms = {"loop": float("inf"), "dataloader": float("inf")}
        # one-time costs (kernel selection, allocator growth) go here, not into the first round
        warm = create_model(ModelConfig(name=args.model), ds.num_classes, mean=ds.mean, std=ds.std)
        train_model(warm, images.subset(torch.arange(min(len(images), 2 * args.batch_size))),
                    cfg.replace(epochs=1), device, generator=torch.Generator().manual_seed(0), log=lambda _: None)
        for r in range(args.repeats):
            for kind in kinds:
                model = create_model(ModelConfig(name=args.model), ds.num_classes, mean=ds.mean, std=ds.std,
                                     generator=torch.Generator().manual_seed(0))
                if args.compile:
                    model = torch.compile(model)
                if kind == "loop":
                    cpu0 = time.process_time()
                    history = train_model(model, images, cfg, device, generator=torch.Generator().manual_seed(r),
                                          log=lambda _: None)
                    cpu = time.process_time() - cpu0
                    seconds = [row["seconds"] for row in history]
                else:
                    seconds, cpu = dataloader_epochs(model, images, cfg, device, args.workers, seed=r)
                ips = timed / sum(seconds[1:])
                best[kind] = max(best[kind], ips)
                cpu_ms[kind] = min(cpu_ms[kind], 1000 * cpu / (len(images) * cfg.epochs))
                print(f"  {device.type} round {r + 1} {kind:10s} {ips:9.1f} img/s, "
                      f"{1000 * cpu / (len(images) * cfg.epochs):.2f} CPU ms/img "
                      f"(epochs {', '.join(f'{s:.2f}' for s in seconds)} s; first is warm-up)")
        # a pipeline left out (--pipelines) has no number: "-", never 0 img/s or a nan ratio
        measured = {k: v for k, v in best.items() if v > 0}
        img_s = {k: f"{measured[k]:.0f}" if k in measured else "-" for k in best}
        ms = {k: f"{cpu_ms[k]:.2f}" if k in measured else "-" for k in best}
        ratio = f"{best['loop'] / best['dataloader']:.2f}" if len(measured) == 2 else "-"
        print(f"{device.type}: loop {img_s['loop']} img/s, DataLoader {img_s['dataloader']} img/s, "
              f"ratio {ratio} (target {'>= 1.0' if device.type == 'cpu' else '>= 3'}); CPU ms/img "
              f"loop {ms['loop']}, DataLoader {ms['dataloader']}")
        rows.append(f"| {datetime.date.today().isoformat()} | {machine(device)} | {device.type} | {args.model} | "
                    f"{len(images)} | {args.epochs} | {args.batch_size} | {args.workers} | {img_s['loop']} | "
                    f"{img_s['dataloader']} | {ratio} | {ms['loop']} | {ms['dataloader']} | `{command}` |")
    if not args.no_record:
        append_rows(SECTION, SECTION_TEXT, TABLE_HEAD[0], rows, Path(args.doc))
        print(f"recorded in {args.doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
