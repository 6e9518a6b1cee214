"""SIG (Barni et al. 2019): a horizontal sinusoid added to target-class images, clean-label.

``x' = clip(x + v)``, ``v[c, i, j] = delta * sin(2 pi j f / W)``: constant down the rows, the same
in every channel, at train and test time alike (BackdoorBench: delta 40/255, f 6; no test-time
amplification).

Decisions (reference notes §7, §14.3):

* **How many images.** The paper poisons "a fraction of the target class", so the count is
  ``round(target_fraction * n_target)`` of the target class's training images, 0.5 by default.
  BackdoorBench's 10% of the whole set poisons 100% of CIFAR-10's class 0, leaves no clean
  image of that class and costs about 7 points of CA (84.5 vs 93.6 at 50% on its leaderboard,
  ASR 98.3 vs 97.1); 50% keeps the ASR and the CA. BackdoorBench's reading stays available:
  set ``poison_rate`` and ``round(poison_rate * N)`` target-class images are poisoned; a count
  larger than the class fails with a ConfigError (BackdoorBench crashes, backdoor-toolbox caps
  silently) instead of quietly poisoning fewer.
* **Other sizes.** ``frequency`` counts cycles across the image width, so the pattern is the same
  at 32 and 64 px; ``delta`` is in pixel-value units and does not change.
* **Grey images** (digits): the signal is the same in every channel, so a grey image stays grey.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ConfigError, param
from ..registry import ATTACKS
from .base import Attack, AttackConfig


@dataclass
class SIGConfig(AttackConfig):
    poison_rate: float | None = param(
        None, "BackdoorBench's reading: poison round(rate x N) target-class images, N the whole training set "
        "(more than the class holds fails); None: target_fraction decides", low=0.0, high=1.0)
    target_fraction: float = param(0.5, "share of the target class's training images that get the signal",
                                   low=0.0, high=1.0, low_open=True)
    delta: float = param(40 / 255, "amplitude of the sinusoid, in [0, 1] pixel units (40/255 in BackdoorBench)",
                         low=0.0, high=1.0, low_open=True)
    frequency: float = param(6.0, "cycles of the sinusoid across the image width", low=0.0, low_open=True)


@ATTACKS.register("sig")
class SIG(Attack):
    Config = SIGConfig
    cfg: SIGConfig
    clean_label = True

    def __init__(self, cfg: SIGConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels, height, width = self.image_shape
        columns = torch.arange(width, dtype=torch.float64)
        wave = cfg.delta * torch.sin(2 * math.pi * columns * cfg.frequency / width)
        self.signal = wave.float().view(1, 1, width).expand(channels, height, width).contiguous()

    def select_poison(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pool = (labels.cpu() == self.target).nonzero().flatten()
        if self.cfg.poison_rate is None:
            n = round(self.cfg.target_fraction * len(pool))
        else:
            n = round(self.cfg.poison_rate * len(labels))
            if n > len(pool):
                raise ConfigError(
                    f"attack.poison_rate: {self.cfg.poison_rate} asks for {n} images of the target class "
                    f"{self.target}, which has {len(pool)} training images; allowed: at most "
                    f"{len(pool) / len(labels):.4g}, or leave it null and set attack.target_fraction")
        pick = torch.randperm(len(pool), generator=generator)[:n]
        return pool[pick].sort().values

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return (x + self.tensor_on("signal", x)).clamp_(0.0, 1.0)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"signal": self.signal}
