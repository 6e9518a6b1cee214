"""A model's predicted labels and accuracy on a set of images: what training reports each epoch
and what every metric builds on. Kept apart from ``evaluation`` so that training needs nothing of it."""
from __future__ import annotations

import torch

from .data.base import ImageSet
from .runtime import autocast, prepare_batch


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
