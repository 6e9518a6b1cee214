"""EP, pre-activation entropy pruning (Zheng et al., NeurIPS'22, "Pre-activation distributions
expose backdoor neurons"): defenses.md A4, BackdoorBench's rule with u = 3.

One forward pass of a batch of the **poisoned training set** (clean and poisoned images mixed,
as the attacker labelled them; labels are not used) through the suspicious model in eval mode.
At every BatchNorm layer the input (the pre-activation) is max-pooled over space per sample and
channel, standardised across the batch, and binned at width ``bin_width`` (0.1); channels whose
histogram entropy is below mean - u·std of their layer are pruned (BN weight and bias zeroed).

The post-training threat model does not give a defender this batch: EP declares
``data_use: poisoned_batch``, the trial hands it over only to such a defense, and the run's
params and the benchmark tables carry that mark.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import param
from ..data import ImageSet
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import Defense, DefenseContext, DefenseResult, frozen_copy
from .bn import BatchNormDefenseConfig, batchnorm_units, pruned_result, require_batchnorm


@dataclass
class EpConfig(BatchNormDefenseConfig):
    u: float = param(3.0, "prune channels whose entropy is below mean - u * std of their layer", low=0.0)
    bin_width: float = param(0.1, "histogram bin width on the standardised pre-activation maxima", low=0.0,
                             low_open=True)
    batch_size: int = param(256, "images of the poisoned training set the trial hands over (one batch)", low=2)


def channel_entropy(values: torch.Tensor, bin_width: float) -> torch.Tensor:
    """Histogram entropy per column of ``values`` (B, C), after standardising each column."""
    v = values.float()
    z = (v - v.mean(0)) / v.std(0).clamp_min(1e-12)
    bins = ((z - z.min(0).values) / bin_width).floor().long()  # (B, C), 0-based per column
    n_bins = int(bins.max()) + 1
    counts = torch.zeros(v.shape[1], n_bins, device=v.device).scatter_add_(
        1, bins.t(), torch.ones_like(bins.t(), dtype=torch.float))
    p = counts / len(v)
    return -(p * p.clamp_min(1e-30).log()).sum(1)


@DEFENSES.register("ep")
class EntropyPruning(Defense):
    """EP (defenses.md A4): prune BN channels whose pre-activation entropy on a poisoned batch is low."""

    Config = EpConfig
    data_use = "poisoned_batch"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        units = require_batchnorm(model, self.name)
        cfg: EpConfig = self.cfg
        started = time.perf_counter()
        f = frozen_copy(model, ctx.device)
        layers = dict(f.named_modules())
        maxima: dict[str, torch.Tensor] = {}
        hooks = [layers[u.name].register_forward_hook(
            lambda mod, inp, out, name=u.name: maxima.__setitem__(name, inp[0].detach().float().amax(dim=(2, 3))))
            for u in batchnorm_units(f)]
        try:
            x = prepare_batch(ctx.poisoned_batch.x.to(ctx.device).float().div_(255.0), ctx.device)
            with torch.no_grad(), autocast(ctx.device):
                f(x)
        finally:
            for h in hooks:
                h.remove()
        selected, entropy = {}, {}
        for u in units:
            e = channel_entropy(maxima[u.name], cfg.bin_width)
            entropy[u.name] = e
            selected[u.name] = (e < e.mean() - cfg.u * e.std()).cpu()
        n = len(ctx.poisoned_batch)
        return pruned_result(self.name, model, selected, ctx, started,
                             f"entropy < mean - {cfg.u} std on a poisoned batch of {n}",
                             extra={"poisoned_batch_size": float(n)})
