"""SAU, shared adversarial unlearning (Wei et al., NeurIPS'23): defenses.md A10, the author's
defaults (BackdoorBench ``defense/sau.py``, ``config/defense/sau/config.yaml``).

f_θ (initialised as the suspicious model) and a frozen copy f_ref of it, both in eval mode while
crafting. Per batch:

* **Shared PGD** (``pgd.PGD``: L∞ 0.2, step 0.2, 5 signed steps, start at +0.2 everywhere, in [0, 1]
  pixel units, x + δ not clamped to [0, 1], as the reference) on β1·L_adv + β2·L_share (β1 = 0.01,
  β2 = 1): L_adv = -(Σ CE(f_θ(x+δ), y) over samples f_θ still labels as it labels x + the same for
  f_ref) / (2B); L_share = Σ JS(p_θ(x+δ) ‖ p_ref(x+δ)) over samples that are not yet shared
  adversarial examples (both models moved off their clean prediction, to the same label), / B.
  It exits early once every sample is a shared adversarial example.
* **Unlearning**, one step: λ1·CE(f_θ(x), y) + λ2·CE(f_θ(x+δ), y) + λ3·L_sar (1, 0, 1), where
  L_sar (:func:`sar_loss`) acts on the potential poison samples, those f_ref(x+δ) sends off both y
  and f_ref(x), and lowers f_θ's probability of f_ref's adversarial label there. f_θ's clean and
  perturbed halves go through one forward; BatchNorm stays in eval mode (``bn_stats: frozen``, the
  reference's default; ``train`` is its ``--train_mode``).

Adam lr 1e-4, no weight decay, cosine schedule, 100 epochs (n_rounds), batch 256, no augmentation
(the reference's test transform). Data: the clean split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import (Defense, DefenseContext, DefenseResult, SGDDefenseConfig, epoch_steps, frozen_copy, sgd_or_adam,
                   train_mode, trainable_copy)
from .pgd import PGD, PGD_STARTS, eval_mode, no_weight_grads


@dataclass
class SauConfig(SGDDefenseConfig):
    epochs: int = param(100, "unlearning epochs over the clean split (n_rounds)", low=1)
    batch_size: int = param(256, "clean images per step", low=1)
    optimizer: str = param("adam", "optimiser of the unlearning: adam (the reference) or sgd", choices=("sgd", "adam"))
    lr: float = param(1e-4, "learning rate of the unlearning", low=0.0, low_open=True)
    weight_decay: float = param(0.0, "L2 weight decay", low=0.0)
    crop_padding: int | None = param(0, "random-crop padding of the clean split (the reference: none); None: as "
                                     "the model was trained", low=0)
    hflip: bool | None = param(False, "random flips of the clean split (the reference: none); None: as the model "
                               "was trained")
    bn_stats: str = param("frozen", "BatchNorm while unlearning: frozen (eval mode, the reference) or train "
                          "(its --train_mode)", choices=("train", "frozen"))
    pgd_eps: float = param(0.2, "L∞ bound of the shared perturbation (trigger_norm), [0, 1] pixel units",
                           low=0.0, low_open=True, high=1.0)
    pgd_step: float = param(0.2, "shared PGD step (adv_lr), [0, 1] pixel units", low=0.0, low_open=True)
    pgd_steps: int = param(5, "shared PGD steps at most (adv_steps); fewer once all samples are shared", low=1)
    pgd_early_exit: bool = param(True, "end the shared PGD once every sample is a shared adversarial example "
                                 "(the reference)")
    pgd_start: str = param("max", "start of δ: max (+ε everywhere, the reference), zero or random", choices=PGD_STARTS)
    beta1: float = param(0.01, "weight β1 of L_adv in the shared PGD", low=0.0)
    beta2: float = param(1.0, "weight β2 of L_share (JS divergence of the two models) in the shared PGD", low=0.0)
    lambda1: float = param(1.0, "weight λ1 of the clean CE", low=0.0)
    lambda2: float = param(0.0, "weight λ2 of the adversarial CE CE(f_θ(x+δ), y) (0: the reference)", low=0.0)
    lambda3: float = param(1.0, "weight λ3 of L_sar, the shared adversarial risk on potential poison samples",
                           low=0.0)

    def smoke(self) -> dict:
        return {"epochs": 1}


def shared_pgd_loss(logits: torch.Tensor, logits_ref: torch.Tensor, clean_pred: torch.Tensor,
                    clean_pred_ref: torch.Tensor, y: torch.Tensor, beta1: float, beta2: float
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """β1·L_adv + β2·L_share at x + δ (see the module docstring) and its parts."""
    logits, logits_ref = logits.float(), logits_ref.float()
    b = len(y)
    pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
    moved, moved_ref = pred != clean_pred, pred_ref != clean_pred_ref
    shared = moved & moved_ref & (pred == pred_ref)
    ce = F.cross_entropy(logits, y, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
    l_adv = -((ce * ~moved).sum() + (ce_ref * ~moved_ref).sum()) / 2 / b
    p, p_ref = F.softmax(logits, 1).clamp(min=1e-8), F.softmax(logits_ref, 1).clamp(min=1e-8)
    mix = 0.5 * (p + p_ref)
    js = 0.5 * (p * (p.log() - mix.log()) + p_ref * (p_ref.log() - mix.log())).sum(1)
    l_share = (js * ~shared).sum() / b
    return beta1 * l_adv + beta2 * l_share, {"l_adv": l_adv, "l_share": l_share, "shared": shared}


def sar_loss(logits_adv: torch.Tensor, pred_ref_adv: torch.Tensor, pred_ref_clean: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sar and the mask of potential poison samples (f_ref(x+δ) ≠ y and ≠ f_ref(x)).

    On those, with ŷ = f_ref(x+δ) and p = softmax(f_θ(x+δ)): ½·[-Σ log(1e-6 + min(1 - p_ŷ, 0.999))
    - Σ log(1 + 1e-6 - max(p_ŷ, 0.001))] / B. The clamps make it constant, with no gradient, where
    f_θ gives ŷ under 0.1%: a sample on which the two models disagree is no shared adversarial example
    and is left alone. Exactly 0 without potential poison samples.
    """
    poison = (pred_ref_adv != y) & (pred_ref_adv != pred_ref_clean)
    if not bool(poison.any()):
        return logits_adv.new_zeros((), dtype=torch.float32), poison
    p = F.softmax(logits_adv.float(), 1).gather(1, pred_ref_adv[:, None]).squeeze(1)[poison]
    loss = (-torch.log(1e-6 + (1 - p).clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - p.clamp(min=0.001)).sum()) / 2
    return loss / len(y), poison


@DEFENSES.register("sau")
class SharedAdversarialUnlearning(Defense):
    """SAU (defenses.md A10): unlearn the adversarial examples f_θ shares with the backdoored model."""

    Config = SauConfig
    data_use = "clean_split"

    def pgd(self) -> PGD:
        cfg: SauConfig = self.cfg
        return PGD(step=cfg.pgd_step, steps=cfg.pgd_steps, eps=cfg.pgd_eps, start=cfg.pgd_start, image_box=False)

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: SauConfig = self.cfg
        device = ctx.device
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        f_ref = frozen_copy(model, device)
        f = trainable_copy(model, device)
        clean = clean.to(device)
        crop, flip = cfg.augmentation(ctx.hflip)
        drop_last, steps = epoch_steps(len(clean), cfg.batch_size)
        optimizer, scheduler = sgd_or_adam(f, cfg, steps)
        pgd = self.pgd()
        ctx.log(f"{self.name}: {len(clean)} clean images, {cfg.epochs} epochs; shared PGD L∞ {cfg.pgd_eps:g}, "
                f"{cfg.pgd_steps} steps of {cfg.pgd_step:g}; loss {cfg.lambda1:g}·CE + {cfg.lambda2:g}·CE_adv + "
                f"{cfg.lambda3:g}·L_sar")
        history: list[dict] = []
        keys = ("ce_clean", "ce_adv", "l_sar", "loss", "l_adv", "l_share", "shared", "potential_poison", "pgd_steps")
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            sums = torch.zeros(len(keys), device=device)  # one sync per epoch
            seen = 0
            for x, y in batches(clean, cfg.batch_size, device=device, shuffle=True, generator=gen,
                                crop_padding=crop, hflip=flip, drop_last=drop_last):
                x = prepare_batch(x, device)
                delta, inner = self._shared_pgd(f, f_ref, x, y, pgd, gen, device)
                loss, outer = self._unlearn_step(f, f_ref, x, y, delta, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                vals = {**outer, **inner}
                sums += torch.stack([vals[k].float() for k in keys]) * len(y)
                seen += len(y)
            means = (sums / max(seen, 1)).tolist()
            row = {"epoch": epoch, "lr": lr, **dict(zip(keys, means)), "seconds": time.perf_counter() - t0}
            ctx.record_epoch(self.name, f, row, history, cfg.epochs)
        f.eval()
        last = history[-1]
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started,
                             findings={"shared_fraction": last["shared"], "potential_poison": last["potential_poison"],
                                       "pgd_steps": last["pgd_steps"]})

    def _shared_pgd(self, f, f_ref, x, y, pgd: PGD, gen, device) -> tuple[torch.Tensor, dict]:
        cfg: SauConfig = self.cfg
        with eval_mode(f), eval_mode(f_ref), no_weight_grads(f):
            with torch.no_grad(), autocast(device):
                clean_pred, clean_pred_ref = f(x).argmax(1), f_ref(x).argmax(1)
            count = {"steps": 0}

            def objective(delta):
                count["steps"] += 1
                x_adv = prepare_batch(x + delta, device)
                with autocast(device):
                    logits, logits_ref = f(x_adv), f_ref(x_adv)
                return shared_pgd_loss(logits, logits_ref, clean_pred, clean_pred_ref, y, cfg.beta1, cfg.beta2)

            delta = pgd.initial(x.shape, device, x, gen)
            stop = (lambda s: bool(s["shared"].all())) if cfg.pgd_early_exit else None
            delta, last = pgd.run(delta, objective, x, stop=stop)
        return delta, {"l_adv": last["l_adv"].detach(), "l_share": last["l_share"].detach(),
                       "shared": last["shared"].float().mean(), "pgd_steps": torch.tensor(float(count["steps"]), device=device)}

    def _unlearn_step(self, f, f_ref, x, y, delta, device) -> tuple[torch.Tensor, dict]:
        cfg: SauConfig = self.cfg
        b = len(y)
        x_adv = prepare_batch(x + delta, device)
        train_mode(f, cfg)
        with autocast(device):
            logits = f(torch.cat([x, x_adv])).float()
        f.eval()
        with torch.no_grad(), autocast(device):
            pred_ref_clean, pred_ref_adv = f_ref(x).argmax(1), f_ref(x_adv).argmax(1)
        ce_clean = F.cross_entropy(logits[:b], y)
        ce_adv = F.cross_entropy(logits[b:], y)
        l_sar, poison = sar_loss(logits[b:], pred_ref_adv, pred_ref_clean, y)
        loss = cfg.lambda1 * ce_clean + cfg.lambda2 * ce_adv + cfg.lambda3 * l_sar
        return loss, {"ce_clean": ce_clean.detach(), "ce_adv": ce_adv.detach(), "l_sar": l_sar.detach(),
                      "loss": loss.detach(), "potential_poison": poison.float().mean()}
