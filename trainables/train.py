"""The one training loop, for clean and poisoned models alike: SGD with momentum and weight
decay, a per-step lr schedule (cosine, step or constant, optional linear warm-up), bf16
autocast and channels_last on CUDA, and batches that stay on the device.

Deterministic on the CPU: the caller's generator drives the order and the augmentation, and
the model's initial weights come from the caller's seed.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import data
from .data.base import ImageSet
from .optim import make_optimizer, make_scheduler
from .predict import accuracy, eval_subsets
from .runtime import autocast, prepare_model

if TYPE_CHECKING:  # type names only: the schema imports the attack and defense modules
    from .attacks.base import Attack
    from .schema import TrainConfig

def train_model(model: nn.Module, train: ImageSet, cfg: "TrainConfig", device: torch.device, *,
                generator: torch.Generator, attack: "Attack | None" = None, hflip_allowed: bool = True,
                protected: torch.Tensor | None = None, eval_sets: dict[str, ImageSet] | None = None,
                log: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` in place on ``train`` and return the per-epoch history.

    Each row holds ``epoch`` (1-based), ``loss`` (mean cross-entropy over the epoch's images),
    ``lr`` (of the epoch's first step), ``seconds`` (training only) and, every
    ``cfg.eval_every`` epochs and after the last, the accuracy on each of ``eval_sets`` under
    its own name (a fixed subsample of ``cfg.eval_size`` images) and ``eval_seconds``.
    An attack adds ``attack.training_loss`` (feature coupling) to the loss and hears of each
    optimiser step and epoch (``after_step``, ``end_epoch``: IAD trains its generator jointly).
    ``attack.training_batch`` sees every augmented batch (crop and flip are skipped for an
    attack with ``standard_augmentation = False``), with the rows it may poison: all but the
    indices in ``protected`` (the defender's clean split). A non-finite loss raises
    :class:`FloatingPointError`. The model is left in eval mode.
    """
    if len(train) < 2:
        raise ValueError(f"train_model: need at least 2 training images (BatchNorm), got {len(train)}")
    device = torch.device(device)
    model = prepare_model(model, device)
    images = train.to(device)  # once, not per epoch
    checks = eval_subsets(eval_sets, cfg.eval_size, device)
    # a trailing batch of one image breaks BatchNorm; any other remainder is trained on
    drop_last = len(train) % cfg.batch_size == 1
    steps = len(train) // cfg.batch_size + (0 if drop_last or len(train) % cfg.batch_size == 0 else 1)
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    scheduler = make_scheduler(optimizer, cfg, steps)
    # an attack that augments inside training_batch (WaNet) replaces crop and flip
    standard = attack is None or getattr(attack, "standard_augmentation", True)
    flips_keep_labels = cfg.hflip and hflip_allowed
    hflip = flips_keep_labels and standard
    crop = cfg.crop_padding if standard else 0
    poisonable = torch.ones(len(train), dtype=torch.bool, device=device)
    if protected is not None and len(protected):
        poisonable[protected.to(device)] = False
    coupled = attack is not None and attack.couples_features
    history: list[dict] = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        # summed on the device: one host sync per epoch instead of one per step
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for x, y, index in data.batches(images, cfg.batch_size, device=device, shuffle=True, generator=generator,
                                        crop_padding=crop, hflip=hflip, drop_last=drop_last, with_index=True):
            if attack is not None:
                x, y = attack.training_batch(x, y, model, generator, poisonable=poisonable[index],
                                             hflip=flips_keep_labels)
            with autocast(device):
                if coupled:  # the attack adds a term on the penultimate features (feature coupling)
                    features = model.features(x)
                    loss = F.cross_entropy(model.head(features), y, label_smoothing=cfg.label_smoothing)
                    extra = attack.training_loss(features, y, index)
                    if extra is not None:
                        loss = loss + extra
                else:
                    loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if attack is not None:
                attack.after_step()
            loss_sum += loss.detach().float() * len(y)
            seen += len(y)
        if attack is not None:
            attack.end_epoch(epoch)
        mean_loss = loss_sum.item() / max(1, seen)
        seconds = time.perf_counter() - start
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"training diverged: the loss of epoch {epoch}/{cfg.epochs} is {mean_loss} "
                                     f"(lr {lr:.4g}); lower train.lr or raise train.warmup_epochs")
        row = {"epoch": epoch, "loss": mean_loss, "lr": lr, "seconds": seconds}
        if checks and ((cfg.eval_every and epoch % cfg.eval_every == 0) or epoch == cfg.epochs):
            t = time.perf_counter()
            row.update({name: accuracy(model, subset, device) for name, subset in checks.items()})
            row["eval_seconds"] = time.perf_counter() - t
        history.append(row)
        scores = "".join(f" {k} {row[k]:.4f}" for k in checks if k in row)
        log(f"epoch {epoch}/{cfg.epochs} loss {mean_loss:.4f} lr {lr:.4g}{scores} {seconds:.1f}s")
    model.eval()
    return history
