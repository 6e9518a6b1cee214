"""Fine-tuning defenses: ``ft`` (the FT baseline, clean split only) and ``ibu`` (METHOD's
idealised backdoor unlearning, a reference rather than a defense: it also fine-tunes on the
real poisoned training samples relabelled to their true class)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import Defense, DefenseContext, DefenseResult, SGDDefenseConfig, sgd, train_mode, trainable_copy


@dataclass
class FineTuneConfig(SGDDefenseConfig):
    """FT: METHOD's table used 10 epochs at lr 0.01 (Min et al.'s FT baseline)."""


@dataclass
class IbuConfig(SGDDefenseConfig):
    clean_weight: float = param(1.0, "weight of the CE on the defender's clean split (keeps the clean task)", low=0.0)
    poison_weight: float = param(1.0, "weight of the CE on the real poisoned samples with their true labels "
                                 "(the unlearning objective)", low=0.0)
    poison_samples: int | None = param(None, "poisoned samples used, drawn with the seed; None: all handed over", low=1)
    augment_poisoned: bool = param(False, "crop/flip the poisoned samples too; False: unlearn each trigger where the "
                                   "attack put it (as RA feeds its poisoned samples)")


def _cycle(images: ImageSet, cfg: SGDDefenseConfig, ctx: DefenseContext, gen: torch.Generator,
           augment: bool, drop_last: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches, reshuffled each time the set is exhausted (the smaller stream cycles)."""
    crop, flip = cfg.augmentation(ctx.hflip) if augment else (0, False)
    while True:
        yield from batches(images, cfg.batch_size, device=ctx.device, shuffle=True, generator=gen,
                           crop_padding=crop, hflip=flip, drop_last=drop_last)


def finetune(model: Classifier, streams: dict[str, tuple[ImageSet, float, bool]], cfg: SGDDefenseConfig,
             ctx: DefenseContext, gen: torch.Generator, name: str, *,
             prepare: Callable[[Classifier], None] | None = None,
             penalty: Callable[[Classifier], torch.Tensor] | None = None,
             after_step: Callable[[Classifier], None] | None = None) -> tuple[Classifier, list[dict]]:
    """Fine-tune a copy of ``model`` on Σ_s weight_s · CE(stream s) (+ ``penalty(f)``); ``streams`` maps
    a name to (images, weight, augment).

    Each step takes one batch from every stream, in one forward; an epoch is one pass over the
    largest stream. ``prepare(f)`` runs on the copy before the optimiser is built (FST re-initialises
    the head), ``after_step(f)`` after each optimiser step (FST's norm projection).
    """
    f = trainable_copy(model, ctx.device)
    if prepare is not None:
        prepare(f)
    streams = {k: (images.to(ctx.device), wt, aug) for k, (images, wt, aug) in streams.items()}
    steps = max(math.ceil(len(images) / cfg.batch_size) for images, _, _ in streams.values())
    optimizer, scheduler = sgd(f, cfg, steps)
    # alone, a trailing batch of one image would break BatchNorm; beside another stream it is fine
    lone = len(streams) == 1
    iters = {k: _cycle(images, cfg, ctx, gen, aug, lone and len(images) % cfg.batch_size == 1)
             for k, (images, _, aug) in streams.items()}
    weights = torch.tensor([wt for _, wt, _ in streams.values()], device=ctx.device)
    history = []
    train_mode(f, cfg)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(len(streams) + 2, device=ctx.device)  # on the device: one sync per epoch
        for _ in range(steps):
            parts = [next(it) for it in iters.values()]
            sizes = [len(y) for _, y in parts]
            with autocast(ctx.device):
                logits = f(prepare_batch(torch.cat([x for x, _ in parts]), ctx.device)).float()
            ces = torch.stack([F.cross_entropy(chunk, y) for chunk, (_, y) in zip(logits.split(sizes), parts)])
            loss = (ces * weights).sum()
            extra = penalty(f) if penalty is not None else loss.new_zeros(())
            loss = loss + extra
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step(f)
            sums += torch.cat([ces.detach(), extra.detach().view(1), loss.detach().view(1)])
        means = (sums / steps).tolist()
        row = {"epoch": epoch, "lr": lr, **{f"ce_{k}": v for k, v in zip(streams, means)},
               **({"penalty": means[-2]} if penalty is not None else {}), "loss": means[-1],
               "seconds": time.perf_counter() - t0}
        ctx.record_epoch(name, f, row, history, cfg.epochs)
    f.eval()
    return f, history


@DEFENSES.register("ft")
class FineTune(Defense):
    """FT: plain fine-tuning on the defender's clean split."""

    Config = FineTuneConfig

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        f, history = finetune(model, {"clean": (clean, 1.0, True)}, self.cfg, ctx, gen, self.name)
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started)


@DEFENSES.register("ibu")
class IdealisedUnlearning(Defense):
    """IBU: fine-tuning on D_c plus the real poisoned samples with their true labels (paper
    App. D.3, Eq. 49: clean CE and unlearning CE, weighted). Knows the trigger by construction; for a
    clean-label attack, whose poisoned samples are labelled the target already, the trigger on
    non-target images (``Attack.poisoned_samples``)."""

    Config = IbuConfig
    uses_poisoned_data = True

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: IbuConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        poisoned = ctx.poisoned
        if cfg.poison_samples is not None and cfg.poison_samples < len(poisoned):
            pick = torch.randperm(len(poisoned), generator=gen)[: cfg.poison_samples].sort().values
            poisoned = poisoned.subset(pick)
        ctx.log(f"{self.name}: {len(clean)} clean and {len(poisoned)} poisoned samples (true labels)")
        streams = {"clean": (clean, cfg.clean_weight, True),
                   "poisoned": (poisoned, cfg.poison_weight, cfg.augment_poisoned)}
        f, history = finetune(model, streams, cfg, ctx, gen, self.name)
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started)
