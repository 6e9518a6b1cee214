"""The attack interface.

An attack decides which training samples to poison and with which labels, and owns a batched
trigger function on float images in [0, 1]. Build-time attacks (BadNets, Blended, SIG, ...)
are fully described by :meth:`Attack.poison_trainset`; attacks that poison on the fly (WaNet,
IAD) or need a trained component (Narcissus, IAD's generator) use the hooks :meth:`prepare`
and :meth:`training_batch`, which the training loop always calls.

Three hooks serve attacks whose trigger is not one fixed function of the image:

* :meth:`poison_images` makes the poisoned training images from a generator (Refool draws a
  reflection per image, Adaptive-Blend a fresh mask per image, Adaptive-Patch one of its
  training triggers); by default it is ``apply_trigger(x, train=True)``. The test set and the
  evaluations' poisoned samples go through it too, each with its own fixed-seed generator, so a
  triggered test set is the same on every run.
* :meth:`select_cover` and :meth:`cover_images` add *cover* (conservatism) samples that carry a
  weakened trigger but keep their true label (the adaptive attacks); by default there are none.
* :meth:`training_batch` gets, besides the batch, which rows may be poisoned (the defender's
  clean split may not) and whether horizontal flips keep labels, so an on-the-fly attack (WaNet)
  poisons per batch after shuffling and augments the batch itself.

An on-the-fly attack sets ``build_time = False`` (nothing is poisoned when the data set is
built), may set ``standard_augmentation = False`` (WaNet replaces crop/flip with its own
augmentation inside ``training_batch``), and restores learned state (IAD's generator,
Narcissus' trigger) from a cached run through :meth:`load_state`. :meth:`extra_test_sets` names
additional test sets whose accuracy the attack stage reports (WaNet's noise-mode accuracy).

Attacks that train a part of their own (IAD's generators, ISSBA's encoder, Narcissus' surrogate)
use three more hooks: :meth:`after_step` and :meth:`end_epoch`, which the training loop calls
after each optimiser step and epoch (IAD steps its generator there), and :meth:`cached_state`,
which keeps what ``prepare`` trained in the attack stage's cache under a content hash of the data,
the fields that decide it, the seed and the training code (``attack_stage`` sets
``state_cache``), so a classifier change does not retrain an encoder.

**Feature coupling** (the paper's §5.7 adaptive attack, ``coupling.py``) is an option of every
build-time attack: ``coupling_weight`` w > 0 adds ``w * ||phi(x') - mean phi(target class)||^2``
over the batch's poisoned rows to the training loss (:meth:`training_loss`).
"""
from __future__ import annotations

import abc
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..config import Config, ConfigError, param
from ..data.base import ImageSet
from ..registry import ATTACKS


@dataclass
class AttackConfig(Config):
    name: str = param("badnets", "registered attack", registry=ATTACKS)
    target: int = param(0, "target class of the all-to-one backdoor", low=0)
    poison_rate: float = param(0.1, "fraction of the training set poisoned (clean-label: still of the whole set)", low=0.0, high=1.0)
    external_model: str | None = param(None, "a suspicious model trained elsewhere, to check: a safetensors state dict "
                                       "of model (pickles are refused). The attack stage is skipped and this section "
                                       "only describes the trigger (ASR, RA, QRA); None: train the attacked model")
    coupling_weight: float = param(0.0, "feature coupling (paper 5.7): weight w of w*||phi(x') - mean phi(target)||^2 "
                                   "over the poisoned rows, added to the training loss; 0: off", low=0.0)

    def check_image(self, image_shape: tuple[int, ...], path: str) -> None:
        """Refuse, with a :class:`ConfigError` naming the field, an image shape (C, H, W) this
        attack cannot serve. Called by :class:`~trainables.schema.RunConfig` with the shape the data
        config implies (when it is known without loading) and again when the attack is built."""
        return None


def check_coupling(cls: type, cfg: AttackConfig, where: str, contrastive: bool = False) -> None:
    """Feature coupling needs the poisoned rows of each batch and the classifier's training loop."""
    if cfg.coupling_weight and (not cls.build_time or contrastive):
        why = "the contrastive setting trains a CLIP" if contrastive else f"{cfg.name} poisons on the fly or not at all"
        raise ConfigError(f"{where}coupling_weight: {cfg.coupling_weight} is not allowed here ({why}); "
                          "allowed: 0, or a build-time attack in the classifier setting")


@dataclass
class PresetRatesConfig(AttackConfig):
    """An attack with cover samples whose ``poison_rate`` and ``cover_rate``, left at None, come from
    the preset its ``rates`` field names in ``RATES`` (the adaptive attacks: the BI-BAU paper's rates or
    the original's). The subclass declares ``rates`` and ``cover_rate``: their meaning is its own."""

    RATES: ClassVar[dict[str, tuple[float, float]]] = {}  # rates -> (poison_rate, cover_rate)
    poison_rate: float | None = param(None, "fraction of the training set poisoned; None: from rates",
                                      low=0.0, high=1.0)

    def resolve(self) -> None:
        poison, cover = self.RATES[self.rates]
        if self.poison_rate is None:
            self.poison_rate = poison
        if self.cover_rate is None:
            self.cover_rate = cover


def check_cover_rate(cfg: AttackConfig, where: str) -> None:
    """Poisoned and cover samples are disjoint: their rates may not sum past the training set."""
    total = cfg.poison_rate + getattr(cfg, "cover_rate", 0.0)
    if total > 1.0:
        raise ConfigError(f"{where}cover_rate: poison_rate + cover_rate = {total:.4g} exceeds the training set; "
                          "allowed: a sum of at most 1")


def check_clean_left(labels: torch.Tensor, index: torch.Tensor, target: int, clean_label: bool) -> None:
    """A class whose every training image is poisoned is learnt from triggered images only.
    Dirty-label: that class is never seen clean (refused); clean-label: the target class carries
    the trigger everywhere, which a researcher may mean (a warning)."""
    if not len(index):
        return
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    left = counts - torch.bincount(labels[index], minlength=len(counts))
    bare = [c for c in (counts > 0).nonzero().flatten().tolist() if left[c] == 0]
    if not bare:
        return
    if clean_label:
        warnings.warn(f"attack.poison_rate: every training image of the target class {target} is poisoned: "
                      "no clean image of it is left", stacklevel=2)
        return
    raise ConfigError(f"attack.poison_rate: poisoning {len(index)} of {len(labels)} training images leaves class(es) "
                      f"{', '.join(map(str, bare[:10]))} without a clean training image; allowed: a lower rate "
                      "(or a larger training set)")


# seed of the per-sample trigger draws of triggered test sets (fixed: the same test set on every run)
TEST_TRIGGER_SEED = 20_17
# which training images stand for an on-the-fly attack's poisoned samples (IBU): a fixed draw
ON_THE_FLY_SAMPLES_SEED = 7


def attacker_rows(poisonable: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """The rows of a batch an on-the-fly attack may poison, in order (``training_batch``'s ``poisonable``)."""
    return torch.arange(batch, device=device) if poisonable is None else poisonable.nonzero().flatten()


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
    adopts_state: bool = False  # load_state adopts saved tensors (drawn from the run's seed or data) instead of comparing
    contrastive_only: bool = False  # an attack on a CLIP's training (BadCLIP): the contrastive setting only
    learns_while_training: bool = False  # the trigger changes during training (IAD's G): test sets are made after it

    @classmethod
    def serves(cls, contrastive: bool) -> bool:
        """Whether the attack serves the contrastive setting (a run with a ``clip`` section) or the
        classifier one. On image-caption pairs a poisoned image is paired with a target caption when
        the training set is built (``ImageSet.poisoned_copy``), so an attack that poisons batches on
        the fly (its own ``training_batch``) serves classifiers only."""
        if not contrastive:
            return not cls.contrastive_only
        return cls.training_batch is Attack.training_batch

    @classmethod
    def poisons_on_the_fly(cls) -> bool:
        """Whether the attack poisons batches in its own ``training_batch`` and none at build time
        (WaNet, IAD); ``clean`` does neither."""
        return not cls.build_time and cls.training_batch is not Attack.training_batch

    def __init__(self, cfg: AttackConfig, image_shape: tuple[int, int, int], num_classes: int):
        if cfg.target >= num_classes:
            raise ConfigError(f"attack.target: {cfg.target} is not a class; allowed: 0..{num_classes - 1}")
        cfg.check_image(tuple(image_shape), "attack")
        check_coupling(type(self), cfg, "attack.")
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.cover_index = torch.empty(0, dtype=torch.long)  # cover samples of the last poison_trainset
        self._device_copies: dict[tuple, torch.Tensor] = {}
        self.poison_index = torch.empty(0, dtype=torch.long)  # poisoned samples of the last poison_trainset
        self.state_cache: Path | None = None  # where cached_state keeps trained parts (set by the attack stage)
        self._coupling = None

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

    def poison_images(self, x: torch.Tensor, generator: torch.Generator, train: bool = True) -> torch.Tensor:
        """Triggered copies of the float images ``x`` as the attack poisons them: at training time
        (``train``) or for the triggered test set. Attacks whose trigger varies per sample (a
        reflection, a mask, one of several triggers) draw it from ``generator``; the default is
        the fixed trigger."""
        return self.apply_trigger(x, train=train)

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

    def select_cover(self, labels: torch.Tensor, generator: torch.Generator, taken: torch.Tensor) -> torch.Tensor:
        """Indices of cover samples (sorted), disjoint from ``taken`` (the poisoned ones):
        ``round(cover_rate * N)`` drawn uniformly from the rest when the config has a
        ``cover_rate``, else none."""
        rate = getattr(self.cfg, "cover_rate", 0.0)
        if not self.build_time or not rate:
            return torch.empty(0, dtype=torch.long)
        free = torch.ones(len(labels), dtype=torch.bool)
        free[taken] = False
        pool = free.nonzero().flatten()
        n = min(round(rate * len(labels)), len(pool))
        return pool[torch.randperm(len(pool), generator=generator)[:n]].sort().values

    def cover_images(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cover samples' images (they keep their labels); only attacks with a ``cover_rate``
        are asked for them."""
        raise NotImplementedError(f"{self.name} has no cover samples")

    def poison_trainset(self, train: ImageSet, generator: torch.Generator,
                        exclude: torch.Tensor | None = None) -> tuple[ImageSet, torch.Tensor]:
        """The poisoned training set (same size) and the indices that were poisoned.

        ``exclude`` lists indices that must stay clean (the defender's clean split). Cover
        samples (adaptive attacks), drawn after the poisoned ones and disjoint from them, are
        changed too but keep their labels; their indices are left in ``self.cover_index``.
        """
        labels = train.y.cpu()
        index = self.select_poison(labels, generator)
        cover = self.select_cover(labels, generator, index)
        if exclude is not None and len(exclude):
            index = index[~torch.isin(index, exclude.cpu())]
            cover = cover[~torch.isin(cover, exclude.cpu())]
        check_clean_left(labels, index, self.target, self.clean_label)
        x, y = train.x.clone(), train.y.clone()
        dev = x.device
        for chunk in index.split(4096) if len(index) else ():  # bounded memory on large sets
            c = chunk.to(dev)
            x[c] = to_uint8(self.poison_images(to_float(x[c]), generator, train=True))
            y[c] = self.poison_labels(y[c])
        for chunk in cover.split(4096) if len(cover) else ():
            c = chunk.to(dev)
            x[c] = to_uint8(self.cover_images(to_float(x[c]), generator))
        self.cover_index = cover
        self.poison_index = index
        self._coupling = None
        # image-caption pairs: the poisoned rows also get a target caption (dirty-label attacks)
        return train.poisoned_copy(x, y, index, None if self.clean_label else self.target, generator), index

    def poisoned_samples(self, train: ImageSet, poisoned_train: ImageSet, index: torch.Tensor) -> ImageSet:
        """The poisoned training samples with their true labels (what the IBU reference unlearns).

        Build-time attacks: the images ``poison_trainset`` produced at ``index``. On-the-fly
        attacks poison other images every epoch, so ``round(poison_rate * N)`` training images
        drawn with a fixed seed and triggered stand for them.

        Clean-label attacks (SIG): the poisoned samples are target-class images under their true
        label, the target, so unlearning them would teach the backdoor again (measured: IBU left
        SIG's ASR at 99.7). What the oracle knows is the trigger: it gets the trigger on as many
        non-target training images (not poisoned ones; a fixed draw), under their true labels.
        """
        if self.poisons_on_the_fly():
            n = round(self.cfg.poison_rate * len(train))
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(ON_THE_FLY_SAMPLES_SEED))[:n]
            pick = pick.sort().values.to(train.x.device)
            return ImageSet(to_uint8(self.apply_trigger(to_float(train.x[pick]))), train.y[pick])
        if self.clean_label:
            labels = train.y.cpu()
            free = labels != self.target
            free[index.cpu()] = False
            pool = free.nonzero().flatten()
            gen = torch.Generator().manual_seed(0)
            pick = pool[torch.randperm(len(pool), generator=gen)[:len(index)]].sort().values.to(train.x.device)
            x = to_uint8(self.poison_images(to_float(train.x[pick]), gen, train=True)) if len(pick) else train.x[pick]
            return ImageSet(x, train.y[pick])
        index = index.to(train.x.device)
        return ImageSet(poisoned_train.x[index], train.y[index])

    def poison_testset(self, test: ImageSet) -> ImageSet:
        """Every test image whose true class is not the target, triggered, labelled as the target.

        Per-sample random triggers (Refool) are drawn from a generator with a fixed seed: the
        triggered test set is the same on every run.
        """
        keep = (test.y != self.target).nonzero().flatten()
        x = torch.empty_like(test.x[keep])
        generator = torch.Generator().manual_seed(TEST_TRIGGER_SEED)
        for i, chunk in enumerate(keep.split(4096)):
            x[i * 4096: i * 4096 + len(chunk)] = to_uint8(
                self.poison_images(to_float(test.x[chunk]), generator, train=False))
        return ImageSet(x, torch.full((len(keep),), self.target, dtype=torch.long, device=test.y.device))

    def extra_test_sets(self, test: ImageSet) -> dict[str, ImageSet]:
        """Further test sets (name -> images with the labels a correct model gives) whose accuracy
        the attack stage reports beside CA and ASR, e.g. WaNet's noise-mode accuracy."""
        return {}

    # -- hooks for attacks that need more than a fixed trigger -------------------------------------
    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        """Called once before poisoning (e.g. to optimise a trigger or build a generator)."""
        return None

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module,
                       generator: torch.Generator, *, poisonable: torch.Tensor | None = None,
                       hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Called on every (augmented, float) training batch; on-the-fly attacks poison here.

        ``poisonable`` (bool, one per row, on the batch's device; None: all) marks the rows the
        attacker controls: rows of the defender's clean split must come back unpoisoned.
        ``hflip`` says whether horizontal flips keep labels here (the data set and
        ``train.hflip`` allow them), for attacks that do their own augmentation.
        """
        return x, y

    def findings(self) -> dict[str, float]:
        """What the attack's own trained parts measured (ISSBA's bit accuracy), reported by the
        attack stage as ``attack_<name>``."""
        return {}

    def after_step(self) -> None:
        """Called after each optimiser step of the classifier (the loss's gradients are still
        there): an attack that trains a part jointly (IAD's generator) steps it here."""
        return None

    def end_epoch(self, epoch: int) -> None:
        """Called after each training epoch (1-based): per-epoch schedules of an attack's own parts."""
        return None

    @property
    def couples_features(self) -> bool:
        return bool(getattr(self.cfg, "coupling_weight", 0.0))

    def training_loss(self, features: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """A term added to the training batch's loss, from the penultimate ``features`` of the
        batch's rows ``index`` (indices into the poisoned training set): feature coupling when
        ``coupling_weight`` > 0 (``coupling.py``), else None."""
        if not self.couples_features:
            return None
        from .coupling import FeatureCoupling

        if self._coupling is None:
            self._coupling = FeatureCoupling(self.cfg.coupling_weight, self.target, self.poison_index,
                                             self.cover_index)
        return self._coupling.loss(features, y, index)

    def cached_state(self, part: str, fields: tuple[str, ...], data: ImageSet, generator: torch.Generator,
                     compute: Callable[[], dict[str, torch.Tensor]], log: Callable[[str], None] = print
                     ) -> dict[str, torch.Tensor]:
        """The tensors ``compute()`` makes in ``prepare`` (an encoder, a surrogate's trigger), kept
        in ``state_cache`` under a content hash of the attack's name, the config ``fields`` that
        decide them, ``data``'s fingerprint, the generator's seed and the training code; computed
        (and stored) on a miss, and always computed when no ``state_cache`` is set."""
        if self.state_cache is None:
            return compute()
        from ..cache import code_version, content_hash, write_entry
        from ..checkpoint import CheckpointError, load_tensors, save_tensors, write_json

        payload = {"stage": f"attack-part:{part}", "attack": self.cfg.name, "image_shape": list(self.image_shape),
                   "fields": {f: getattr(self.cfg, f) for f in fields}, "data": data.fingerprint(),
                   "seed": generator.initial_seed(), "code_version": code_version(contrastive=False)}
        key = content_hash(payload)
        entry = Path(self.state_cache) / f"{part}-{key}"
        if (entry / "model.json").is_file():
            try:
                tensors = load_tensors(entry / "state.safetensors")
                log(f"[attack] {part} loaded from the cache ({entry})")
                return tensors
            except CheckpointError as exc:
                log(f"[attack] {part} cache entry {entry} is unusable ({exc}); training again")
        tensors = compute()

        def write(folder: Path) -> None:
            save_tensors(folder / "state.safetensors", tensors)
            write_json(folder / "model.json", payload)  # model.json marks a complete entry (write_entry)

        write_entry(entry, write)
        return tensors

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
