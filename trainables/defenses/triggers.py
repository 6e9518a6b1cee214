"""Parts shared by the trigger-synthesis defenses, NC and BTI-DBF(U) (defenses.md A1, A2).

* :func:`stamp`: a mask-and-pattern trigger, (1 - m)·x + m·p in [0, 1] pixel space (NC's form);
* :func:`unlearn_with_triggers`: fine-tune the model on its clean split with a share of each
  batch replaced by synthesised-trigger images that keep their **true** labels (NC's unlearning
  set, BTI-DBF(U)'s unlearning rounds), optionally with BTI-DBF(U)'s feature-consistency term.
  The two papers differ only in the share, the optimiser and that term: they are parameters.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..runtime import autocast, prepare_batch
from .base import DefenseContext, SGDDefenseConfig, epoch_steps, sgd_or_adam, train_mode

Trigger = Callable[[torch.Tensor], torch.Tensor]  # x in [0, 1] -> triggered x in [0, 1]


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """(1 - m)·x + m·p; ``mask`` (1, H, W) or (B, 1, H, W), ``pattern`` (C, H, W), all in [0, 1]."""
    return (1.0 - mask) * x + mask * pattern


def n_triggered(batch: int, fraction: float, plus_one: bool) -> int:
    """How many of a batch get the synthesised trigger: round(fraction·B) (NC's 20% of the set),
    or int(fraction·B) + 1 (BTI-DBF(U)'s rule, never none)."""
    k = int(fraction * batch) + 1 if plus_one else round(fraction * batch)
    return max(0, min(batch, k))


@dataclass
class UnlearnConfig(SGDDefenseConfig):
    """The fine-tuning of the trigger-synthesis defenses (the optimiser is SGD unless ``optimizer``)."""

    optimizer: str = param("sgd", "optimiser of the unlearning: sgd (momentum, weight decay as set) or adam "
                           "(betas 0.9/0.999, weight decay as set)", choices=("sgd", "adam"))
    trigger_fraction: float = param(0.2, "share of each unlearning batch given a synthesised trigger, labels kept true",
                                    low=0.0, high=1.0)


def unlearn_with_triggers(f: Classifier, clean: ImageSet, trigger: Trigger, cfg: UnlearnConfig, ctx: DefenseContext,
                          gen: torch.Generator, name: str, *, epochs: int | None = None, plus_one: bool = False,
                          feature_weight: float = 0.0, feature_map: bool = False, phase: str = "unlearn",
                          log_prefix: str = "", path_anchor: Mapping[str, torch.Tensor] | None = None,
                          rho: float = 0.0) -> list[dict]:
    """Fine-tune ``f`` (in place) for ``epochs`` (default ``cfg.epochs``) passes over ``clean``:
    loss = CE(f(x̃), y) + feature_weight·MSE(h(x̃), h(x)), where x̃ is the (augmented) batch with
    its first ``n_triggered`` images replaced by ``trigger(x)``; the batch order is shuffled, so
    which images get the trigger is random. h is the penultimate vector, or the last feature map
    before the pool when ``feature_map`` (BTI-DBF's reference).

    With ``path_anchor`` (θ_bd's parameters) and ``rho``, each step is PAM's path-aware step: the
    gradient is taken at θ + ρ·d/||d||, d = θ_bd - θ over the parameters (a fixed distance toward the
    backdoored model), then θ is restored and the optimiser steps from it (plain steps while d = 0)."""
    epochs = cfg.epochs if epochs is None else epochs
    crop, flip = cfg.augmentation(ctx.hflip)
    clean = clean.to(ctx.device)
    drop_last, steps = epoch_steps(len(clean), cfg.batch_size)
    optimizer, scheduler = sgd_or_adam(f, cfg, steps)
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        sums = torch.zeros(3, device=ctx.device)
        for x, y in batches(clean, cfg.batch_size, device=ctx.device, shuffle=True, generator=gen,
                            crop_padding=crop, hflip=flip, drop_last=drop_last):
            k = n_triggered(len(y), cfg.trigger_fraction, plus_one)
            if k:
                with torch.no_grad():
                    x_tilde = torch.cat([trigger(x[:k]).detach().clamp(0, 1).to(x.dtype), x[k:]])
            else:
                x_tilde = x
            train_mode(f, cfg)
            restore = _toward(f, path_anchor, rho) if path_anchor is not None and rho > 0 else None
            with autocast(ctx.device):
                if feature_weight > 0:
                    both = prepare_batch(torch.cat([x_tilde, x]), ctx.device)
                    h = (f.feature_map(both) if feature_map else f.features(both)).float()
                    h_tilde, h_clean = h.split(len(y))
                    ce = F.cross_entropy(f.head(f.pool(h_tilde) if feature_map else h_tilde).float(), y)
                    feat = F.mse_loss(h_tilde, h_clean)
                else:
                    ce = F.cross_entropy(f(prepare_batch(x_tilde, ctx.device)).float(), y)
                    feat = ce.new_zeros(())
            loss = ce + feature_weight * feat
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if restore is not None:
                restore()
            optimizer.step()
            scheduler.step()
            sums += torch.stack([ce.detach(), feat.detach(), loss.detach()])
        ce_m, feat_m, loss_m = (sums / steps).tolist()
        row = {"phase": phase, "epoch": epoch, "lr": lr, "ce": ce_m, "feature_mse": feat_m, "loss": loss_m,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        ctx.log(f"{name} {log_prefix}{phase} epoch {epoch}/{epochs}: lr={lr:.4g} ce={ce_m:.4g} "
                f"feature_mse={feat_m:.4g}")
        if not math.isfinite(loss_m):
            raise FloatingPointError(f"{name} diverged while unlearning: the loss of epoch {epoch}/{epochs} is "
                                     f"{loss_m} (lr {lr:.4g}); lower defense.lr")
    f.eval()
    return history


@torch.no_grad()
def _toward(f: torch.nn.Module, anchor: Mapping[str, torch.Tensor], rho: float) -> Callable[[], None]:
    """Move f's parameters by ρ·d/||d|| with d = anchor - θ (||d|| over all parameters); returns the undo."""
    params = dict(f.named_parameters())
    d = {n: anchor[n].to(p.dtype) - p for n, p in params.items()}
    norm = torch.sqrt(sum((v.float() ** 2).sum() for v in d.values()))
    scale = rho / (norm + 1e-12)
    saved = {n: p.detach().clone() for n, p in params.items()}
    for n, p in params.items():
        p.add_(d[n] * scale)

    @torch.no_grad()
    def restore() -> None:
        for n, p in params.items():
            p.copy_(saved[n])

    return restore
