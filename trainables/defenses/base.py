"""The defense interface.

A defense gets the suspicious model, the defender's small clean split and its config, and
returns the purified model with its own diagnostics. Each defense declares the data it sees
(``Defense.data_use``, copied into its config's ``data_use`` so it lands in the run's params):
the clean split (most), none (data-free CLP), a batch of the poisoned training set (EP, which
the post-training threat model does not grant), or the real poisoned samples with their true
labels (the IBU reference, ``uses_poisoned_data``). Nothing else reaches it.
"""
from __future__ import annotations

import abc
import copy
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import Config, ConfigError, param
from ..data.base import ImageSet
from ..models.base import Classifier, ModelConfig
from ..optim import make_optimizer, make_scheduler
from ..registry import DEFENSES
from ..runtime import prepare_model


# what a defense may see, besides the suspicious model
DATA_USES = ("clean_split", "none", "poisoned_batch", "clean_split+poisoned_samples")


@dataclass
class DefenseConfig(Config):
    name: str = param("bibau_u", "registered defense", registry=DEFENSES)
    data_use: str | None = param(None, "data the defense sees, declared by the defense and recorded with the run "
                                 "(not a setting: None fills in the declaration)", choices=DATA_USES)

    def resolve(self) -> None:
        if self.name in DEFENSES:
            self.data_use = self.data_use or DEFENSES.get(self.name).declared_data_use()

    def check(self, path: str) -> None:
        if self.name in DEFENSES:
            declared = DEFENSES.get(self.name).declared_data_use()
            if self.data_use != declared:
                raise ConfigError(f"{path + '.' if path else ''}data_use: {self.data_use!r} is not what defense "
                                  f"{self.name!r} uses; allowed: {declared!r} (leave it unset)")

    def smoke(self) -> dict:
        """Settings that shrink this defense for ``--smoke-test``, a fast end-to-end check."""
        return {"epochs": 1} if hasattr(self, "epochs") else {}

    def check_model(self, model: ModelConfig, path: str) -> None:
        """Rules between the defense and the model it will get (BN-pruning needs BatchNorm);
        ``path`` names the model section. Called by the run config before any work."""
        return None


@dataclass
class AugmentedDefenseConfig(DefenseConfig):
    """Fields shared by defenses that draw (augmented) batches of the clean split at random."""

    crop_padding: int | None = param(None, "random-crop padding of the clean split in pixels (0: no crop); "
                                     "None: as the model was trained (train.crop_padding of the run)", low=0)
    hflip: bool | None = param(None, "random horizontal flips of the clean split, where the data set allows them; "
                               "None: as the model was trained (train.hflip of the run)")
    seed: int | None = param(None, "seed of shuffling, augmentation and random starts; None: the trial's seed", low=0)

    def augmentation(self, data_allows_flips: bool) -> tuple[int, bool]:
        """(crop padding, flips) of the clean split. A defense built outside a run config, which
        has no training to follow, leaves an unset value off."""
        return self.crop_padding or 0, bool(self.hflip) and data_allows_flips


@dataclass
class SGDDefenseConfig(AugmentedDefenseConfig):
    """Fields shared by defenses that fine-tune the model with SGD on the clean split."""

    epochs: int = param(10, "passes over the defender's clean split", low=1)
    batch_size: int = param(128, "clean images per SGD step", low=1)
    lr: float = param(0.01, "peak learning rate of SGD", low=0.0, low_open=True)
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "L2 weight decay", low=0.0)
    nesterov: bool = param(False, "Nesterov momentum")
    schedule: str = param("cosine", "learning-rate schedule over the defense's steps", choices=("cosine", "constant"))
    bn_stats: str = param("train", "BatchNorm while updating: train (batch statistics, running stats updated) or "
                          "frozen (the suspicious model's running statistics, affine weights still learned)",
                          choices=("train", "frozen"))


@dataclass
class DefenseContext:
    """What the trial hands a defense besides the model and the clean split."""

    device: torch.device
    num_classes: int
    seed: int = 0
    hflip: bool = True  # the data set allows horizontal flips as augmentation
    target: int | None = None  # attack target; handed only to defenses with ``needs_target``
    poisoned: ImageSet | None = None  # real poisoned samples, true labels; only ``uses_poisoned_data``
    # a random batch of the poisoned training set as the attacker labelled it (clean and poisoned
    # images mixed); only for ``data_use == "poisoned_batch"`` (EP)
    poisoned_batch: ImageSet | None = None
    log: Callable[[str], None] = print
    # called by the defense after each epoch with (model, epoch, epochs, history); the trial's
    # gate uses it to stop a defense whose model is already off any useful front (raises DefenseStopped)
    on_epoch: Callable[[Classifier, int, int, list[dict]], None] | None = None

    def epoch_done(self, model: Classifier, epoch: int, epochs: int, history: list[dict]) -> None:
        """End of one epoch of a defense's main loop, where ``model`` is the candidate purified model
        (not a phase that destroys it on purpose, like RNP's unlearning)."""
        if self.on_epoch is not None:
            self.on_epoch(model, epoch, epochs, history)

    def record_epoch(self, name: str, model: Classifier, row: dict, history: list[dict], epochs: int, *,
                     loss: str = "loss", what: str = "the loss", unit: str = "epoch", detail: str = "",
                     hint: str = "lower defense.lr") -> None:
        """One epoch of an SGD-style defense done: ``row`` (with ``epoch`` and ``lr``) joins ``history``
        and the log, a non-finite ``row[loss]`` stops the defense (``what`` names that loss in the error,
        ``detail`` adds settings after the lr, ``hint`` says what to change), then :meth:`epoch_done`."""
        epoch = row["epoch"]
        history.append(row)
        self.log(f"{name} epoch {epoch}/{epochs}: " + " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
        if not math.isfinite(row[loss]):
            raise FloatingPointError(f"{name} diverged: {what} of {unit} {epoch}/{epochs} is {row[loss]} "
                                     f"(lr {row['lr']:.4g}{detail}); {hint}")
        self.epoch_done(model, epoch, epochs, history)


class DefenseStopped(Exception):
    """A defense stopped by the trial before its last epoch (the sweep's gate): carries the model
    as it was and the epochs run."""

    def __init__(self, reason: str, model: Classifier, history: list[dict], epoch: int, epochs: int,
                 margin: float = float("nan")):
        super().__init__(reason)
        self.reason, self.model, self.history = reason, model, list(history)
        self.epoch, self.epochs, self.margin = epoch, epochs, margin


@dataclass
class DefenseResult:
    model: Classifier
    history: list[dict] = field(default_factory=list)  # per-epoch diagnostics (losses, time)
    seconds: float = 0.0
    # what the defense found (flagged classes, pruned channels, trigger norms): flat numbers,
    # reported with the trial's metrics as ``defense_<key>``
    findings: dict[str, float] = field(default_factory=dict)


class Defense(abc.ABC):
    name: str
    Config = DefenseConfig
    needs_target: bool = False  # targeted variants assume the target class is known
    uses_poisoned_data: bool = False  # only the IBU reference
    data_use: str | None = None  # one of DATA_USES; None: the clean split (and the poisoned samples for IBU)
    # purifies a CLIP of the contrastive setting (a ClipModel and a PairSet of clean pairs) instead of a classifier
    contrastive: bool = False

    @classmethod
    def declared_data_use(cls) -> str:
        if cls.data_use is not None:
            return cls.data_use
        return "clean_split+poisoned_samples" if cls.uses_poisoned_data else "clean_split"

    def __init__(self, cfg: DefenseConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        """Return the purified model (``model`` itself is left unchanged)."""

    def describe(self) -> list[str]:
        """What this config computes, in the method's own terms (printed by ``bibau config``)."""
        return []

    def check_context(self, clean: ImageSet, ctx: DefenseContext) -> None:
        """Fail with a clear message when the trial did not hand over what this defense needs."""
        use = self.declared_data_use()
        if use == "poisoned_batch" and (ctx.poisoned_batch is None or len(ctx.poisoned_batch) < 2):
            raise ValueError(f"defense {self.name!r} needs a batch of the poisoned training set "
                             "(DefenseContext.poisoned_batch), which was not given")
        if use.startswith("clean_split") and len(clean) < 2:
            raise ValueError(f"defense {self.name!r}: the defender's clean split has {len(clean)} images; "
                             "it needs at least 2 (BatchNorm), raise data.clean_fraction")
        if self.needs_target:
            if ctx.target is None:
                raise ValueError(f"defense {self.name!r} is targeted and needs the attack target "
                                 "(DefenseContext.target), which was not given")
            if not 0 <= ctx.target < ctx.num_classes:
                raise ValueError(f"defense {self.name!r}: target {ctx.target} is not a class; "
                                 f"allowed: 0..{ctx.num_classes - 1}")
        if self.uses_poisoned_data and (ctx.poisoned is None or len(ctx.poisoned) == 0):
            raise ValueError(f"defense {self.name!r} is the idealised reference and needs the real poisoned "
                             "training samples with their true labels (DefenseContext.poisoned), which were not given")

    def seed(self, ctx: DefenseContext) -> int:
        own = getattr(self.cfg, "seed", None)
        return ctx.seed if own is None else own


def trainable_copy(model: Classifier, device: torch.device) -> Classifier:
    """A deep copy to purify; the caller's model keeps its weights, mode, device and flags."""
    twin = prepare_model(copy.deepcopy(model), device)
    for p in twin.parameters():
        p.requires_grad_(True)
    return twin


def frozen_copy(model: Classifier, device: torch.device) -> Classifier:
    """A deep copy in eval mode without parameter gradients (the reference ``f_bd``)."""
    twin = prepare_model(copy.deepcopy(model), device).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def train_mode(model: torch.nn.Module, cfg: SGDDefenseConfig) -> torch.nn.Module:
    """``model.train()``, with BatchNorm layers left in eval mode under ``bn_stats: frozen``: on a
    clean split of a thousand images, mixed with perturbed ones, the batch statistics drift away
    from the test distribution the running statistics were estimated on."""
    model.train()
    if cfg.bn_stats == "frozen":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


def epoch_steps(n: int, batch_size: int) -> tuple[bool, int]:
    """(drop_last, steps per epoch) of shuffled batches over ``n`` clean images: a trailing batch of
    one image is dropped, since a lone image breaks BatchNorm in train mode."""
    drop_last = n % batch_size == 1
    return drop_last, max(1, n // batch_size if drop_last else math.ceil(n / batch_size))


def sgd(model: torch.nn.Module, cfg: SGDDefenseConfig, steps_per_epoch: int):
    """SGD and its per-step lr schedule over ``cfg.epochs``, built by the training loop's helpers."""
    optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov)
    return optimizer, make_scheduler(optimizer, cfg, steps_per_epoch)


def sgd_or_adam(model: torch.nn.Module, cfg: SGDDefenseConfig, steps_per_epoch: int):
    """The optimiser ``cfg.optimizer`` names (``sgd``: :func:`sgd`; ``adam``: betas 0.9/0.999, weight decay
    as set; a config without the field gets SGD) and its per-step lr schedule over ``cfg.epochs``."""
    if getattr(cfg, "optimizer", "sgd") == "sgd":
        return sgd(model, cfg, steps_per_epoch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                           weight_decay=cfg.weight_decay)
    return opt, make_scheduler(opt, cfg, steps_per_epoch)
