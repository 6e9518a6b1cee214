"""WaNet (Nguyen & Tran 2021): a fixed, smooth warp of the image, dirty-label, poisoned on the
fly in every batch, with "noise mode" samples that are warped randomly and keep their labels.

The warp field (reference notes §3; BackdoorBench and the original code agree): ``k x k`` uniform
noise in [-1, 1], scaled to mean absolute value 1, upsampled bicubically to the image size; the
backdoor grid is ``clamp((identity + s * noise / H) * grid_rescale, -1, 1)`` and a poisoned image
is ``grid_sample(x, grid)`` (bilinear, align_corners). The field is drawn once from the run's seed
(``prepare``), saved with the attack's state beside the model, and adopted from a cached run.

Training (``training_batch``, after the batch is shuffled): the first ``int(poison_rate * B)``
rows the attacker controls are warped and relabelled, the next ``cross_ratio`` times as many get
the backdoor grid plus fresh per-sample noise of up to half a pixel and keep their labels; rows of the
defender's clean split are never poisoned. When ``poison_rate * B < 1`` one row is poisoned with
probability ``poison_rate * B`` (BackdoorBench). The whole batch then goes through WaNet's own
augmentation instead of the trainer's crop and flip: random crop with ``crop_padding`` zeros
(p 0.8), rotation up to ``rotation`` degrees (p 0.5), horizontal flip where the data set and
``train.hflip`` allow it. The attack stage reports the noise-mode accuracy (every test image with a
fresh noise grid, true labels) as ``backdoored_noise_acc``.

Decisions: the poisoned samples the IBU reference unlearns are ``round(poison_rate * N)``
training images drawn with a fixed seed and warped (on-the-fly poisoning touches a different set
every epoch). Other sizes: the field is defined at the image size, so the displacement stays about
``s / 2`` pixels at 32 and 64 px. Grey images stay grey (the warp moves pixels, it adds no colour).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..config import param
from ..data.base import ImageSet
from ..data.batches import random_crop
from ..registry import ATTACKS
from .base import Attack, AttackConfig, TEST_TRIGGER_SEED, attacker_rows, to_float, to_uint8

_PLACEHOLDER_SEED = 0  # field of an attack built outside a run (before prepare or load_state)


@dataclass
class WaNetConfig(AttackConfig):
    k: int = param(4, "side of the random control grid that is upsampled to the warp field", low=2)
    s: float = param(0.5, "strength of the warp (displacement about s/2 pixels)", low=0.0, low_open=True)
    grid_rescale: float = param(1.0, "factor on the warped grid before clamping (1: none)", low=0.0, low_open=True)
    cross_ratio: float = param(2.0, "noise-mode samples per poisoned sample in each batch (0: no noise mode)", low=0.0)
    crop_padding: int = param(5, "WaNet's own augmentation: random-crop padding in pixels (p 0.8; 0: none)", low=0)
    rotation: float = param(10.0, "WaNet's own augmentation: largest rotation in degrees (p 0.5; 0: none)",
                            low=0.0, high=180.0)


def identity_grid(height: int, width: int) -> torch.Tensor:
    """(H, W, 2) sampling grid in grid_sample's (x, y) order that leaves an image unchanged."""
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) sampled at ``grid`` ((H, W, 2) shared, or (B, H, W, 2))."""
    if grid.dim() == 3:
        grid = grid.expand(len(x), *grid.shape)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True).clamp_(0, 1)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image turned about its centre by its angle (zeros come in at the corners)."""
    rad = degrees.to(x.device, x.dtype) * (math.pi / 180)
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@ATTACKS.register("wanet")
class WaNet(Attack):
    Config = WaNetConfig
    cfg: WaNetConfig
    build_time = False
    standard_augmentation = False
    adopts_state = True

    def __init__(self, cfg: WaNetConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        self.grid = self._draw_grid(torch.Generator().manual_seed(_PLACEHOLDER_SEED))

    def _draw_grid(self, generator: torch.Generator) -> torch.Tensor:
        _, height, width = self.image_shape
        k = self.cfg.k
        noise = torch.rand(1, 2, k, k, generator=generator, dtype=torch.float64) * 2 - 1
        noise = noise / noise.abs().mean()
        field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)[0].permute(1, 2, 0)
        # the field's (x, y) displacement in units of the grid's half-size, like the reference's s * N / H
        scale = torch.tensor([width, height], dtype=torch.float64)
        grid = (identity_grid(height, width).double() + self.cfg.s * field / scale) * self.cfg.grid_rescale
        return grid.clamp(-1, 1).float()

    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        self.grid = self._draw_grid(generator)
        self._device_copies.clear()

    def noise_grid(self, n: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """(n, H, W, 2): the backdoor grid moved by fresh uniform noise of up to half a pixel per sample."""
        _, height, width = self.image_shape
        r = torch.rand(n, height, width, 2, generator=generator).to(like.device, like.dtype)
        scale = torch.tensor([width, height], device=like.device, dtype=like.dtype)
        return (self.tensor_on("grid", like) + (2 * r - 1) / scale).clamp(-1, 1)

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return warp(x, self.tensor_on("grid", x))

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module,
                       generator: torch.Generator, *, poisonable: torch.Tensor | None = None,
                       hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(x)
        expected = self.cfg.poison_rate * b
        n_bd = int(expected)
        if n_bd == 0 and expected > 0:  # BackdoorBench's generalize_to_lower_pratio
            n_bd = int(torch.rand((), generator=generator).item() < expected)
        n_cross = int(n_bd * self.cfg.cross_ratio)
        rows = attacker_rows(poisonable, b, x.device)
        bd, cross = rows[:n_bd], rows[n_bd:n_bd + n_cross]
        x, y = x.clone(), y.clone()
        if len(bd):
            x[bd] = self.apply_trigger(x[bd])
            y[bd] = self.target
        if len(cross):
            x[cross] = warp(x[cross], self.noise_grid(len(cross), generator, x))
        return self._augment(x, generator, hflip), y

    def _augment(self, x: torch.Tensor, generator: torch.Generator, hflip: bool) -> torch.Tensor:
        b = len(x)
        if self.cfg.crop_padding:
            rows = (torch.rand(b, generator=generator) < 0.8).nonzero().flatten().to(x.device)
            if len(rows):
                x = x.index_copy(0, rows, random_crop(x[rows], self.cfg.crop_padding, generator))
        if self.cfg.rotation:
            turn = torch.rand(b, generator=generator) < 0.5
            angles = (torch.rand(b, generator=generator) * 2 - 1) * self.cfg.rotation
            rows = turn.nonzero().flatten()
            if len(rows):
                x = x.index_copy(0, rows.to(x.device), rotate(x[rows.to(x.device)], angles[rows]))
        if hflip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x

    def extra_test_sets(self, test: ImageSet) -> dict[str, ImageSet]:
        """``noise_acc``: every test image warped with a fresh noise grid, with its true label."""
        generator = torch.Generator().manual_seed(TEST_TRIGGER_SEED)
        out = torch.empty_like(test.x)
        for start in range(0, len(test), 4096):
            chunk = to_float(test.x[start:start + 4096])
            out[start:start + 4096] = to_uint8(warp(chunk, self.noise_grid(len(chunk), generator, chunk)))
        return {"noise_acc": ImageSet(out, test.y.clone())}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"grid": self.grid}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        grid = tensors.get("grid")
        if set(tensors) != {"grid"} or grid is None or tuple(grid.shape) != tuple(self.grid.shape) \
                or not torch.isfinite(grid).all():
            raise ValueError(f"wanet: saved state must hold 'grid' of shape {tuple(self.grid.shape)}, "
                             f"got {({k: tuple(v.shape) for k, v in tensors.items()})}")
        self.grid = grid.detach().float().cpu().clamp(-1, 1)
        self._device_copies.clear()
