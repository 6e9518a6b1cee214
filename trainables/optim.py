"""The optimiser and the per-step learning-rate schedule every SGD loop builds: the training loop,
the SGD defenses, RA, and (the schedule) the contrastive loop. A leaf: it knows torch only, so the
defenses' configs and the training loop both use it without importing each other."""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn


class ScheduleSpec(Protocol):
    """What a schedule reads: ``epochs`` and ``schedule``; ``warmup_epochs``, ``milestones`` and
    ``gamma`` when present (``schema.TrainConfig``, a defense's config, ``contrastive.train.Schedule``)."""

    epochs: int
    schedule: str


def make_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float,
                   nesterov: bool = False) -> torch.optim.SGD:
    """SGD over the parameters that require gradients (fused kernels when they all live on CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no parameter that requires a gradient")
    if nesterov and momentum <= 0:
        raise ValueError(f"nesterov: Nesterov momentum needs momentum > 0, got momentum={momentum}")
    fused = all(p.is_cuda for p in params) or None
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, fused=fused)


def lr_factor(cfg: "ScheduleSpec", step: int, steps_per_epoch: int) -> float:
    """The multiplier of the peak lr at optimiser step ``step`` (0-based).

    Warm-up rises linearly to 1 over ``warmup_epochs``; then cosine decays to 0 over the
    remaining steps, ``step`` multiplies by ``gamma`` once past each milestone (a fraction of
    all steps), ``constant`` stays at 1.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total, round(getattr(cfg, "warmup_epochs", 0.0) * steps_per_epoch))
    if step < warm:
        return (step + 1) / warm
    schedule = getattr(cfg, "schedule", "cosine")
    if schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        passed = sum(step >= round(m * total) for m in getattr(cfg, "milestones", (0.5, 0.75)))
        return getattr(cfg, "gamma", 0.1) ** passed
    if schedule == "constant":
        return 1.0
    raise ValueError(f"train.schedule: {schedule!r} is not allowed; allowed: 'cosine', 'step', 'constant'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: "ScheduleSpec",
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step once per optimiser step; ``cfg`` needs ``epochs`` and ``schedule``
    (``milestones``, ``gamma``, ``warmup_epochs`` are read when present)."""
    if steps_per_epoch < 1:
        raise ValueError(f"make_scheduler: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    lr_factor(cfg, 0, steps_per_epoch)  # an unknown schedule fails here, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step, steps_per_epoch))
