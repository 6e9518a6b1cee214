"""One trial end to end: data -> attack (cached by content hash) -> defense -> evaluation.

:func:`run_trial` is what ``bibau run`` and every sweep trial call. The three stages are
separate functions so each can be run, timed and tested alone:

* :func:`attack_stage` loads the data, splits off the defender's clean indices, poisons the
  rest and trains the attacked model, or loads it from the cache when the same data, model,
  training, attack, seed and training code produced it before;
* :func:`defense_stage` purifies that model with the defender's clean split;
* :func:`evaluation_stage` measures CA and ASR and runs the other registered evaluations.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from .attacks import build_attack
from .attacks.base import Attack
from .cache import code_version, content_hash, write_entry
from .checkpoint import DIR_MODE, CheckpointError, load_checkpoint, load_tensors, save_checkpoint, save_tensors, write_json
from .config import to_dict
from .data import defender_split, load_dataset, seeded_generator
from .data.base import Dataset, ImageSet
from .evaluation.metrics import accuracy, attack_success_rate, clean_accuracy
from .models.base import Classifier, create_model, weights_digest
from .runtime import resolve_device, seed_everything
from .schema import RunConfig

Log = Callable[[str], None]
REPORTED_METRICS = ("ca", "asr", "r_asr", "q_asr", "bec", "ra_clean_asr")
DEFAULT_CACHE = Path("~/.cache/bibau/models")


# -- configuration helpers -----------------------------------------------------------------------


def smoke_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` shrunk for a fast end-to-end check: a few hundred images, one epoch, small
    evaluations. Idempotent; sizes already smaller are kept."""
    def at_most(value, limit):
        return limit if value is None else min(value, limit)

    ev = cfg.evaluation
    changes: dict = {
        "data": {"train_size": at_most(cfg.data.train_size, 400), "test_size": at_most(cfg.data.test_size, 200)},
        "train": {"epochs": 1, "eval_size": min(cfg.train.eval_size, 100), "batch_size": min(cfg.train.batch_size, 64)},
        "evaluation": {"ra_size": min(ev.ra_size, 100), "ra_epochs": 1, "qra_epochs": 1,
                       "qra_clean_size": min(ev.qra_clean_size, 50), "qra_poison_size": min(ev.qra_poison_size, 50),
                       "qra_hidden": min(ev.qra_hidden, 64), "bec_samples": min(ev.bec_samples, 50)},
    }
    if cfg.defense is not None and hasattr(cfg.defense, "smoke"):
        changes["defense"] = cfg.defense.smoke()
    if cfg.clip is not None:
        changes["clip"] = cfg.clip.smoke()
    return cfg.replace(**changes)  # type: ignore[return-value]


def resolved_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds and ``--print-config`` shows)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
           "code_version": code_version()}
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


def _model_meta(cfg: RunConfig, dataset: Dataset, model: Classifier) -> dict:
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
        attack.prepare(dataset.train, model, device, seeded_generator(cfg.seed, "attack_prepare"))
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
        metrics = {"backdoored_ca": clean_accuracy(model, dataset.test, device),
                   "backdoored_asr": attack_success_rate(model, poisoned_test, device),
                   **{f"backdoored_{name}": accuracy(model, images, device) for name, images in extra.items()}}
        meta = {**_model_meta(cfg, dataset, model), "stage": "attack", "cache_key": key,
                "attack": to_dict(cfg.attack), "data": to_dict(cfg.data), "train": to_dict(cfg.train),
                "seed": cfg.seed, "data_fingerprint": key_payload["data_fingerprint"],
                "code_version": key_payload["code_version"], "device": str(device), "metrics": metrics,
                "history": history, "seconds": time.perf_counter() - start, "n_poisoned": len(index)}
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


# -- stage 2: the defense ------------------------------------------------------------------------


@dataclass
class DefenseStage:
    model: Classifier
    history: list[dict]
    seconds: float
    findings: dict = field(default_factory=dict)  # what the defense found, reported as defense_<key>
    # set when the gate stopped the defense before its last epoch: epoch, epochs, reason, margin
    stopped: dict | None = None


def gate_check(cfg: RunConfig, stage: AttackStage, device: torch.device, log: Log = print):
    """The ``on_epoch`` hook of the gate's ``during_defense`` check, or None when it is off: from
    ``check_from`` of the defense's epochs on (the last one left to the final gate), the CA of the
    model on a fixed subsample of the clean test set; below the gate by more than ``slack``, the
    defense stops (``DefenseStopped``)."""
    gate = cfg.evaluation.gate
    if gate is None or not gate.during_defense:
        return None
    from .defenses.base import DefenseStopped

    test = stage.dataset.test
    if gate.eval_size < len(test):
        pick = torch.randperm(len(test), generator=seeded_generator(cfg.evaluation.seed, "gate_subsample"))
        test = test.subset(pick[:gate.eval_size].sort().values)
    test = test.to(device)
    backdoored_ca = stage.metrics.get("backdoored_ca")

    def on_epoch(model: Classifier, epoch: int, epochs: int, history: list[dict]) -> None:
        if epoch < gate.first_checked_epoch(epochs) or epoch >= epochs:
            return
        ca = clean_accuracy(model, test, device)
        margin, why = gate.margin(ca, backdoored_ca)
        if history:
            history[-1]["gate_ca"] = ca  # the check's CA, kept with the epoch it measured
        if margin > gate.slack:
            reason = (f"stopped after defense epoch {epoch}/{epochs}: {why} on {len(test)} test images, "
                      f"beyond the gate by {margin:.4f} > slack {gate.slack:g}")
            log(f"[defense] {reason}")
            raise DefenseStopped(reason, model, history, epoch, epochs, margin)
        log(f"[defense] gate check after epoch {epoch}/{epochs}: CA {ca:.4f} (margin {-margin:.4f})")

    return on_epoch


def defense_stage(cfg: RunConfig, stage: AttackStage, device: torch.device, log: Log = print) -> DefenseStage | None:
    """Purify the attacked model with the defender's clean split; None when ``cfg.defense`` is null."""
    if cfg.defense is None:
        return None
    from . import defenses
    from .defenses.base import DefenseContext, DefenseStopped
    from .registry import DEFENSES

    start = time.perf_counter()
    build_defense = getattr(defenses, "build_defense", None)
    defense = build_defense(cfg.defense) if build_defense else DEFENSES.get(cfg.defense.name)(cfg.defense)
    data_use = type(defense).declared_data_use()
    ctx = DefenseContext(device=device, num_classes=stage.dataset.num_classes, seed=cfg.seed,
                         hflip=stage.dataset.hflip,
                         target=stage.attack.target if defense.needs_target else None,
                         poisoned=stage.poisoned_samples() if defense.uses_poisoned_data else None,
                         poisoned_batch=poisoned_batch(stage, getattr(cfg.defense, "batch_size", 256), cfg.seed)
                         if data_use == "poisoned_batch" else None, log=log,
                         on_epoch=gate_check(cfg, stage, device, log))
    clean = stage.clean_split
    log(f"[defense] {cfg.defense.name} (data: {data_use}) on {len(clean)} clean images")
    try:
        result = defense.purify(stage.model, clean, ctx)
    except DefenseStopped as stop:
        stop.model.eval()
        seconds = time.perf_counter() - start
        return DefenseStage(model=stop.model, history=stop.history, seconds=seconds,
                            stopped={"epoch": stop.epoch, "epochs": stop.epochs, "reason": stop.reason,
                                     "margin": stop.margin})
    seconds = time.perf_counter() - start
    log(f"[defense] done ({seconds:.1f}s)")
    return DefenseStage(model=result.model, history=result.history, seconds=seconds,
                        findings=dict(getattr(result, "findings", {})))


def poisoned_batch(stage: AttackStage, size: int, seed: int) -> ImageSet:
    """A random batch of the poisoned training set as the attacker labelled it (the defender's
    clean split left out): what EP-style defenses assume they are given."""
    gen = seeded_generator(seed, "defense_poisoned_batch")
    pick = stage.rest_index[torch.randperm(len(stage.rest_index), generator=gen)[:size]]
    return stage.poisoned_train.subset(pick.sort().values)


# -- stage 3: the evaluation ---------------------------------------------------------------------


def evaluation_stage(cfg: RunConfig, stage: AttackStage, model: Classifier, device: torch.device,
                     log: Log = print, stopped: dict | None = None) -> dict:
    """CA and ASR of ``model``, then every other evaluation ``cfg.evaluation.metrics`` names,
    unless ``cfg.evaluation.gate`` stops the model first (cheap first: RA, QRA and BEC cost
    more than the defense at CPU scale, and a model that lost its clean accuracy is off any
    useful front whatever its R-ASR). ``evaluation_status`` says which: ``full`` or ``gated``.
    ``stopped``: the gate already stopped the defense (``DefenseStage.stopped``); the model is
    gated, with the CA and ASR it had then."""
    t = time.perf_counter()
    out: dict = {"ca": clean_accuracy(model, stage.dataset.test, device),
                 "asr": attack_success_rate(model, stage.poisoned_test, device)}
    out["time_eval_ca_asr_s"] = time.perf_counter() - t
    log(f"[eval] CA {out['ca']:.4f}, ASR {out['asr']:.4f}")
    extra = [m for m in cfg.evaluation.metrics if m not in ("ca", "asr")]
    gate = cfg.evaluation.gate
    out["evaluation_status"] = "full"
    if stopped is not None:
        out.update(evaluation_status="gated", gate_reason=stopped["reason"], gate_margin=stopped["margin"],
                   gate_stopped_epoch=stopped["epoch"], evaluations_skipped=extra)
        log(f"[eval] gated during the defense (epoch {stopped['epoch']}/{stopped['epochs']}); "
            f"not run: {', '.join(extra) or 'nothing'}")
        return out
    if gate is not None:
        margin, why = gate.margin(out["ca"], stage.metrics.get("backdoored_ca"))
        if math.isfinite(margin):
            out["gate_margin"] = margin
        if margin > 0:
            out.update(evaluation_status="gated", gate_reason=why, evaluations_skipped=extra)
            log(f"[eval] gated: {why}; not run: {', '.join(extra) or 'nothing'}")
            return out
        log(f"[eval] gate passed (margin {-margin:.4f})" if math.isfinite(margin) else "[eval] gate passed")
    if not extra:
        return out
    from . import evaluation

    evaluate = getattr(evaluation, "evaluate", None)
    if evaluate is None:
        log(f"[eval] {', '.join(extra)} skipped: trainables.evaluation.evaluate is not available")
        out["evaluations_skipped"] = extra
        return out
    from .evaluation.base import EvalContext

    reference: list[Classifier] = []

    def clean_model() -> Classifier:
        if not reference:
            reference.append(clean_reference(cfg, stage.dataset, log, device))
        return reference[0]

    ctx = EvalContext(model=model, backdoored=stage.model, clean_reference=clean_model, attack=stage.attack,
                      dataset=stage.dataset, attacker_train=stage.attacker_train, poisoned_test=stage.poisoned_test,
                      cfg=cfg.evaluation, device=device, log=log)
    out.update(evaluate(ctx, extra))
    return out


# -- the whole trial -----------------------------------------------------------------------------


def run_trial(cfg: RunConfig, out_dir: Path | None = None, *, log: Log = print, smoke_test: bool = False) -> dict:
    """Run one trial and return a flat report: every metric, the time of each stage, the cache
    and data provenance, and ``history`` (per-epoch records of the attack and defense stages).

    With ``out_dir``: writes ``config.yaml`` (resolved, first), ``backdoored.safetensors/.json``,
    ``attack.safetensors`` (the trigger), ``purified.*`` when a defense ran, and ``results.json``.
    """
    if smoke_test:
        cfg = smoke_config(cfg)
    start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # CPU results depend on it: the resolved config fixes it
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(resolved_yaml(cfg))
    defense_name = cfg.defense.name if cfg.defense is not None else None
    log(f"[trial] {cfg.data.name} / {cfg.model.name if cfg.clip is None else 'clip ' + cfg.clip.arch} / attack {cfg.attack.name} / defense {defense_name or 'none'} "
        f"on {device}{' (smoke test)' if smoke_test else ''}")

    t = time.perf_counter()
    dataset = trial_dataset(cfg)
    time_data = time.perf_counter() - t
    log(f"[data] {dataset.name}: {len(dataset.train)} train / {len(dataset.test)} test images "
        f"{tuple(dataset.image_shape)} ({time_data:.1f}s)")

    stage = attack_stage(cfg, dataset, device, log)
    defended = defense_stage(cfg, stage, device, log)
    final = defended.model if defended is not None else copy.deepcopy(stage.model)  # evaluations may not touch the cached model
    t = time.perf_counter()
    metrics = evaluation_stage(cfg, stage, final, device, log,
                               stopped=defended.stopped if defended is not None else None)
    time_eval = time.perf_counter() - t

    gated = metrics.get("evaluation_status") == "gated"
    # a gated trial's report has no key for what was never measured (not even a null R-ASR)
    report: dict = {metric: None for metric in REPORTED_METRICS if not gated or metric in ("ca", "asr")}
    report.update(metrics)
    report.update({
        **stage.metrics,
        "attack": cfg.attack.name, "defense": defense_name, "dataset": dataset.name,
        "model": cfg.model.name if cfg.clip is None else f"clip:{cfg.clip.arch}",
        "seed": cfg.seed, "device": str(device), "smoke_test": smoke_test,
        "n_train": len(dataset.train), "n_test": len(dataset.test), "n_clean": len(stage.clean_index),
        "n_poisoned": len(stage.poison_index), "n_cover": len(stage.attack.cover_index), "n_poisoned_test": len(stage.poisoned_test),
        "cache_hit": stage.cache_hit, "cache_key": stage.cache_key, "cache_dir": str(stage.cache_dir),
        "data_fingerprint": stage.data_fingerprint, "code_version": code_version(),
        "time_data_s": time_data, "time_attack_s": stage.seconds,
        "time_defense_s": defended.seconds if defended is not None else 0.0, "time_eval_s": time_eval,
    })
    if defended is not None:
        report["defense_data_use"] = getattr(cfg.defense, "data_use", None)
        report.update({f"defense_{k}": v for k, v in defended.findings.items()})
    if device.type == "cuda":  # what trials packed on one GPU (resources.gpus < 1) must fit in together
        report["cuda_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    report["wall_time_s"] = time.perf_counter() - start
    report["history"] = {"attack": stage.history, "defense": defended.history if defended is not None else []}

    if out_dir is not None:
        meta = {**stage.meta, "metrics": stage.metrics}
        save_checkpoint(out_dir, stage.model, meta, "backdoored")
        save_tensors(out_dir / "attack.safetensors", stage.attack.state_tensors())
        if defended is not None:
            save_checkpoint(out_dir, defended.model,
                            {**_model_meta(cfg, dataset, defended.model), "stage": "defense",
                             "defense": to_dict(cfg.defense), "backdoored_cache_key": stage.cache_key,
                             "data_fingerprint": report["data_fingerprint"], "code_version": report["code_version"],
                             "metrics": {k: report[k] for k in REPORTED_METRICS if k in report}, "history": defended.history},
                            "purified")
        write_json(out_dir / "results.json", report)
        log(f"[trial] wrote {out_dir}/results.json")
    log("[trial] " + ", ".join(f"{k} {report[k]:.4f}" for k in REPORTED_METRICS if isinstance(report.get(k), float))
        + (" (gated: RA, QRA and BEC not run)" if gated else "")
        + f" ({report['wall_time_s']:.1f}s, cache {'hit' if stage.cache_hit else 'miss'})")
    return report
