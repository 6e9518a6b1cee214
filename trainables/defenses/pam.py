"""PAM, path-aware minimization (Min et al., NeurIPS'24): defenses.md A11, the reference's
``defense.sh`` defaults.

BTI-DBF's trigger inversion (``btidbf.py``: generator pre-training, benign-feature decoupling,
inversion, target detection; here 3 rounds and ``feat_bound`` 3 as in Min et al.'s script) with its
unlearning replaced: in each batch int(0.2·B) + 1 images become G(x) with their true labels, the loss
is CE only (no feature term), and each step is the path-aware step (``triggers.unlearn_with_triggers``
with ``path_anchor``): with d = θ_bd - θ over the parameters, the gradient is taken at θ + ρ·d/||d||,
a fixed distance toward the backdoored model, then applied at θ by SGD (lr 0.01, momentum 0.1, no
weight decay). The first step (d = 0) is plain SGD. ρ = 0.5; larger ρ moves the model further from
θ_bd at a cost of clean accuracy.

Left open by the reference, decided here: the SGD momentum buffer restarts each round (the
reference keeps one optimiser over the rounds; momentum 0.1 forgets within a few steps), and the
schedule is constant, as the reference's. Data: the clean split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, param
from ..data import ImageSet
from ..models.base import Classifier
from ..registry import DEFENSES
from .base import DefenseContext
from .btidbf import BtiDbfConfig, BtiDbfUnlearning
from .triggers import unlearn_with_triggers
from .unet import UNet


@dataclass
class PamConfig(BtiDbfConfig):
    epochs: int = param(30, "path-aware unlearning epochs per round (ul_round)", low=1)
    lr: float = param(0.01, "learning rate of the unlearning SGD", low=0.0, low_open=True)
    optimizer: str = param("sgd", "optimiser of the unlearning: sgd (the reference) or adam", choices=("sgd", "adam"))
    momentum: float = param(0.1, "SGD momentum (the reference's 0.1)", low=0.0, high=1.0)
    weight_decay: float = param(0.0, "L2 weight decay of the unlearning", low=0.0)
    rounds: int = param(3, "rounds of decoupling, inversion and unlearning (nround of Min et al.'s script)", low=1)
    feat_bound: float = param(3.0, "benign-feature MSE above which a batch only pulls G(x) back to x (Min et al.: 3)",
                              low=0.0, low_open=True)
    rho: float = param(0.5, "ρ: distance of the gradient's point from θ toward θ_bd, in parameter-space L2 units",
                       low=0.0)

    def check(self, path: str) -> None:
        super().check(path)
        if self.feature_weight != 1.0:  # inherited from BTI-DBF(U), unused here: a value would mislead
            raise ConfigError(f"{path + '.' if path else ''}feature_weight: {self.feature_weight!r}; PAM's "
                              "unlearning is CE only (the feature term is BTI-DBF(U)'s: defense.name btidbf_u)")


@DEFENSES.register("pam")
class PathAwareMinimization(BtiDbfUnlearning):
    """PAM (defenses.md A11): BTI-DBF's inverted trigger unlearned with path-aware steps toward θ_bd."""

    Config = PamConfig
    data_use = "clean_split"

    def _unlearn(self, model: Classifier, f: Classifier, clean: ImageSet, g: UNet, cfg: PamConfig,
                 ctx: DefenseContext, gen: torch.Generator, prefix: str) -> list[dict]:
        anchor = {n: p.detach().to(ctx.device) for n, p in model.named_parameters()}
        return unlearn_with_triggers(f, clean, lambda x: g(x), cfg, ctx, gen, self.name, plus_one=True,
                                     feature_weight=0.0, log_prefix=prefix, path_anchor=anchor, rho=cfg.rho)
