"""An example bibau plugin: a defense that lives in its own package (see pyproject.toml)."""
from dataclasses import dataclass

import torch

from trainables.config import param
from trainables.defenses.base import Defense, DefenseConfig, DefenseResult, trainable_copy
from trainables.registry import DEFENSES


@DEFENSES.register("bn_recalibrate")
class BNRecalibrate(Defense):
    """Re-estimate every BatchNorm layer's running statistics on the defender's clean split."""

    @dataclass
    class Config(DefenseConfig):
        batch_size: int = param(256, "clean images per forward pass", low=1)

    def purify(self, model, clean, ctx):
        f = trainable_copy(model, ctx.device).train()
        for m in f.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the clean split
        with torch.no_grad():
            for i in range(0, len(clean), self.cfg.batch_size):
                f(clean.x[i:i + self.cfg.batch_size].to(ctx.device).float() / 255)
        return DefenseResult(f.eval())
