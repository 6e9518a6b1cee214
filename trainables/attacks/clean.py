"""``clean``: no attack. Training under it gives the clean reference model that the
evaluations (RA on a clean model, QRA's teacher, BEC's baseline) compare against."""
from __future__ import annotations

import torch

from ..registry import ATTACKS
from .base import Attack


@ATTACKS.register("clean")
class Clean(Attack):
    build_time = False  # nothing is poisoned

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        return x.clone()
