"""NC, Neural Cleanse (Wang et al. S&P'19), as BackdoorBench runs it: defenses.md A1.

1. For every class k, search a mask m (1×H×W) and pattern p (C×H×W), both tanh-parameterised
   into [0, 1], minimising CE(f((1-m)·x + m·p), k) + cost·‖m‖₁ on the clean split (Adam 0.1,
   betas 0.5/0.9, masks and patterns start at all ones), with NC's cost schedule (×2 after
   ``patience`` epochs at attack success ≥ 98%, ÷2^1.5 after as many below) and early stop
   (no new best below 0.99× the best for 25 epochs once the cost moved both ways). The kept mask
   is the smallest ‖m‖₁ among epochs that reached the success threshold.
2. MAD outlier test on the masks' L1 norms: anomaly index |min - median| / (1.4826·MAD); the
   model is flagged when it is ≥ ``anomaly_threshold`` (2), and the flagged classes are those
   below the median with deviation/MAD above it.
3. Not flagged: the model is returned unchanged, and the findings say so (``flagged`` 0).
   Flagged: fine-tune on the clean split with ``trigger_fraction`` (20%) of each batch stamped
   with a flagged class's reversed trigger (one drawn per image), labels kept true; BB's shared
   fine-tuning (SGD 0.01, momentum 0.9, wd 5e-4, cosine, batch 256, 100 epochs).

BackdoorBench stamps a fixed 20% of the clean subset once; here 20% of every batch is stamped
(the same share, redrawn per batch). Data: the clean split only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import Defense, DefenseContext, DefenseResult, frozen_copy, trainable_copy
from .triggers import UnlearnConfig, stamp, unlearn_with_triggers

MAD_CONSISTENCY = 1.4826  # MAD -> standard deviation of a normal distribution


@dataclass
class NeuralCleanseConfig(UnlearnConfig):
    epochs: int = param(100, "unlearning epochs over the clean split (BackdoorBench's shared fine-tuning)", low=1)
    batch_size: int = param(256, "clean images per step of the trigger search and the unlearning", low=1)
    search_epochs: int = param(80, "most trigger-search epochs per class (nc_epoch)", low=1)
    search_lr: float = param(0.1, "Adam learning rate of the mask and pattern (betas 0.5, 0.9)", low=0.0, low_open=True)
    init_cost: float = param(1e-3, "initial weight of the mask's L1 norm", low=0.0)
    cost_up: float = param(2.0, "factor on the cost after `patience` epochs at or above the success threshold", low=1.0)
    cost_down: float = param(2.0 ** 1.5, "divisor of the cost after `patience` epochs below it", low=1.0)
    patience: int = param(5, "epochs before the cost is raised or lowered", low=1)
    early_stop_patience: int = param(25, "epochs without a new best mask (below 0.99x the best) before the search of "
                                     "a class stops, once the cost moved both up and down", low=1)
    success_threshold: float = param(0.98, "share of stamped clean images classified as the class for a mask to count",
                                     low=0.0, high=1.0)
    anomaly_threshold: float = param(2.0, "MAD anomaly index at or above which the model is flagged (2 in NC)", low=0.0)

    def smoke(self) -> dict:
        return {"epochs": 1, "search_epochs": 1}


@DEFENSES.register("nc")
class NeuralCleanse(Defense):
    """NC (defenses.md A1): trigger reverse-engineering per class, MAD outlier test, unlearning with
    the reversed triggers at true labels. Data: the clean split."""

    Config = NeuralCleanseConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: NeuralCleanseConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        clean = clean.to(ctx.device)
        frozen = frozen_copy(model, ctx.device)
        history, triggers, norms = [], [], []
        for k in range(ctx.num_classes):
            mask, pattern, l1, reached, rows = search_trigger(frozen, clean, k, cfg, ctx, gen, self.name)
            triggers.append((mask, pattern))
            norms.append(l1)
            history += rows
        norms_t = torch.tensor(norms)
        index, flagged = mad_outliers(norms_t, cfg.anomaly_threshold)
        findings = {"anomaly_index": index, "flagged": float(bool(flagged)), "flagged_classes": float(len(flagged)),
                    **{f"mask_l1.{k}": float(v) for k, v in enumerate(norms)},
                    **{f"flagged.{k}": 1.0 for k in flagged}}
        ctx.log(f"{self.name}: mask L1 norms {[round(v, 1) for v in norms]}, anomaly index {index:.3g}; "
                + (f"flagged classes {flagged}" if flagged else "not flagged: the model is returned unchanged"))
        f = trainable_copy(model, ctx.device)
        if flagged:
            masks = torch.stack([triggers[k][0] for k in flagged])  # (F, 1, H, W)
            patterns = torch.stack([triggers[k][1] for k in flagged])  # (F, C, H, W)

            def trigger(x: torch.Tensor) -> torch.Tensor:
                pick = torch.randint(len(flagged), (len(x),), generator=gen).to(x.device)
                return stamp(x, masks[pick], patterns[pick])

            history += unlearn_with_triggers(f, clean, trigger, cfg, ctx, gen, self.name)
        f.eval()
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started, findings=findings)


def mad_outliers(norms: torch.Tensor, threshold: float) -> tuple[float, list[int]]:
    """(anomaly index of the smallest norm, flagged classes); none flagged below ``threshold``."""
    median = norms.median()
    dev = (norms - median).abs()
    mad = MAD_CONSISTENCY * dev.median()
    if float(mad) == 0.0:  # half the norms equal: any deviation is infinitely anomalous
        score = torch.where(dev > 0, torch.full_like(dev, math.inf), torch.zeros_like(dev))
    else:
        score = dev / mad
    index = float(score[norms.argmin()])
    if index < threshold:
        return index, []
    return index, [k for k in range(len(norms)) if norms[k] < median and score[k] >= threshold]


def search_trigger(f: Classifier, clean: ImageSet, k: int, cfg: NeuralCleanseConfig, ctx: DefenseContext,
                   gen: torch.Generator, name: str):
    """NC's optimisation for class ``k``: (mask (1,H,W), pattern (C,H,W), L1 of the kept mask,
    whether any epoch reached the success threshold, history rows)."""
    c, h, w = clean.x.shape[1:]
    raw_init = math.atanh(1.0 - 1e-4)  # masks and patterns start at (almost) all ones, tanh-parameterised
    mask_raw = torch.full((1, h, w), raw_init, device=ctx.device, requires_grad=True)
    pattern_raw = torch.full((c, h, w), raw_init, device=ctx.device, requires_grad=True)
    opt = torch.optim.Adam([mask_raw, pattern_raw], lr=cfg.search_lr, betas=(0.5, 0.9))
    crop, flip = cfg.augmentation(ctx.hflip)
    cost, up, down, moved_up, moved_down = cfg.init_cost, 0, 0, False, False
    best = (None, None, math.inf)
    last_best, stall, rows = math.inf, 0, []

    def squash(raw):
        return torch.tanh(raw) / 2 + 0.5

    for epoch in range(1, cfg.search_epochs + 1):
        t0 = time.perf_counter()
        hits = torch.zeros((), device=ctx.device)
        ce_sum = torch.zeros((), device=ctx.device)
        seen = 0
        for x, _ in batches(clean, cfg.batch_size, device=ctx.device, shuffle=True, generator=gen,
                            crop_padding=crop, hflip=flip):
            mask, pattern = squash(mask_raw), squash(pattern_raw)
            target = torch.full((len(x),), k, device=ctx.device, dtype=torch.long)
            with autocast(ctx.device):
                logits = f(prepare_batch(stamp(x, mask, pattern), ctx.device)).float()
            ce = F.cross_entropy(logits, target)
            loss = ce + cost * mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            hits += (logits.argmax(1) == k).sum()
            ce_sum += ce.detach() * len(x)
            seen += len(x)
        with torch.no_grad():
            mask, pattern = squash(mask_raw), squash(pattern_raw)
            l1 = float(mask.sum())
        success = float(hits) / seen
        if success >= cfg.success_threshold and l1 < best[2]:
            best = (mask.detach().clone(), pattern.detach().clone(), l1)
        rows.append({"phase": "search", "class": k, "epoch": epoch, "cost": cost, "mask_l1": l1,
                     "attack_success": success, "ce": float(ce_sum) / seen, "seconds": time.perf_counter() - t0})
        # NC's cost schedule
        if success >= cfg.success_threshold:
            up, down = up + 1, 0
        else:
            up, down = 0, down + 1
        if up >= cfg.patience:
            up, cost, moved_up = 0, cost * cfg.cost_up, True
        elif down >= cfg.patience:
            down, cost, moved_down = 0, cost / cfg.cost_down, True
        # early stop: no best below 0.99x the last one for early_stop_patience epochs
        if best[2] < 0.99 * last_best:
            last_best, stall = best[2], 0
        else:
            stall += 1
        if moved_up and moved_down and stall >= cfg.early_stop_patience:
            break
    reached = best[0] is not None
    if not reached:  # no mask made the class win: keep the last one, its norm says how large it had to be
        best = (mask.detach().clone(), pattern.detach().clone(), l1)
    ctx.log(f"{name} search class {k}: {len(rows)} epochs, mask L1 {best[2]:.1f}"
            + ("" if reached else f" (success threshold {cfg.success_threshold} never reached)"))
    return best[0], best[1], best[2], reached, rows
