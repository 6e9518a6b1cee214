"""The contrastive setting (a run with a ``clip`` section): a CLIP on image-caption pairs.

* :func:`pair_dataset`: the run's labelled data set with its training split replaced by
  image-caption pairs (templated captions of its images, or the pairs of ``clip.captions``); the
  test split stays labelled for the zero-shot evaluation.
* :func:`clean_clip`: the clean pre-trained CLIP the attack starts from: the weights file as
  given, or (a CLIP without weights) contrastive pre-training on the clean pairs, cached by
  content hash like every attack-stage model.
* :func:`fit`: the attack's contrastive fine-tuning on the poisoned pairs.
* RA: ``contrastive.train.retune_clip`` (the same retuning with the CLIP loss).

Only the contrastive setting runs this module: it is one of ``cache.CONTRASTIVE_SOURCES``, so a
change here keeps every classifier's cached model.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..cache import cache_root, code_version, content_hash, write_entry
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..config import to_dict
from ..contrastive.model import ClipModel, build_model
from ..contrastive.train import Schedule, retune_clip, train_contrastive
from ..data import load_dataset
from ..data.base import Dataset, ImageSet
from ..data.captions import PairSet, file_pairs, templated_pairs
from ..data.splits import seeded_generator
from ..models.base import resolve_stats, weights_digest
from ..models.clip import clip_stats
from ..predict import accuracy
from .base import Log, Task


def pair_dataset(cfg, dataset: Dataset) -> Dataset:
    """``dataset`` whose training split is the run's image-caption pairs (a :class:`PairSet`)."""
    clip = cfg.clip
    if clip.from_files():
        side = dataset.image_shape[1]
        train = file_pairs(clip.captions, side, dataset.classes, clip.caption_templates)
    else:
        train = templated_pairs(dataset.train, dataset.classes, clip.caption_templates,
                                seeded_generator(cfg.seed, "captions"))
    return Dataset(name=dataset.name, train=train, test=dataset.test, classes=dataset.classes, hflip=dataset.hflip,
                   mean=dataset.mean, std=dataset.std, info={**dataset.info, "captions": clip.source_name()})


def model_stats(cfg, dataset: Dataset):
    """The normalisation: what pretrained weights expect, else the data set's."""
    if cfg.clip.weights is not None:
        return clip_stats(cfg.clip.arch)
    return resolve_stats(dataset.mean, dataset.std, dataset.image_shape[0])


def model_meta(cfg, dataset: Dataset, model: ClipModel) -> dict:
    return {"clip": to_dict(cfg.clip), "model": {"name": "clip", "arch": cfg.clip.arch},
            "num_classes": dataset.num_classes, "in_channels": dataset.image_shape[0],
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
            "image_shape": list(dataset.image_shape), "classes": dataset.classes}


def schedule(cfg, pretrain: bool = False) -> Schedule:
    t, c = cfg.train, cfg.clip
    return Schedule(epochs=c.pretrain_epochs if pretrain else t.epochs, batch_size=t.batch_size,
                    lr=c.pretrain_lr if pretrain else c.lr, weight_decay=c.weight_decay, schedule=t.schedule,
                    warmup_epochs=c.pretrain_warmup_epochs if pretrain else t.warmup_epochs,
                    crop_padding=t.crop_padding, hflip=t.hflip)


def clean_clip(cfg, dataset: Dataset, device: torch.device, log: Log = print) -> ClipModel:
    """The clean pre-trained CLIP (a copy each call: the attack fine-tunes it)."""
    mean, std = model_stats(cfg, dataset)
    if cfg.clip.weights is not None:
        log(f"[clip] {cfg.clip.arch} with the weights of {cfg.clip.weights}")
        return build_model(cfg.clip, dataset.classes, mean, std, device)
    payload = {"stage": "clip_pretrain", "clip": to_dict(cfg.clip), "data_fingerprint": dataset.fingerprint(),
               "train": {k: getattr(cfg.train, k) for k in ("batch_size", "schedule", "crop_padding", "hflip")},
               "seed": cfg.seed, "device": device.type, "code_version": code_version()}
    for k in ("captions",):  # where the pairs came from is in the data's fingerprint
        payload["clip"].pop(k, None)
    key = content_hash(payload)
    entry = cache_root(cfg) / f"clip-pretrain-{key}"
    if (entry / "model.json").is_file():
        try:
            model, meta = load_checkpoint(entry / "model.safetensors", device)
            if meta.get("cache_key") == key:
                log(f"[clip] cache hit: clean pre-trained {cfg.clip.arch} from {entry} "
                    f"(zero-shot CA {meta['metrics']['ca']:.4f})")
                return model  # type: ignore[return-value]
        except CheckpointError as exc:
            log(f"[clip] cache entry {entry} is unusable ({exc}); training again")
    start = time.perf_counter()
    model = build_model(cfg.clip, dataset.classes, mean, std, device, generator=seeded_generator(cfg.seed, "clip_init"))
    log(f"[clip] cache miss ({key}): pre-training {cfg.clip.arch} on {len(dataset.train)} clean pairs for "
        f"{cfg.clip.pretrain_epochs} epochs on {device}")
    history = train_contrastive(model, dataset.train, schedule(cfg, pretrain=True), device,
                                generator=seeded_generator(cfg.seed, "clip_pretrain"),
                                eval_sets={"ca": dataset.test}, eval_every=cfg.train.eval_every,
                                eval_size=cfg.train.eval_size, log=log, tag="clip pretrain")
    metrics = {"ca": accuracy(model, dataset.test, device)}  # CA, zero-shot
    _store(entry, model, {**model_meta(cfg, dataset, model), "stage": "clip_pretrain", "cache_key": key,
                          "metrics": metrics, "history": history, "seconds": time.perf_counter() - start})
    log(f"[clip] pre-trained: zero-shot CA {metrics['ca']:.4f} ({time.perf_counter() - start:.1f}s); cached in {entry}")
    return model


def _store(entry: Path, model: ClipModel, meta: dict) -> None:
    write_entry(entry, lambda folder: save_checkpoint(folder, model, meta, "model"))


def fit(model: ClipModel, poisoned: PairSet, cfg, device: torch.device, *, generator: torch.Generator,
        eval_sets: dict[str, ImageSet], log: Log = print) -> list[dict]:
    """The attack's contrastive fine-tuning of the clean CLIP on the poisoned pairs."""
    return train_contrastive(model, poisoned, schedule(cfg), device, generator=generator, eval_sets=eval_sets,
                             eval_every=cfg.train.eval_every, eval_size=cfg.train.eval_size, log=log, tag="attack")


class ContrastiveTask(Task):
    name = "contrastive"

    @property
    def model_label(self) -> str:
        return f"clip:{self.cfg.clip.arch}"

    def smoke(self) -> dict:
        return {"clip": self.cfg.clip.smoke()}

    def dataset(self) -> Dataset:
        return pair_dataset(self.cfg, load_dataset(self.cfg.data))

    def cache_key(self) -> dict:
        key = {"code_version": code_version(contrastive=True), "clip": to_dict(self.cfg.clip)}
        if self.cfg.clip.weights is not None:  # the weights' content, not their path, decides the model
            key["clip_weights_sha256"] = weights_digest(self.cfg.clip)
        return key

    def initial_model(self, dataset: Dataset, device: torch.device, log: Log) -> ClipModel:
        return clean_clip(self.cfg, dataset, device, log)

    def fit(self, model, poisoned, dataset, device, *, generator, attack, protected, eval_sets, log) -> list[dict]:
        return fit(model, poisoned, self.cfg, device, generator=generator, eval_sets=eval_sets, log=log)

    def meta(self, dataset: Dataset, model: ClipModel) -> dict:
        return model_meta(self.cfg, dataset, model)

    def retune(self, model: ClipModel, data: PairSet, poisoned: torch.Tensor, device: torch.device, *,
               epochs: int, lr: float, batch_size: int, generator: torch.Generator, hflip: bool) -> ClipModel:
        return retune_clip(model, data, poisoned, device, epochs=epochs, lr=lr, batch_size=batch_size,
                           generator=generator, hflip=hflip)
