"""The ``clip`` section of a run: the contrastive setting.

A run with a ``clip`` section trains and attacks a CLIP on image-caption pairs and evaluates it
zero-shot on the labelled data set ``data`` names; without it (the default) the run is the
classifier setting and nothing here is used. The section says which CLIP (``arch``,
``weights``: ``models/clip.py``), where the pairs come from (``captions``), the zero-shot
prompts, the clean pre-training of a CLIP without weights, and AdamW's settings for the
contrastive training (the run's ``train`` section gives epochs, batch size, schedule and
augmentation of the attack's fine-tuning on the poisoned pairs).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, param
from ..data.captions import DEFAULT_CAPTION_TEMPLATES, check_templates, list_pairs
from ..models.clip import ClipConfig

TEMPLATES = "templates"
DEFAULT_PROMPTS = ("a photo of a {class}.",)


@dataclass
class ContrastiveConfig(ClipConfig):
    captions: str = param(TEMPLATES, "image-caption pairs: 'templates' (the data set's training images, each with a "
                          "caption from caption_templates of its class name), a CC3M-style .tsv/.csv file (image-path "
                          "and caption columns) or a folder of NAME.<image> + NAME.txt files")
    caption_templates: list[str] = param(list(DEFAULT_CAPTION_TEMPLATES), "caption templates, '{class}' standing for "
                                         "the class name: the captions of 'templates' pairs, and the target captions "
                                         "a dirty-label attack pairs its poisoned images with")
    prompts: list[str] = param(list(DEFAULT_PROMPTS), "zero-shot prompts, '{class}' standing for the class name; a "
                               "class's text embedding is the mean of its prompts' normalised embeddings")
    pretrain_epochs: int = param(20, "clean contrastive pre-training of a CLIP without weights (epochs over the clean "
                                 "pairs, before the attack's fine-tuning); must be 0 with weights", low=0)
    pretrain_lr: float = param(2e-3, "AdamW peak learning rate of the clean pre-training", low=0.0, low_open=True)
    pretrain_warmup_epochs: float = param(1.0, "linear warm-up of the pre-training's lr, in epochs (without it a "
                                          "micro ViT at lr 2e-3 collapsed to one class)", low=0.0)
    lr: float = param(5e-4, "AdamW peak learning rate of the attack's contrastive fine-tuning on the poisoned pairs "
                      "(train.epochs, train.batch_size, train.schedule, train.warmup_epochs)", low=0.0, low_open=True)
    weight_decay: float = param(0.1, "AdamW weight decay of the contrastive training (CLIP's)", low=0.0)

    def check(self, path: str) -> None:
        super().check(path)
        where = f"{path}." if path else "clip."
        check_templates(self.caption_templates, f"{where}caption_templates")
        check_templates(self.prompts, f"{where}prompts")
        if self.weights is not None and self.pretrain_epochs:
            raise ConfigError(f"{where}pretrain_epochs: {self.pretrain_epochs} with weights {self.weights!r}; allowed: 0 "
                              "(a CLIP with weights is used as given: it is the clean pre-trained model)")
        if self.weights is None and not self.pretrain_epochs:
            raise ConfigError(f"{where}pretrain_epochs: 0 without weights would attack a random CLIP; allowed: >= 1, "
                              "or give clip.weights")

    def check_files(self, path: str = "clip") -> None:
        """The preflight's checks (before any work, as for data and weights files): the weights file
        (``models/clip.py``) and every image of a caption file or folder present."""
        super().check_files(path)
        if self.from_files():
            list_pairs(self.captions, f"{path}.captions" if path else "captions")

    def from_files(self) -> bool:
        return self.captions != TEMPLATES

    def smoke(self) -> dict:
        return {"pretrain_epochs": min(self.pretrain_epochs, 1)} if self.pretrain_epochs else {}

    def source_name(self) -> str:
        return TEMPLATES if not self.from_files() else str(Path(self.captions).expanduser().resolve())
