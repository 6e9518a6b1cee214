"""The attack interface.

An attack decides which training samples to poison and with which labels, and owns a batched
trigger function on float images in [0, 1]. Build-time attacks (BadNets, Blended, SIG, ...)
are fully described by :meth:`Attack.poison_trainset`; attacks that poison on the fly (WaNet,
IAD) or need a trained component (Narcissus, IAD's generator) use the hooks :meth:`prepare`
and :meth:`training_batch`, which the training loop always calls.

An on-the-fly attack sets ``build_time = False`` (nothing is poisoned when the data set is
built), may set ``standard_augmentation = False`` (WaNet replaces crop/flip with its own
augmentation inside ``training_batch``), and restores learned state (IAD's generator,
Narcissus' trigger) from a cached run through :meth:`load_state`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import torch

from ..config import Config, ConfigError, param
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
    build_time: bool = True  # poisons the training set when it is built; False: clean, or on the fly
    standard_augmentation: bool = True  # False: the trainer skips crop/flip (the attack augments itself)

    def __init__(self, cfg: AttackConfig, image_shape: tuple[int, int, int], num_classes: int):
        if cfg.target >= num_classes:
            raise ConfigError(f"attack.target: {cfg.target} is not a class; allowed: 0..{num_classes - 1}")
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self._device_copies: dict[tuple, torch.Tensor] = {}

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
        Empty for attacks that poison nothing at build time.
        """
        if not self.build_time:
            return torch.empty(0, dtype=torch.long)
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

    def poisoned_samples(self, train: ImageSet, poisoned_train: ImageSet, index: torch.Tensor) -> ImageSet:
        """The poisoned training samples with their true labels (what the IBU reference unlearns).

        Build-time attacks: the images ``poison_trainset`` produced at ``index``. On-the-fly
        attacks override this to draw their poisoned images from ``train``.
        """
        index = index.to(train.x.device)
        return ImageSet(poisoned_train.x[index], train.y[index])

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

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the trigger saved with a cached model.

        A trigger computed from the config alone (BadNets, Blended) is only compared, so a
        cache entry written by different trigger code is caught; attacks with learned state
        (a generator, an optimised trigger) override this to adopt ``tensors``.
        """
        own = self.state_tensors()
        if set(own) != set(tensors):
            raise ValueError(f"{self.name}: saved trigger holds {sorted(tensors)}, expected {sorted(own)}")
        for key, value in own.items():
            saved = tensors[key].to(value.device, value.dtype)
            if saved.shape != value.shape or not torch.equal(saved, value):
                raise ValueError(f"{self.name}: saved trigger tensor {key!r} differs from the one this config builds")
        self._device_copies.clear()

    def tensor_on(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """``state_tensors()[key]`` on ``like``'s device (floats in its dtype), copied once per
        (device, dtype): triggers are applied to every batch."""
        ref = self.state_tensors()[key]
        dtype = like.dtype if ref.is_floating_point() else ref.dtype
        cache_key = (key, like.device, dtype)
        out = self._device_copies.get(cache_key)
        if out is None:
            out = ref.to(like.device, dtype)
            self._device_copies[cache_key] = out
        return out
