"""RNP, Reconstructive Neuron Pruning (Li et al., ICML'23): defenses.md A5, BackdoorBench's defaults.

1. Unlearn: gradient ascent on the CE of the clean split (SGD 0.01, momentum 0.9, wd 5e-4, lr ×0.1
   at epochs 10 and 20), at most ``unlearn_epochs`` (20), stopping after the first epoch whose
   clean training accuracy is ≤ ``clean_threshold`` (0.2).
2. Recover: the unlearned model's BN channels get masks (init 1); only the masks learn, by SGD
   (lr 0.2, momentum 0.9) on ``alpha``·CE (0.2) for ``recover_epochs`` (20), clipped to [0, 1].
3. Prune the **original** suspicious model: channels whose mask is ≤ ``prune_threshold`` (0.7,
   BackdoorBench's saved model) get BN weight and bias zeroed. The threshold is fixed; the
   reference's sweep over thresholds is reporting only. Data: the clean split.
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
from .base import (AugmentedDefenseConfig, Defense, DefenseContext, DefenseResult, epoch_steps, frozen_copy,
                   trainable_copy)
from .bn import (BatchNormDefenseConfig, check_threshold, insert_masks, mask_findings, pruned_result, require_batchnorm,
                 select_by_mask)


@dataclass
class RnpConfig(BatchNormDefenseConfig, AugmentedDefenseConfig):
    batch_size: int = param(256, "clean images per step", low=1)
    unlearn_epochs: int = param(20, "most epochs of gradient ascent", low=1)
    unlearn_lr: float = param(0.01, "SGD learning rate of the unlearning (momentum 0.9, wd 5e-4)", low=0.0,
                              low_open=True)
    unlearn_milestones: list[int] = param([10, 20], "epochs after which the unlearning lr is multiplied by 0.1")
    clean_threshold: float = param(0.2, "stop unlearning once the clean training accuracy is at or below this")
    recover_epochs: int = param(20, "epochs of mask learning on the unlearned model", low=1)
    mask_lr: float = param(0.2, "SGD learning rate of the masks (momentum 0.9)", low=0.0, low_open=True)
    alpha: float = param(0.2, "weight of the CE while the masks learn", low=0.0, low_open=True)
    prune_threshold: float = param(0.7, "prune the channels whose mask is at or below this (fixed, no oracle)")

    def smoke(self) -> dict:
        return {"unlearn_epochs": 1, "recover_epochs": 1}

    def check(self, path: str) -> None:
        super().check(path)
        prefix = path + "." if path else ""
        check_threshold(self.prune_threshold, f"{prefix}prune_threshold")
        check_threshold(self.clean_threshold, f"{prefix}clean_threshold")


@DEFENSES.register("rnp")
class ReconstructiveNeuronPruning(Defense):
    """RNP (defenses.md A5): unlearn, recover BN masks on the unlearned model, prune the original."""

    Config = RnpConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        require_batchnorm(model, self.name)
        cfg: RnpConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        clean = clean.to(ctx.device)
        crop, flip = cfg.augmentation(ctx.hflip)
        drop_last, steps = epoch_steps(len(clean), cfg.batch_size)

        def epoch_batches():
            return batches(clean, cfg.batch_size, device=ctx.device, shuffle=True, generator=gen,
                           crop_padding=crop, hflip=flip, drop_last=drop_last)

        # 1. unlearn by gradient ascent
        f = trainable_copy(model, ctx.device).train()
        opt = torch.optim.SGD(f.parameters(), lr=cfg.unlearn_lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.unlearn_milestones, 0.1)
        history = []
        for epoch in range(1, cfg.unlearn_epochs + 1):
            t0, lr = time.perf_counter(), opt.param_groups[0]["lr"]
            sums = torch.zeros(2, device=ctx.device)
            seen = 0
            for x, y in epoch_batches():
                with autocast(ctx.device):
                    logits = f(x).float()
                ce = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                (-ce).backward()
                opt.step()
                sums += torch.stack([ce.detach() * len(y), (logits.argmax(1) == y).sum()])
                seen += len(y)
            sched.step()
            ce_m, acc = (sums / seen).tolist()
            history.append({"phase": "unlearn", "epoch": epoch, "lr": lr, "ce": ce_m, "clean_acc": acc,
                            "seconds": time.perf_counter() - t0})
            ctx.log(f"{self.name} unlearn epoch {epoch}/{cfg.unlearn_epochs}: lr={lr:.4g} ce={ce_m:.4g} acc={acc:.3f}")
            if not math.isfinite(ce_m):
                raise FloatingPointError(f"{self.name} diverged while unlearning (CE {ce_m}); lower defense.unlearn_lr")
            if acc <= cfg.clean_threshold:
                break
        unlearn_epochs = len(history)

        # 2. recover: masks on the unlearned model's BN channels, weights fixed
        scratch = frozen_copy(f, ctx.device).train()
        masks = insert_masks(scratch)
        mask_params = [m.mask for m in masks.values()]
        mopt = torch.optim.SGD(mask_params, lr=cfg.mask_lr, momentum=0.9)
        for epoch in range(1, cfg.recover_epochs + 1):
            t0 = time.perf_counter()
            sums = torch.zeros(2, device=ctx.device)
            seen = 0
            for x, y in epoch_batches():
                with autocast(ctx.device):
                    logits = scratch(prepare_batch(x, ctx.device)).float()
                ce = F.cross_entropy(logits, y)
                mopt.zero_grad(set_to_none=True)
                (cfg.alpha * ce).backward()
                mopt.step()
                with torch.no_grad():
                    for p in mask_params:
                        p.clamp_(0.0, 1.0)
                sums += torch.stack([ce.detach() * len(y), (logits.argmax(1) == y).sum()])
                seen += len(y)
            ce_m, acc = (sums / seen).tolist()
            row = {"phase": "recover", "epoch": unlearn_epochs + epoch, "lr": cfg.mask_lr, "ce": ce_m,
                   "clean_acc": acc, **mask_findings(masks), "seconds": time.perf_counter() - t0}
            history.append(row)
            ctx.log(f"{self.name} recover epoch {epoch}/{cfg.recover_epochs}: ce={ce_m:.4g} acc={acc:.3f} "
                    f"mask_mean={row['mask_mean']:.3f}")

        # 3. prune the original model
        return pruned_result(self.name, model, select_by_mask(masks, cfg.prune_threshold), ctx, started,
                             f"mask <= {cfg.prune_threshold} after {unlearn_epochs} unlearning epochs", history,
                             {**mask_findings(masks), "unlearn_epochs": float(unlearn_epochs)})
