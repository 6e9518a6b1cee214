"""CA and ASR, the two metrics every stage reports (METHOD.md, evaluation protocol)."""
from __future__ import annotations

import torch

from ..data.base import ImageSet
from ..predict import accuracy
from ..registry import EVALUATIONS
from .base import EvalContext, Evaluation


def clean_accuracy(model: torch.nn.Module, test: ImageSet, device: torch.device) -> float:
    """CA: accuracy on the clean test set."""
    return accuracy(model, test, device)


def attack_success_rate(model: torch.nn.Module, poisoned_test: ImageSet, device: torch.device,
                        perturb=None) -> float:
    """ASR: share of triggered non-target test images classified as the target.

    ``poisoned_test`` comes from ``Attack.poison_testset`` (labels are the target already).
    """
    return accuracy(model, poisoned_test, device, perturb=perturb)


# -- the registered CA and ASR evaluations -------------------------------------------------------


@EVALUATIONS.register("ca")
class CleanAccuracy(Evaluation):
    outputs = ("ca",)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        return {"ca": clean_accuracy(ctx.model, ctx.dataset.test, ctx.device)}


@EVALUATIONS.register("asr")
class AttackSuccessRate(Evaluation):
    outputs = ("asr",)

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        return {"asr": attack_success_rate(ctx.model, ctx.poisoned_test, ctx.device)}
