"""FST, feature shift tuning (Min et al., NeurIPS'23): defenses.md A8, the reference's defaults
(``fine_tune/ft.py --ft_mode fst``).

1. Re-initialise the linear head, weight and bias uniform in ±1/√fan_in.
2. Fine-tune every parameter on CE(f(x), y) + α·<W, W_bd>, the Frobenius inner product of the head's
   weight with the backdoored model's: minimising it turns W away from W_bd, so the features must
   shift away from the ones the backdoored head read.
3. After each step rescale W to ||W_bd||_F (without it the penalty would just shrink W).

Defaults: α = 0.2 (the code's; its README example uses 0.1), 10 epochs, SGD lr 0.01, momentum 0.9,
no weight decay, cosine schedule (stepped per batch here, per epoch in the reference), batch 128,
augmentation as the model was trained. Data: the clean split (the reference takes 2% of the
training set; here the trial's clean split).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..config import param
from ..data import ImageSet
from ..models.base import Classifier
from ..registry import DEFENSES
from .base import Defense, DefenseContext, DefenseResult, SGDDefenseConfig
from .finetune import finetune


@dataclass
class FstConfig(SGDDefenseConfig):
    alpha: float = param(0.2, "weight α of the inner product <W, W_bd> of the new head with the backdoored one",
                         low=0.0)
    weight_decay: float = param(0.0, "L2 weight decay (the reference: none)", low=0.0)
    reinit: bool = param(True, "re-initialise the head before tuning (the reference; off leaves FST's penalty "
                         "and projection on the backdoored head)")


@DEFENSES.register("fst")
class FeatureShiftTuning(Defense):
    """FST (defenses.md A8): new head, pushed away from the backdoored head, its norm kept."""

    Config = FstConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: FstConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        w_bd = model.head.weight.detach().to(ctx.device).clone()
        norm_bd = w_bd.norm()

        def reinit(f: Classifier) -> None:
            if not cfg.reinit:
                return
            bound = 1.0 / math.sqrt(f.head.weight.shape[1])
            with torch.no_grad():
                for p in (f.head.weight, f.head.bias):
                    if p is not None:
                        p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1).mul_(bound))

        def penalty(f: Classifier) -> torch.Tensor:
            return cfg.alpha * (f.head.weight.float() * w_bd.float()).sum()

        def project(f: Classifier) -> None:
            with torch.no_grad():
                f.head.weight.mul_(norm_bd / f.head.weight.norm().clamp_min(1e-12))

        ctx.log(f"{self.name}: {len(clean)} clean images, {cfg.epochs} epochs, α {cfg.alpha:g}, head "
                + ("re-initialised" if cfg.reinit else "kept"))
        f, history = finetune(model, {"clean": (clean, 1.0, True)}, cfg, ctx, gen, self.name,
                              prepare=reinit, penalty=penalty, after_step=project)
        w = f.head.weight.detach().float()
        cosine = float((w * w_bd.float()).sum() / (w.norm() * norm_bd.float() + 1e-12))
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started,
                             findings={"head_cosine": cosine, "head_norm": float(w.norm())})
