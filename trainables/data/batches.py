"""The batch iterator: images stay uint8 on the device, each batch is converted to float [0, 1]
and augmented with batched tensor ops (random crop with zero padding, horizontal flip).

Random numbers are drawn on the CPU from the caller's generator and then moved, so the same
seed gives the same batches on every device.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..runtime import prepare_batch
from .base import ImageSet


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pad (B, C, H, W) with ``padding`` zeros per side and cut a random H x W window per sample,
    like torchvision's ``RandomCrop(padding=p)``, as one gather instead of a per-image loop."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding)).flatten(2)  # (B, C, (H+2p)(W+2p))
    wide = w + 2 * padding
    window = (torch.arange(h, device=x.device)[:, None] * wide + torch.arange(w, device=x.device)).flatten()
    start = offsets[0] * wide + offsets[1]  # flat position of each window's top-left pixel
    index = (start[:, None] + window)[:, None, :].expand(b, c, h * w)
    return padded.gather(2, index).view(b, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, generator: torch.Generator, crop_padding: int = 0, hflip: bool = False,
            where: torch.Tensor | None = None) -> torch.Tensor:
    """The data set's batched crop and flip on the rows of the float batch ``x`` where
    ``where`` is True; the other rows are left as they are."""
    if where is None:
        where = torch.ones(len(x), dtype=torch.bool)
    rows = where.nonzero().flatten().to(x.device)
    if not len(rows) or not (crop_padding or hflip):
        return x
    part = random_crop(x[rows], crop_padding, generator)
    if hflip:
        part = random_flip(part, generator)
    return x.index_copy(0, rows, part)


def batches(images: ImageSet, batch_size: int, *, device: torch.device | str, shuffle: bool = True,
            generator: torch.Generator | None = None, crop_padding: int = 0, hflip: bool = False,
            drop_last: bool = False, with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield ``(x, y)``: x float (B, C, H, W) in [0, 1] on ``device`` (channels_last on CUDA),
    y int64; with ``with_index``, ``(x, y, index)`` with the rows' positions in ``images``.

    ``images`` is moved to ``device`` once per call when it is not there already (pass a set
    already on the device to avoid even that). ``generator`` (CPU) drives the order, crops and
    flips; ``hflip`` should be False for data sets whose ``Dataset.hflip`` is False.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1")
    device = torch.device(device)
    x, y = images.x, images.y
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    n = len(x)
    order = torch.randperm(n, generator=generator).to(device) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            idx = torch.arange(start, min(n, start + batch_size), device=device)
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
        xb = xb.float().div_(255.0)
        if crop_padding:
            xb = random_crop(xb, crop_padding, generator)
        if hflip:
            xb = random_flip(xb, generator)
        if with_index:
            yield prepare_batch(xb, device), yb, idx
        else:
            yield prepare_batch(xb, device), yb
