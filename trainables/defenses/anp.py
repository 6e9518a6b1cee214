"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS'21): defenses.md A3, the official defaults.

Every BatchNorm channel gets a mask m (init 1) and, while perturbed, multiplicative and bias
noise: (m + δ)·γ·x̂ + (1 + ξ)·β. Each of ``iterations`` (2000) steps draws a batch of the clean
split with replacement, starts δ, ξ uniform in [-ε, ε], takes ``noise_steps`` (1) signed ascent
steps of ε/steps on the CE, then updates the masks with SGD (lr 0.2, momentum
0.9) on α·CE(clean) + (1-α)·CE(perturbed), clipped to [0, 1] (ε 0.4, α 0.2). The suspicious
model's channels whose mask is ≤ ``prune_threshold`` (0.2, the paper's recommended fixed value)
are pruned (BN weight and bias zeroed). BackdoorBench instead sweeps the threshold and keeps the
lowest ASR on the poisoned test set: an oracle, not done here. Data: the clean split.

The reference does not clamp the noise after its ascent step, so with one step of ε from a start in
[-ε, ε] it reaches up to 2ε; that is the default. ``noise_clip: true`` clamps it to ±ε after each step
(this project's first ANP, a weaker perturbation), kept as a named option to measure beside it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet
from ..data.batches import random_crop, random_flip
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import AugmentedDefenseConfig, Defense, DefenseContext, DefenseResult, frozen_copy
from .bn import (BatchNormDefenseConfig, check_threshold, insert_masks, mask_findings, pruned_result, require_batchnorm,
                 select_by_mask)


@dataclass
class AnpConfig(BatchNormDefenseConfig, AugmentedDefenseConfig):
    iterations: int = param(2000, "mask optimisation steps (nb_iter)", low=1)
    batch_size: int = param(128, "clean images per step, drawn with replacement", low=1)
    eps: float = param(0.4, "bound ε of the neuron noise δ, ξ (relative to γ, β)", low=0.0)
    noise_steps: int = param(1, "signed ascent steps on the noise per iteration (anp_steps)", low=1)
    alpha: float = param(0.2, "weight α of the clean CE; 1 - α weighs the perturbed CE", low=0.0, high=1.0)
    mask_lr: float = param(0.2, "SGD learning rate of the masks (momentum 0.9)", low=0.0, low_open=True)
    prune_threshold: float = param(0.2, "prune the channels whose mask is at or below this (fixed, no oracle)")
    noise_clip: bool = param(False, "clamp δ, ξ to ±ε after each ascent step (not the reference, whose noise "
                             "reaches 2ε after one step: a weaker ANP, kept to compare)")
    log_every: int = param(200, "iterations per history row", low=1)

    def smoke(self) -> dict:
        return {"iterations": 10, "log_every": 5}

    def check(self, path: str) -> None:
        super().check(path)
        check_threshold(self.prune_threshold, f"{path + '.' if path else ''}prune_threshold")


def sample_batch(clean: ImageSet, size: int, crop: int, flip: bool, gen: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` clean images drawn with replacement, as floats in [0, 1], augmented."""
    idx = torch.randint(len(clean), (size,), generator=gen).to(clean.x.device)
    x = clean.x[idx].float().div_(255.0)
    if crop:
        x = random_crop(x, crop, gen)
    if flip:
        x = random_flip(x, gen)
    return prepare_batch(x, device), clean.y[idx]


@DEFENSES.register("anp")
class AdversarialNeuronPruning(Defense):
    """ANP (defenses.md A3): masks learned under adversarial neuron noise, pruned at a fixed threshold."""

    Config = AnpConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        require_batchnorm(model, self.name)
        cfg: AnpConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        clean = clean.to(ctx.device)
        crop, flip = cfg.augmentation(ctx.hflip)
        scratch = frozen_copy(model, ctx.device).train()  # batch statistics, as the reference optimises
        masks = insert_masks(scratch)
        mask_params = [m.mask for m in masks.values()]
        noise_params = [p for m in masks.values() for p in (m.noise, m.noise_bias)]
        opt = torch.optim.SGD(mask_params, lr=cfg.mask_lr, momentum=0.9)
        step = cfg.eps / cfg.noise_steps
        history, t0 = [], time.perf_counter()
        sums = torch.zeros(2, device=ctx.device)
        for it in range(1, cfg.iterations + 1):
            x, y = sample_batch(clean, cfg.batch_size, crop, flip, gen, ctx.device)
            if cfg.eps > 0:
                with torch.no_grad():  # random start of the noise in [-ε, ε]
                    for p in noise_params:
                        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1).mul_(cfg.eps).to(p.device))
                for m in masks.values():
                    m.perturbed = True
                for _ in range(cfg.noise_steps):
                    with autocast(ctx.device):
                        ce = F.cross_entropy(scratch(x).float(), y)
                    grads = torch.autograd.grad(ce, noise_params)
                    with torch.no_grad():
                        for p, g in zip(noise_params, grads):
                            p.add_(step * g.sign())
                            if cfg.noise_clip:
                                p.clamp_(-cfg.eps, cfg.eps)
                with autocast(ctx.device):
                    loss_rob = F.cross_entropy(scratch(x).float(), y)
            else:
                loss_rob = torch.zeros((), device=ctx.device)
            for m in masks.values():
                m.perturbed = False
            with autocast(ctx.device):
                loss_nat = F.cross_entropy(scratch(x).float(), y)
            loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for p in mask_params:
                    p.clamp_(0.0, 1.0)
            sums += torch.stack([loss_nat.detach(), loss_rob.detach()])
            if it % cfg.log_every == 0 or it == cfg.iterations:
                n = (it - 1) % cfg.log_every + 1
                nat, rob = (sums / n).tolist()
                row = {"phase": "mask", "epoch": len(history) + 1, "iteration": it, "lr": cfg.mask_lr,
                       "ce_clean": nat, "ce_perturbed": rob, **mask_findings(masks),
                       "seconds": time.perf_counter() - t0}
                history.append(row)
                ctx.log(f"{self.name} iteration {it}/{cfg.iterations}: ce_clean={nat:.4g} ce_perturbed={rob:.4g} "
                        f"mask_mean={row['mask_mean']:.3f}")
                sums.zero_()
                t0 = time.perf_counter()
        return pruned_result(self.name, model, select_by_mask(masks, cfg.prune_threshold), ctx, started,
                             f"mask <= {cfg.prune_threshold}", history, mask_findings(masks))
