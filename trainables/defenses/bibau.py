"""BI-BAU (METHOD.md): blind-inversion backdoor adversarial unlearning, as alternating
E-steps (PGD crafts x' on which f_bd fires while f_θ keeps x's meaning, ``pgd.py``) and
M-steps (SGD on CE(f_θ(x), y) + CE(f_θ(x'), y) + λ1·L_EWC + λ2·L_invEWC).

Registered as ``bibau_u`` (untargeted: L_trig = -CE(f_bd(x'), y), u from f_bd's prediction on
x') and ``bibau_t`` (targeted: needs the attack target). With no settings both run METHOD.md as
written (its defaults, the per-sample empirical Fisher). ``preset`` runs the ablations of the
paper's Table 6 (METHOD's terms only) with the same config.

``bibau_u_kd`` and ``bibau_t_kd`` are this project's extension, not the paper's method: the M-step
also distils f_bd's clean-batch outputs into f_θ (``mstep_kd`` · T²·KL(σ(f_bd(x)/T) ‖ σ(f_θ(x)/T))).
At CPU scale on CIFAR-10 it kept CA 70% instead of 52% at the same R-ASR (docs/benchmarks.md,
"BI-BAU settings search"); the tables show it beside the paper's method, never instead of it.

Per epoch: F^C (Fisher of f_θ on the clean split) and θ^t are taken at the epoch's start;
F^U (Fisher of f_bd on the previous epoch's x', labelled by f_bd) is off in the first epoch.
Models are in eval mode while crafting (``pgd.py``) and f_θ is in train mode for the M-step,
whose clean and crafted halves go through one forward (BatchNorm sees both in its batch
statistics, as when the training set mixes them); ``bn_stats`` gives the other readings (one
forward per half, or BatchNorm frozen at the suspicious model's statistics).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import (Defense, DefenseContext, DefenseResult, SGDDefenseConfig, frozen_copy, sgd, train_mode,
                   trainable_copy)
from .fisher import diagonal_fisher
from .losses import ewc_penalty, inverse_ewc, kd_loss, trigger_loss
from .pgd import EStep

# Which of METHOD's weights each ablation of Table 6 switches off: constraint set A (clean
# preservation) is L_KD (α) and L_EWC (λ1), set B (backdoor removal) L_prior (β) and L_invEWC (λ2).
# The extension's distillation is no Table 6 term: a preset never touches it.
PRESETS: dict[str, tuple[str, ...]] = {
    "full": (),
    "base_at": ("alpha", "beta", "lambda1", "lambda2"),
    "base_at_a": ("beta", "lambda2"),
    "base_at_b": ("alpha", "lambda1"),
}
PRESET_NAMES = {"full": "Base AT + A + B (BI-BAU)", "base_at": "Base AT", "base_at_a": "Base AT + A",
                "base_at_b": "Base AT + B"}
# each weight's term, as METHOD.md writes it (for `bibau config` and the run log)
TERMS = {
    "alpha": ("E", "α·L_KD", "(1-γ)·CE(f_θ(x'), y) + γ·T²·KL(σ(f_bd(x)/T) ‖ σ(f_θ(x')/T))"),
    "beta": ("E", "β·L_prior", "(cos(Δh, h_θ(x)) - θ)² - cos(Δh, u)"),
    "lambda1": ("M", "λ1·L_EWC", "Σ F^C (θ - θ^t)², F^C on D_c, θ^t at the epoch's start"),
    "lambda2": ("M", "λ2·L_invEWC", "min(1 / (Σ F^U (θ - θ_bd)²), C), F^U on the previous epoch's x'"),
    "mstep_kd": ("M", "mstep_kd·L_KD(clean)", "T²·KL(σ(f_bd(x)/T) ‖ σ(f_θ(x)/T)): this project's extension, "
                 "not in METHOD"),
}


@dataclass
class BiBauConfig(SGDDefenseConfig):
    epochs: int = param(20, "unlearning epochs over the defender's clean split (one E-step and M-step per batch)", low=1)
    preset: str = param("full", "ablation of Table 6: full (Base AT + A + B), base_at (α=β=λ1=λ2=0), "
                        "base_at_a (keeps L_KD, L_EWC), base_at_b (keeps L_prior, L_invEWC)", choices=tuple(PRESETS))
    alpha: float = param(1.0, "E-step weight α of the distillation likelihood L_KD", low=0.0)
    beta: float = param(1.0, "E-step weight β of the prior L_prior (angle + alignment)", low=0.0)
    theta: float = param(0.5, "prior's target cosine θ between the feature perturbation Δh and h_θ(x) "
                         "(0: orthogonal, free to take backdoor directions; 1: along the clean features)", low=0.0, high=1.0)
    kd_temperature: float = param(2.0, "L_KD temperature T", low=0.0, low_open=True)
    kd_gamma: float = param(0.5, "L_KD share γ of the KL (soft) term; 1-γ goes to the CE (hard) term", low=0.0, high=1.0)
    lambda1: float = param(1.0, "M-step weight λ1 of L_EWC (clean Fisher, anchor θ at the epoch's start)", low=0.0)
    lambda2: float = param(0.1, "M-step weight λ2 of the clipped inverse EWC (unlearning Fisher, anchor θ_bd)", low=0.0)
    inv_ewc_clip: float = param(10.0, "clip C of the inverse EWC min(1/(Σ F^U Δ²), C)", low=0.0, low_open=True)
    pgd_eps: float = param(25 / 255, "L∞ bound ε of the perturbation, in [0, 1] pixel units", low=0.0, high=1.0)
    pgd_step: float = param(2 / 255, "PGD step size, in [0, 1] pixel units", low=0.0, low_open=True)
    pgd_steps: int = param(20, "PGD steps per batch", low=1)
    pgd_random_start: bool = param(True, "start PGD uniformly in [-ε, ε]")
    fisher_norm: str = param("max", "Fisher normalisation over all parameters: max (entries in [0, 1]; METHOD) or mean "
                             "(diverged at λ1 = 1 in METHOD's run)", choices=("max", "mean"))
    fisher_estimator: str = param("sample", "sample: METHOD's empirical Fisher, the mean of squared per-sample "
                                  "gradients (from layer hooks; torch.func where a layer needs it); batch: squared "
                                  "mini-batch gradients averaged over batches (cheaper, a different weighting of the "
                                  "parameters: docs/benchmarks.md, Fisher estimators)", choices=("sample", "batch"))
    fisher_batch_size: int = param(64, "images per Fisher gradient (batch estimator) or per chunk of per-sample gradients (sample: speed and memory only, the same Fisher; with vmap, 256 took 45% off the Fishers' time on an H200)", low=1)
    fisher_samples: int | None = param(None, "images each Fisher is estimated on (clean split; previous epoch's x'); None: all", low=1)
    # METHOD is silent on BatchNorm in the M-step; the three readings adversarial-training papers use,
    # measured side by side in benchmarks/bibau_cost.py (docs/benchmarks.md, "BI-BAU's clean-accuracy cost")
    bn_stats: str = param("train", "BatchNorm in the M-step: train (clean and crafted halves in one forward, batch "
                          "statistics of the mix, running stats updated by it), split (one forward per half, each "
                          "normalised by its own batch statistics, running stats updated by both) or frozen (the "
                          "suspicious model's running statistics, affine weights still learned)",
                          choices=("train", "split", "frozen"))

    key_hints: ClassVar[dict[str, str]] = {
        "mstep_kd": "the M-step distillation is this project's extension: defense.name bibau_u_kd or bibau_t_kd",
        "distill": "the M-step distillation is this project's extension: defense.name bibau_u_kd or bibau_t_kd",
        "targeted_on": "only the targeted variants bibau_t and bibau_t_kd have it",
    }

    def weights(self) -> dict[str, float]:
        """α, β, λ1, λ2 after the preset has switched its terms off."""
        w = {"alpha": self.alpha, "beta": self.beta, "lambda1": self.lambda1, "lambda2": self.lambda2}
        return {k: (0.0 if k in PRESETS[self.preset] else v) for k, v in w.items()}


@dataclass
class BiBauTargetedConfig(BiBauConfig):
    targeted_on: str = param("all", "clean images x' is crafted from: all (METHOD: every image of D_c) or "
                             "non_target (the paper's threat model: D_c without the target class; its images "
                             "still enter the M-step's clean CE)", choices=("all", "non_target"))


@dataclass
class MStepDistillation:
    """The extension's two fields (a mixin: put it first among the bases, so its fields come last)."""

    distill: bool = param(True, "this project's extension on: the M-step adds mstep_kd·T²·KL(σ(f_bd(x)/T) ‖ "
                          "σ(f_θ(x)/T)) on the clean batch (T = kd_temperature); off gives the paper's method, "
                          "so one sweep can search both")
    mstep_kd: float = param(10.0, "weight of the M-step distillation when distill is on (CIFAR-10 at CPU scale: "
                            "CA 52% at 0, 66% at 4, 70% at 10, R-ASR 5-8% throughout; docs/benchmarks.md)",
                            low=0.0, low_open=True)

    def weights(self) -> dict[str, float]:
        return {**super().weights(), "mstep_kd": self.mstep_kd if self.distill else 0.0}  # type: ignore[misc]


@dataclass
class BiBauKDConfig(MStepDistillation, BiBauConfig):
    pass


@dataclass
class BiBauTargetedKDConfig(MStepDistillation, BiBauTargetedConfig):
    pass


def describe_terms(cfg: BiBauConfig, targeted: bool, trig: str | None = None,
                   task: str = "CE(f_θ(x), y) + CE(f_θ(x'), y)") -> list[str]:
    """What the config computes, as METHOD writes it: the terms on, those off, the Fisher, the presets
    (``trig`` and ``task``: the task's own L_trig and M-step loss, BI-BAU-CLIP's contrastive ones)."""
    w = cfg.weights()
    trig = trig or ("CE(f_bd(x'), y_t)" if targeted else "-CE(f_bd(x'), y)")
    on = [k for k, v in w.items() if v > 0]
    estep = " + ".join([f"L_trig = {trig}"] + [f"{TERMS[k][1]} ({k} {w[k]:g})" for k in on if TERMS[k][0] == "E"])
    mstep = " + ".join([task]
                       + [f"{TERMS[k][1]} ({k} {w[k]:g})" for k in on if TERMS[k][0] == "M"])
    lines = [f"preset {cfg.preset}: {PRESET_NAMES[cfg.preset]}",
             f"E-step (PGD, L∞ ε {255 * cfg.pgd_eps:.3g}/255, {cfg.pgd_steps} steps of {255 * cfg.pgd_step:.3g}/255): {estep}",
             f"M-step: {mstep}"]
    lines += [f"  {TERMS[k][1].split('·', 1)[1]} = {TERMS[k][2]}" for k in on]
    if off := [k for k, v in w.items() if v == 0]:
        lines.append("off: " + ", ".join(f"{TERMS[k][1]} ({k})" for k in off))
    fisher = ("per-sample empirical Fisher (METHOD)" if cfg.fisher_estimator == "sample"
              else "mini-batch Fisher (squared batch gradients; not METHOD's per-sample Fisher)")
    if w["lambda1"] > 0 or w["lambda2"] > 0:
        lines.append(f"Fisher: {fisher}, normalised by its {cfg.fisher_norm}")
    if targeted:
        lines.append(f"x' crafted from: {'all of D_c' if getattr(cfg, 'targeted_on', 'all') == 'all' else 'D_c without the target class'}")
    lines.append("method: " + ("this project's extension (M-step distillation), not the paper's method"
                               if w.get("mstep_kd", 0) > 0 else "the paper's (METHOD.md)"))
    lines.append("presets (defense.preset): " + "; ".join(
        f"{p} = {PRESET_NAMES[p]}" + (f" (off: {', '.join(PRESETS[p])})" if PRESETS[p] else "") for p in PRESETS))
    return lines


class BiBau(Defense):
    Config = BiBauConfig
    targeted: bool = False

    def estep(self, target: int | None) -> EStep:
        cfg, w = self.cfg, self.cfg.weights()
        return EStep(eps=cfg.pgd_eps, step=cfg.pgd_step, steps=cfg.pgd_steps, random_start=cfg.pgd_random_start,
                     target=target if self.targeted else None, alpha=w["alpha"], beta=w["beta"], theta=cfg.theta,
                     temperature=cfg.kd_temperature, gamma=cfg.kd_gamma, keep_teacher=w.get("mstep_kd", 0.0) > 0,
                     trigger=self.trigger_loss, kd=self.kd_loss)

    # the task's loss on logits: METHOD's cross-entropy; BI-BAU-CLIP's contrastive loss over captions
    @staticmethod
    def trigger_loss(logits: torch.Tensor, y: torch.Tensor, target: int | None) -> torch.Tensor:
        return trigger_loss(logits, y, target)

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    @staticmethod
    def kd_loss(logits_adv: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float,
                gamma: float) -> torch.Tensor:
        """The E-step's L_KD (METHOD); BI-BAU-CLIP's is relational, over the batch's captions."""
        return kd_loss(logits_adv, teacher, y, temperature, gamma)

    def describe(self) -> list[str]:
        return describe_terms(self.cfg, self.targeted)

    def crafted_from(self, y: torch.Tensor, target: int | None) -> torch.Tensor | None:
        """Mask of the batch's images x' is crafted from; None: all of them."""
        if self.targeted and getattr(self.cfg, "targeted_on", "all") == "non_target":
            return y != target
        return None

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: BiBauConfig = self.cfg
        w, device, log = cfg.weights(), ctx.device, ctx.log
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        self._warn(w, log)
        f_bd = frozen_copy(model, device)
        f = trainable_copy(model, device)
        clean = clean.to(device)
        estep = self.estep(ctx.target)
        optimizer, scheduler = sgd(f, cfg, math.ceil(len(clean) / cfg.batch_size))
        theta_bd = {n: p.detach().clone() for n, p in f_bd.named_parameters()}
        n_fisher = len(clean) if cfg.fisher_samples is None else min(cfg.fisher_samples, len(clean))
        fisher_index = torch.randperm(len(clean), generator=gen)[:n_fisher].sort().values.to(device)
        log(f"{self.name}: {len(clean)} clean images, {cfg.epochs} epochs; " + "; ".join(self.describe()[:3]))

        history: list[dict] = []
        previous_adv: torch.Tensor | None = None
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            fisher_c = fisher_u = anchor = None
            if w["lambda1"] > 0:
                anchor = {n: p.detach().clone() for n, p in f.named_parameters()}
                fisher_c = self._fisher(f, clean.x[fisher_index], clean.y[fisher_index], device)
            if w["lambda2"] > 0 and previous_adv is not None and len(previous_adv):
                fisher_u = self._fisher(f_bd, previous_adv, None, device)
            fisher_seconds = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]

            sums: dict[str, torch.Tensor] = {}
            seen, crafted, kept = 0, 0, []
            crop, flip = cfg.augmentation(ctx.hflip)
            for x, y in batches(clean, cfg.batch_size, device=device, shuffle=True, generator=gen,
                                crop_padding=crop, hflip=flip):
                mask = self.crafted_from(y, ctx.target)
                x_src, y_src = (x, y) if mask is None else (x[mask], y[mask])
                teacher = None
                if len(y_src):
                    x_adv, inner = estep.craft(f_bd, f, x_src, y_src, device, gen)
                    teacher = inner.pop("teacher", None)  # f_bd(x), computed once per batch for both steps
                else:
                    x_adv, inner = x_src, {}
                if mask is not None and w.get("mstep_kd", 0.0) > 0:
                    teacher = self._teacher(f_bd, x, device)  # the distillation sees the whole clean batch
                if w["lambda2"] > 0 and crafted < n_fisher:
                    kept.append(x_adv[: n_fisher - crafted])
                loss, outer = self._mstep(f, x, x_adv, y, anchor, fisher_c, theta_bd, fisher_u, w, device, teacher,
                                          y_adv=y_src)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k, v in outer.items():  # summed on the device: one sync per epoch
                    sums[k] = sums.get(k, 0.0) + v.float() * len(y)
                for k, v in inner.items():  # the E-step's terms average over the images it crafted from
                    sums[k] = sums.get(k, 0.0) + v.float() * len(y_src)
                seen += len(y)
                crafted += len(y_src)
            if kept:
                previous_adv = torch.cat(kept)
            row = {"epoch": epoch, "lr": lr,
                   **{k: v.item() / (seen if k in _OUTER else max(crafted, 1)) for k, v in sums.items()},
                   "crafted": crafted, "fisher_seconds": fisher_seconds, "seconds": time.perf_counter() - t0}
            if "l_angle" in row:
                row["l_prior"] = row["l_angle"] + row["l_align"]
            ctx.record_epoch(self.name, f, row, history, cfg.epochs, loss="loss_out", what="L_out",
                             detail=f", λ1 {w['lambda1']:g}, fisher_norm {cfg.fisher_norm}",
                             hint="lower defense.lr or defense.lambda1")
        f.eval()
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started)

    @staticmethod
    def _teacher(f_bd: Classifier, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        with torch.no_grad(), autocast(device):
            return f_bd(prepare_batch(x, device)).float()

    def _fisher(self, model, x, labels, device) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        return diagonal_fisher(model, x, labels, device, batch_size=cfg.fisher_batch_size,
                               estimator=cfg.fisher_estimator, normalize=cfg.fisher_norm)

    def _mstep(self, f, x, x_adv, y, anchor, fisher_c, theta_bd, fisher_u, w, device, teacher=None, y_adv=None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_out (to differentiate) and its terms (detached). ``y_adv``: the labels of ``x_adv``
        when it was crafted from part of the batch (targeted_on: non_target)."""
        train_mode(f, self.cfg)
        b = len(y)
        y_adv = y if y_adv is None else y_adv
        with autocast(device):
            if self.cfg.bn_stats == "split" and len(x_adv):
                logits = torch.cat([f(prepare_batch(x, device)), f(prepare_batch(x_adv, device))]).float()
            else:
                logits = f(prepare_batch(torch.cat([x, x_adv]), device)).float()
        terms = {"ce_clean": self.task_loss(logits[:b], y)}
        # a batch of target-class images only has no x' (targeted_on: non_target)
        terms["ce_adv"] = self.task_loss(logits[b:], y_adv) if len(y_adv) else logits.new_zeros(())
        loss = terms["ce_clean"] + terms["ce_adv"]
        if teacher is not None and w.get("mstep_kd", 0.0) > 0:
            terms["kd_clean"] = kd_loss(logits[:b], teacher, y, self.cfg.kd_temperature, gamma=1.0)
            loss = loss + w["mstep_kd"] * terms["kd_clean"]
        params = dict(f.named_parameters())
        if fisher_c is not None:
            terms["ewc"] = ewc_penalty(params, anchor, fisher_c)
            loss = loss + w["lambda1"] * terms["ewc"]
        if fisher_u is not None:
            terms["inv_ewc"] = inverse_ewc(params, theta_bd, fisher_u, self.cfg.inv_ewc_clip)
            loss = loss + w["lambda2"] * terms["inv_ewc"]
        terms["loss_out"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def _warn(self, w: dict[str, float], log) -> None:
        cfg = self.cfg
        curvature = 2 * cfg.lr * w["lambda1"]
        if curvature > 1:
            log(f"warning: {self.name}: 2·lr·λ1 = 2·{cfg.lr:g}·{w['lambda1']:g} = {curvature:.3g} > 1: the EWC pull "
                "can make SGD unstable (METHOD: keep it near or below 1; λ1 = 50 at lr 0.01 ran with momentum)")
        if cfg.fisher_norm == "mean" and w["lambda1"] > 0:
            log(f"warning: {self.name}: fisher_norm=mean with λ1 = {w['lambda1']:g}: METHOD's run diverged "
                "(CA 10% after one epoch) at λ1 = 1 with mean-normalised Fishers")


_OUTER = ("ce_clean", "ce_adv", "kd_clean", "ewc", "inv_ewc", "loss_out")  # M-step terms: over the whole batch


@DEFENSES.register("bibau_u")
class BiBauUntargeted(BiBau):
    """BI-BAU(U): the target class is unknown."""

    targeted = False


@DEFENSES.register("bibau_t")
class BiBauTargeted(BiBau):
    """BI-BAU(T): assumes the attack target is known (DefenseContext.target)."""

    Config = BiBauTargetedConfig
    targeted = True
    needs_target = True


@DEFENSES.register("bibau_u_kd")
class BiBauUntargetedKD(BiBauUntargeted):
    """BI-BAU(U) with this project's M-step distillation (an extension, not the paper's method)."""

    Config = BiBauKDConfig


@DEFENSES.register("bibau_t_kd")
class BiBauTargetedKD(BiBauTargeted):
    """BI-BAU(T) with this project's M-step distillation (an extension, not the paper's method)."""

    Config = BiBauTargetedKDConfig
