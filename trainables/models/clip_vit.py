"""``clip_vit``: a CLIP visual encoder (open_clip ViT) with a linear head, the paper's Table 3 model.

``features(x)`` is the visual tower's output embedding (after its projection, ``embed_dim``
wide: 512 for ViT-B/32), ``head`` the linear classifier on it, as in the paper ("the vision
encoder of CLIP (ViT-B/32) as the backbone, followed by a linear classification head").

- Architecture: ``model.arch`` (default ``bibau-ViT-tiny-8``, a 4-layer, 128-wide ViT with 8 px
  patches on 32 px inputs, for CPU runs); ``ViT-B-32-quickgelu`` with OpenAI's weights for the paper.
- Weights: ``model.weights``, a local CLIP state dict (``clip.py``); the head starts random.
  Pretrained weights bring their normalisation: the model then normalises with the
  architecture's preprocessing statistics (OpenAI's mean/std) instead of the data set's, since
  those are what the encoder was trained on. Without weights it normalises like every other model.
- Input size: inputs of any size are resized (bicubic, as CLIP's preprocessing) to the
  architecture's ``image_size`` (32 px for the tiny ones, 224 for ViT-B-32); grey inputs are
  repeated to three channels.
- No BatchNorm: the BN-pruning defenses (ANP, EP, RNP, CLP) refuse it in the run config.
- BEC probes the residual stream after each transformer block (``probes``: channels = the
  width, positions = the tokens) where it probes a CNN's convolutions; ``conv_layers()`` is the
  patch embedding, the only convolution.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError
from ..registry import MODELS
from .base import Classifier, Probe, init_weights, resolve_stats
from .clip import (DEFAULT_ARCH, TINY_ARCHS, ClipConfig, check_arch, check_clip, clip_image_size, clip_stats,
                   create_clip_visual)


class ClipViT(Classifier):
    def __init__(self, visual: nn.Module, image_size: tuple[int, int], embed_dim: int, num_classes: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__(mean, std)
        if num_classes < 1:
            raise ValueError(f"ClipViT: num_classes {num_classes} must be >= 1")
        self.visual = visual
        self.image_size = tuple(image_size)
        self.head = nn.Linear(embed_dim, num_classes)
        # the residual stream after each block, channel-first (B, width, tokens), for BEC
        # (a submodule of each block, reached through the hook's own argument, so that a deep copy
        # of the model feeds its own probes)
        for block in visual.transformer.resblocks:
            block.probe = Probe(visual.transformer.width)
            block.probe.batch_first = getattr(visual.transformer, "batch_first", True)  # (B, L, D), else (L, B, D)
            block.register_forward_hook(_feed_probe)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.mean.shape[1] == 3:  # grey input, RGB statistics (a pretrained encoder's)
            x = x.expand(-1, 3, -1, -1)
        return super().normalize(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        return self.visual(x)

    def conv_layers(self) -> list[tuple[str, nn.Conv2d]]:
        return [("visual.conv1", self.visual.conv1)]


def _feed_probe(block: nn.Module, inputs, out: torch.Tensor) -> None:
    batch_first = out if block.probe.batch_first else out.transpose(0, 1)
    block.probe(batch_first.transpose(1, 2))  # (B, D, L): channels first, tokens as positions


def _check(options: dict, path: str) -> None:
    """What needs no file: the architecture is an open_clip ViT (run by every config build)."""
    arch = options.get("arch") or DEFAULT_ARCH
    vision = check_arch(arch, f"{path}.arch")["vision_cfg"]
    # open_clip builds its own ViT from an int depth; a tuple is a ResNet, a timm/HF name another tower
    if not isinstance(vision.get("layers"), int) or vision.get("timm_model_name") or vision.get("hf_model_name"):
        raise ConfigError(f"{path}.arch: {arch!r} has no open_clip ViT visual tower; allowed: a ViT "
                          f"architecture (ViT-B-32, ViT-B-32-quickgelu, ViT-B-16, {', '.join(TINY_ARCHS)})")


def _check_files(options: dict, path: str) -> str | None:
    """The weights file (run by the preflight, ``--check``, and before the model is built)."""
    if options.get("weights") is None:
        return None
    arch = options.get("arch") or DEFAULT_ARCH
    check_clip(arch, options["weights"], path, visual_only=True)
    return f"{path}.weights {options['weights']}: a {arch} visual tower's weights, loadable without pickle"


@MODELS.register("clip_vit")
def clip_vit(num_classes: int, in_channels: int = 3, arch: str | None = None, weights: str | None = None,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             generator: torch.Generator | None = None) -> ClipViT:
    """CLIP ViT visual encoder of ``arch`` + linear head; ``weights``: a local CLIP state dict."""
    cfg = ClipConfig(arch=arch or DEFAULT_ARCH, weights=weights)
    _check(dict(arch=cfg.arch), "model")
    _check_files(dict(arch=cfg.arch, weights=weights), "model")
    visual = create_clip_visual(cfg, "cpu", generator)
    if weights is not None:
        mean, std = clip_stats(cfg.arch)
    else:
        mean, std = resolve_stats(mean, std, in_channels)
    embed_dim = visual.proj.shape[1] if getattr(visual, "proj", None) is not None else visual.output_dim
    model = ClipViT(visual, clip_image_size(cfg.arch), embed_dim, num_classes, mean, std)
    init_weights(model.head, generator)
    return model


clip_vit.check_options = _check  # type: ignore[attr-defined]
clip_vit.check_files = _check_files  # type: ignore[attr-defined]
