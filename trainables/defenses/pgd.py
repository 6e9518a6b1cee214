"""The one inner-problem loop of the adversarial-unlearning defenses, and BI-BAU's E-step on it.

:class:`PGD` descends a perturbation δ on an objective for a number of steps, with the variants of
the three methods as parameters: signed steps and an L∞ projection (BI-BAU, SAU's shared PGD) or
plain gradient steps without a bound (I-BAU's universal perturbation), the start (zero, uniform in
[-ε, ε], or +ε everywhere: SAU's ``pgd_init: max``), whether x + δ is kept in [0, 1] (BI-BAU; SAU and
I-BAU do not clamp), and an early exit (SAU: once every sample is a shared adversarial example).

BI-BAU's E-step (:class:`EStep`): crafting unlearning examples x' = clip(x + δ, 0, 1),
||δ||_∞ <= ε, by PGD on L_in = L_trig + α·L_KD + β·L_prior (METHOD.md), batched, in [0, 1] pixel space.
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

PGD_STARTS = ("zero", "random", "max")


@dataclass(frozen=True)
class PGD:
    """Descent of a perturbation δ on ``objective(δ) -> (loss, stats)`` (see the module docstring)."""

    step: float
    steps: int
    eps: float | None = None  # L∞ bound of δ; None: no projection (I-BAU)
    signed: bool = True  # step along the gradient's sign (PGD) or the gradient itself (I-BAU's SGD)
    start: str = "zero"  # zero | random (uniform in [-ε, ε]) | max (+ε everywhere, SAU)
    image_box: bool = True  # keep x + δ in [0, 1] (needs x)

    def __post_init__(self):
        if self.start not in PGD_STARTS:
            raise ValueError(f"PGD start {self.start!r}; allowed: {', '.join(PGD_STARTS)}")
        if self.start != "zero" and self.eps is None:
            raise ValueError(f"PGD start {self.start!r} needs a bound eps")

    def initial(self, shape: torch.Size | tuple, device: torch.device, x: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """δ at the start, projected."""
        delta = torch.zeros(shape, device=device)
        if self.start == "random" and self.eps > 0:
            noise = torch.rand(tuple(shape), generator=generator, dtype=torch.float32)
            delta = self.project(((noise * 2 - 1) * self.eps).to(device), x)
        elif self.start == "max":
            delta = self.project(delta + self.eps, x)
        return delta

    def project(self, delta: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Into the ε-ball and, with ``image_box``, so that x + δ stays in [0, 1]."""
        if self.eps is not None:
            delta = delta.clamp(-self.eps, self.eps)
        if self.image_box and x is not None:
            delta = (x + delta).clamp(0.0, 1.0) - x
        return delta.detach()

    def run(self, delta: torch.Tensor, objective: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
            x: torch.Tensor | None = None, stop: Callable[[dict], bool] | None = None,
            on_step: Callable[[torch.Tensor, dict], None] | None = None) -> tuple[torch.Tensor, dict]:
        """``steps`` descent steps from ``delta``; returns δ and the stats of the last iterate evaluated
        (before its step). ``stop(stats)``, checked after each step, ends the loop early."""
        stats: dict = {}
        for _ in range(self.steps):
            delta.requires_grad_(True)
            loss, stats = objective(delta)
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = self.project(delta - self.step * (g.sign() if self.signed else g), x)
            if on_step is not None:
                on_step(loss, stats)
            if stop is not None and stop(stats):
                break
        return delta.detach(), stats


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
        with eval_mode(f_bd), eval_mode(f_theta), no_weight_grads(f_theta):
            return self._pgd(f_bd, f_theta, x, y, device, generator, trace)

    def _pgd(self, f_bd, f_theta, x, y, device, generator, trace) -> tuple[torch.Tensor, dict]:
        use_theta = self.alpha > 0 or self.beta > 0
        with torch.no_grad(), autocast(device):
            teacher = f_bd(x) if self.alpha > 0 or self.keep_teacher else None
            h_clean = f_theta.features(x).float() if self.beta > 0 else None
        w_bd, w_theta = f_bd.head.weight.detach(), f_theta.head.weight.detach()

        pgd = PGD(step=self.step, steps=self.steps, eps=self.eps,
                  start="random" if self.random_start and self.eps > 0 else "zero")
        delta = pgd.initial(x.shape, device, x, generator)
        stats: dict = {"l_in_trace": [], "l_trig_trace": []} if trace else {}

        def objective(delta: torch.Tensor) -> tuple[torch.Tensor, dict]:
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
            return loss, {"l_in": loss, **terms}

        def record(loss: torch.Tensor, terms: dict) -> None:
            stats["l_in_trace"].append(loss.item())
            stats["l_trig_trace"].append(terms["l_trig"].item())

        delta, last = pgd.run(delta, objective, x, on_step=record if trace else None)
        x_adv = (x + delta).clamp_(0.0, 1.0)
        stats.update({k: v.detach() for k, v in last.items()})
        stats["delta_linf"] = (x_adv - x).abs().flatten(1).amax(1).mean()
        if self.keep_teacher:
            stats["teacher"] = teacher.detach().float()
        return x_adv, stats


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def no_weight_grads(model: torch.nn.Module):
    """No weight gradients while crafting (only δ is differentiated)."""
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
