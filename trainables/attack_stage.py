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
from .cache import DEFAULT_CACHE, cache_root, content_hash, write_entry  # noqa: F401  (cache_root: preflight)
from .checkpoint import DIR_MODE, CheckpointError, load_checkpoint, load_tensors, save_checkpoint, save_tensors, write_json
from .config import to_dict
from .data import defender_split, seeded_generator
from .data.base import Dataset, ImageSet
from .evaluation.metrics import attack_success_rate, clean_accuracy
from .models.base import Classifier, weights_digest
from .predict import accuracy
from .runtime import resolve_device
from .schema import RunConfig
from .tasks import Task, task_for

Log = Callable[[str], None]


def trial_dataset(cfg: RunConfig) -> Dataset:
    """The data set a trial's stages take (its task builds it: in the contrastive setting the
    training split is image-caption pairs)."""
    return task_for(cfg).dataset()


def attack_key(cfg: RunConfig, dataset: Dataset, device: torch.device, task: Task | None = None) -> dict:
    """Everything that determines the attack-stage model. Where the data came from (root,
    cache folder) does not matter: the data's fingerprint stands for its content. Nor does how
    often training was watched: the per-epoch evaluation leaves the weights alone. The task adds
    its part (the training code's version, the CLIP)."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("root", "cache_dir", "download")}
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("eval_every", "eval_size")}
    key = {"stage": "attack", "data": data, "data_fingerprint": dataset.fingerprint(), "model": to_dict(cfg.model),
           "train": train, "attack": to_dict(cfg.attack), "seed": cfg.seed,
           "device": device.type,  # bf16 on CUDA trains a different model than fp32 on the CPU
           **(task or task_for(cfg)).cache_key()}
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
    source: str = "trained"  # trained | cache | external (attack.external_model: trained elsewhere)

    @property
    def clean_split(self) -> ImageSet:
        return self.dataset.train.subset(self.clean_index)

    @property
    def attacker_train(self) -> ImageSet:
        """Clean images of the attacker's part of the training set (RA and QRA draw from it)."""
        return self.dataset.train.subset(self.rest_index)

    def poisoned_samples(self) -> ImageSet:
        return self.attack.poisoned_samples(self.dataset.train, self.poisoned_train, self.poison_index)


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
    start = time.perf_counter()
    task = task_for(cfg)
    rest_index, clean_index = defender_split(dataset.train, cfg.data.clean_fraction, cfg.data.seed)
    attack = build_attack(cfg.attack, dataset)
    if cfg.attack.external_model is not None:
        return _external_stage(cfg, dataset, attack, rest_index, clean_index, device, log, start)
    key_payload = attack_key(cfg, dataset, device, task)
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
        log(f"[attack] cache miss ({key}): training {task.model_label} under {cfg.attack.name} "
            f"on {len(dataset.train)} images for {cfg.train.epochs} epochs on {device}")
        model = task.initial_model(dataset, device, log)
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
        history = task.fit(model, poisoned_train, dataset, device, generator=seeded_generator(cfg.seed, "train"),
                           attack=attack, protected=clean_index,
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
        if attack.build_time and len(index):
            # how far the poisoned samples sit from the target class in feature space (feature coupling)
            target_rows = dataset.train.y.cpu() == attack.target
            target_rows[index.cpu()] = False
            target_rows[attack.cover_index.cpu()] = False
            metrics["backdoored_feature_distance"] = feature_distance(
                model, poisoned_train.subset(index), dataset.train.subset(target_rows.nonzero().flatten()), device)
        meta = {**task.meta(dataset, model), "stage": "attack", "cache_key": key,
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
                       seconds=time.perf_counter() - start, source="cache" if cached is not None else "trained")


def _external_stage(cfg: RunConfig, dataset: Dataset, attack: Attack, rest_index: torch.Tensor,
                    clean_index: torch.Tensor, device: torch.device, log: Log, start: float) -> AttackStage:
    """The suspicious model of ``attack.external_model`` in place of a trained one: the trigger is
    what the attack's settings and the run's seed draw (``prepare`` and the poisoned samples RA and
    QRA use, as a model trained here would have had), nothing is trained or cached."""
    from .external import load_external
    from .models.base import ModelConfig

    path = cfg.attack.external_model
    model = load_external(path, cfg.model, dataset.num_classes, dataset.image_shape[0], dataset.mean, dataset.std,
                          device)
    attack.prepare(dataset.train, model, device, seeded_generator(cfg.seed, "attack_prepare"))
    poisoned_train, index = attack.poison_trainset(dataset.train, seeded_generator(cfg.seed, "poison"),
                                                   exclude=clean_index)
    poisoned_test = attack.poison_testset(dataset.test)
    extra = attack.extra_test_sets(dataset.test)
    metrics = {"backdoored_ca": clean_accuracy(model, dataset.test, device),
               "backdoored_asr": attack_success_rate(model, poisoned_test, device),
               **{f"backdoored_{name}": accuracy(model, images, device) for name, images in extra.items()}}
    digest = weights_digest(ModelConfig(name=cfg.model.name, weights=path))
    meta = {**task_for(cfg).meta(dataset, model), "stage": "attack", "source": "external", "external_model": str(path),
            "external_model_sha256": digest, "attack": to_dict(cfg.attack), "data": to_dict(cfg.data),
            "seed": cfg.seed, "data_fingerprint": dataset.fingerprint(), "device": str(device), "metrics": metrics,
            "history": [], "n_poisoned": len(index)}
    log(f"[attack] external model {path} ({cfg.model.name}): attack stage skipped, the trigger is {cfg.attack.name}'s "
        f"(target {cfg.attack.target}): CA {metrics['backdoored_ca']:.4f}, ASR {metrics['backdoored_asr']:.4f}")
    return AttackStage(dataset=dataset, attack=attack, model=model, rest_index=rest_index, clean_index=clean_index,
                       poison_index=index, poisoned_train=poisoned_train, poisoned_test=poisoned_test,
                       metrics=metrics, cache_key=f"external-{digest[:16]}", cache_dir=None,
                       data_fingerprint=meta["data_fingerprint"], meta=meta, seconds=time.perf_counter() - start,
                       source="external")


def clean_reference(cfg: RunConfig, dataset: Dataset, log: Log = print,
                    device: torch.device | None = None) -> Classifier:
    """The model trained on the same data, architecture and schedule without any attack (the
    ``clean`` attack), through the same cache."""
    clean_cfg = cfg.replace(attack={"name": "clean"}, defense=None)
    device = device or resolve_device(cfg.device)
    log("[eval] clean reference model: same data, model and training, no attack")
    return attack_stage(clean_cfg, dataset, device, log).model  # type: ignore[arg-type]
