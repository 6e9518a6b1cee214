"""BatchNorm channels, shared by the pruning defenses (ANP, EP, RNP, CLP; defenses.md A3-A6).

One rule finds every BatchNorm layer of any registered model and the convolution that feeds it:
the most recently registered ``Conv2d`` before it in module order (BackdoorBench's CLP pairing,
A6). In post-activation ResNets and VGG that is the convolution right before the BN; in
PreAct-ResNet a block's ``bn1`` gets the previous block's last convolution, as in the reference.
A channel is pruned by zeroing its BN weight and bias; masks are learned through
:class:`MaskedBatchNorm`, which wraps a layer in place of modifying each architecture.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import ConfigError, to_dict
from ..models.base import ModelConfig, create_model
from .base import DefenseConfig


@dataclass
class BNUnit:
    name: str  # the BN layer's module name
    bn: _BatchNorm
    conv_name: str | None  # the convolution paired with it (None when no convolution precedes it)
    conv: nn.Conv2d | None


def batchnorm_units(model: nn.Module) -> list[BNUnit]:
    """Every BatchNorm layer in module order, each with the last convolution registered before it."""
    units, last = [], (None, None)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            last = (name, m)
        elif isinstance(m, _BatchNorm) and m.affine:
            units.append(BNUnit(name, m, *last))
    return units


def require_batchnorm(model: nn.Module, defense: str) -> list[BNUnit]:
    units = batchnorm_units(model)
    if not units:
        raise ValueError(f"defense {defense!r} prunes BatchNorm channels, but the model "
                         f"({type(model).__name__}) has no affine BatchNorm layer; use a defense that does not prune BN")
    return units


@functools.lru_cache(maxsize=32)
def _has_batchnorm(model_key: tuple) -> bool:
    cfg = ModelConfig(**dict(model_key)).architecture()  # the structure decides; pretrained weights are not read
    return bool(batchnorm_units(create_model(cfg, num_classes=2, generator=torch.Generator().manual_seed(0))))


@dataclass
class BatchNormDefenseConfig(DefenseConfig):
    """Base of the configs of defenses that prune BatchNorm channels: the model must have BN."""

    def check_model(self, model: ModelConfig, path: str) -> None:
        if not _has_batchnorm(tuple(sorted(to_dict(model).items()))):
            raise ConfigError(f"{path}.name: {model.name!r} has no BatchNorm layer, and defense {self.name!r} "
                              "prunes BatchNorm channels; allowed: a model with BatchNorm (resnet18, "
                              "preact_resnet18, vgg19_bn, small_resnet) or a defense that does not prune BN")


def check_threshold(value: float, path: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{path}: {value!r} is out of range; allowed: in [0, 1]")


class MaskedBatchNorm(nn.Module):
    """A BN layer whose channels carry a mask m (init 1) and, for ANP, multiplicative and bias
    noise (δ, ξ): output = (m + δ)·γ·x̂ + (1 + ξ)·β. The wrapped layer's parameters and running
    statistics are the model's own (shared, not copied)."""

    def __init__(self, bn: _BatchNorm):
        super().__init__()
        self.bn = bn
        c = bn.num_features
        self.mask = nn.Parameter(torch.ones(c, device=bn.weight.device))
        self.noise = nn.Parameter(torch.zeros(c, device=bn.weight.device))
        self.noise_bias = nn.Parameter(torch.zeros(c, device=bn.weight.device))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch = bn.training or bn.running_mean is None
        x_hat = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, use_batch, bn.momentum or 0.0, bn.eps)
        scale = self.mask + self.noise if self.perturbed else self.mask
        shift = 1.0 + self.noise_bias if self.perturbed else 1.0
        w = (scale * bn.weight).to(x_hat.dtype).view(1, -1, 1, 1)
        b = (shift * bn.bias).to(x_hat.dtype).view(1, -1, 1, 1)
        return x_hat * w + b


def insert_masks(model: nn.Module) -> dict[str, MaskedBatchNorm]:
    """Wrap every BN layer of ``model`` (in place) in a :class:`MaskedBatchNorm`; returns them by
    the BN layer's name."""
    masked = {}
    for unit in batchnorm_units(model):
        parent_name, _, attr = unit.name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = MaskedBatchNorm(unit.bn)
        setattr(parent, attr, wrapper)
        masked[unit.name] = wrapper
    return masked


def remove_masks(model: nn.Module) -> None:
    """Put the wrapped BN layers back (their parameters were never copied)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, MaskedBatchNorm):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.bn)


@torch.no_grad()
def prune_channels(model: nn.Module, selected: dict[str, torch.Tensor]) -> None:
    """Zero the BN weight and bias of the channels ``selected[name]`` (a bool mask per BN layer)."""
    layers = dict(model.named_modules())
    for name, pick in selected.items():
        bn = layers[name]
        bn.weight[pick.to(bn.weight.device)] = 0.0
        bn.bias[pick.to(bn.bias.device)] = 0.0


def pruning_findings(selected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Channels pruned in all and per layer (``pruned.<layer>``), for the trial's report."""
    total = sum(int(p.sum()) for p in selected.values())
    channels = sum(p.numel() for p in selected.values())
    out: dict[str, float] = {"pruned_channels": float(total), "pruned_fraction": total / max(channels, 1),
                             "pruned_layers": float(sum(bool(p.any()) for p in selected.values()))}
    out.update({f"pruned.{name}": float(p.sum()) for name, p in selected.items()})
    return out


def prune_copy(model: nn.Module, selected: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A copy of ``model`` (the suspicious one, not a scratch model masks were learned on) with
    the ``selected`` channels pruned, in eval mode."""
    from .base import trainable_copy

    pruned = trainable_copy(model, device)
    prune_channels(pruned, selected)
    return pruned.eval()


def select_by_mask(masks: dict[str, MaskedBatchNorm], threshold: float) -> dict[str, torch.Tensor]:
    """Channels whose learned mask is at or below ``threshold`` (ANP's and RNP's pruning rule)."""
    return {name: (m.mask.detach() <= threshold).cpu() for name, m in masks.items()}


def mask_findings(masks: dict[str, MaskedBatchNorm]) -> dict[str, float]:
    values = torch.cat([m.mask.detach().flatten().cpu() for m in masks.values()])
    return {"mask_mean": float(values.mean()), "mask_min": float(values.min())}


def pruned_result(defense: str, model: nn.Module, selected: dict[str, torch.Tensor], ctx, started: float,
                  rule: str, history: list[dict] | None = None, extra: dict[str, float] | None = None):
    """The end of every pruning defense: prune a copy of the suspicious ``model``, log and report
    what was pruned (``rule`` says by what), with ``extra`` findings. Without ``history`` (a
    one-pass defense), the history is one row with the pass's time."""
    from .base import DefenseResult

    findings = {**pruning_findings(selected), **(extra or {})}
    if history is None:
        history = [{"phase": "prune", "epoch": 1, "pruned_channels": findings["pruned_channels"],
                    "seconds": time.perf_counter() - started}]
    ctx.log(f"{defense}: pruned {int(findings['pruned_channels'])} channels in {int(findings['pruned_layers'])} "
            f"layers ({rule})")
    pruned = prune_copy(model, selected, ctx.device)
    return DefenseResult(model=pruned, history=history, seconds=time.perf_counter() - started, findings=findings)
