"""BI-BAU-CLIP (METHOD.md, CLIP extension; the paper's Appendix C): BI-BAU on a CLIP's visual
encoder, the text encoder frozen.

With the text encoder frozen, the caption embeddings are constants, so the CLIP's image-to-text
logits over the captions of the defender's clean pairs are a classifier (``CaptionHead``: the
visual tower, a fixed head ``scale · texts``). BI-BAU runs on that view with its own E-step
(``pgd.py``), M-step, Fishers and EWC terms (``bibau.py``), the task's losses replaced:

* ``L_trig``: the negated CLIP loss of f_bd on x' with the true captions (untargeted), or the
  contrastive image-to-text loss of x' toward the target caption (targeted; the view gets one
  more row, the target class's zero-shot prompt embedding);
* ``L_KD``: relational distillation within the batch (METHOD: "In a batch, the relation matrix
  ..."): KL between the row-softmaxed relations of the batch's images to the batch's captions
  (its distinct captions: images that share a templated caption share its column), natural images
  under f_bd against x' under f_θ. It is ``kd_loss`` on those columns with γ = 1 (no CE term) and
  T = 1 by default (the relations at the CLIP's own logit scale). Until 2026-12-07 the relations ran
  over every caption of the clean split;
* ``L_prior``: METHOD's, with ``h`` the normalised visual embedding. Its alignment direction
  ``u = (W_bd - W_θ)[k]`` comes from the head, which is the frozen text side here: u = 0, so by
  METHOD's rule (skip while ||u|| < 1e-8) only the angle term acts;
* ``L_out``: the CLIP loss on natural and on adversarial pairs with the true captions (both
  directions, ``contrastive.losses.clip_loss``), plus λ1·L_EWC and λ2·L_invEWC over the visual
  encoder's parameters (the only parameters of the view).

The purified visual tower goes back into a copy of the CLIP, whose zero-shot head is refreshed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from ..config import param
from ..contrastive.losses import clip_loss, negated_clip_loss
from ..contrastive.model import CaptionHead, ClipModel, encode_texts, tokenize
from ..data.base import ImageSet
from ..data.captions import PairSet
from ..registry import DEFENSES
from .base import DefenseContext, DefenseResult
from .bibau import BiBau, BiBauConfig, describe_terms
from .losses import kd_loss


@dataclass
class BiBauClipConfig(BiBauConfig):
    lr: float = param(0.01, "peak learning rate of SGD on the visual encoder (METHOD's default)", low=0.0, low_open=True)
    kd_temperature: float = param(1.0, "temperature T of the relational L_KD (1: the relations at the CLIP's logit scale)",
                                  low=0.0, low_open=True)
    kd_gamma: float = param(1.0, "share γ of the relational KL in L_KD (METHOD's CLIP L_KD is the KL alone: 1); "
                            "1-γ goes to a contrastive term on x' with the true captions", low=0.0, high=1.0)
    crop_padding: int | None = param(None, "random-crop padding of the clean pairs in pixels (0: no crop); None: as "
                                     "the CLIP was trained (train.crop_padding of the run)", low=0)


class BiBauClip(BiBau):
    Config = BiBauClipConfig
    contrastive = True

    def describe(self) -> list[str]:
        trig = "CE(f_bd(x'), target caption) (image-to-text)" if self.targeted else "-L_CLIP(f_bd(x'), true captions)"
        lines = describe_terms(self.cfg, self.targeted, trig=trig,
                               task="L_CLIP(f_θ(x), captions) + L_CLIP(f_θ(x'), captions)")
        return [lines[0], "CLIP extension (METHOD): visual encoder only, text encoder frozen; L_KD relational (KL of "
                "row-softmaxed image-text relations within the batch); u = 0 (frozen text side): the prior's alignment term is off",
                *lines[1:]]

    @staticmethod
    def trigger_loss(logits: torch.Tensor, y: torch.Tensor, target: int | None) -> torch.Tensor:
        return negated_clip_loss(logits, y, target)

    @staticmethod
    def kd_loss(logits_adv: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                gamma: float) -> torch.Tensor:
        """The relation matrix of the batch: each image against the batch's distinct captions only."""
        present, local = y.unique(return_inverse=True)
        return kd_loss(logits_adv[:, present], teacher[:, present], local, temperature, gamma)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # the target row of the targeted view serves L_trig only: the M-step contrasts the captions
        return clip_loss(logits[:, : self._captions], y)

    def purify(self, model: ClipModel, clean: PairSet, ctx: DefenseContext) -> DefenseResult:
        if not isinstance(model, ClipModel) or not isinstance(clean, PairSet):
            raise ValueError(f"defense {self.name!r} purifies a CLIP on image-caption pairs (the contrastive setting: "
                             f"a clip section); got a {type(model).__name__} and a {type(clean).__name__}")
        self.check_context(clean, ctx)
        device = ctx.device
        source = copy.deepcopy(model).to(device).eval()
        used, labels = clean.caption.cpu().unique(return_inverse=True)
        texts = encode_texts(source, tokenize(source.arch, [clean.texts[int(i)] for i in used]), device)
        self._captions = len(texts)
        target = None
        if self.targeted:
            texts = torch.cat([texts, source.class_embeddings()[ctx.target][None].float()])
            target = len(texts) - 1
        view = CaptionHead(source, texts)
        ctx.log(f"{self.name}: the visual encoder against {self._captions} frozen caption embeddings"
                + (f" and the target class's prompt embedding (row {target})" if target is not None else ""))
        result = super().purify(view, ImageSet(clean.x, labels.to(clean.x.device)),
                                replace(ctx, num_classes=len(texts), target=target))
        purified = copy.deepcopy(source)
        purified.clip.visual.load_state_dict(result.model.visual.state_dict())
        purified.refresh_head()
        result.model = purified.eval()
        return result


@DEFENSES.register("bibau_clip_u")
class BiBauClipUntargeted(BiBauClip):
    """BI-BAU-CLIP(U): the target class is unknown."""

    targeted = False


@DEFENSES.register("bibau_clip_t")
class BiBauClipTargeted(BiBauClip):
    """BI-BAU-CLIP(T): the attack target is known (DefenseContext.target)."""

    targeted = True
    needs_target = True
