"""Stage 1 of a trial: the attacked model, from the cache or trained.

:func:`attack_stage` loads nothing but what decides the model: it splits off the defender's clean
indices, poisons the rest and trains the attacked model, or loads it from the cache when the same
data, model, training, attack, seed and training code produced it before. This module is one of
the cache key's training sources (``cache.TRAINING_SOURCES``), so it holds only what makes the
attacked model: a change to the defense or evaluation stages (``trial.py``) keeps every cached model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .attacks import build_attack
from .attacks.base import Attack
from .attacks.coupling import feature_distance
from .cache import code_version, content_hash, write_entry
from .checkpoint import DIR_MODE, CheckpointError, load_checkpoint, load_tensors, save_checkpoint, save_tensors, write_json
from .config import to_dict
from .data import defender_split, load_dataset, seeded_generator
from .data.base import Dataset, ImageSet
from .evaluation.metrics import attack_success_rate, clean_accuracy
from .models.base import Classifier, create_model, weights_digest
from .predict import accuracy
from .runtime import resolve_device
from .schema import RunConfig

Log = Callable[[str], None]
DEFAULT_CACHE = Path("~/.cache/bibau/models")


def trial_dataset(cfg: RunConfig) -> Dataset:
    """The data set a trial's stages take: ``data``, with its training split as image-caption pairs
    in the contrastive setting (a ``clip`` section)."""
    dataset = load_dataset(cfg.data)
    if cfg.clip is not None:
        from .contrastive.stage import pair_dataset

        dataset = pair_dataset(cfg, dataset)
    return dataset


def cache_root(cfg: RunConfig) -> Path:
    return Path(cfg.cache_dir or DEFAULT_CACHE).expanduser()


def attack_key(cfg: RunConfig, dataset: Dataset, device: torch.device) -> dict:
    """Everything that determines the attack-stage model. Where the data came from (root,
    cache folder) does not matter: the data's fingerprint stands for its content. Nor does how
    often training was watched: the per-epoch evaluation leaves the weights alone."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("root", "cache_dir", "download")}
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("eval_every", "eval_size")}
    key = {"stage": "attack", "data": data, "data_fingerprint": dataset.fingerprint(), "model": to_dict(cfg.model),
           "train": train, "attack": to_dict(cfg.attack), "seed": cfg.seed,
           "device": device.type,  # bf16 on CUDA trains a different model than fp32 on the CPU
           "code_version": code_version(contrastive=cfg.clip is not None)}
    if cfg.clip is not None:  # the contrastive setting: the CLIP and its pairs make the model
        key["clip"] = to_dict(cfg.clip)
        if cfg.clip.weights is not None:
            key["clip_weights_sha256"] = weights_digest(cfg.clip)
    if cfg.model.weights is not None:  # the pretrained file's content, not its path, decides the model
        key["model_weights_sha256"] = weights_digest(cfg.model)
    return key


# -- stage 1: the attack -------------------------------------------------------------------------


@dataclass
class AttackStage:
    """The attacked model with everything later stages need to know about how it was made."""

    dataset: Dataset
    attack: Attack
    model: Classifier
    rest_index: torch.Tensor  # training samples the attacker controls (poisoned ones among them)
    clean_index: torch.Tensor  # the defender's clean split, never poisoned
    poison_index: torch.Tensor  # samples poisoned at build time
    poisoned_train: ImageSet
    poisoned_test: ImageSet
    metrics: dict
    history: list[dict] = field(default_factory=list)
    cache_hit: bool = False
    cache_key: str = ""
    cache_dir: Path | None = None
    data_fingerprint: str = ""
    meta: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def clean_split(self) -> ImageSet:
        return self.dataset.train.subset(self.clean_index)

    @property
    def attacker_train(self) -> ImageSet:
        """Clean images of the attacker's part of the training set (RA and QRA draw from it)."""
        return self.dataset.train.subset(self.rest_index)

    def poisoned_samples(self) -> ImageSet:
        return self.attack.poisoned_samples(self.dataset.train, self.poisoned_train, self.poison_index)


def model_meta(cfg: RunConfig, dataset: Dataset, model: Classifier) -> dict:
    if cfg.clip is not None:
        from .contrastive.stage import model_meta

        return model_meta(cfg, dataset, model)
    return {"model": to_dict(cfg.model), "num_classes": dataset.num_classes, "in_channels": dataset.image_shape[0],
            "mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist(),
            "image_shape": list(dataset.image_shape), "classes": dataset.classes}


def _load_cached(entry: Path, key: str, attack: Attack, device: torch.device,
                 log: Log) -> tuple[Classifier, dict, torch.Tensor] | None:
    """The cached model, its meta and poisoned indices, with the attack's saved state loaded;
    None (and a log line saying why) when the entry is missing or unusable."""
    if not (entry / "model.json").is_file():
        return None
    try:
        model, meta = load_checkpoint(entry / "model.safetensors", device)
        if meta.get("cache_key") != key:
            raise CheckpointError(f"its key {meta.get('cache_key')!r} is not {key!r}")
        attack.load_state(load_tensors(entry / "attack.safetensors"))
        index = load_tensors(entry / "poison.safetensors")["index"]
    except (CheckpointError, ValueError, KeyError, OSError) as exc:
        log(f"[attack] cache entry {entry} is unusable ({exc}); training again")
        return None
    return model, meta, index


def _store(entry: Path, model: Classifier, meta: dict, attack: Attack, poison_index: torch.Tensor,
           key_payload: dict) -> None:
    def write(folder: Path) -> None:
        save_checkpoint(folder, model, meta, "model")
        save_tensors(folder / "attack.safetensors", attack.state_tensors())
        save_tensors(folder / "poison.safetensors", {"index": poison_index})
        write_json(folder / "key.json", key_payload)

    write_entry(entry, write, DIR_MODE)


def attack_stage(cfg: RunConfig, dataset: Dataset, device: torch.device, log: Log = print) -> AttackStage:
    """Poison the training set (the defender's clean split excluded), train on it and measure
    CA and ASR; reuse the cached model when one exists for the same content hash."""
    from .train import train_model  # the training loop is only needed on a cache miss

    start = time.perf_counter()
    rest_index, clean_index = defender_split(dataset.train, cfg.data.clean_fraction, cfg.data.seed)
    attack = build_attack(cfg.attack, dataset)
    key_payload = attack_key(cfg, dataset, device)
    key = content_hash(key_payload)
    entry = cache_root(cfg) / key

    cached = _load_cached(entry, key, attack, device, log)
    if cached is not None:
        model, meta, saved_index = cached
        poisoned_train, index = attack.poison_trainset(dataset.train, seeded_generator(cfg.seed, "poison"),
                                                       exclude=clean_index)
        if not torch.equal(index, saved_index):
            log(f"[attack] cache entry {entry} was poisoned at other indices; training again")
            cached, attack = None, build_attack(cfg.attack, dataset)  # drop the loaded state
    if cached is None:
        log(f"[attack] cache miss ({key}): training {cfg.model.name if cfg.clip is None else cfg.clip.arch} under {cfg.attack.name} "
            f"on {len(dataset.train)} images for {cfg.train.epochs} epochs on {device}")
        if cfg.clip is not None:  # the contrastive setting: the attack fine-tunes a clean pre-trained CLIP
            from .contrastive.stage import clean_clip

            model = clean_clip(cfg, dataset, device, log)
        else:
            model = create_model(cfg.model, dataset.num_classes, dataset.image_shape[0], dataset.mean, dataset.std,
                                 generator=seeded_generator(cfg.seed, "model_init"))
        attack.state_cache = cache_root(cfg)  # trained parts (encoder, surrogate) cached by content hash
        prepare_start = time.perf_counter()
        attack.prepare(dataset.train, model, device, seeded_generator(cfg.seed, "attack_prepare"))
        prepare_seconds = time.perf_counter() - prepare_start
        poisoned_train, index = attack.poison_trainset(dataset.train, seeded_generator(cfg.seed, "poison"),
                                                       exclude=clean_index)
    poisoned_test = attack.poison_testset(dataset.test)

    if cached is not None:
        history, metrics = meta.get("history", []), meta["metrics"]
        log(f"[attack] cache hit: {cfg.attack.name} model loaded from {entry} "
            f"(CA {metrics['backdoored_ca']:.4f}, ASR {metrics['backdoored_asr']:.4f}); no training")
    else:
        covers = f", {len(attack.cover_index)} cover images" if len(attack.cover_index) else ""
        log(f"[attack] poisoned {len(index)} of {len(dataset.train)} training images{covers} ({len(clean_index)} held "
            f"out as the defender's clean split); {len(poisoned_test)} triggered test images")
        extra = attack.extra_test_sets(dataset.test)
        # train_model skips crop and flip itself for an attack that augments on its own; an
        # on-the-fly attack leaves the defender's clean split (protected) unpoisoned
        if cfg.clip is not None:
            from .contrastive.stage import fit

            history = fit(model, poisoned_train, cfg, device, generator=seeded_generator(cfg.seed, "train"),
                          eval_sets={"ca": dataset.test, "asr": poisoned_test, **extra}, log=log)
        else:
            history = train_model(model, poisoned_train, cfg.train, device, generator=seeded_generator(cfg.seed, "train"),
                                  attack=attack, hflip_allowed=dataset.hflip, protected=clean_index,
                                  eval_sets={"ca": dataset.test, "asr": poisoned_test, **extra}, log=log)
        if attack.learns_while_training:  # IAD's generator changed during training: trigger the test set anew
            poisoned_test = attack.poison_testset(dataset.test)
            extra = attack.extra_test_sets(dataset.test)
        metrics = {"backdoored_ca": clean_accuracy(model, dataset.test, device),
                   "backdoored_asr": attack_success_rate(model, poisoned_test, device),
                   **{f"backdoored_{name}": accuracy(model, images, device) for name, images in extra.items()},
                   # what the attack's own parts found (an encoder's bit accuracy); their cost is a
                   # timing, kept in meta beside the stage's seconds (metrics are deterministic)
                   **{f"attack_{name}": value for name, value in attack.findings().items()}}
        if cfg.clip is None and attack.build_time and len(index):
            # how far the poisoned samples sit from the target class in feature space (feature coupling)
            target_rows = dataset.train.y.cpu() == attack.target
            target_rows[index.cpu()] = False
            target_rows[attack.cover_index.cpu()] = False
            metrics["backdoored_feature_distance"] = feature_distance(
                model, poisoned_train.subset(index), dataset.train.subset(target_rows.nonzero().flatten()), device)
        meta = {**model_meta(cfg, dataset, model), "stage": "attack", "cache_key": key,
                "attack": to_dict(cfg.attack), "data": to_dict(cfg.data), "train": to_dict(cfg.train),
                "seed": cfg.seed, "data_fingerprint": key_payload["data_fingerprint"],
                "code_version": key_payload["code_version"], "device": str(device), "metrics": metrics,
                "history": history, "seconds": time.perf_counter() - start,
                "prepare_seconds": prepare_seconds, "n_poisoned": len(index)}
        _store(entry, model, meta, attack, index, key_payload)
        log(f"[attack] trained: CA {metrics['backdoored_ca']:.4f}, ASR {metrics['backdoored_asr']:.4f} "
            f"({time.perf_counter() - start:.1f}s); cached in {entry}")
    return AttackStage(dataset=dataset, attack=attack, model=model, rest_index=rest_index, clean_index=clean_index,
                       poison_index=index, poisoned_train=poisoned_train, poisoned_test=poisoned_test,
                       metrics=metrics, history=history, cache_hit=cached is not None, cache_key=key,
                       cache_dir=entry, data_fingerprint=key_payload["data_fingerprint"], meta=meta,
                       seconds=time.perf_counter() - start)


def clean_reference(cfg: RunConfig, dataset: Dataset, log: Log = print,
                    device: torch.device | None = None) -> Classifier:
    """The model trained on the same data, architecture and schedule without any attack (the
    ``clean`` attack), through the same cache."""
    clean_cfg = cfg.replace(attack={"name": "clean"}, defense=None)
    device = device or resolve_device(cfg.device)
    log("[eval] clean reference model: same data, model and training, no attack")
    return attack_stage(clean_cfg, dataset, device, log).model  # type: ignore[arg-type]
