"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks"), CIFAR
stem: the network of BackdoorBench's leaderboard."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..registry import MODELS
from .base import Classifier, init_weights, resolve_stats


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # the projection sees the pre-activated input, the identity the raw one (as in the paper)
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(Classifier):
    def __init__(self, width: int, blocks: int, num_classes: int, in_channels: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(mean, std)
        if width < 1 or blocks < 1 or num_classes < 1:
            raise ValueError(f"PreActResNet: width {width}, blocks {blocks} and num_classes {num_classes} must be >= 1")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        stages, planes = [], width
        for i in range(4):
            stage = []
            for j in range(blocks):
                stage.append(PreActBlock(planes, width * 2 ** i, stride=2 if i > 0 and j == 0 else 1))
                planes = width * 2 ** i
            stages.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*stages)
        # the last block's sum is not normalised; a final BN-ReLU gives the head rectified features
        self.bn = nn.BatchNorm2d(planes)
        self.head = nn.Linear(planes, num_classes)

    def embed_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.layers(self.conv1(x))))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.embed_map(x))


@MODELS.register("preact_resnet18")
def preact_resnet18(num_classes: int, in_channels: int = 3, width: int = 64, depth: int = 2,
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    generator: torch.Generator | None = None) -> PreActResNet:
    """PreAct-ResNet-18: 4 stages of ``width`` x 1, 2, 4, 8 channels, ``depth`` blocks each
    (64 and 2: the standard network)."""
    mean, std = resolve_stats(mean, std, in_channels)
    model = PreActResNet(width, depth, num_classes, in_channels, mean, std)
    init_weights(model, generator)
    return model
