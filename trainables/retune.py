"""RA's fine-tuning of a classifier (the retuning attack, ``evaluation/retuning.py``): SGD on a
small retuning set, the poisoned rows unaugmented. The classifier task's ``retune``; the
contrastive one is ``contrastive.train.retune_clip``. Not a training source of the attack cache:
a change here keeps every cached attacked model."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .attacks.base import to_float
from .data.base import ImageSet
from .data.batches import augment
from .models.base import Classifier
from .optim import make_optimizer
from .runtime import autocast, prepare_batch, prepare_model


def retune(model: Classifier, data: ImageSet, poisoned: torch.Tensor, device: torch.device, *,
           epochs: int, lr: float, batch_size: int, generator: torch.Generator,
           crop_padding: int = 4, hflip: bool = True, momentum: float = 0.9) -> Classifier:
    """Fine-tune all weights of a copy of ``model`` on ``data`` (SGD, no weight decay, constant
    lr); ``model`` itself is left unchanged.

    Benign samples get the training augmentation, the poisoned ones (``poisoned`` mask) none,
    as in the reference code, so a positioned trigger stays where the attack put it.
    """
    tuned = prepare_model(copy.deepcopy(model), device)
    tuned.requires_grad_(True)
    tuned.train()
    opt = make_optimizer(tuned, lr, momentum, weight_decay=0.0)
    x_all, y_all = data.x.to(device), data.y.to(device)
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # a lone sample breaks batch norm in training mode
                continue
            dev_idx = idx.to(device)
            x = augment(to_float(x_all[dev_idx]), generator, crop_padding, hflip, where=~poisoned[idx])
            with autocast(device):
                loss = F.cross_entropy(tuned(prepare_batch(x, device)), y_all[dev_idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return tuned.eval()
