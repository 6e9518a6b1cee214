"""CleanCLIP (Bansal et al. ICCV'23; ``../shared/reference/defenses.md`` A12): fine-tune the whole
poisoned CLIP on clean image-caption pairs with ``clip_weight · L_CLIP + inmodal_weight · L_inmodal``,
``L_inmodal = ½ [InfoNCE(image, augmented image) + InfoNCE(text, augmented text)]``.

Defaults are the reference README's fine-tuning: AdamW (β 0.9/0.999, eps 1e-8, weight decay
0.1), lr 1e-5 with 50 warm-up steps then cosine, batch 64, 10 epochs, both weights 1.

Augmentation, decided here: the paper's AutoAugment (images) and EDA (text) are per-sample PIL
and WordNet operations. Images get batched tensor operations in their place: random crop
(``crop_padding``), flip, per-image brightness/contrast/saturation jitter and random grayscale.
Captions get EDA's two operations that need no word list: random deletion (each word piece with
probability ``text_delete``, at least one kept) and one random swap of two word pieces.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..config import param
from ..contrastive.losses import info_nce
from ..contrastive.model import ClipModel
from ..contrastive.train import Schedule, caption_tokens, train_contrastive
from ..data.batches import random_crop, random_flip
from ..data.captions import PairSet
from ..registry import DEFENSES
from .base import AugmentedDefenseConfig, Defense, DefenseContext, DefenseResult, trainable_copy


@dataclass
class CleanClipConfig(AugmentedDefenseConfig):
    epochs: int = param(10, "passes over the defender's clean pairs", low=1)
    batch_size: int = param(64, "pairs per AdamW step", low=2)
    lr: float = param(1e-5, "AdamW peak learning rate (reference: 1e-5)", low=0.0, low_open=True)
    weight_decay: float = param(0.1, "AdamW weight decay", low=0.0)
    warmup_steps: int = param(50, "linear warm-up steps before the cosine decay", low=0)
    clip_weight: float = param(1.0, "weight of the multimodal CLIP loss", low=0.0)
    inmodal_weight: float = param(1.0, "weight of the in-modal (self-supervised) loss", low=0.0)
    jitter: float = param(0.4, "image augmentation: brightness, contrast and saturation factors drawn in [1-j, 1+j]",
                          low=0.0, high=1.0)
    grayscale: float = param(0.2, "image augmentation: probability of a grayscale view", low=0.0, high=1.0)
    text_delete: float = param(0.1, "text augmentation (EDA): probability of deleting each word piece", low=0.0, high=0.9)


def augment_images(x: torch.Tensor, cfg: CleanClipConfig, flips: bool, generator: torch.Generator) -> torch.Tensor:
    """A second view of the float batch: crop, flip, colour jitter, grayscale, all batched."""
    crop, _ = cfg.augmentation(flips)
    x = random_crop(x, crop or 0, generator)
    if flips:
        x = random_flip(x, generator)
    b = len(x)

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(b, generator=generator) * 2 - 1) * cfg.jitter).to(x.device).view(b, 1, 1, 1)

    x = x * factor()  # brightness
    x = (x - x.mean((1, 2, 3), keepdim=True)) * factor() + x.mean((1, 2, 3), keepdim=True)  # contrast
    gray = (0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if x.shape[1] == 3 else x.mean(1, keepdim=True)
    x = (x - gray) * factor() + gray  # saturation
    to_gray = (torch.rand(b, generator=generator) < cfg.grayscale).to(x.device).view(b, 1, 1, 1)
    x = torch.where(to_gray, gray.expand_as(x), x)
    return x.clamp(0.0, 1.0)


def augment_tokens(tokens: torch.Tensor, p_delete: float, generator: torch.Generator) -> torch.Tensor:
    """EDA's random deletion and one random swap on token rows (start token, end token and padding
    kept in place)."""
    out = torch.zeros_like(tokens)
    rows = tokens.cpu().tolist()
    for i, row in enumerate(rows):
        eot = max(row)  # the end-of-text token has the largest id of the vocabulary
        end = row.index(eot)
        words = row[1:end]
        if len(words) > 1:
            keep = (torch.rand(len(words), generator=generator) >= p_delete).tolist()
            kept = [w for w, k in zip(words, keep) if k] or [words[int(torch.randint(len(words), (1,), generator=generator))]]
            if len(kept) > 1:
                a, b = torch.randperm(len(kept), generator=generator)[:2].tolist()
                kept[a], kept[b] = kept[b], kept[a]
            words = kept
        new = [row[0], *words, eot]
        out[i, : len(new)] = torch.tensor(new[: tokens.shape[1]], dtype=tokens.dtype)
    return out.to(tokens.device)


@DEFENSES.register("cleanclip")
class CleanClip(Defense):
    Config = CleanClipConfig
    contrastive = True

    def describe(self) -> list[str]:
        c = self.cfg
        return [f"CleanCLIP: {c.clip_weight:g}·L_CLIP + {c.inmodal_weight:g}·L_inmodal on the clean pairs, all of the "
                f"CLIP fine-tuned, AdamW lr {c.lr:g} (warm-up {c.warmup_steps} steps, cosine), {c.epochs} epochs"]

    def purify(self, model: ClipModel, clean: PairSet, ctx: DefenseContext) -> DefenseResult:
        if not isinstance(model, ClipModel) or not isinstance(clean, PairSet):
            raise ValueError(f"defense {self.name!r} purifies a CLIP on image-caption pairs (the contrastive setting: "
                             f"a clip section); got a {type(model).__name__} and a {type(clean).__name__}")
        self.check_context(clean, ctx)
        cfg: CleanClipConfig = self.cfg
        started = time.perf_counter()
        device = ctx.device
        gen = torch.Generator().manual_seed(self.seed(ctx))
        f = trainable_copy(model, device)
        tokens = caption_tokens(f, clean, device)
        flips = ctx.hflip and bool(cfg.hflip)

        def inmodal(m: ClipModel, x, image, text, inverse, captions, generator):
            if cfg.inmodal_weight == 0:
                return image.new_zeros(()), {}
            image_aug = m.features(augment_images(x, cfg, flips, generator))
            text_aug = m.encode_text(augment_tokens(tokens[captions], cfg.text_delete, generator))
            term = 0.5 * (info_nce(image, image_aug, m.scale()) + info_nce(text[inverse], text_aug, m.scale()))
            return cfg.inmodal_weight * term, {"inmodal_loss": term.detach()}

        steps = math.ceil(len(clean) / cfg.batch_size)
        schedule = Schedule(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            warmup_epochs=cfg.warmup_steps / steps, crop_padding=0, hflip=False,
                            optimizer="adamw", betas=(0.9, 0.999), eps=1e-8)
        history = train_contrastive(f, clean, schedule, device, generator=gen, extra=inmodal,
                                    clip_weight=cfg.clip_weight, log=ctx.log, tag=self.name)
        return DefenseResult(model=f.eval(), history=history, seconds=time.perf_counter() - started)
