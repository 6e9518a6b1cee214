"""Adaptive-Blend (Qi et al. 2023): a blended trigger cut into pieces, half of them dropped at
random per poisoned image, plus *cover* samples that carry the same partial trigger but keep
their true labels, so the poisoned and clean samples stay close in latent space.

Training (backdoor-toolbox ``adaptive_blend``; reference notes §9): the image is split into
``pieces`` equal blocks (a 4 x 4 grid at 16), for every poisoned and every cover image a fresh
random ``round(mask_rate * pieces)`` of them are dropped, and ``x' = x + alpha_train * m * (K - x)``
with ``alpha_train`` 0.15; poisoned images get the target label, cover images keep theirs.
Test: the full trigger at ``alpha_test`` 0.2. ``apply_trigger(train=True)`` is the full trigger
at ``alpha_train`` (the masks are drawn only where poisoned images are made, from a generator).

Decisions (§14.4, §14.7):

* **Rates** (``rates``). The BI-BAU paper's setup ("the poisoning ratio is set to 10% ... for all
  attacks, except for SIG and Narcissus") is the default: 10% poisoned, with cover samples in the
  original's 1:1 proportion (10%). ``rates: original`` is Qi et al.'s 0.3% + 0.3% (150 + 150 on
  CIFAR-10), which did not implant at the CPU scale (ASR 7.7); an explicit ``poison_rate`` or
  ``cover_rate`` overrides the preset. The resolved rates are in every run's config.
* **Trigger image.** Backdoor-toolbox's Hello Kitty is not shipped; the default is the same
  stand-in as Blended's (scikit-learn's china.jpg), a file path replaces it.
* **Other sizes.** The trigger is resized to the image; the pieces' grid must divide both sides
  (``pieces`` a square number, ``sqrt(pieces)`` dividing H and W), else a ConfigError names
  ``attack.pieces``: 8 x 8 blocks at 32 px, 16 x 16 at 64 px.
* **Grey images** (digits): a colour trigger is blended as it is (the models see three channels);
  give a grey image to keep grey data grey.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError, param
from ..registry import ATTACKS
from .base import PresetRatesConfig, check_cover_rate
from .blended import Blended, BlendedConfig
from .coupling import coupling_on


@dataclass
class AdaptiveBlendConfig(PresetRatesConfig, BlendedConfig):
    RATES = {"bibau": (0.1, 0.1), "original": (0.003, 0.003)}
    rates: str = param("bibau", "poison and cover rates when not given: 'bibau' (the BI-BAU paper's 10% poisoned, "
                       "cover samples in the original's 1:1 proportion: 10%) or 'original' (Qi et al.'s 0.3% + 0.3%)",
                       choices=tuple(RATES))
    cover_rate: float | None = param(None, "fraction of the training set given the partial trigger with their true "
                                     "labels (cover samples); None: from rates", low=0.0, high=1.0)
    pieces: int = param(16, "blocks the trigger is cut into: a square number whose root divides the image side", low=1)
    mask_rate: float = param(0.5, "share of the pieces dropped in each poisoned or cover image", low=0.0, high=1.0)
    alpha_train: float = param(0.15, "weight of the trigger in poisoned and cover training images (inside the "
                               "pieces kept)", low=0.0, high=1.0)
    alpha_test: float = param(0.2, "weight of the (full) trigger in triggered test images", low=0.0, high=1.0)

    def check(self, path: str) -> None:
        super().check(path)
        where = f"{path}." if path else "attack."
        root = math.isqrt(self.pieces)
        if root * root != self.pieces:
            raise ConfigError(f"{where}pieces: {self.pieces} is not a square number; allowed: 1, 4, 9, 16, 25, ...")
        check_cover_rate(self, where)

    def check_image(self, image_shape: tuple[int, ...], path: str) -> None:
        root = math.isqrt(self.pieces)
        _, height, width = image_shape
        if height % root or width % root:
            raise ConfigError(f"{path}.pieces: {self.pieces} ({root} x {root}) does not divide the {height}x{width} "
                              f"images; allowed: a square number whose root divides {math.gcd(height, width)}")


@ATTACKS.register("adaptive_blend")
class AdaptiveBlend(Blended):
    """Blended's trigger image and full-trigger ``apply_trigger``; per-image masks when poisoning."""

    Config = AdaptiveBlendConfig
    cfg: AdaptiveBlendConfig

    def masks(self, n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """(n, 1, H, W): per image, a fresh random ``mask_rate`` of the pieces set to 0, the rest 1."""
        root = math.isqrt(self.cfg.pieces)
        _, height, width = self.image_shape
        dropped = round(self.cfg.mask_rate * self.cfg.pieces)
        order = torch.rand(n, self.cfg.pieces, generator=generator).argsort(1)
        keep = torch.ones(n, self.cfg.pieces)
        keep.scatter_(1, order[:, :dropped], 0.0)
        grid = keep.view(n, 1, root, root)
        grid = grid.repeat_interleave(height // root, 2).repeat_interleave(width // root, 3)
        return grid.to(like.device, like.dtype)

    def _partial(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        weight = self.cfg.alpha_train * self.masks(len(x), generator, x)
        return torch.lerp(x, self.tensor_on("image", x).expand_as(x), weight)

    def poison_images(self, x: torch.Tensor, generator: torch.Generator, train: bool = True) -> torch.Tensor:
        return self._partial(x, generator) if train else self.apply_trigger(x, train=False)

    def cover_images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._partial(x, generator)


@dataclass
class AdaptiveBlendFCConfig(AdaptiveBlendConfig):
    coupling_weight: float = coupling_on()


@ATTACKS.register("adaptive_blend_fc")
class AdaptiveBlendFC(AdaptiveBlend):
    """Adaptive-Blend with feature coupling (the paper's adaptive attack on BI-BAU, §5.7; ``coupling.py``)."""

    Config = AdaptiveBlendFCConfig
