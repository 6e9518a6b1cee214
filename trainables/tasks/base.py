"""The task interface: what a trial does that depends on its setting.

A run is the classifier setting (no ``clip`` section) or the contrastive one (a CLIP on
image-caption pairs). The stages (``attack_stage.py``, ``trial.py``) and RA
(``evaluation/retuning.py``) are written once against :class:`Task`; each setting implements it
(``classifier.py``, ``contrastive.py``) and :func:`trainables.tasks.task_for` picks one for a run.
Everything past the model is shared: a CLIP is a ``Classifier`` (zero-shot head), pairs are an
``ImageSet``, attacks poison both through ``ImageSet.poisoned_copy``.
"""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Callable

import torch

from ..data.base import Dataset, ImageSet
from ..models.base import Classifier

if TYPE_CHECKING:  # type names only: the tasks sit above the run's config
    from ..attacks.base import Attack
    from ..schema import RunConfig

Log = Callable[[str], None]


class Task(abc.ABC):
    """One setting of a run (``cfg``): build the data, the model the attack starts from, train it,
    describe it, and retune it (RA). Same config and seed: same data, model and numbers."""

    name: str

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @property
    @abc.abstractmethod
    def model_label(self) -> str:
        """The model as reports name it (``resnet18``, ``clip:ViT-B-32``)."""

    def smoke(self) -> dict:
        """Changes of the setting's own config sections for ``--smoke-test``."""
        return {}

    # -- build the data ---------------------------------------------------------------------------

    @abc.abstractmethod
    def dataset(self) -> Dataset:
        """The data set every stage of the trial takes."""

    # -- train ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def cache_key(self) -> dict:
        """The setting's part of the attack-stage cache key (the training code's version included)."""

    @abc.abstractmethod
    def initial_model(self, dataset: Dataset, device: torch.device, log: Log) -> Classifier:
        """The model the attack starts from (a fresh one, or a clean pre-trained CLIP)."""

    @abc.abstractmethod
    def fit(self, model: Classifier, poisoned: ImageSet, dataset: Dataset, device: torch.device, *,
            generator: torch.Generator, attack: Attack, protected: torch.Tensor,
            eval_sets: dict[str, ImageSet], log: Log) -> list[dict]:
        """Train ``model`` in place on the poisoned training set (``protected``: the defender's clean
        rows, which on-the-fly poisoning leaves alone); the per-epoch history."""

    @abc.abstractmethod
    def meta(self, dataset: Dataset, model: Classifier) -> dict:
        """What a checkpoint of ``model`` records so that it reloads without the run."""

    # -- evaluate: retune (RA) --------------------------------------------------------------------

    @abc.abstractmethod
    def retune(self, model: Classifier, data: ImageSet, poisoned: torch.Tensor, device: torch.device, *,
               epochs: int, lr: float, batch_size: int, generator: torch.Generator, hflip: bool) -> Classifier:
        """RA's fine-tuning of a copy of ``model`` on ``data`` (``poisoned``: bool mask of its
        triggered rows, left unaugmented); ``model`` is left unchanged."""
