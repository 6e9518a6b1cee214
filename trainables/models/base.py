"""The classifier interface: inputs in [0, 1], normalisation inside, features and head exposed."""
from __future__ import annotations

import abc
import functools
import hashlib
import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, ConfigError, param
from ..registry import MODELS

# CIFAR-10 per-channel statistics (BackdoorBench's values): the default normalisation.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.247, 0.243, 0.261)


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

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (B, d, h, w) of inputs in [0, 1], before the global pool:
        ``features(x) == pool(feature_map(x))``. Defenses that localise a trigger in feature
        space (BTI-DBF's benign-feature mask) need the spatial map, not its average."""
        return self.embed_map(self.normalize(x))

    def embed_map(self, x: torch.Tensor) -> torch.Tensor:
        """``feature_map`` of already normalised inputs; a model without a spatial map (a ViT's
        pooled token) gives its features as a 1x1 map."""
        return self.embed(x)[:, :, None, None]

    @staticmethod
    def pool(fmap: torch.Tensor) -> torch.Tensor:
        """The global average pool every model applies between its feature map and its head."""
        return F.adaptive_avg_pool2d(fmap, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        """The feature convolutions in forward order, 1x1 shortcut projections left out.

        Every model names its projections ``shortcut``, so the same rule (the one of BEC's
        reference code) picks the block convolutions of every architecture; BEC probes the
        last ``n`` of them.
        """
        return [(n, m) for n, m in self.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]


class Probe(nn.Identity):
    """A named point where layer probes (BEC) read a model's activations: it passes its input, a
    channel-first (B, C, ...) tensor, through unchanged. Convolutional models need none (their
    convolutions are probed); a transformer exposes its residual stream through probes."""

    def __init__(self, channels: int):
        super().__init__()
        self.out_channels = channels


def resolve_stats(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                  in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std); None means CIFAR-10's (their channel average when not RGB)."""
    if mean is None:
        mean = CIFAR10_MEAN if in_channels == 3 else (sum(CIFAR10_MEAN) / 3,) * in_channels
    if std is None:
        std = CIFAR10_STD if in_channels == 3 else (sum(CIFAR10_STD) / 3,) * in_channels
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean/std: need {in_channels} values (one per input channel), got {mean} and {std}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std: every value must be > 0, got {std}")
    return mean, std


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """He-normal (fan-out) convolutions, unit BatchNorm, PyTorch's uniform rule for linear layers.

    Drawn from ``generator`` (the global RNG when None), so a seed fixes the initial weights.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.uniform_(-bound, bound, generator=generator)
            if m.bias is not None:
                m.bias.uniform_(-bound, bound, generator=generator)


OPTIONS = ("width", "depth", "arch", "weights")  # the ModelConfig fields a factory may take


@dataclass
class ModelConfig(Config):
    name: str = param("small_resnet", "registered model", registry=MODELS)
    width: int | None = param(None, "channels of the first stage (small_resnet); None: the model's default", low=1)
    depth: int | None = param(None, "stages (small_resnet) or residual blocks per stage; None: the model's default", low=1)
    arch: str | None = param(None, "open_clip architecture of a CLIP-based model (clip_vit: bibau-ViT-tiny-8 for CPU, "
                             "ViT-B-32-quickgelu for OpenAI's ViT-B/32 weights); None: the model's default")
    weights: str | None = param(None, "local file of pretrained weights the model starts from (clip_vit: a CLIP state "
                                "dict, .safetensors or weights-only .pt/.pth/.bin); None: random initialisation. "
                                "Never downloaded, never unpickled")

    def check(self, path: str) -> None:
        if self.name in MODELS:
            factory = MODELS.get(self.name)
            options = self.options()
            _check_options(factory, self.name, options, path)
            check = getattr(factory, "check_options", None)  # a factory's own rules (a weights file that fits)
            if check is not None:
                check(options, path or "model")

    def options(self) -> dict:
        return {k: getattr(self, k) for k in OPTIONS}

    def architecture(self) -> "ModelConfig":
        """This config without pretrained weights: the same network, randomly initialised (what a
        saved checkpoint, whose own weights replace them, or a structural check needs)."""
        return ModelConfig(name=self.name, width=self.width, depth=self.depth, arch=self.arch)


def _check_options(factory, name: str, options: dict, path: str) -> None:
    """A model whose factory has no such parameter (vgg19_bn has no ``depth``) rejects it."""
    accepted = inspect.signature(factory).parameters
    for key, value in options.items():
        if value is not None and key not in accepted:
            where = f"{path}.{key}" if path else f"model.{key}"
            allowed = ", ".join(k for k in OPTIONS if k in accepted) or "none"
            raise ConfigError(f"{where}: {name} does not take {key} (got {value!r}); options it takes: {allowed}")


@functools.lru_cache(maxsize=8)
def _digest(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_digest(cfg: ModelConfig) -> str | None:
    """sha256 of the pretrained weights file a model starts from (None without one): a cache key
    records it, so that a file replaced at the same path makes a new model."""
    if cfg.weights is None:
        return None
    path = Path(os.path.expandvars(cfg.weights)).expanduser().resolve()
    st = path.stat()
    return _digest(str(path), (st.st_size, st.st_mtime_ns))


def check_model_files(cfg: ModelConfig, path: str = "model") -> str | None:
    """The files a model config names (pretrained weights) exist and load safely: the preflight's
    check, run before any work. Returns what was found (None when the model reads no file)."""
    check = getattr(MODELS.get(cfg.name), "check_files", None)
    return check(cfg.options(), path) if check is not None else None


def create_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 generator: torch.Generator | None = None) -> Classifier:
    """Build a registered model; options left at None are dropped so each model keeps its defaults.

    ``generator`` draws the initial weights (the global RNG when None).
    """
    factory = MODELS.get(cfg.name)
    _check_options(factory, cfg.name, cfg.options(), "model")
    kwargs = {k: v for k, v in dict(cfg.options(), mean=mean, std=std, generator=generator).items() if v is not None}
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
