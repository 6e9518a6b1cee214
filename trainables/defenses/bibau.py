"""BI-BAU (METHOD.md): blind-inversion backdoor adversarial unlearning, as alternating
E-steps (PGD crafts x' on which f_bd fires while f_θ keeps x's meaning, ``pgd.py``) and
M-steps (SGD on CE(f_θ(x), y) + CE(f_θ(x'), y) + λ1·L_EWC + λ2·L_invEWC).

Registered as ``bibau_u`` (untargeted: L_trig = -CE(f_bd(x'), y), u from f_bd's prediction on
x') and ``bibau_t`` (targeted: needs the attack target). ``preset`` runs the ablations of the
paper's Table 6 with the same config.

Per epoch: F^C (Fisher of f_θ on the clean split) and θ^t are taken at the epoch's start;
F^U (Fisher of f_bd on the previous epoch's x', labelled by f_bd) is off in the first epoch.
Models are in eval mode while crafting (``pgd.py``) and f_θ is in train mode for the M-step,
whose clean and crafted halves go through one forward (BatchNorm sees both in its batch
statistics, as when the training set mixes them).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

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
from .losses import ewc_penalty, inverse_ewc, kd_loss
from .pgd import EStep

# Which weights each ablation of Table 6 switches off. Constraint set A (clean preservation):
# L_KD (α), L_EWC (λ1) and the M-step distillation (mstep_kd: not in METHOD.md, on by default since the
# CPU-scale settings search in docs/benchmarks.md); set B (backdoor removal): L_prior (β) and L_invEWC (λ2).
PRESETS: dict[str, tuple[str, ...]] = {
    "full": (),
    "base_at": ("alpha", "beta", "lambda1", "lambda2", "mstep_kd"),
    "base_at_a": ("beta", "lambda2"),
    "base_at_b": ("alpha", "lambda1", "mstep_kd"),
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
    mstep_kd: float = param(10.0, "M-step weight of T²·KL(σ(f_bd(x)/T) ‖ σ(f_θ(x)/T)) on the clean batch, T = "
                            "kd_temperature. Not in METHOD: a choice of this implementation that keeps f_bd's clean "
                            "behaviour (CIFAR-10 at CPU scale: CA 52% at 0, 66% at 4, 70% at 10, R-ASR 5-8% throughout; "
                            "docs/benchmarks.md); 0 gives METHOD's M-step", low=0.0)
    inv_ewc_clip: float = param(10.0, "clip C of the inverse EWC min(1/(Σ F^U Δ²), C)", low=0.0, low_open=True)
    pgd_eps: float = param(25 / 255, "L∞ bound ε of the perturbation, in [0, 1] pixel units", low=0.0, high=1.0)
    pgd_step: float = param(2 / 255, "PGD step size, in [0, 1] pixel units", low=0.0, low_open=True)
    pgd_steps: int = param(20, "PGD steps per batch", low=1)
    pgd_random_start: bool = param(True, "start PGD uniformly in [-ε, ε]")
    fisher_norm: str = param("max", "Fisher normalisation over all parameters: max (entries in [0, 1]; METHOD) or mean "
                             "(diverged at λ1 = 1 in METHOD's run)", choices=("max", "mean"))
    fisher_estimator: str = param("batch", "batch: squared mini-batch gradients averaged over batches; "
                                  "sample: mean squared per-sample gradients (torch.func, slower)", choices=("batch", "sample"))
    fisher_batch_size: int = param(64, "images per Fisher gradient (batch estimator) or per vmap chunk (sample)", low=1)
    fisher_samples: int | None = param(None, "images each Fisher is estimated on (clean split; previous epoch's x'); None: all", low=1)

    def weights(self) -> dict[str, float]:
        """α, β, λ1, λ2 after the preset has switched its terms off."""
        w = {"alpha": self.alpha, "beta": self.beta, "lambda1": self.lambda1, "lambda2": self.lambda2,
             "mstep_kd": self.mstep_kd}
        return {k: (0.0 if k in PRESETS[self.preset] else v) for k, v in w.items()}


class BiBau(Defense):
    Config = BiBauConfig
    targeted: bool = False

    def estep(self, target: int | None) -> EStep:
        cfg, w = self.cfg, self.cfg.weights()
        return EStep(eps=cfg.pgd_eps, step=cfg.pgd_step, steps=cfg.pgd_steps, random_start=cfg.pgd_random_start,
                     target=target if self.targeted else None, alpha=w["alpha"], beta=w["beta"], theta=cfg.theta,
                     temperature=cfg.kd_temperature, gamma=cfg.kd_gamma, keep_teacher=w["mstep_kd"] > 0)

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
        log(f"{self.name}: {len(clean)} clean images, {cfg.epochs} epochs, preset {cfg.preset}: "
            + ", ".join(f"{k}={v:g}" for k, v in w.items()))

        history: list[dict] = []
        previous_adv: torch.Tensor | None = None
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            fisher_c = fisher_u = anchor = None
            if w["lambda1"] > 0:
                anchor = {n: p.detach().clone() for n, p in f.named_parameters()}
                fisher_c = self._fisher(f, clean.x[fisher_index], clean.y[fisher_index], device)
            if w["lambda2"] > 0 and previous_adv is not None:
                fisher_u = self._fisher(f_bd, previous_adv, None, device)
            fisher_seconds = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]

            sums: dict[str, torch.Tensor] = {}
            seen, kept = 0, []
            crop, flip = cfg.augmentation(ctx.hflip)
            for x, y in batches(clean, cfg.batch_size, device=device, shuffle=True, generator=gen,
                                crop_padding=crop, hflip=flip):
                x_adv, inner = estep.craft(f_bd, f, x, y, device, gen)
                teacher = inner.pop("teacher", None)  # f_bd(x), computed once per batch for both steps
                if w["lambda2"] > 0 and seen < n_fisher:
                    kept.append(x_adv[: n_fisher - seen])
                loss, outer = self._mstep(f, x, x_adv, y, anchor, fisher_c, theta_bd, fisher_u, w, device, teacher)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                for k, v in {**inner, **outer}.items():  # summed on the device: one sync per epoch
                    sums[k] = sums.get(k, 0.0) + v.float() * len(y)
                seen += len(y)
            if kept:
                previous_adv = torch.cat(kept)
            row = {"epoch": epoch, "lr": lr, **{k: v.item() / seen for k, v in sums.items()},
                   "fisher_seconds": fisher_seconds, "seconds": time.perf_counter() - t0}
            if "l_angle" in row:
                row["l_prior"] = row["l_angle"] + row["l_align"]
            history.append(row)
            log(f"{self.name} epoch {epoch}/{cfg.epochs}: " + " ".join(
                f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"))
            if not math.isfinite(row["loss_out"]):
                raise FloatingPointError(
                    f"{self.name} diverged: L_out of epoch {epoch}/{cfg.epochs} is {row['loss_out']} (lr {lr:.4g}, "
                    f"λ1 {w['lambda1']:g}, fisher_norm {cfg.fisher_norm}); lower defense.lr or defense.lambda1")
        f.eval()
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started)

    def _fisher(self, model, x, labels, device) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        return diagonal_fisher(model, x, labels, device, batch_size=cfg.fisher_batch_size,
                               estimator=cfg.fisher_estimator, normalize=cfg.fisher_norm)

    def _mstep(self, f, x, x_adv, y, anchor, fisher_c, theta_bd, fisher_u, w, device, teacher=None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_out (to differentiate) and its terms (detached)."""
        train_mode(f, self.cfg)
        b = len(y)
        with autocast(device):
            logits = f(prepare_batch(torch.cat([x, x_adv]), device)).float()
        terms = {"ce_clean": F.cross_entropy(logits[:b], y), "ce_adv": F.cross_entropy(logits[b:], y)}
        loss = terms["ce_clean"] + terms["ce_adv"]
        if teacher is not None:
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


@DEFENSES.register("bibau_u")
class BiBauUntargeted(BiBau):
    """BI-BAU(U): the target class is unknown."""

    targeted = False


@DEFENSES.register("bibau_t")
class BiBauTargeted(BiBau):
    """BI-BAU(T): assumes the attack target is known (DefenseContext.target)."""

    targeted = True
    needs_target = True
