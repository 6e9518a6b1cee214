"""BadNets (Gu et al. 2017): a small patch pasted into the image, dirty-label, all-to-one.

The trigger is drawn on a 32x32 reference grid (BackdoorBench's ``trigger_image.png``: a 3x3
white square in the bottom-right corner) and resized to the input size, bilinear by default
as BackdoorBench resizes its PNG: at 64x64 a 5x5 core with a soft rim. Pixels the resized
trigger covers are replaced by it, the others are kept (``x' = x [T = 0] + T [T > 0]``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, param
from ..registry import ATTACKS
from .base import Attack, AttackConfig
from .images import check_image_spec, load_image, resize

REFERENCE = 32  # side of the grid that size and position are given on
CORNERS = ("bottom-right", "bottom-left", "top-right", "top-left")


@dataclass
class BadNetsConfig(AttackConfig):
    size: int = param(3, "side of the square patch in pixels of the 32x32 reference grid (scaled by H/32, W/32)", low=1, high=REFERENCE)
    position: str | tuple[int, int] = param(
        "bottom-right", f"where the patch sits: a corner ({', '.join(CORNERS)}) or [row, col] of its "
        "top-left pixel on the 32x32 reference grid")
    pattern: str = param("white", "patch content: white (every pixel 255) or checkerboard (255 and 0 alternating)",
                         choices=("white", "checkerboard"))
    image: str | None = param(None, "trigger image file (BackdoorBench's mask-image convention: its non-black "
                              "pixels replace the input's), resized to the input size; replaces size/position/pattern")
    resize: str = param("bilinear", "scaling of the reference trigger to other sizes: bilinear (BackdoorBench, "
                        "soft rim) or nearest (crisp square)", choices=("bilinear", "nearest"))

    def check(self, path: str) -> None:
        where = f"{path}." if path else "attack."
        if isinstance(self.position, str):
            if self.position not in CORNERS:
                raise ConfigError(f"{where}position: {self.position!r} is not allowed; allowed: one of "
                                  f"{', '.join(CORNERS)} or [row, col]")
        else:
            for axis, value in zip(("row", "col"), self.position):
                if not 0 <= value <= REFERENCE - self.size:
                    raise ConfigError(f"{where}position: {axis} {value} puts the {self.size}-pixel patch outside "
                                      f"the {REFERENCE}x{REFERENCE} grid; allowed: 0..{REFERENCE - self.size}")
        if self.image is not None:
            check_image_spec(self.image, f"{where}image")

    def top_left(self) -> tuple[int, int]:
        if not isinstance(self.position, str):
            return tuple(self.position)  # type: ignore[return-value]
        far = REFERENCE - self.size
        return (far if self.position.startswith("bottom") else 0, far if self.position.endswith("right") else 0)


@ATTACKS.register("badnets")
class BadNets(Attack):
    Config = BadNetsConfig
    cfg: BadNetsConfig

    def __init__(self, cfg: BadNetsConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels, height, width = self.image_shape
        if cfg.image is not None:
            drawn = load_image(cfg.image, channels)
            cover = (drawn.amax(0, keepdim=True) > 0).float()
        else:
            drawn, cover = self._reference(channels)
        # the patch is resized together with a black surround, so rim pixels take the blended
        # (darker) value, and every pixel the resized patch touches is replaced
        self.pattern = resize(drawn * cover, (height, width), cfg.resize)
        self.mask = resize(cover, (height, width), cfg.resize) > 0

    def _reference(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.cfg.size
        row, col = self.cfg.top_left()
        if self.cfg.pattern == "white":
            cell = torch.ones(size, size)
        else:
            ij = torch.arange(size)
            cell = ((ij[:, None] + ij[None, :]) % 2 == 0).float()
        drawn = torch.zeros(channels, REFERENCE, REFERENCE)
        cover = torch.zeros(1, REFERENCE, REFERENCE)
        drawn[:, row:row + size, col:col + size] = cell
        cover[:, row:row + size, col:col + size] = 1.0
        return drawn, cover

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return torch.where(self.tensor_on("mask", x), self.tensor_on("pattern", x), x)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"pattern": self.pattern, "mask": self.mask}
