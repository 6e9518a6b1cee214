"""One trial end to end: data -> attack (cached by content hash) -> defense -> evaluation.

:func:`run_trial` is what ``bibau run`` and every sweep trial call. The three stages are
separate functions so each can be run, timed and tested alone:

* :func:`attack_stage` (``attack_stage.py``) loads the data, splits off the defender's clean
  indices, poisons the rest and trains the attacked model, or loads it from the cache when the
  same data, model, training, attack, seed and training code produced it before;
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

from .attack_stage import (DEFAULT_CACHE, AttackStage, attack_key, attack_stage, cache_root,  # noqa: F401
                           clean_reference)
from .cache import code_version
from .checkpoint import save_checkpoint, save_tensors, write_json
from .config import to_dict
from .data import seeded_generator
from .data.base import ImageSet
from .evaluation.metrics import attack_success_rate, clean_accuracy
from .models.base import Classifier
from .runtime import resolve_device, seed_everything
from .schema import RunConfig
from .tasks import task_for

Log = Callable[[str], None]
REPORTED_METRICS = ("ca", "asr", "r_asr", "q_asr", "bec", "ra_clean_asr")


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
    changes.update(task_for(cfg).smoke())
    return cfg.replace(**changes)  # type: ignore[return-value]


def resolved_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what ``config.yaml`` holds and ``--print-config`` shows)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


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
    seed = cfg.seed if cfg.defense_seed is None else cfg.defense_seed
    if cfg.defense_seed is not None:  # a replicate: the defense's own draws from its own seed
        seed_everything(seed)
    ctx = DefenseContext(device=device, num_classes=stage.dataset.num_classes, seed=seed,
                         hflip=stage.dataset.hflip,
                         target=stage.attack.target if defense.needs_target else None,
                         poisoned=stage.poisoned_samples() if defense.uses_poisoned_data else None,
                         poisoned_batch=poisoned_batch(stage, getattr(cfg.defense, "batch_size", 256), seed)
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
        margin, why = gate.margin(out["ca"], stage.metrics.get("backdoored_ca"), out["asr"])
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
                      cfg=cfg.evaluation, task=task_for(cfg), device=device, log=log)
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
    task = task_for(cfg)
    log(f"[trial] {cfg.data.name} / {task.model_label} / attack {cfg.attack.name} / defense {defense_name or 'none'} "
        f"on {device}{' (smoke test)' if smoke_test else ''}")

    t = time.perf_counter()
    dataset = task.dataset()
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
        "model": task.model_label,
        "seed": cfg.seed, "device": str(device), "smoke_test": smoke_test,
        "n_train": len(dataset.train), "n_test": len(dataset.test), "n_clean": len(stage.clean_index),
        "n_poisoned": len(stage.poison_index), "n_cover": len(stage.attack.cover_index), "n_poisoned_test": len(stage.poisoned_test),
        "cache_hit": stage.cache_hit, "cache_key": stage.cache_key, "cache_dir": str(stage.cache_dir),
        "attack_source": stage.source,  # external: a model trained elsewhere, no attack stage
        "data_fingerprint": stage.data_fingerprint, "code_version": code_version(),
        "time_data_s": time_data, "time_attack_s": stage.seconds,
        # the attack's own parts (mask, encoder, surrogate) when the attacked model was made (cache hits too)
        "time_attack_prepare_s": stage.meta.get("prepare_seconds", 0.0),
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
                            {**task.meta(dataset, defended.model), "stage": "defense",
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
