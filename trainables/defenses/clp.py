"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV'22): defenses.md A6, data-free.

For each BatchNorm layer and the convolution paired with it (the last one registered before it,
BackdoorBench's pairing, see ``bn.py``), the upper bound of each channel's Lipschitz constant
(UCLC) is the largest singular value of the channel's kernel, reshaped to in × (kh·kw), times
|γ_k / σ_k|. Channels with UCLC > mean + u·std of their layer (u = 3) are pruned (BN weight and
bias zeroed). A BN whose paired convolution does not produce its channels is left alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import param
from ..data import ImageSet
from ..models.base import Classifier
from ..registry import DEFENSES
from .base import Defense, DefenseContext, DefenseResult
from .bn import BatchNormDefenseConfig, BNUnit, pruned_result, require_batchnorm


@dataclass
class ClpConfig(BatchNormDefenseConfig):
    u: float = param(3.0, "prune channels whose UCLC exceeds mean + u * std of their layer", low=0.0)


@torch.no_grad()
def channel_lipschitz(unit: BNUnit) -> torch.Tensor | None:
    """UCLC per output channel of ``unit``; None when the pairing does not match in channels."""
    conv, bn = unit.conv, unit.bn
    if conv is None or conv.out_channels != bn.num_features or conv.groups != 1:
        return None
    w = conv.weight.detach().float().flatten(2)  # (out, in, kh*kw)
    var = bn.running_var.float() if bn.running_var is not None else torch.ones_like(bn.weight, dtype=torch.float)
    scale = (bn.weight.detach().float() / (var + bn.eps).sqrt()).abs()
    return torch.linalg.matrix_norm(w * scale.view(-1, 1, 1), ord=2)


@DEFENSES.register("clp")
class ChannelLipschitzPruning(Defense):
    """CLP (defenses.md A6): data-free pruning of channels with an outlying Lipschitz bound."""

    Config = ClpConfig
    data_use = "none"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        units = require_batchnorm(model, self.name)
        cfg: ClpConfig = self.cfg
        started = time.perf_counter()
        selected, skipped = {}, []
        for unit in units:
            uclc = channel_lipschitz(unit)
            if uclc is None:
                skipped.append(unit.name)
                continue
            selected[unit.name] = (uclc > uclc.mean() + cfg.u * uclc.std()).cpu()
        rule = f"UCLC > mean + {cfg.u} std" + (f"; no matching convolution: {skipped}" if skipped else "")
        return pruned_result(self.name, model, selected, ctx, started, rule, extra={"layers_skipped": float(len(skipped))})
