"""Post-activation ResNets with a CIFAR stem (3x3 convolution, no max-pool): ``resnet18`` and
``small_resnet``, the narrow few-stage variant that trains in minutes on a CPU."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import MODELS
from .base import Classifier, init_weights, resolve_stats


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(Classifier):
    """Stem, then one stage per entry of ``widths`` (``blocks`` BasicBlocks each, stride 2 from
    the second stage on), global average pool, linear head."""

    def __init__(self, widths: list[int], blocks: int, num_classes: int, in_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(mean, std)
        if not widths or min(widths) < 1 or blocks < 1 or num_classes < 1:
            raise ValueError(f"ResNet: widths {widths}, blocks {blocks} and num_classes {num_classes} must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, planes = [], widths[0]
        for i, width in enumerate(widths):
            stage = []
            for j in range(blocks):
                stage.append(BasicBlock(planes, width, stride=2 if i > 0 and j == 0 else 1))
                planes = width
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        self.head = nn.Linear(planes, num_classes)

    def embed_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.embed_map(x))


@MODELS.register("small_resnet")
def small_resnet(num_classes: int, in_channels: int = 3, width: int = 16, depth: int = 4,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 generator: torch.Generator | None = None) -> ResNet:
    """``depth`` stages of one BasicBlock each, ``width`` channels doubling per stage
    (16-32-64-128 by default, 0.3 M parameters): fast enough for CPU trials."""
    mean, std = resolve_stats(mean, std, in_channels)
    model = ResNet([width * 2 ** i for i in range(depth)], 1, num_classes, in_channels, mean, std)
    init_weights(model, generator)
    return model


@MODELS.register("resnet18")
def resnet18(num_classes: int, in_channels: int = 3, width: int = 64, depth: int = 2,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             generator: torch.Generator | None = None) -> ResNet:
    """ResNet-18 with the CIFAR stem: 4 stages of ``width`` x 1, 2, 4, 8 channels and ``depth``
    blocks each (the defaults, 64 and 2, are the standard network; other values scale it)."""
    mean, std = resolve_stats(mean, std, in_channels)
    model = ResNet([width * 2 ** i for i in range(4)], depth, num_classes, in_channels, mean, std)
    init_weights(model, generator)
    return model
