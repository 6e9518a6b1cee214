"""The contrastive setting inside a trial (``trial.py`` calls these when the run has a ``clip`` section).

* :func:`pair_dataset`: the run's labelled data set with its training split replaced by
  image-caption pairs (templated captions of its images, or the pairs of ``clip.captions``); the
  test split stays labelled for the zero-shot evaluation.
* :func:`clean_clip`: the clean pre-trained CLIP the attack starts from: the weights file as
  given, or (a CLIP without weights) contrastive pre-training on the clean pairs, cached by
  content hash like every attack-stage model.
* :func:`fit`: the attack's contrastive fine-tuning on the poisoned pairs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..cache import code_version, content_hash
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..config import to_dict
from ..data.base import Dataset, ImageSet
from ..data.captions import PairSet, file_pairs, templated_pairs
from ..data.splits import seeded_generator
from .model import ClipModel, build_model
from .train import Schedule, train_contrastive

Log = Callable[[str], None]


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
    from ..models.base import resolve_stats
    from ..models.clip import clip_stats

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
    from ..attack_stage import cache_root

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
    from ..evaluation.metrics import clean_accuracy

    metrics = {"ca": clean_accuracy(model, dataset.test, device)}
    _store(entry, model, {**model_meta(cfg, dataset, model), "stage": "clip_pretrain", "cache_key": key,
                          "metrics": metrics, "history": history, "seconds": time.perf_counter() - start})
    log(f"[clip] pre-trained: zero-shot CA {metrics['ca']:.4f} ({time.perf_counter() - start:.1f}s); cached in {entry}")
    return model


def _store(entry: Path, model: ClipModel, meta: dict) -> None:
    from ..cache import write_entry

    write_entry(entry, lambda folder: save_checkpoint(folder, model, meta, "model"))


def fit(model: ClipModel, poisoned: PairSet, cfg, device: torch.device, *, generator: torch.Generator,
        eval_sets: dict[str, ImageSet], log: Log = print) -> list[dict]:
    """The attack's contrastive fine-tuning of the clean CLIP on the poisoned pairs."""
    return train_contrastive(model, poisoned, schedule(cfg), device, generator=generator, eval_sets=eval_sets,
                             eval_every=cfg.train.eval_every, eval_size=cfg.train.eval_size, log=log, tag="attack")
