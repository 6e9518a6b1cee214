"""The contrastive training loop: CLIP's loss on image-caption pairs, AdamW or SGD, the training
loop's lr schedules, batches that stay on the device.

One loop serves the clean pre-training and the attack's fine-tuning (the attack stage), the
retuning attack on a CLIP (RA) and CleanCLIP (whose in-modal term comes in through ``extra``).
Each batch encodes only its distinct captions once (``clip_loss`` treats images sharing a
caption as that text's positives).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.base import ImageSet
from ..data.batches import augment, batches
from ..data.captions import PairSet
from ..optim import make_scheduler
from ..predict import accuracy, eval_subsets
from ..runtime import autocast, prepare_model
from .losses import batch_logits, clip_loss
from .model import ClipModel, tokenize


@dataclass
class Schedule:
    """What one contrastive training run does (the fields ``make_scheduler`` reads included)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    crop_padding: int = 0
    hflip: bool = False
    optimizer: str = "adamw"  # adamw (CLIP, CleanCLIP) or sgd (RA, METHOD's retuning)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.98)  # CLIP's AdamW
    eps: float = 1e-6


def decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict]:
    """CLIP's recipe (open_clip's training loop): weight decay on matrices and filters only; gains,
    biases, embeddings of rank < 2 and the logit scale are not decayed (decay pulls the log scale
    toward 0, i.e. the temperature toward 1, and the LayerNorm gains toward 0)."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
            if g["params"]]


def make_optimizer(params: list[torch.nn.Parameter], s: Schedule) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("contrastive training: no parameter requires a gradient")
    groups = decay_groups(params, s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, eps=s.eps)
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    raise ValueError(f"optimizer {s.optimizer!r}; allowed: adamw, sgd")


Extra = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def caption_tokens(model: ClipModel, pairs: PairSet, device: torch.device) -> torch.Tensor:
    """The token rows of ``pairs``' caption table, on the device."""
    return tokenize(model.arch, pairs.texts).to(device)


def train_contrastive(model: ClipModel, pairs: PairSet, s: Schedule, device: torch.device, *,
                      generator: torch.Generator, params: list[torch.nn.Parameter] | None = None,
                      extra: Extra | None = None, eval_sets: dict[str, ImageSet] | None = None,
                      eval_every: int = 1, eval_size: int = 1000, no_augment: torch.Tensor | None = None,
                      clip_weight: float = 1.0,
                      log: Callable[[str], None] = print, tag: str = "clip") -> list[dict]:
    """Train ``model`` in place on ``pairs`` and return the per-epoch history (``loss``: the mean
    CLIP loss, plus ``extra``'s terms; the zero-shot accuracy on each of ``eval_sets``).

    ``params`` (default: all of the CLIP) are trained; ``extra(model, x, image_emb, text_emb,
    inverse, captions, generator)`` returns an added loss and its terms. Rows marked in
    ``no_augment`` (bool per pair) skip crop and flip (RA's poisoned pairs keep the trigger where
    the attack put it). The head is refreshed at the end; the model is left in eval mode.
    """
    if len(pairs) < 2:
        raise ValueError(f"contrastive training: need at least 2 pairs, got {len(pairs)}")
    model = prepare_model(model, device)
    if params is None:
        model.clip.requires_grad_(True)
        params = [p for p in model.clip.parameters() if p.requires_grad]
    opt = make_optimizer(params, s)
    steps = math.ceil(len(pairs) / s.batch_size)
    scheduler = make_scheduler(opt, s, steps)
    tokens = caption_tokens(model, pairs, device)
    data = pairs.to(device)
    captions = data.caption
    checks = eval_subsets(eval_sets, eval_size, device)
    keep = no_augment.to(device) if no_augment is not None else None
    history: list[dict] = []
    for epoch in range(1, s.epochs + 1):
        model.train()
        start = time.perf_counter()
        lr = opt.param_groups[0]["lr"]
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        plain = ImageSet(data.x, data.y)
        for x, _, idx in batches(plain, s.batch_size, device=device, shuffle=True, generator=generator,
                                 crop_padding=s.crop_padding if keep is None else 0,
                                 hflip=s.hflip if keep is None else False, with_index=True):
            if len(idx) < 2:
                continue
            if keep is not None and (s.crop_padding or s.hflip):
                x = augment(x, generator, s.crop_padding, s.hflip, where=~keep[idx].cpu())
            uniq, inverse = captions[idx].unique(return_inverse=True)
            with autocast(device):
                image = model.features(x)
                text = model.encode_text(tokens[uniq])
                multimodal = clip_loss(batch_logits(image, text, model.scale()), inverse)
                loss = clip_weight * multimodal
                terms = {"clip_loss": multimodal.detach()}
                if extra is not None:
                    added, more = extra(model, x, image, text, inverse, captions[idx], generator)
                    loss = loss + added
                    terms.update(more)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
            with torch.no_grad():
                model.clip.logit_scale.clamp_(0, math.log(100.0))
            terms["loss"] = loss.detach()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float() * len(idx)
            seen += len(idx)
        row = {"epoch": epoch, "lr": lr, **{k: v.item() / max(1, seen) for k, v in sums.items()},
               "seconds": time.perf_counter() - start}
        if not math.isfinite(row.get("loss", 0.0)):
            raise FloatingPointError(f"{tag}: contrastive training diverged: the loss of epoch {epoch}/{s.epochs} is "
                                     f"{row['loss']} (lr {lr:.4g}); lower the learning rate")
        if checks and ((eval_every and epoch % eval_every == 0) or epoch == s.epochs):
            model.refresh_head()
            row.update({name: accuracy(model, subset, device) for name, subset in checks.items()})
        history.append(row)
        shown = " ".join(f"{k} {row[k]:.4f}" for k in ("loss", *checks) if k in row)
        log(f"[{tag}] epoch {epoch}/{s.epochs} {shown} lr {lr:.4g} {row['seconds']:.1f}s")
    model.refresh_head()
    model.eval()
    return history


def retune_clip(model: ClipModel, data: PairSet, poisoned: torch.Tensor, device: torch.device, *, epochs: int,
                lr: float, batch_size: int, generator: torch.Generator, crop_padding: int = 4, hflip: bool = True,
                momentum: float = 0.9) -> ClipModel:
    """RA on a CLIP: a copy of ``model``, all of it fine-tuned with the CLIP loss on the retuning pairs
    (a few poisoned images paired with target captions among benign pairs), with RA's optimiser
    (SGD, no weight decay, constant lr); the poisoned pairs are not augmented."""
    import copy

    tuned = copy.deepcopy(model)
    s = Schedule(epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=0.0, schedule="constant",
                 crop_padding=crop_padding, hflip=hflip, optimizer="sgd", momentum=momentum)
    train_contrastive(tuned, data, s, device, generator=generator, no_augment=poisoned, log=lambda _: None, tag="ra")
    return tuned.eval()
