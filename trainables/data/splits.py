"""Seeded, stratified subsets: ``data.train_size``/``data.test_size`` and the defender's clean split."""
from __future__ import annotations

import hashlib

import torch

from ..config import ConfigError
from .base import Dataset, DataConfig, ImageSet


def seeded_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one purpose: the same seed gives the same stream, and different
    purposes (train subset, test subset, defender split) draw independently."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def stratified_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted indices of ``n`` samples, each class represented in proportion to its size.

    Class ``c`` gets ``floor(n * count_c / N)`` samples and the ``n - sum`` left over go to
    the classes with the largest remainders (ties broken by ``generator``), so equal-sized
    classes end up within one sample of each other.
    """
    labels = labels.detach().cpu().long()
    total = len(labels)
    if total and int(labels.min()) < 0:  # unlabelled samples (image-caption pairs from files): uniform
        if not 0 <= n <= total:
            raise ValueError(f"cannot draw {n} samples from {total}")
        return torch.randperm(total, generator=generator)[:n].sort().values
    if not 0 <= n <= total:
        raise ValueError(f"cannot draw {n} samples from {total}")
    if n == total:
        return torch.arange(total)
    if n == 0 or total == 0:
        return torch.empty(0, dtype=torch.long)
    counts = torch.bincount(labels)
    share = n * counts  # integer arithmetic: exact shares, no float ties
    take = share // total
    remainder = share % total
    left = n - int(take.sum())
    if left:
        shuffled = torch.randperm(len(counts), generator=generator)
        order = shuffled[torch.argsort(remainder[shuffled], descending=True, stable=True)]
        take[order[:left]] += 1
    # A random order within each class: permute everything, then group by class stably.
    perm = torch.randperm(total, generator=generator)
    grouped = perm[torch.argsort(labels[perm], stable=True)]
    grouped_labels = labels[grouped]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(total) - starts[grouped_labels]
    return grouped[rank < take[grouped_labels]].sort().values


def defender_split(train: ImageSet, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rest_index, clean_index): the defender's stratified clean split of ``round(fraction * N)``
    training samples and everything else; disjoint, both sorted. Poison only ``rest``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"data.clean_fraction: {fraction} must lie in [0, 1)")
    n = round(fraction * len(train))
    clean = stratified_subset(train.y, n, seeded_generator(seed, "defender"))
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[clean] = False
    return torch.nonzero(keep).flatten(), clean


def take_subsets(ds: Dataset, cfg: DataConfig) -> Dataset:
    """``ds`` with its splits cut to ``cfg.train_size``/``cfg.test_size`` (stratified, seeded)."""
    splits = {}
    for split, size in (("train", cfg.train_size), ("test", cfg.test_size)):
        images: ImageSet = getattr(ds, split)
        if size is None or size == len(images):
            splits[split] = images
            continue
        if size > len(images):
            raise ConfigError(
                f"data.{split}_size: {size} is more than the {len(images)} {split} images of {ds.name} available"
            )
        index = stratified_subset(images.y, size, seeded_generator(cfg.seed, f"{split}_size"))
        splits[split] = images.subset(index)
    info = dict(ds.info, train_size=cfg.train_size, test_size=cfg.test_size, subset_seed=cfg.seed)
    return Dataset(name=ds.name, train=splits["train"], test=splits["test"], classes=ds.classes,
                   hflip=ds.hflip, mean=ds.mean, std=ds.std, info=info)
