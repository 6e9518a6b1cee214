"""The attack interface.

An attack decides which training samples to poison and with which labels, and owns a batched
trigger function on float images in [0, 1]. Build-time attacks (BadNets, Blended, SIG, ...)
are fully described by :meth:`Attack.poison_trainset`; attacks that poison on the fly (WaNet,
IAD) or need a trained component (Narcissus, IAD's generator) use the hooks :meth:`prepare`
and :meth:`training_batch`, which the training loop always calls.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..config import Config, param
from ..data.base import ImageSet
from ..registry import ATTACKS


@dataclass
class AttackConfig(Config):
    name: str = param("badnets", "registered attack", registry=ATTACKS)
    target: int = param(0, "target class of the all-to-one backdoor", low=0)
    poison_rate: float = param(0.1, "fraction of the training set poisoned (clean-label: still of the whole set)", low=0.0, high=1.0)


def to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8, truncating like the reference code's ``astype(uint8)``."""
    return (x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)


class Attack(abc.ABC):
    """One backdoor attack, configured for one data set's image shape and class count."""

    name: str
    Config = AttackConfig
    clean_label: bool = False  # poisoned samples keep their true label (SIG, Narcissus)

    def __init__(self, cfg: AttackConfig, image_shape: tuple[int, int, int], num_classes: int):
        if cfg.target >= num_classes:
            raise ValueError(f"attack.target: {cfg.target} is not a class; allowed: 0..{num_classes - 1}")
        self.cfg = cfg
        self.image_shape = image_shape
        self.num_classes = num_classes

    @property
    def target(self) -> int:
        return self.cfg.target

    # -- the trigger -------------------------------------------------------------------------
    @abc.abstractmethod
    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Triggered copies of the float images ``x`` (B, C, H, W) in [0, 1].

        ``train`` selects the training-time trigger where it differs from the test-time one
        (Narcissus multiplies its trigger at test time).
        """

    # -- build-time poisoning ------------------------------------------------------------------
    def select_poison(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Indices of the training samples to poison (sorted).

        Dirty-label: drawn uniformly from the whole set; clean-label: from the target class,
        with the count still measured against the whole set (capped by the class size).
        """
        n = round(self.cfg.poison_rate * len(labels))
        pool = torch.arange(len(labels))
        if self.clean_label:
            pool = pool[labels.cpu() == self.target]
        n = min(n, len(pool))
        pick = torch.randperm(len(pool), generator=generator)[:n]
        return pool[pick].sort().values

    def poison_labels(self, y: torch.Tensor) -> torch.Tensor:
        return y.clone() if self.clean_label else torch.full_like(y, self.target)

    def poison_trainset(self, train: ImageSet, generator: torch.Generator,
                        exclude: torch.Tensor | None = None) -> tuple[ImageSet, torch.Tensor]:
        """The poisoned training set (same size) and the indices that were poisoned.

        ``exclude`` lists indices that must stay clean (the defender's clean split).
        """
        labels = train.y.cpu()
        index = self.select_poison(labels, generator)
        if exclude is not None and len(exclude):
            index = index[~torch.isin(index, exclude.cpu())]
        x, y = train.x.clone(), train.y.clone()
        if len(index):
            dev = x.device
            for chunk in index.split(4096):  # bounded memory on large sets
                c = chunk.to(dev)
                x[c] = to_uint8(self.apply_trigger(to_float(x[c]), train=True))
                y[c] = self.poison_labels(y[c])
        return ImageSet(x, y), index

    def poison_testset(self, test: ImageSet) -> ImageSet:
        """Every test image whose true class is not the target, triggered, labelled as the target."""
        keep = (test.y != self.target).nonzero().flatten()
        x = torch.empty_like(test.x[keep])
        for i, chunk in enumerate(keep.split(4096)):
            x[i * 4096: i * 4096 + len(chunk)] = to_uint8(self.apply_trigger(to_float(test.x[chunk]), train=False))
        return ImageSet(x, torch.full((len(keep),), self.target, dtype=torch.long, device=test.y.device))

    # -- hooks for attacks that need more than a fixed trigger -------------------------------------
    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        """Called once before poisoning (e.g. to optimise a trigger or build a generator)."""
        return None

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Called on every (augmented, float) training batch; on-the-fly attacks poison here."""
        return x, y

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that define the trigger (saved beside the model so a defense-free re-run
        can rebuild the test-time trigger)."""
        return {}
