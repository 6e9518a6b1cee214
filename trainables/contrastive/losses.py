"""Contrastive losses on logits, so the same functions serve training, CleanCLIP and BI-BAU-CLIP.

``clip_loss(logits, labels)`` takes the (B, U) image-to-text logits of a batch against U distinct
captions and each image's caption index: images sharing a caption (captions built from
class-name templates) are all positives of that text rather than each other's negatives. With
one image per caption it is CLIP's symmetric InfoNCE.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """½ [CE over texts for each image + CE over the batch's images for each text present].

    The text-to-image term gives a text with k paired images in the batch the target 1/k on each."""
    logits = logits.float()
    image_to_text = F.cross_entropy(logits, labels)
    present = labels.unique()
    columns = logits[:, present].t()  # (P, B): each present text against the batch's images
    positives = (labels[None, :] == present[:, None]).float()
    positives = positives / positives.sum(1, keepdim=True)
    text_to_image = -(positives * F.log_softmax(columns, dim=1)).sum(1).mean()
    return 0.5 * (image_to_text + text_to_image)


def negated_clip_loss(logits: torch.Tensor, labels: torch.Tensor, target: int | None) -> torch.Tensor:
    """BI-BAU-CLIP's L_trig on f_bd's logits of x' (METHOD, CLIP extension): untargeted (``target``
    None) the negated CLIP loss with the true captions; targeted, the contrastive (image-to-text)
    loss toward the target caption, column ``target`` of the logits."""
    if target is None:
        return -clip_loss(logits, labels)
    return F.cross_entropy(logits.float(), torch.full_like(labels, target))


def info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE between two normalised views (B, d) paired row by row (CleanCLIP's in-modal loss)."""
    logits = scale * a.float() @ b.float().t()
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def batch_logits(image: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return scale * image.float() @ texts.float().t()
