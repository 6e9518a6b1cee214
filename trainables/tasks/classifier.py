"""The classifier setting: a model of the ``model`` section trained from scratch (or from its
pretrained file) with cross-entropy by the training loop, retuned by RA with SGD."""
from __future__ import annotations

import torch

from ..cache import code_version
from ..config import to_dict
from ..data import load_dataset, seeded_generator
from ..data.base import Dataset, ImageSet
from ..models.base import Classifier, create_model, weights_digest
from ..retune import retune
from ..train import train_model
from .base import Log, Task


class ClassifierTask(Task):
    name = "classifier"

    @property
    def model_label(self) -> str:
        return self.cfg.model.name

    def dataset(self) -> Dataset:
        return load_dataset(self.cfg.data)

    def cache_key(self) -> dict:
        # a CLIP-only change keeps every classifier's cached model
        key = {"code_version": code_version(contrastive=False)}
        if self.cfg.model.weights is not None:  # the pretrained file's content, not its path, decides the model
            key["model_weights_sha256"] = weights_digest(self.cfg.model)
        return key

    def initial_model(self, dataset: Dataset, device: torch.device, log: Log) -> Classifier:
        return create_model(self.cfg.model, dataset.num_classes, dataset.image_shape[0], dataset.mean, dataset.std,
                            generator=seeded_generator(self.cfg.seed, "model_init"))

    def fit(self, model, poisoned, dataset, device, *, generator, attack, protected, eval_sets, log) -> list[dict]:
        # train_model skips crop and flip itself for an attack that augments on its own; an
        # on-the-fly attack leaves the defender's clean split (protected) unpoisoned
        return train_model(model, poisoned, self.cfg.train, device, generator=generator, attack=attack,
                           hflip_allowed=dataset.hflip, protected=protected, eval_sets=eval_sets, log=log)

    def meta(self, dataset: Dataset, model: Classifier) -> dict:
        return {"model": to_dict(self.cfg.model), "num_classes": dataset.num_classes,
                "in_channels": dataset.image_shape[0], "mean": model.mean.flatten().tolist(),
                "std": model.std.flatten().tolist(), "image_shape": list(dataset.image_shape),
                "classes": dataset.classes}

    def retune(self, model: Classifier, data: ImageSet, poisoned: torch.Tensor, device: torch.device, *,
               epochs: int, lr: float, batch_size: int, generator: torch.Generator, hflip: bool) -> Classifier:
        return retune(model, data, poisoned, device, epochs=epochs, lr=lr, batch_size=batch_size,
                      generator=generator, hflip=hflip)
