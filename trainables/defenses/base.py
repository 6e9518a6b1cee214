"""The defense interface.

A defense gets the suspicious model, the defender's small clean split and its config, and
returns the purified model with its own diagnostics. It never sees the poisoned training data
or the true trigger; the IBU reference declares ``uses_poisoned_data`` and is handed them.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import Config, param
from ..data.base import ImageSet
from ..models.base import Classifier
from ..registry import DEFENSES


@dataclass
class DefenseConfig(Config):
    name: str = param("bibau_u", "registered defense", registry=DEFENSES)


@dataclass
class DefenseContext:
    """What the trial hands a defense besides the model and the clean split."""

    device: torch.device
    num_classes: int
    seed: int = 0
    hflip: bool = True  # the data set allows horizontal flips as augmentation
    target: int | None = None  # attack target; handed only to defenses with ``needs_target``
    poisoned: ImageSet | None = None  # real poisoned samples, true labels; only ``uses_poisoned_data``
    log: Callable[[str], None] = print


@dataclass
class DefenseResult:
    model: Classifier
    history: list[dict] = field(default_factory=list)  # per-epoch diagnostics (losses, time)
    seconds: float = 0.0


class Defense(abc.ABC):
    name: str
    Config = DefenseConfig
    needs_target: bool = False  # targeted variants assume the target class is known
    uses_poisoned_data: bool = False  # only the IBU reference

    def __init__(self, cfg: DefenseConfig):
        self.cfg = cfg

    @abc.abstractmethod
    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        """Return the purified model (``model`` itself is left unchanged)."""
