"""Adaptive-Patch (Qi et al. 2023): several weak patch triggers, one per poisoned image, plus cover
samples carrying them with their true labels; at test time stronger triggers are pasted.

Training (backdoor-toolbox ``adaptive_patch``; reference notes §10): four triggers with
``train_alphas`` [0.5, 0.2, 0.5, 0.3], in the order phoenix_corner, firefox_corner, badnet_patch4,
trojan_square; each poisoned image gets one of them, ``x' = x + alpha_j * M_j * (T_j - x)``, and
the target label; cover images get one the same way and keep their labels. Test (CIFAR-10's
setting): phoenix_corner2 and badnet_patch4, both pasted at ``test_alpha`` 1 in that order.

The built-in triggers live on a 32 x 32 grid:

* ``badnet_patch4``: exactly the toolbox's: a 3 x 3 black/white pattern in each corner, a
  different one per corner, the mask covering all four 3 x 3 squares;
* ``phoenix_corner``, ``phoenix_corner2``, ``firefox_corner``, ``trojan_square``: the toolbox's
  logos are not shipped, so each is a seeded (``patch_seed``) random-colour patch of the same
  size, place and mask: a 5 x 5 block at rows/cols 27-31 (phoenix_corner2: the same block and its
  mirror image at cols 0-4), a disc of radius 6.5 centred in rows 1-13 x cols 18-30 (about 140
  pixels), an 8 x 8 square at rows/cols 21-28.

A trigger may instead be a file path: an image (resized to the input size with
``resize``) whose non-black pixels are its mask, the toolbox's default for its PNGs.

Decisions (§14.4, §14.7):

* **Rates** (``rates``). The BI-BAU paper's 10% poisoned is the default, with cover samples in
  the original's 1:2 proportion (20%); ``rates: original`` is Qi et al.'s CIFAR-10 setting, 0.3%
  poisoned and 0.6% cover, which did not implant at the CPU scale (ASR 5.7). An explicit
  ``poison_rate`` or ``cover_rate`` overrides the preset.
* **Which image gets which trigger.** The toolbox splits the sorted poison indices into four
  consecutive chunks; here each image's trigger is drawn from a balanced random assignment
  (counts equal up to one), which is the same in distribution, since the indices are a uniform
  random draw, and needs no global order.
* **Other sizes.** The 32 x 32 reference triggers are scaled by nearest neighbour (``resize``:
  crisp 2 x 2 pixel blocks at 64 px, as backdoor-toolbox redraws its patches per size); any size
  from 8 px on is served.
* **Grey images** (digits): the patches keep their colours (the models see three channels);
  badnet_patch4 is black and white.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, param
from ..registry import ATTACKS
from .base import Attack, PresetRatesConfig, check_cover_rate
from .coupling import coupling_on
from .images import check_image_spec, load_image, resize

REFERENCE = 32
BUILT_IN = ("phoenix_corner", "phoenix_corner2", "firefox_corner", "badnet_patch4", "trojan_square")
# the toolbox's badnet_patch4 corners (1 = white, 0 = black), top-left, top-right, bottom-left, bottom-right
PATCH4 = {
    (0, 0): [[1, 0, 1], [0, 1, 0], [1, 0, 0]],
    (0, REFERENCE - 3): [[1, 0, 1], [0, 1, 0], [0, 0, 1]],
    (REFERENCE - 3, 0): [[1, 0, 0], [0, 1, 0], [1, 0, 1]],
    (REFERENCE - 3, REFERENCE - 3): [[0, 0, 1], [0, 1, 0], [1, 0, 1]],
}


@dataclass
class AdaptivePatchConfig(PresetRatesConfig):
    RATES = {"bibau": (0.1, 0.2), "original": (0.003, 0.006)}
    rates: str = param("bibau", "poison and cover rates when not given: 'bibau' (the BI-BAU paper's 10% poisoned, "
                       "cover samples in the original's 1:2 proportion: 20%) or 'original' (Qi et al.'s 0.3% + 0.6%)",
                       choices=tuple(RATES))
    cover_rate: float | None = param(None, "fraction of the training set given a training trigger with their true "
                                     "labels (cover samples); None: from rates", low=0.0, high=1.0)
    train_triggers: list[str] = param(["phoenix_corner", "firefox_corner", "badnet_patch4", "trojan_square"],
                                      f"training triggers, one per poisoned or cover image: built-in ({', '.join(BUILT_IN)}) "
                                      "or an image file whose non-black pixels are the mask")
    train_alphas: list[float] = param([0.5, 0.2, 0.5, 0.3], "opacity of each training trigger inside its mask",
                                      low=0.0, high=1.0)
    test_triggers: list[str] = param(["phoenix_corner2", "badnet_patch4"], "triggers pasted, in order, on test images")
    test_alpha: float = param(1.0, "opacity of the test triggers inside their masks (1: pasted)", low=0.0, high=1.0)
    patch_seed: int = param(0, "seed of the colours of the substitute logo patches", low=0)
    resize: str = param("nearest", "scaling of the 32x32 reference triggers and trigger files to the image size",
                        choices=("nearest", "bilinear"))

    def check(self, path: str) -> None:
        where = f"{path}." if path else "attack."
        for field in ("train_triggers", "test_triggers"):
            names = getattr(self, field)
            if not names:
                raise ConfigError(f"{where}{field}: empty; allowed: at least one of {', '.join(BUILT_IN)} or a file")
            for i, name in enumerate(names):
                if name not in BUILT_IN:
                    try:
                        check_image_spec(name, f"{where}{field}[{i}]")
                    except ConfigError as exc:
                        raise ConfigError(f"{exc}; or a built-in trigger: {', '.join(BUILT_IN)}") from None
        if len(self.train_alphas) != len(self.train_triggers):
            raise ConfigError(f"{where}train_alphas: {len(self.train_alphas)} values for {len(self.train_triggers)} "
                              "train_triggers; allowed: one opacity per training trigger")
        check_cover_rate(self, where)


def reference_trigger(name: str, channels: int, generator_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A built-in trigger on the 32 x 32 grid: (pattern (C, 32, 32) in [0, 1], mask (1, 32, 32))."""
    pattern = torch.zeros(channels, REFERENCE, REFERENCE)
    mask = torch.zeros(1, REFERENCE, REFERENCE)
    # one colour stream per logo, so phoenix_corner and phoenix_corner2 share their block
    logo = "phoenix" if name.startswith("phoenix") else name
    g = torch.Generator().manual_seed(generator_seed * 1000 + sum(map(ord, logo)))

    def colours(h: int, w: int) -> torch.Tensor:
        # kept away from black so the colours read as a logo (not as the background)
        return 0.15 + 0.85 * torch.rand(channels, h, w, generator=g)

    if name == "badnet_patch4":
        for (row, col), cells in PATCH4.items():
            pattern[:, row:row + 3, col:col + 3] = torch.tensor(cells, dtype=torch.float32)
            mask[:, row:row + 3, col:col + 3] = 1.0
    elif name in ("phoenix_corner", "phoenix_corner2"):
        block = colours(5, 5)
        pattern[:, 27:32, 27:32] = block
        mask[:, 27:32, 27:32] = 1.0
        if name == "phoenix_corner2":
            pattern[:, 27:32, 0:5] = block.flip(-1)
            mask[:, 27:32, 0:5] = 1.0
    elif name == "firefox_corner":
        rows, cols = torch.meshgrid(torch.arange(REFERENCE), torch.arange(REFERENCE), indexing="ij")
        disc = ((rows - 7.0) ** 2 + (cols - 24.0) ** 2) <= 6.5 ** 2
        pattern[:, disc] = colours(1, int(disc.sum()))[:, 0]
        mask[:, disc] = 1.0
    elif name == "trojan_square":
        pattern[:, 21:29, 21:29] = colours(8, 8)
        mask[:, 21:29, 21:29] = 1.0
    else:
        raise ValueError(f"unknown built-in trigger {name!r}; known: {', '.join(BUILT_IN)}")
    return pattern, mask


@ATTACKS.register("adaptive_patch")
class AdaptivePatch(Attack):
    Config = AdaptivePatchConfig
    cfg: AdaptivePatchConfig

    def __init__(self, cfg: AdaptivePatchConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.train_patterns, self.train_masks = self._load(cfg.train_triggers)
        self.test_patterns, self.test_masks = self._load(cfg.test_triggers)

    def _load(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        channels, height, width = self.image_shape
        patterns, masks = [], []
        for name in names:
            if name in BUILT_IN:
                pattern, mask = reference_trigger(name, channels, self.cfg.patch_seed)
            else:
                pattern = load_image(name, channels)
                mask = (pattern.amax(0, keepdim=True) > 0).float()
            # resized with its black surround, like BadNets' trigger: the mask follows the pattern
            patterns.append(resize(pattern * mask, (height, width), self.cfg.resize))
            masks.append((resize(mask, (height, width), self.cfg.resize) > 0).float())
        return torch.stack(patterns), torch.stack(masks)

    @staticmethod
    def _stamp(x: torch.Tensor, pattern: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.lerp(x, pattern.expand_as(x), weight.expand_as(x))

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """The test triggers, pasted in order (``train`` is ignored: the training triggers are
        drawn per image in :meth:`poison_images`)."""
        patterns, masks = self.tensor_on("test_patterns", x), self.tensor_on("test_masks", x)
        for pattern, mask in zip(patterns, masks):
            x = self._stamp(x, pattern, self.cfg.test_alpha * mask)
        return x

    def _one_each(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        k = len(self.cfg.train_triggers)
        which = (torch.arange(len(x)) % k)[torch.randperm(len(x), generator=generator)].to(x.device)
        patterns, masks = self.tensor_on("train_patterns", x), self.tensor_on("train_masks", x)
        alphas = torch.tensor(self.cfg.train_alphas, device=x.device, dtype=x.dtype)
        return self._stamp(x, patterns[which], alphas[which].view(-1, 1, 1, 1) * masks[which])

    def poison_images(self, x: torch.Tensor, generator: torch.Generator, train: bool = True) -> torch.Tensor:
        return self._one_each(x, generator) if train else self.apply_trigger(x)

    def cover_images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self._one_each(x, generator)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"train_patterns": self.train_patterns, "train_masks": self.train_masks,
                "test_patterns": self.test_patterns, "test_masks": self.test_masks}


@dataclass
class AdaptivePatchFCConfig(AdaptivePatchConfig):
    coupling_weight: float = coupling_on()


@ATTACKS.register("adaptive_patch_fc")
class AdaptivePatchFC(AdaptivePatch):
    """Adaptive-Patch with feature coupling (the paper's adaptive attack on BI-BAU, §5.7; ``coupling.py``)."""

    Config = AdaptivePatchFCConfig
