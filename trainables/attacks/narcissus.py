"""Narcissus (Zeng et al. 2023): a clean-label backdoor whose trigger is an optimised, bounded
perturbation that makes the target class "more itself"; a few target-class training images carry
it under their own label, and test images carry it three times as strong.

The procedure (reference notes §8; the authors' ``narcissus_function.py`` and notebook):

1. **Surrogate.** A model trained on a POOD (public out-of-distribution) data set plus the
   target-class training images: the POOD classes keep their labels, the target-class images get
   one extra label. The POOD set is the registered data set ``pood`` (the reference's
   Tiny-ImageNet for CIFAR-10), read from ``pood_root``, resized to the image size; ``pood_size``
   caps its images. SGD(``surrogate_lr`` 0.1, momentum 0.9, wd 5e-4), cosine, batches of 350,
   crop (4) and flip, ``surrogate_epochs`` 200.
2. **POI warm-up.** A copy fine-tuned on the target-class images only, ``warmup_epochs`` 5, RAdam
   (``warmup_lr`` 0.1), the same augmentation.
3. **Trigger.** The warmed-up model frozen (eval mode), ``delta`` starts at 0 and minimises
   ``CE(f(clip(x + clip(delta, +-eps))), target label)`` over the target-class images (augmented)
   with RAdam(``trigger_lr`` 0.01) for ``trigger_epochs`` 1000 passes, stopping when the gradient
   vanishes; then ``delta = clip(delta, +-eps)``, ``eps`` = ``epsilon``/255 = 16/255 in pixels (the
   reference's 32/255 in its [-1, 1] units).
4. **Poisoning.** ``poison_rate`` of the training set (0.05%: the reference's 25 of 50,000),
   drawn from the target class (capped by its size), ``x + delta`` clipped, labels kept.
5. **Test.** ``x + test_multiplier * delta`` (3: up to 48/255), clipped.

Steps 1-3 run in ``prepare`` and are cached by content hash (``Attack.cached_state``);
``delta`` is the attack's saved state.

Decisions (docs/attacks.md):

* **The surrogate's architecture** is the run's own model (a copy of the freshly initialised model
  the attack stage hands ``prepare``, with a head of POOD classes + 1): the reference uses the
  victim's ResNet-18 for both.
* **The target's surrogate label** is the extra class in all three steps; the reference's
  warm-up and trigger steps use the CIFAR label's index instead (a quirk, consistent only with
  itself); here the label the surrogate learnt for the target class is used throughout.
* **Reduced epochs** at the CPU scale are config values (``surrogate_epochs``,
  ``trigger_epochs``), recorded in every run's config as the deviation they are.
* **POOD choices.** CIFAR-10: Tiny-ImageNet (the reference); Tiny-ImageNet: CIFAR-10 resized;
  GTSRB (no POOD in the paper): Tiny-ImageNet resized. The POOD must be another data set than
  the run's (nothing here can check that the two names differ: the data section is not the
  attack's); ``digits`` (bundled with scikit-learn) serves offline tests.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, param
from ..data.base import ImageSet
from ..registry import ATTACKS, DATASETS
from .base import Attack, AttackConfig

_PLACEHOLDER_SEED = 0


@dataclass
class NarcissusConfig(AttackConfig):
    poison_rate: float = param(0.0005, "fraction of the whole training set poisoned, drawn from the target class "
                               "(the reference's 25 of 50,000)", low=0.0, high=1.0)
    pood: str = param("tiny-imagenet", "registered data set the surrogate learns as out-of-distribution classes",
                      registry=DATASETS)
    pood_root: str | None = param(None, "folder or archive of the POOD data set; None: its default place")
    pood_size: int | None = param(None, "POOD training images used (stratified); None: all", low=1)
    epsilon: float = param(16.0, "L-inf radius of the trigger in 1/255 pixel units", low=0.0, high=255.0, low_open=True)
    test_multiplier: float = param(3.0, "factor on the trigger in triggered test images", low=0.0, low_open=True)
    surrogate_epochs: int = param(200, "epochs of surrogate training on POOD + the target class", low=1)
    surrogate_lr: float = param(0.1, "SGD learning rate of the surrogate (cosine)", low=0.0, low_open=True)
    surrogate_batch: int = param(350, "batch size of surrogate training, warm-up and trigger optimisation", low=2)
    warmup_epochs: int = param(5, "POI warm-up epochs on the target class only", low=0)
    warmup_lr: float = param(0.1, "RAdam learning rate of the POI warm-up", low=0.0, low_open=True)
    trigger_epochs: int = param(1000, "passes of trigger optimisation over the target-class images", low=1)
    trigger_lr: float = param(0.01, "RAdam learning rate of the trigger", low=0.0, low_open=True)

    def check(self, path: str) -> None:
        from ..data.load import locate_dataset

        where = f"{path}." if path else "attack."
        try:
            locate_dataset({"name": self.pood, "root": self.pood_root})
        except ConfigError as exc:
            field = "pood_root" if self.pood_root is not None else "pood"
            raise ConfigError(f"{where}{field}: the POOD data set {self.pood!r} is not on disk ({exc}); allowed: a "
                              "registered data set whose files are present (pood_root names its folder)") from None


def _schedule(epochs: int, batch: int, lr: float) -> SimpleNamespace:
    """The surrogate's training settings for ``train.train_model`` (the reference's SGD and cosine)."""
    return SimpleNamespace(epochs=epochs, batch_size=batch, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=False,
                           schedule="cosine", warmup_epochs=0.0, crop_padding=4, hflip=True, label_smoothing=0.0,
                           eval_every=0, eval_size=1000)


@ATTACKS.register("narcissus")
class Narcissus(Attack):
    Config = NarcissusConfig
    cfg: NarcissusConfig
    clean_label = True
    adopts_state = True

    def __init__(self, cfg: NarcissusConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        # before prepare (or load_state): a seeded +-eps sign pattern, so the attack is usable standalone
        g = torch.Generator().manual_seed(_PLACEHOLDER_SEED)
        self.delta = (torch.randint(0, 2, (1, *image_shape), generator=g).float() * 2 - 1) * self.eps

    @property
    def eps(self) -> float:
        return self.cfg.epsilon / 255.0

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        scale = 1.0 if train else self.cfg.test_multiplier
        return (x + scale * self.tensor_on("delta", x)).clamp(0, 1)

    # -- the trigger's optimisation ------------------------------------------------------------------
    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        if model is None or not isinstance(getattr(model, "head", None), nn.Linear):
            raise ValueError("narcissus: prepare needs the run's (initialised) classifier to copy as the surrogate")
        fields = ("pood", "pood_size", "epsilon", "surrogate_epochs", "surrogate_lr", "surrogate_batch",
                  "warmup_epochs", "warmup_lr", "trigger_epochs", "trigger_lr", "target")
        arch = {"arch": type(model).__name__, "params": sum(p.numel() for p in model.parameters())}
        self._arch = arch
        state = self.cached_state("narcissus-trigger", fields, train, generator,
                                  lambda: self._optimise(train, model, device, generator))
        self.load_state(state)

    def pood_set(self) -> ImageSet:
        from ..data.load import load_dataset

        _, height, _ = self.image_shape
        pood = load_dataset({"name": self.cfg.pood, "root": self.cfg.pood_root, "image_size": height,
                             "train_size": self.cfg.pood_size})
        if pood.image_shape != self.image_shape:
            raise ConfigError(f"attack.pood: {self.cfg.pood!r} has images of shape {pood.image_shape}, the data "
                              f"{self.image_shape}; allowed: a data set of the same channels")
        return pood.train

    def _optimise(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                  generator: torch.Generator) -> dict[str, torch.Tensor]:
        from ..train import train_model

        pood = self.pood_set()
        n_pood = int(pood.y.max()) + 1
        target_x = train.x[train.y.cpu() == self.target]
        if len(target_x) < 2:
            raise ValueError(f"narcissus: the training split has {len(target_x)} images of the target class; need 2")
        surrogate = copy.deepcopy(model).cpu()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            surrogate.head = nn.Linear(surrogate.head.in_features, n_pood + 1)
        label = n_pood  # the surrogate's class of the target images
        mixed = ImageSet(torch.cat([pood.x, target_x.cpu()]),
                         torch.cat([pood.y.cpu(), torch.full((len(target_x),), label, dtype=torch.long)]))
        quiet = lambda _: None  # noqa: E731
        train_model(surrogate, mixed, _schedule(self.cfg.surrogate_epochs, self.cfg.surrogate_batch,
                                                self.cfg.surrogate_lr), device, generator=generator, log=quiet)
        targets = ImageSet(target_x.cpu(), torch.full((len(target_x),), label, dtype=torch.long)).to(device)
        self._warm_up(surrogate, targets, device, generator)
        delta = self._trigger(surrogate, targets, device, generator)
        return {"delta": delta.cpu()}

    def _warm_up(self, model: torch.nn.Module, targets: ImageSet, device: torch.device,
                 generator: torch.Generator) -> None:
        from ..data import batches

        model.train()
        opt = torch.optim.RAdam(model.parameters(), lr=self.cfg.warmup_lr)
        for _ in range(self.cfg.warmup_epochs):
            for x, y in batches(targets, self.cfg.surrogate_batch, device=device, generator=generator,
                                crop_padding=4, hflip=True, drop_last=len(targets) % self.cfg.surrogate_batch == 1):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.eval()

    def _trigger(self, model: torch.nn.Module, targets: ImageSet, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
        from ..data import batches

        model.eval().requires_grad_(False)
        delta = torch.zeros(1, *self.image_shape, device=device, requires_grad=True)
        opt = torch.optim.RAdam([delta], lr=self.cfg.trigger_lr)
        for _ in range(self.cfg.trigger_epochs):
            moved = False
            for x, y in batches(targets, self.cfg.surrogate_batch, device=device, generator=generator,
                                crop_padding=4, hflip=True):
                poisoned = (x + delta.clamp(-self.eps, self.eps)).clamp(0, 1)
                loss = F.cross_entropy(model(poisoned), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                moved = moved or bool(delta.grad.abs().sum() > 0)
                opt.step()
            if not moved:  # the reference stops when the gradient vanishes
                break
        return delta.detach().clamp(-self.eps, self.eps)

    # -- state ------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        delta = tensors.get("delta")
        if set(tensors) != {"delta"} or delta is None or tuple(delta.shape) != tuple(self.delta.shape) \
                or not torch.isfinite(delta).all():
            raise ValueError(f"narcissus: saved state must hold 'delta' of shape {tuple(self.delta.shape)}, "
                             f"got {({k: tuple(v.shape) for k, v in tensors.items()})}")
        self.delta = delta.detach().float().cpu()
        self._device_copies.clear()
