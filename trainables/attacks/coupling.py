"""Feature coupling (the paper's §5.7 adaptive attack on BI-BAU): the attacker adds to the
training loss of its poisoned samples ``w * ||phi(x') - mean phi(target class)||^2``, with
``phi`` the classifier's penultimate features, so the poisoned samples sit inside the target
class's cluster in latent space instead of forming their own, which defenses that separate
latent clusters (and BI-BAU's feature-space trigger synthesis) look for.

Decisions the paper leaves open (recorded in docs/attacks.md):

* **Which rows.** The poisoned training samples (``Attack.poison_index``); cover samples and the
  clean rows get only the cross-entropy.
* **The target centroid.** The mean feature of the batch's clean target-class rows (not poisoned,
  not cover), detached (the attacker pulls the poisoned samples towards the class, not the class
  towards them); kept as an exponential moving average (momentum 0.9) so a batch without clean
  target rows still has a centroid. Before the first such batch there is no term.
* **The norm.** The squared Euclidean norm summed over the feature dimensions, averaged over the
  batch's poisoned rows.

:func:`feature_distance` is what the attack stage reports (``backdoored_feature_distance``): the
mean squared distance of poisoned samples' features to the target class's centroid, divided by the
target class's own mean squared distance to it (1: a poisoned sample is as close to the target
centroid as a typical target-class sample).
"""
from __future__ import annotations

import torch

from ..config import param
from ..data.base import ImageSet
from ..runtime import autocast, prepare_batch

MOMENTUM = 0.9
# the registered *_fc variants' default weight (a choice: the paper gives none; docs/attacks.md)
FC_WEIGHT = 0.05


def coupling_on():
    """The ``coupling_weight`` field of a registered *_fc variant: on, at ``FC_WEIGHT``."""
    return param(FC_WEIGHT, "feature coupling (paper 5.7): weight w of w*||phi(x') - mean phi(target)||^2 over the "
                 "poisoned rows", low=0.0)


class FeatureCoupling:
    """The coupling term of one training run (holds the target centroid between batches)."""

    def __init__(self, weight: float, target: int, poison_index: torch.Tensor, cover_index: torch.Tensor):
        self.weight = weight
        self.target = target
        self.poison_index = poison_index.cpu()
        self.cover_index = cover_index.cpu()
        self.centroid: torch.Tensor | None = None
        self._masks: dict = {}

    def _flags(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = index.device
        if key not in self._masks:
            size = int(max(self.poison_index.max().item() if len(self.poison_index) else 0,
                           self.cover_index.max().item() if len(self.cover_index) else 0)) + 1
            poisoned = torch.zeros(size, dtype=torch.bool)
            poisoned[self.poison_index] = True
            cover = torch.zeros(size, dtype=torch.bool)
            cover[self.cover_index] = True
            self._masks[key] = (poisoned.to(key), cover.to(key))
        poisoned, cover = self._masks[key]
        inside = index < len(poisoned)
        safe = index.clamp(max=len(poisoned) - 1)
        return poisoned[safe] & inside, cover[safe] & inside

    def loss(self, features: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        poisoned, cover = self._flags(index)
        clean_target = (y == self.target) & ~poisoned & ~cover
        if clean_target.any():
            mean = features[clean_target].detach().float().mean(0)
            self.centroid = mean if self.centroid is None else MOMENTUM * self.centroid + (1 - MOMENTUM) * mean
        if self.centroid is None or not poisoned.any():
            return None
        gap = features[poisoned].float() - self.centroid
        return self.weight * gap.pow(2).sum(1).mean()


@torch.no_grad()
def mean_features(model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int = 500) -> torch.Tensor:
    model.eval()
    out = []
    for start in range(0, len(x), batch):
        chunk = prepare_batch(x[start:start + batch].to(device).float().div_(255.0), device)
        with autocast(device):
            out.append(model.features(chunk).float())
    return torch.cat(out)


def feature_distance(model: torch.nn.Module, poisoned: ImageSet, target_images: ImageSet, device: torch.device,
                     limit: int = 1000) -> float:
    """Mean squared distance of ``poisoned``'s features to the centroid of ``target_images``'
    features, relative to the target images' own mean squared distance to it (the first ``limit``
    images of each)."""
    if len(poisoned) == 0 or len(target_images) < 2:
        return float("nan")
    target = mean_features(model, target_images.x[:limit], device)
    centroid = target.mean(0)
    spread = (target - centroid).pow(2).sum(1).mean()
    gap = (mean_features(model, poisoned.x[:limit], device) - centroid).pow(2).sum(1).mean()
    return float(gap / spread.clamp_min(1e-12))
