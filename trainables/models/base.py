"""The classifier interface: inputs in [0, 1], normalisation inside, features and head exposed."""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config, param
from ..registry import MODELS


class Classifier(nn.Module, abc.ABC):
    """Base of every model.

    ``forward(x) == head(features(x))``; ``x`` is float in [0, 1], (B, C, H, W). BI-BAU needs
    the penultimate features ``h`` and the final linear layer ``W`` separately.
    """

    head: nn.Linear

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, d) of inputs in [0, 1]."""
        return self.embed(self.normalize(x))

    @abc.abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, d) of already normalised inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class ModelConfig(Config):
    name: str = param("small_resnet", "registered model", registry=MODELS)
    width: int | None = param(None, "channels of the first stage (small_resnet); None: the model's default", low=1)
    depth: int | None = param(None, "stages (small_resnet) or residual blocks per stage; None: the model's default", low=1)


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> Classifier:
    """Build a registered model; options left at None are dropped so each model keeps its defaults."""
    factory = MODELS.get(cfg.name)
    kwargs = {k: v for k, v in dict(width=cfg.width, depth=cfg.depth, mean=mean, std=std).items() if v is not None}
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
