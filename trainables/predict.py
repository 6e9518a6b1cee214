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


# fixed, not the run's seed: every run evaluates on the same test images, so curves compare
EVAL_SUBSAMPLE_SEED = 0
_RESERVED = ("epoch", "loss", "lr", "seconds", "eval_seconds")


def eval_subsets(eval_sets: dict[str, ImageSet] | None, size: int,
                 device: torch.device) -> dict[str, ImageSet]:
    """The sets a training loop checks after its epochs, each cut to a fixed subsample of ``size``
    images, on the device; their names must not clash with the history's own columns."""
    out = {}
    for name, images in (eval_sets or {}).items():
        if name in _RESERVED:
            raise ValueError(f"eval_sets: the name {name!r} is taken by the history; use another")
        if len(images) > size:
            g = torch.Generator().manual_seed(EVAL_SUBSAMPLE_SEED)
            images = images.subset(torch.randperm(len(images), generator=g)[:size].sort().values)
        out[name] = images.to(device)
    return out
