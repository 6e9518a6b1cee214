"""BI-BAU's E-step: crafting unlearning examples x' = clip(x + δ, 0, 1), ||δ||_∞ <= ε, by PGD
on L_in = L_trig + α·L_KD + β·L_prior (METHOD.md), batched, in [0, 1] pixel space.

Per batch the frozen f_bd sees the clean x once (the KD teacher) and f_θ sees it once (h_θ(x)
for the prior); each PGD step is one forward of f_bd and, when α or β is on, one of f_θ on x',
then one backward to δ only. Both models are in eval mode while crafting, and f_θ's weights
get no gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.base import Classifier
from ..runtime import autocast, prepare_batch
from .losses import backdoor_direction, kd_loss, prior_terms, trigger_loss


@dataclass(frozen=True)
class EStep:
    """The inner problem's settings (see ``BiBauConfig`` for their meaning)."""

    eps: float
    step: float
    steps: int
    random_start: bool = True
    target: int | None = None  # None: untargeted, L_trig = -CE(f_bd(x'), y)
    alpha: float = 1.0
    beta: float = 1.0
    theta: float = 0.5
    temperature: float = 2.0
    gamma: float = 0.5
    keep_teacher: bool = False  # return f_bd(x) as stats["teacher"] (the M-step's distillation reuses it)
    # L_trig on f_bd's logits of x', (logits, y, target) -> loss; BI-BAU-CLIP passes its contrastive form
    trigger: Callable[..., torch.Tensor] = trigger_loss
    # L_KD on (f_θ's logits of x', f_bd's logits of x, y, T, γ) -> loss; BI-BAU-CLIP passes the relational form
    kd: Callable[..., torch.Tensor] = kd_loss

    def craft(self, f_bd: Classifier, f_theta: Classifier, x: torch.Tensor, y: torch.Tensor,
              device: torch.device, generator: torch.Generator | None = None,
              trace: bool = False) -> tuple[torch.Tensor, dict]:
        """Unlearning examples for the float batch ``x`` in [0, 1] and its diagnostics.

        Diagnostics (0-dim tensors, so the caller syncs once per epoch): ``l_in`` and its
        terms at the last PGD iterate evaluated (before its step), ``delta_linf`` (mean over
        the batch of ||x' - x||_∞); with ``trace`` also the lists ``l_in_trace`` and
        ``l_trig_trace`` (floats) of every step.
        """
        x = prepare_batch(x.detach().float(), device)
        with _eval(f_bd), _eval(f_theta), _frozen(f_theta):
            return self._pgd(f_bd, f_theta, x, y, device, generator, trace)

    def _pgd(self, f_bd, f_theta, x, y, device, generator, trace) -> tuple[torch.Tensor, dict]:
        use_theta = self.alpha > 0 or self.beta > 0
        with torch.no_grad(), autocast(device):
            teacher = f_bd(x) if self.alpha > 0 or self.keep_teacher else None
            h_clean = f_theta.features(x).float() if self.beta > 0 else None
        w_bd, w_theta = f_bd.head.weight.detach(), f_theta.head.weight.detach()

        delta = torch.zeros_like(x)
        if self.random_start and self.eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=torch.float32)
            delta = self._project(x, ((noise * 2 - 1) * self.eps).to(device))
        stats: dict = {"l_in_trace": [], "l_trig_trace": []} if trace else {}
        last: dict[str, torch.Tensor] = {}
        for _ in range(self.steps):
            delta.requires_grad_(True)
            x_adv = prepare_batch(x + delta, device)
            with autocast(device):
                logits_bd = f_bd(x_adv)
                h_adv = f_theta.features(x_adv) if use_theta else None
                logits_theta = f_theta.head(h_adv) if self.alpha > 0 else None
            terms = {"l_trig": self.trigger(logits_bd, y, self.target)}
            loss = terms["l_trig"]
            if self.alpha > 0:
                terms["l_kd"] = self.kd(logits_theta, teacher, y, self.temperature, self.gamma)
                loss = loss + self.alpha * terms["l_kd"]
            if self.beta > 0:
                k = (torch.full_like(y, self.target) if self.target is not None
                     else logits_bd.detach().argmax(1))
                u = backdoor_direction(w_bd, w_theta, k)
                terms["l_angle"], terms["l_align"] = prior_terms(h_adv.float(), h_clean, u, self.theta)
                loss = loss + self.beta * (terms["l_angle"] + terms["l_align"])
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = self._project(x, delta - self.step * g.sign())
            last = {"l_in": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
            if trace:
                stats["l_in_trace"].append(loss.item())
                stats["l_trig_trace"].append(terms["l_trig"].item())
        x_adv = (x + delta).clamp_(0.0, 1.0)
        stats.update(last)
        stats["delta_linf"] = (x_adv - x).abs().flatten(1).amax(1).mean()
        if self.keep_teacher:
            stats["teacher"] = teacher.detach().float()
        return x_adv, stats

    def _project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Into the ε-ball and so that x + δ stays in [0, 1]."""
        return ((x + delta.clamp(-self.eps, self.eps)).clamp(0.0, 1.0) - x).detach()


@contextlib.contextmanager
def _eval(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _frozen(model: torch.nn.Module):
    """No weight gradients while crafting (only δ is differentiated)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
