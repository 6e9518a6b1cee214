"""A CLIP as a zero-shot classifier, so every classifier evaluation (CA, ASR, QRA) serves it.

:class:`ClipModel` wraps an open_clip CLIP (``models/clip.py``): ``features(x)`` is the
normalised image embedding of inputs in [0, 1] (normalisation and resizing to the CLIP's input
side inside), ``head`` a frozen linear layer whose rows are ``logit_scale`` times the class
prompts' mean normalised text embedding, so ``forward`` gives the zero-shot logits
``scale · cos(image, class text)``. ``refresh_head`` recomputes the rows after the text tower or
the scale changed (contrastive training, CleanCLIP); the prompt tokens live in a buffer, saved
with the weights.

:class:`CaptionHead` is the view BI-BAU-CLIP unlearns: the visual tower and a fixed head over the
caption embeddings of a frozen text tower. With the text side constant, the CLIP's image-to-text
logits are a classifier over captions, and METHOD's E- and M-step run on it unchanged.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import Classifier
from ..models.clip import ClipConfig, clip_image_size, clip_tokenizer, create_clip
from ..runtime import autocast, prepare_model

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FixedHead(nn.Module):
    """A linear map without bias whose weight is a buffer: computed from the text side, never trained
    (trainable copies, optimisers and Fishers see no parameter here)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.to(h.dtype).t()


class ClipModel(Classifier):
    def __init__(self, clip: nn.Module, mean, std, prompt_tokens: torch.Tensor, num_classes: int,
                 image_size: tuple[int, int], arch: str):
        super().__init__(mean, std)
        self.clip = clip
        self.arch = arch  # names the tokenizer
        self.image_size = tuple(image_size)
        if len(prompt_tokens) % num_classes:
            raise ValueError(f"{len(prompt_tokens)} prompt rows do not split over {num_classes} classes")
        self.register_buffer("prompt_tokens", prompt_tokens.long())
        dim = int(clip.text_projection.shape[1]) if getattr(clip, "text_projection", None) is not None \
            else int(clip.visual.output_dim)
        self.head = FixedHead(torch.zeros(num_classes, dim))
        self.refresh_head()

    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    def text_parameters(self) -> list[nn.Parameter]:
        visual = {id(p) for p in self.clip.visual.parameters()}
        return [p for p in self.clip.parameters() if id(p) not in visual]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(_resize(x, self.image_size)).float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.clip.logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """(classes, d): each class's prompts' normalised embeddings averaged, normalised again."""
        device = self.prompt_tokens.device
        with autocast(device):
            emb = self.encode_text(self.prompt_tokens)
        emb = emb.view(self.head.out_features, -1, emb.shape[-1]).mean(1)
        return F.normalize(emb, dim=-1)

    @torch.no_grad()
    def refresh_head(self) -> None:
        was = self.training
        self.eval()
        self.head.weight.copy_(self.scale() * self.class_embeddings())
        self.train(was)

    def conv_layers(self) -> list:
        return [(n, m) for n, m in self.clip.visual.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n
                and m.kernel_size != m.stride]  # a ViT's patch embedding is no feature convolution


class CaptionHead(Classifier):
    """The visual tower of ``model`` (shared, not copied) with a fixed head: ``scale · texts``.

    ``texts`` (U, d) are normalised caption embeddings; ``forward(x)`` gives the (B, U)
    image-to-text logits of the CLIP. Its parameters are the visual tower's only."""

    def __init__(self, model: ClipModel, texts: torch.Tensor):
        super().__init__(tuple(model.mean.flatten().tolist()), tuple(model.std.flatten().tolist()))
        self.visual = model.clip.visual
        self.image_size = model.image_size
        self.head = FixedHead((model.scale().detach() * texts.float()).to(texts.device))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(_resize(x, self.image_size)).float(), dim=-1)


@torch.no_grad()
def encode_texts(model: ClipModel, tokens: torch.Tensor, device: torch.device, batch_size: int = 1024) -> torch.Tensor:
    """Normalised embeddings (U, d) of token rows, in chunks, the model in eval mode."""
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(tokens), batch_size):
        with autocast(device):
            out.append(model.encode_text(tokens[start:start + batch_size].to(device)).float())
    model.train(was)
    return torch.cat(out)


def tokenize(arch: str, texts: list[str] | tuple[str, ...]) -> torch.Tensor:
    return clip_tokenizer(arch)(list(texts))


def prompt_tokens(cfg: ClipConfig, classes: list[str], prompts: list[str] | tuple[str, ...]) -> torch.Tensor:
    from ..data.captions import fill

    return tokenize(cfg.arch, [fill(p, c) for c in classes for p in prompts])


def build_model(cfg, classes: list[str], mean, std, device: torch.device,
                generator: torch.Generator | None = None) -> ClipModel:
    """The CLIP of ``cfg`` (a ``ContrastiveConfig``) as a zero-shot classifier over ``classes``."""
    clip = create_clip(ClipConfig(arch=cfg.arch, weights=cfg.weights), "cpu", generator)
    model = ClipModel(clip, mean, std, prompt_tokens(cfg, classes, cfg.prompts), len(classes),
                      clip_image_size(cfg.arch), cfg.arch)
    return prepare_model(model, device)


def rebuild(meta: dict) -> ClipModel:
    """An uninitialised ClipModel of the shape a checkpoint's sidecar describes (its weights
    are loaded next): the architecture without its weights file, the prompts' token rows."""
    from .config import ContrastiveConfig
    from ..config import build

    cfg = build(ContrastiveConfig, {**meta["clip"], "weights": None, "captions": "templates",
                                    "pretrain_epochs": max(1, int(meta["clip"].get("pretrain_epochs") or 1))}, "clip")
    clip = create_clip(ClipConfig(arch=cfg.arch, weights=None), "cpu", torch.Generator())
    tokens = prompt_tokens(cfg, list(meta["classes"]), cfg.prompts)
    return ClipModel(clip, tuple(meta["mean"]), tuple(meta["std"]), tokens, int(meta["num_classes"]),
                     clip_image_size(cfg.arch), cfg.arch)


def clip_copy(model: ClipModel) -> ClipModel:
    return copy.deepcopy(model)
