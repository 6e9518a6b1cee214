"""The configuration of one trial: data -> attack -> defense -> evaluation.

``bibau run`` reads it from YAML (with command-line overrides), a sweep builds one per trial,
and the resolved form is saved beside every result.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .attacks.base import AttackConfig, check_coupling
from .config import Config, ConfigError, param, to_dict
from .contrastive.config import ContrastiveConfig
from .data.base import DataConfig
from .defenses.base import DefenseConfig
from .models.base import ModelConfig
from .registry import ATTACKS, DEFENSES, EVALUATIONS


def available_cpus() -> int:
    """$OMP_NUM_THREADS when set (torch's own default follows it too), else the cores this
    process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class TrainConfig(Config):
    """Training of the (backdoored or clean reference) model."""

    epochs: int = param(15, "passes over the training set", low=1)
    batch_size: int = param(128, "images per SGD step", low=1)
    lr: float = param(0.05, "peak learning rate of SGD", low=0.0, low_open=True)
    momentum: float = param(0.9, "SGD momentum", low=0.0, high=1.0)
    weight_decay: float = param(5e-4, "L2 weight decay", low=0.0)
    nesterov: bool = param(False, "Nesterov momentum")
    schedule: str = param("cosine", "learning-rate schedule", choices=("cosine", "step", "constant"))
    milestones: list[float] = param([0.5, 0.75], "step schedule: fractions of training after which lr is multiplied by gamma")
    gamma: float = param(0.1, "step schedule: lr factor at each milestone", low=0.0, high=1.0)
    warmup_epochs: float = param(0.0, "linear warm-up of the lr, in epochs", low=0.0)
    label_smoothing: float = param(0.0, "label smoothing of the cross-entropy", low=0.0, high=1.0)
    crop_padding: int = param(4, "random-crop padding in pixels (0: no crop)", low=0)
    hflip: bool = param(True, "random horizontal flips, where the data set allows them")
    eval_every: int = param(1, "epochs between CA/ASR evaluations on a test subsample (0: only at the end)", low=0)
    eval_size: int = param(1000, "test images used by the per-epoch evaluation", low=1)

    def check(self, path: str) -> None:
        if any(not 0.0 < m < 1.0 for m in self.milestones):
            raise ConfigError(f"{path}.milestones: {self.milestones} must lie in (0, 1) (fractions of training)")


@dataclass
class GateConfig(Config):
    """Cheap-first evaluation: CA and ASR first; a model that fails one of these rules is not
    retuned, attacked or probed (RA, QRA, BEC are skipped and its report says ``gated``)."""

    ca_min: float | None = param(None, "lowest clean accuracy worth the full evaluation (fraction in [0, 1]); None: no floor",
                                 low=0.0, high=1.0)
    ca_drop_max: float | None = param(None, "largest drop of clean accuracy from the backdoored model worth the full "
                                      "evaluation (fraction: 0.2 = 20 points); None: no limit", low=0.0, high=1.0)
    # RA fine-tunes the model on poisoned samples, so R-ASR is almost never below the ASR it starts
    # from: a model whose backdoor is still there after the defense misses every R-ASR rule anyway,
    # and its RA and QRA (most of a CPU trial) would only confirm it
    asr_max: float | None = param(None, "highest attack success rate after the defense worth the full evaluation "
                                  "(fraction in [0, 1]): a model whose backdoor is still in place skips RA, QRA "
                                  "and BEC; None: no limit. Not used during the defense, nor on a sweep's baselines (their R-ASR is the "
                                  "comparison)", low=0.0, high=1.0)
    # the gate can also stop the defense itself: a trial whose model already sits clearly below the
    # floor half-way through its defense rarely climbs back, and the rest of its defense is wasted
    during_defense: bool = param(False, "also check the gate after each epoch of the defense (BI-BAU, FT, IBU) and "
                                 "stop the defense of a model already below it; the trial is then gated with the "
                                 "CA and ASR of the model as it was when stopped")
    # CA climbs back as the learning rate anneals: in a 2-epoch BI-BAU(U) study (12 trials) CA rose by
    # up to 0.146 in the last epoch, and trials that ended above the floor sat 0.005 above ones that
    # did not after the first (docs/benchmarks.md, "Sweep efficiency"); hence a late check, a wide slack
    check_from: float = param(0.5, "during_defense: first epoch checked, as a fraction of the defense's epochs "
                              "(0.5 of 20: from epoch 10; the last epoch is left to the final gate)", low=0.0, high=1.0)
    slack: float = param(0.15, "during_defense: how far below the gate (in CA, fraction) a model must be to stop its "
                         "defense: room for the CA it regains while the learning rate anneals, and for the "
                         "subsample's noise", low=0.0, high=1.0)
    eval_size: int = param(1000, "during_defense: clean test images of each check (a fixed seeded subsample)", low=1)

    def check(self, path: str) -> None:
        if self.ca_min is None and self.ca_drop_max is None and self.asr_max is None:
            raise ConfigError(f"{path}: a gate needs ca_min, ca_drop_max or asr_max (any of them); "
                              "leave the gate out (null) for no gate")

    def first_checked_epoch(self, epochs: int) -> int:
        """The first defense epoch (1-based) ``during_defense`` checks; at least 1."""
        return max(1, math.ceil(self.check_from * epochs - 1e-9))

    def margin(self, ca: float, backdoored_ca: float | None, asr: float | None = None) -> tuple[float, str]:
        """How far ``ca`` (and ``asr``, when given) is beyond the gate (> 0: it fails; <= 0: it
        passes, by that much) and why."""
        worst, reasons = float("-inf"), []
        if self.asr_max is not None and asr is not None:
            m = asr - self.asr_max
            worst = max(worst, m)
            if m > 0:
                reasons.append(f"ASR {asr:.4f} > asr_max {self.asr_max:g}")
        if self.ca_min is not None:
            m = self.ca_min - ca
            worst = max(worst, m)
            if m > 0:
                reasons.append(f"CA {ca:.4f} < ca_min {self.ca_min:g}")
        if self.ca_drop_max is not None and backdoored_ca is not None:
            drop = backdoored_ca - ca
            m = drop - self.ca_drop_max
            worst = max(worst, m)
            if m > 0:
                reasons.append(f"CA drop {drop:.4f} (from {backdoored_ca:.4f} to {ca:.4f}) > ca_drop_max {self.ca_drop_max:g}")
        return worst, "; ".join(reasons)


@dataclass
class EvalConfig(Config):
    """The evaluation protocol of METHOD.md: CA, ASR, RA (R-ASR), QRA (Q-ASR), BEC."""

    metrics: list[str] = param(["ca", "asr", "ra", "qra", "bec"], "evaluations to run, by registered name", registry=EVALUATIONS)
    ra_poison_count: int | None = param(None, "RA: poisoned samples among the benign ones; None: the attack's default (5; 1 Blended; 2 Refool/SIG/Narcissus/Adaptive)", low=0)
    ra_size: int = param(1000, "RA: training images in total, poisoned ones included", low=1)
    ra_epochs: int = param(5, "RA: fine-tuning epochs", low=1)
    ra_lr: float = param(0.01, "RA: SGD learning rate", low=0.0, low_open=True)
    ra_batch_size: int = param(128, "RA: batch size", low=1)
    ra_on_clean: bool = param(True, "RA: also retune the clean reference model, for comparison")
    qra_epochs: int = param(50, "QRA: generator training epochs", low=1)
    qra_lr: float = param(0.1, "QRA: generator SGD learning rate", low=0.0, low_open=True)
    qra_budget: float = param(16 / 255, "QRA: L-inf bound of the perturbation, in [0, 1] pixel units", low=0.0, high=1.0)
    qra_clean_size: int = param(500, "QRA: clean training images", low=1)
    qra_poison_size: int = param(500, "QRA: poisoned training images", low=1)
    qra_kl_weight: float = param(0.2, "QRA: weight of the KL term to the retuned model", low=0.0)
    qra_hidden: int = param(1024, "QRA: width of the generator's hidden layers", low=1)
    qra_batch_size: int = param(128, "QRA: generator training batch size", low=1)
    bec_layers: int = param(10, "BEC: last convolutional layers used", low=1)
    bec_top_fraction: float = param(0.1, "BEC: share of channels kept by trigger-activated change", low=0.0, high=1.0, low_open=True)
    bec_samples: int = param(500, "BEC: poisoned test images", low=2)
    bec_k: float = param(10.0, "BEC: sigmoid slope of the reported value", low=0.0)
    bec_c: float = param(0.5, "BEC: sigmoid centre of the reported value")
    seed: int = param(42, "seed of the evaluation's sampling and fine-tuning", low=0)
    gate: GateConfig | None = param(None, "cheap-first gate: RA, QRA and BEC run only for a model whose CA passes it; "
                                    "None: every model is evaluated fully (a sweep spec's gate sets it for its trials)")


@dataclass
class RunConfig(Config):
    """One trial. Missing sections take their defaults; ``defense: null`` evaluates the attack alone."""

    seed: int = param(0, "seed of training, poisoning and defense", low=0)
    defense_seed: int | None = param(None, "seed of the defense alone (a seed replicate re-runs a defense on the same "
                                     "attacked model with another); None: seed", low=0)
    device: str = param("auto", "'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    data: DataConfig = param(factory=DataConfig, help="data set and splits")
    model: ModelConfig = param(factory=ModelConfig, help="architecture")
    train: TrainConfig = param(factory=TrainConfig, help="training of the attacked and the clean reference model")
    attack: AttackConfig = param(factory=AttackConfig, help="the backdoor attack ('clean': none)", registry=ATTACKS)
    defense: DefenseConfig | None = param(None, "the defense; null: none", registry=DEFENSES)
    evaluation: EvalConfig = param(factory=EvalConfig, help="evaluation protocol")
    clip: ContrastiveConfig | None = param(None, "the contrastive setting: a CLIP trained on image-caption pairs, "
                                           "attacked and purified as such, evaluated zero-shot on data's test split; "
                                           "null: the classifier setting")
    cache_dir: str | None = param(None, "cache of trained attack-stage models, keyed by content hash; None: ~/.cache/bibau/models")
    threads: int | None = param(None, "CPU threads torch uses in this trial (results on the CPU depend on it); "
                                "None: $OMP_NUM_THREADS, else the cores this process may use; a number once resolved", low=1)

    def resolve(self) -> None:
        if self.clip is not None and self.evaluation.metrics == EvalConfig().metrics:
            # BEC probes convolutional layers a CLIP's ViT has not; QRA stays one setting away
            self.evaluation.metrics = list(CONTRASTIVE_METRICS)
        if self.threads is None:  # a number in the resolved config, so a re-run uses the same count
            self.threads = available_cpus()
        # A defense fine-tunes a model trained with train's augmentation: cropping the clean split when
        # the model never saw crops cost BI-BAU(U) 3.4 more CA points on CIFAR-10 (docs/benchmarks.md).
        for name in ("crop_padding", "hflip"):
            if self.defense is not None and hasattr(self.defense, name) and getattr(self.defense, name) is None:
                setattr(self.defense, name, getattr(self.train, name))

    def check(self, path: str) -> None:
        check_setting(self, path)
        if self.defense is not None and hasattr(self.defense, "check_model") and self.clip is None:
            self.defense.check_model(self.model, f"{path + '.' if path else ''}model")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"{path + '.' if path else ''}device: {self.device!r} is not allowed; allowed: auto, cpu, cuda, cuda:N")
        # an attack that cannot serve the data set's image size fails here, before the data is loaded
        shape = self.data.image_shape()
        if shape is not None:
            self.attack.check_image(shape, f"{path}.attack" if path else "attack")
        classes = self.data.class_count()
        if classes is not None and self.attack.target >= classes:  # else the attack stage refuses it, after minutes
            raise ConfigError(f"{path + '.' if path else ''}attack.target: {self.attack.target} is not a class of "
                              f"{self.data.name} ({classes} classes); allowed: 0..{classes - 1}")
        check_poison_rate(self, path)


def check_poison_rate(self: RunConfig, path: str) -> None:
    """A dirty-label attack that relabels every training image it holds leaves no clean image of any
    class to learn the task from (the model it trains has chance-level CA): refused. The per-class
    case, known only with the labels, is ``attacks.base.check_clean_left``'s."""
    attack = ATTACKS.get(self.attack.name) if self.attack.name in ATTACKS else None
    rate = getattr(self.attack, "poison_rate", None)
    if attack is None or attack.clean_label or rate is None or rate < 1.0:
        return
    if not attack.build_time and not attack.poisons_on_the_fly():
        return  # poisons nothing ('clean')
    raise ConfigError(f"{path + '.' if path else ''}attack.poison_rate: {rate} relabels every training image to the "
                      f"target {self.attack.target}: no clean image of any class is left to learn the task from; "
                      "allowed: below 1")


CONTRASTIVE_METRICS = ("ca", "asr", "ra")
# train fields the contrastive setting does not read (its optimiser is AdamW with clip.lr, clip.weight_decay)
CONTRASTIVE_UNUSED_TRAIN = ("lr", "momentum", "weight_decay", "nesterov", "milestones", "gamma", "label_smoothing")


def check_setting(self: RunConfig, path: str) -> None:
    """The attack, the defense and the evaluations must serve the run's setting (classifier, or
    contrastive with a ``clip`` section); sections the setting does not read must stay unset."""
    def where(key: str) -> str:
        return f"{path}.{key}" if path else key

    contrastive = self.clip is not None
    setting = "contrastive setting (a clip section)" if contrastive else "classifier setting (no clip section)"
    if self.defense is not None and self.defense.name in DEFENSES:
        serves = lambda n: bool(getattr(DEFENSES.get(n), "contrastive", False)) == contrastive  # noqa: E731
        if not serves(self.defense.name):
            raise ConfigError(f"{where('defense.name')}: {self.defense.name!r} does not serve the {setting}; allowed: "
                              f"{', '.join(n for n in DEFENSES if serves(n))}")
    if self.attack.name in ATTACKS:
        check_coupling(ATTACKS.get(self.attack.name), self.attack, where("attack."), contrastive)
    if self.attack.name in ATTACKS and not ATTACKS.get(self.attack.name).serves(contrastive):
        raise ConfigError(f"{where('attack.name')}: {self.attack.name!r} does not serve the {setting}; allowed: "
                          f"{', '.join(n for n in ATTACKS if ATTACKS.get(n).serves(contrastive))}")
    if not contrastive:
        return
    if self.attack.external_model is not None:
        raise ConfigError(f"{where('attack.external_model')}: {self.attack.external_model!r}; a suspicious model from a "
                          "file serves the classifier setting only (no clip section)")
    if to_dict(self.model) != to_dict(ModelConfig()):
        raise ConfigError(f"{where('model')}: {to_dict(self.model)} is not used in the contrastive setting (the CLIP is "
                          "clip.arch and clip.weights); remove the model section")
    default = TrainConfig()
    for key in CONTRASTIVE_UNUSED_TRAIN:
        if getattr(self.train, key) != getattr(default, key):
            raise ConfigError(f"{where('train.' + key)}: {getattr(self.train, key)!r} is not used in the contrastive "
                              "setting (AdamW with clip.lr and clip.weight_decay); remove it")
    if "bec" in self.evaluation.metrics:
        raise ConfigError(f"{where('evaluation.metrics')}: 'bec' probes convolutional layers and is not defined for a "
                          f"CLIP here; allowed: {', '.join(m for m in EVALUATIONS if m != 'bec')}")

