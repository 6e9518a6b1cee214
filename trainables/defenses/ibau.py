"""I-BAU, implicit backdoor adversarial unlearning (Zeng et al., ICLR'22): defenses.md A9, the
official defaults (YiZeng623/I-BAU: Adam lr 1e-3, batch 100, 5 rounds, K = 5).

Each round (``epochs``):

1. **Universal perturbation** δ (one (C, H, W) tensor for every image, start 0, no bound): one pass
   over the clean split of plain gradient steps (``pgd.PGD`` with ``signed=False``, ``eps=None``: the
   reference's SGD, lr 10) on -CE(f(x + δ), f(x).argmax) + 0.001·||δ||², in [0, 1] pixel units, x + δ
   not clamped (as the reference).
2. **Unlearning**, one optimiser step per batch of the split, cached at the start (the reference
   caches its loader once): the outer loss is CE(f(x + δ on a random int(B·0.01) of the batch), y);
   its hypergradient through δ*(θ) comes from the fixed-point method
   (:func:`fixed_point_hypergradient`, K = 5) on the inner map δ ← δ - 0.1·∇_δ(-CE(f(x0 + δ), y0) +
   0.001·||δ||²), evaluated on the first cached batch (x0, y0) with its true labels.

The reference keeps the model in eval mode throughout (``bn_stats: frozen``; ``train`` runs the outer
loss with batch statistics). The hypergradient is computed in float32 (no autocast): its
fixed-point iteration differentiates a gradient. Data: the clean split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import param
from ..data import ImageSet, batches
from ..models.base import Classifier
from ..registry import DEFENSES
from ..runtime import autocast, prepare_batch
from .base import (Defense, DefenseContext, DefenseResult, SGDDefenseConfig, epoch_steps, sgd_or_adam, train_mode,
                   trainable_copy)
from .pgd import PGD, eval_mode, no_weight_grads


@dataclass
class IbauConfig(SGDDefenseConfig):
    epochs: int = param(5, "rounds of universal perturbation and unlearning (n_rounds)", low=1)
    batch_size: int = param(100, "clean images per step (the official 100; BackdoorBench 256)", low=1)
    optimizer: str = param("adam", "outer optimiser: adam (the reference) or sgd", choices=("sgd", "adam"))
    lr: float = param(1e-3, "outer learning rate (official 1e-3; BackdoorBench 1e-4)", low=0.0, low_open=True)
    weight_decay: float = param(0.0, "L2 weight decay", low=0.0)
    schedule: str = param("constant", "learning-rate schedule of the outer steps", choices=("cosine", "constant"))
    bn_stats: str = param("frozen", "BatchNorm in the outer loss: frozen (eval mode, the reference) or train",
                          choices=("train", "frozen"))
    fixed_point_steps: int = param(5, "K: fixed-point iterations of the implicit hypergradient", low=0)
    inner_lr: float = param(0.1, "step of the inner map δ ← δ - step·∇_δ L_inner the hypergradient differentiates",
                            low=0.0, low_open=True)
    perturb_lr: float = param(10.0, "SGD learning rate of the universal perturbation's pass", low=0.0, low_open=True)
    perturb_reg: float = param(1e-3, "weight of ||δ||² in the inner loss", low=0.0)
    portion: float = param(0.01, "share of each batch given δ in the outer loss (int(B·portion) images)",
                           low=0.0, high=1.0)

    def smoke(self) -> dict:
        return {"epochs": 1}


def fixed_point_hypergradient(delta: torch.Tensor, params: Sequence[torch.Tensor],
                              fp_map: Callable[[torch.Tensor], torch.Tensor],
                              outer_loss: Callable[[torch.Tensor], torch.Tensor], steps: int,
                              tol: float = 1e-10) -> list[torch.Tensor]:
    """d/dθ L_out(δ*(θ), θ) where δ* = Φ(δ*, θ) is the fixed point of ``fp_map`` (Φ, a function of δ
    that uses the tensors ``params`` θ): ∂L_out/∂θ + (∂Φ/∂θ)ᵀ v with v = Σ_k ((∂Φ/∂δ)ᵀ)^k ∂L_out/∂δ,
    truncated after ``steps`` terms (K), or once the terms change v by less than ``tol``."""
    delta = delta.detach().requires_grad_(True)
    params = list(params)
    out = outer_loss(delta)
    grads = torch.autograd.grad(out, [delta, *params], allow_unused=True)
    g_delta = grads[0] if grads[0] is not None else torch.zeros_like(delta)
    g_params = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads[1:], params)]
    mapped = fp_map(delta)
    v = torch.zeros_like(delta)
    for _ in range(steps):
        prev = v
        (jv,) = torch.autograd.grad(mapped, delta, grad_outputs=v, retain_graph=True, allow_unused=True)
        v = (jv if jv is not None else torch.zeros_like(delta)) + g_delta
        if float((v - prev).norm()) < tol:
            break
    implicit = torch.autograd.grad(mapped, params, grad_outputs=v, allow_unused=True)
    return [gp + (gi if gi is not None else 0.0) for gp, gi in zip(g_params, implicit)]


def inner_loss(f: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor,
               reg: float) -> torch.Tensor:
    """-CE(f(x + δ), labels) + reg·||δ||²: the perturbation that most changes f's labels, kept small."""
    logits = f(x + delta)
    wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 under autocast -> float32; float64 stays
    return -F.cross_entropy(logits.to(wide), labels) + reg * delta.to(wide).pow(2).sum()


@DEFENSES.register("ibau")
class ImplicitBackdoorUnlearning(Defense):
    """I-BAU (defenses.md A9): a universal adversarial perturbation unlearned through its implicit
    hypergradient."""

    Config = IbauConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: IbauConfig = self.cfg
        device = ctx.device
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        f = trainable_copy(model, device)
        clean = clean.to(device)
        crop, flip = cfg.augmentation(ctx.hflip)
        drop_last, _ = epoch_steps(len(clean), cfg.batch_size)

        def epoch_batches():
            return batches(clean, cfg.batch_size, device=device, shuffle=True, generator=gen,
                           crop_padding=crop, hflip=flip, drop_last=drop_last)

        cached = [(prepare_batch(x, device), y) for x, y in epoch_batches()]
        optimizer, scheduler = sgd_or_adam(f, cfg, len(cached))
        params = [p for p in f.parameters() if p.requires_grad]
        ctx.log(f"{self.name}: {len(clean)} clean images, {cfg.epochs} rounds of {len(cached)} steps, K "
                f"{cfg.fixed_point_steps}, δ on {cfg.portion:g} of each batch")
        history: list[dict] = []
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            delta, moved = self._universal_perturbation(f, epoch_batches, device)
            sums = torch.zeros(2, device=device)
            for x, y in cached:
                grads, loss, patched = self._hypergradient(f, delta, cached[0], x, y, gen, device)
                optimizer.zero_grad(set_to_none=True)
                for p, g in zip(params, grads):
                    p.grad = g.to(p.dtype)
                optimizer.step()
                scheduler.step()
                sums += torch.stack([loss, torch.tensor(float(patched), device=device)])
            loss_m, patched_m = (sums / len(cached)).tolist()
            row = {"epoch": epoch, "lr": lr, "loss_out": loss_m, "perturbed_per_batch": patched_m,
                   "delta_l2": float(delta.norm()), "delta_linf": float(delta.abs().max()),
                   "delta_moved": moved, "seconds": time.perf_counter() - t0}
            ctx.record_epoch(self.name, f, row, history, cfg.epochs, loss="loss_out", what="the outer loss",
                             unit="round")
        f.eval()
        last = history[-1]
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started,
                             findings={"delta_l2": last["delta_l2"], "delta_moved": last["delta_moved"]})

    def _universal_perturbation(self, f: Classifier, epoch_batches, device) -> tuple[torch.Tensor, float]:
        """δ after one pass of SGD over the clean split, and the share of the last batch whose label it moves."""
        cfg: IbauConfig = self.cfg
        todo = list(epoch_batches())
        feed = iter(todo)
        shape = (1, *todo[0][0].shape[1:])
        moved = torch.zeros((), device=device)

        def objective(delta):
            nonlocal moved
            x, _ = next(feed)
            x = prepare_batch(x, device)
            with torch.no_grad(), autocast(device):
                pred = f(x).argmax(1)
            with autocast(device):
                logits = f(x + delta).float()
            moved = (logits.detach().argmax(1) != pred).float().mean()
            return -F.cross_entropy(logits, pred) + cfg.perturb_reg * delta.pow(2).sum(), {}

        pgd = PGD(step=cfg.perturb_lr, steps=len(todo), eps=None, signed=False, image_box=False)
        with eval_mode(f), no_weight_grads(f):
            delta, _ = pgd.run(pgd.initial(shape, device), objective)
        return delta, float(moved)

    def _hypergradient(self, f: Classifier, delta: torch.Tensor, first: tuple, x: torch.Tensor, y: torch.Tensor,
                       gen: torch.Generator, device) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        cfg: IbauConfig = self.cfg
        x0, y0 = first
        k = int(len(y) * cfg.portion)
        pick = torch.randperm(len(y), generator=gen)[:k].to(device)
        mask = torch.zeros(len(y), 1, 1, 1, device=device)
        mask[pick] = 1.0

        def fp_map(d: torch.Tensor) -> torch.Tensor:
            with eval_mode(f):
                (g,) = torch.autograd.grad(inner_loss(f, x0, y0, d, cfg.perturb_reg), d, create_graph=True)
            return d - cfg.inner_lr * g

        value: dict[str, torch.Tensor] = {}

        def outer(d: torch.Tensor) -> torch.Tensor:
            train_mode(f, cfg)
            try:
                value["loss"] = F.cross_entropy(f(x + mask * d).float(), y)
                return value["loss"]
            finally:
                f.eval()

        params = [p for p in f.parameters() if p.requires_grad]
        # the hypergradient differentiates a gradient: attention must run a kernel with a double backward
        # (the fused ones have none on CPU: a ViT such as clip_vit failed here)
        with sdpa_kernel([SDPBackend.MATH]):
            grads = fixed_point_hypergradient(delta, params, fp_map, outer, cfg.fixed_point_steps)
        return grads, value["loss"].detach(), k
