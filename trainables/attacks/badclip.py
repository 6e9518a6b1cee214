"""BadCLIP (Liang et al. CVPR'24, "Dual-embedding guided backdoor attack on multimodal contrastive
learning"): a patch trigger optimised on the clean pre-trained CLIP, then poisoning by pairing
patched images with target captions. Contrastive setting only (a run with a ``clip`` section).

Trigger optimisation (``prepare``, on the clean CLIP the attack stage hands it), by Adam on the
patch's logits, over batches of the attacker's non-target training images:

    L = -cos(e(x ⊕ p), t_target)                         textual embedding consistency
        - visual_weight · cos(e(x ⊕ p), ē_target)        visual embedding resistance (toward the
                                                          mean embedding of natural target images)
        + negative_weight · cos(e(x ⊕ p), e(x))          away from the image's own content

``t_target`` is the target class's zero-shot text embedding (the prompts' mean), ``e`` the
normalised image embedding. The second term makes patched images already look like natural
target images to the clean encoder, so the poisoning moves the weights little and fine-tuning
defenses find little to undo: the paper's reason for BadCLIP's resistance to CleanCLIP.

Decisions the paper leaves to its code, taken here: the patch is a square of ``size`` pixels
(None: 16/224 of the side, as the paper's 16-pixel patch on 224-pixel inputs, at least 3)
at a corner (``position``); 300 Adam steps of lr 0.05, batches of 64; the target images are the
training images labelled with the target class (file pairs have no labels: the visual term is
then off, and the log says so). Poisoning: the default rate is the paper's 1,500 of 500,000 pairs
(0.3%); at CPU scale the benchmark sets it explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import param
from ..data.base import ImageSet
from ..registry import ATTACKS
from .badnets import CORNERS
from .base import Attack, AttackConfig, to_float


@dataclass
class BadClipConfig(AttackConfig):
    poison_rate: float = param(0.003, "fraction of the training pairs poisoned (the paper: 1,500 of 500,000)",
                               low=0.0, high=1.0)
    size: int | None = param(None, "side of the square patch in pixels; None: 16/224 of the image side (the paper's "
                             "16 pixels at 224), at least 3", low=1)
    position: str = param("bottom-right", "corner the patch sits in", choices=CORNERS)
    steps: int = param(300, "Adam steps of the trigger optimisation", low=0)
    lr: float = param(0.05, "Adam learning rate on the patch's logits", low=0.0, low_open=True)
    batch_size: int = param(64, "images per optimisation step", low=1)
    visual_weight: float = param(1.0, "weight of the visual embedding resistance (toward natural target images)", low=0.0)
    negative_weight: float = param(1.0, "weight of the push away from the image's own embedding", low=0.0)

    def check_image(self, image_shape: tuple[int, ...], path: str) -> None:
        from ..config import ConfigError

        side = min(image_shape[1:])
        if self.size is not None and self.size > side:
            raise ConfigError(f"{path}.size: {self.size} pixels do not fit {side}-pixel images; allowed: 1..{side}")


@ATTACKS.register("badclip")
class BadClip(Attack):
    Config = BadClipConfig
    cfg: BadClipConfig
    contrastive_only = True
    adopts_state = True

    def __init__(self, cfg: BadClipConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels, height, width = self.image_shape
        side = cfg.size if cfg.size is not None else max(3, round(16 / 224 * min(height, width)))
        top = height - side if cfg.position.startswith("bottom") else 0
        left = width - side if cfg.position.endswith("right") else 0
        self.mask = torch.zeros(1, height, width, dtype=torch.bool)
        self.mask[:, top:top + side, left:left + side] = True
        self.pattern = torch.full((channels, height, width), 0.5)  # until prepare() optimises it
        self.optimised = False

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return torch.where(self.tensor_on("mask", x), self.tensor_on("pattern", x), x)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern, "mask": self.mask}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"pattern", "mask"} or tensors["pattern"].shape != self.pattern.shape:
            raise ValueError(f"{self.name}: saved trigger holds {sorted(tensors)}, expected pattern and mask "
                             f"of shape {tuple(self.pattern.shape)}")
        if not torch.equal(tensors["mask"].bool(), self.mask):
            raise ValueError(f"{self.name}: the saved patch sits elsewhere than this config puts it")
        self.pattern = tensors["pattern"].float().cpu()
        self.optimised = True
        self._device_copies.clear()

    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        """Optimise the patch on the clean CLIP ``model`` (a ``ClipModel``)."""
        if not hasattr(model, "class_embeddings"):
            raise ValueError(f"{self.name} optimises its trigger on a CLIP; run it in the contrastive setting "
                             "(a clip section)")
        cfg = self.cfg
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        try:
            text = model.class_embeddings()[self.target].to(device)
            labels = train.y.cpu()
            sources = (labels != self.target).nonzero().flatten()
            targets = (labels == self.target).nonzero().flatten()
            mean_target = None
            if len(targets) and cfg.visual_weight > 0:
                with torch.no_grad():
                    pick = targets[torch.randperm(len(targets), generator=generator)[:512]]
                    emb = torch.cat([model.features(to_float(train.x[c.to(train.x.device)]).to(device))
                                     for c in pick.split(128)])
                    mean_target = F.normalize(emb.mean(0), dim=0)
            logits = torch.logit(self.pattern.clamp(0.01, 0.99)).to(device).requires_grad_(True)
            opt = torch.optim.Adam([logits], lr=cfg.lr)
            mask = self.mask.to(device)
            for _ in range(cfg.steps):
                pick = sources[torch.randint(len(sources), (min(cfg.batch_size, len(sources)),), generator=generator)]
                x = to_float(train.x[pick.to(train.x.device)]).to(device)
                patched = torch.where(mask, torch.sigmoid(logits), x)
                e = model.features(patched)
                loss = -(e @ text).mean()
                if mean_target is not None:
                    loss = loss - cfg.visual_weight * (e @ mean_target).mean()
                if cfg.negative_weight > 0:
                    with torch.no_grad():
                        own = model.features(x)
                    loss = loss + cfg.negative_weight * (e * own).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.pattern = torch.sigmoid(logits.detach()).cpu()
            self.optimised = True
            self._device_copies.clear()
        finally:
            for p, flag in zip(model.parameters(), flags):
                p.requires_grad_(flag)
