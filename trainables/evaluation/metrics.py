"""CA and ASR, the two metrics every stage reports (METHOD.md, evaluation protocol)."""
from __future__ import annotations

import torch

from ..data.base import ImageSet
from ..runtime import autocast, prepare_batch


@torch.no_grad()
def predict(model: torch.nn.Module, images: ImageSet | torch.Tensor, device: torch.device,
            batch_size: int = 512, perturb=None) -> torch.Tensor:
    """Predicted labels (on ``device``) for uint8 or float [0, 1] images.

    ``perturb`` maps a float batch to the batch actually fed (QRA's generator, a trigger).
    """
    x_all = images.x if isinstance(images, ImageSet) else images
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(device, non_blocking=True)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if perturb is not None:
            x = perturb(x)
        with autocast(device):
            out.append(model(prepare_batch(x, device)).argmax(1))
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=device)


def accuracy(model: torch.nn.Module, images: ImageSet, device: torch.device, batch_size: int = 512,
             perturb=None) -> float:
    """Fraction of ``images`` whose prediction equals its label."""
    if len(images) == 0:
        return float("nan")
    pred = predict(model, images, device, batch_size, perturb)
    return (pred == images.y.to(pred.device)).float().mean().item()


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
from .base import EvalContext, Evaluation  # noqa: E402  (the functions above need no context)
from ..registry import EVALUATIONS  # noqa: E402


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
