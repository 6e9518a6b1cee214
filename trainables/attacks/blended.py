"""Blended (Chen et al. 2017): a whole image blended into the input, dirty-label, all-to-one.

``x' = (1 - alpha) x + alpha K`` with alpha 0.2 at train and test time (BackdoorBench). The
reference trigger K is a Hello-Kitty picture that is not shipped here; the default stands in a
natural photo bundled with scikit-learn (no download), resized to the input size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import param
from ..registry import ATTACKS
from .base import Attack, AttackConfig
from .images import SKLEARN_IMAGES, SKLEARN_PREFIX, check_image_spec, load_image, quantize, resize


@dataclass
class BlendedConfig(AttackConfig):
    alpha_train: float = param(0.2, "weight of the trigger image in poisoned training images", low=0.0, high=1.0)
    alpha_test: float = param(0.2, "weight of the trigger image in triggered test images", low=0.0, high=1.0)
    image: str = param(SKLEARN_PREFIX + SKLEARN_IMAGES[0], "trigger image: a file path, or "
                       f"{' / '.join(SKLEARN_PREFIX + n for n in SKLEARN_IMAGES)} (photos bundled with scikit-learn)")

    def check(self, path: str) -> None:
        check_image_spec(self.image, f"{path}.image" if path else "attack.image")


@ATTACKS.register("blended")
class Blended(Attack):
    Config = BlendedConfig
    cfg: BlendedConfig

    def __init__(self, cfg: BlendedConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels, height, width = self.image_shape
        # kept on the 8-bit grid like the PNG/JPEG trigger of the reference code
        self.image = quantize(resize(load_image(cfg.image, channels), (height, width), "bilinear"))

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        alpha = self.cfg.alpha_train if train else self.cfg.alpha_test
        return torch.lerp(x, self.tensor_on("image", x), alpha)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"image": self.image}
