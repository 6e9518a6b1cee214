"""VGG-19 with BatchNorm, CIFAR form: 16 conv-BN-ReLU layers, five max-pools, global average
pool, one 512 -> classes linear layer (not torchvision's 4096-wide ImageNet head)."""
from __future__ import annotations

import torch
from torch import nn

from ..registry import MODELS
from .base import Classifier, init_weights, resolve_stats

# channels as multiples of the first stage's width; "M": 2x2 max-pool
_VGG19 = (1, 1, "M", 2, 2, "M", 4, 4, 4, 4, "M", 8, 8, 8, 8, "M", 8, 8, 8, 8, "M")


class VGG(Classifier):
    def __init__(self, width: int, num_classes: int, in_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(mean, std)
        if width < 1 or num_classes < 1:
            raise ValueError(f"VGG: width {width} and num_classes {num_classes} must be >= 1")
        layers: list[nn.Module] = []
        planes = in_channels
        for item in _VGG19:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = width * int(item)
                layers += [nn.Conv2d(planes, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                planes = out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(planes, num_classes)

    def embed_map(self, x: torch.Tensor) -> torch.Tensor:
        # five halvings: inputs must be at least 32 px (1x1 map); 64 px leaves a 2x2 map
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.embed_map(x))


@MODELS.register("vgg19_bn")
def vgg19_bn(num_classes: int, in_channels: int = 3, width: int = 64,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             generator: torch.Generator | None = None) -> VGG:
    """VGG-19-BN; ``width`` is the first stage's channels (64: the standard 64-128-256-512-512).
    Its depth is fixed, so it takes no ``depth`` (a config that sets one is refused)."""
    mean, std = resolve_stats(mean, std, in_channels)
    model = VGG(width, num_classes, in_channels, mean, std)
    init_weights(model, generator)
    return model
