"""BTI-DBF(U), backdoor trigger inversion via benign-feature decoupling, unlearning variant
(Xu et al., ICLR'24): defenses.md A2, the official defaults (5 rounds, feat_bound 5).

1. Pre-train a UNet generator G (``unet.py``) for ``pretrain_epochs`` (50, Adam 1e-3) to keep
   the model's behaviour: soft CE of f(G(x)) against softmax f(x) + MSE of the features + the
   image MSE, weighted 100 above 0.1 and 0.01 below.
2. Each of ``rounds`` rounds, on the current model:
   a. decouple benign features: a feature mask M = tanh(·)/2 + 0.5 learned for ``mask_epochs``
      (20, Adam 0.01) on CE(f(M⊙h), y) - CE(f((1-M)⊙h), y);
   b. invert the trigger: train G for ``invert_epochs`` (30) on
      -MSE((1-M)⊙h(x), (1-M)⊙h(G(x))) + 0.01·MSE(M⊙h(x), M⊙h(G(x))); a batch whose image MSE
      exceeds ``norm_bound`` (0.3) or whose benign-feature MSE exceeds ``feat_bound`` (5) has the
      image MSE in place of those two terms. From the second round, every batch, bounded or not,
      adds CE(f(G(x)), detected target). The target is detected once, after the first round's
      inversion, and kept (the reference's default, ``earlystop`` off): the majority class of
      f(G(x + 0.03·N(0, 1))) on the clean split, the noise in normalised-input units as the
      reference adds it to normalised images;
   c. unlearn for ``epochs`` (30, Adam 1e-4): in each batch int(0.2·B) + 1 images become G(x),
      labels kept true; loss CE + MSE(h(x̃), h(x)) (``triggers.unlearn_with_triggers``).

h is the model's last feature map before the global pool (``Classifier.feature_map``: layer4's
map on the ResNets, as in the reference's ``from_input_to_features``), so the mask M can single
out where in the image the trigger's features sit; ``features: pooled`` uses the pooled vector
instead (a 1x1 map; the only choice for models without a spatial map). M starts from a seeded
N(0, 1) draw, as in the reference. Image MSEs are measured on normalised inputs, the space the
reference's bounds were set in. Data: the clean split.
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
from ..runtime import autocast, prepare_batch, prepare_model
from .base import Defense, DefenseContext, DefenseResult, epoch_steps, frozen_copy, trainable_copy
from .triggers import UnlearnConfig, unlearn_with_triggers
from .unet import UNet


@dataclass
class BtiDbfConfig(UnlearnConfig):
    epochs: int = param(30, "unlearning epochs per round (ul_round)", low=1)
    batch_size: int = param(128, "clean images per step of every phase", low=1)
    lr: float = param(1e-4, "learning rate of the unlearning", low=0.0, low_open=True)
    optimizer: str = param("adam", "optimiser of the unlearning: adam (the reference) or sgd", choices=("sgd", "adam"))
    weight_decay: float = param(0.0, "L2 weight decay of the unlearning", low=0.0)
    schedule: str = param("constant", "learning-rate schedule of the unlearning", choices=("cosine", "constant"))
    rounds: int = param(5, "rounds of decoupling, inversion and unlearning (nround)", low=1)
    pretrain_epochs: int = param(50, "generator pre-training epochs", low=0)
    mask_epochs: int = param(20, "feature-mask epochs per round (mround)", low=1)
    invert_epochs: int = param(30, "generator (trigger inversion) epochs per round (uround)", low=1)
    generator_lr: float = param(1e-3, "Adam learning rate of the generator", low=0.0, low_open=True)
    mask_lr: float = param(0.01, "Adam learning rate of the feature mask", low=0.0, low_open=True)
    norm_bound: float = param(0.3, "image MSE (normalised inputs) above which a batch only pulls G(x) back to x",
                              low=0.0, low_open=True)
    feat_bound: float = param(5.0, "benign-feature MSE above which a batch only pulls G(x) back to x",
                              low=0.0, low_open=True)
    feature_weight: float = param(1.0, "weight of MSE(h(x~), h(x)) in the unlearning", low=0.0)
    unet_width: int = param(32, "filters of the generator's first level", low=1)
    unet_depth: int = param(4, "levels of the generator", low=1)
    noise: float = param(0.03, "std of the Gaussian noise added to the clean images before the target detection, "
                         "in normalised-input units (the reference adds it to normalised images)", low=0.0)
    features: str = param("map", "h of the decoupling, inversion and feature MSEs: map (the last feature map "
                          "before the global pool, the reference) or pooled (the penultimate vector)",
                          choices=("map", "pooled"))

    def smoke(self) -> dict:
        return {"epochs": 1, "rounds": 1, "pretrain_epochs": 1, "mask_epochs": 1, "invert_epochs": 1}


def _image_mse(f: Classifier, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(f.normalize(a.float()), f.normalize(b.float()))


def _h(f: Classifier, x: torch.Tensor, cfg: BtiDbfConfig) -> torch.Tensor:
    """h(x) as the config says: (B, d, h, w) either way, 1x1 when pooled."""
    return f.feature_map(x) if cfg.features == "map" else f.features(x)[:, :, None, None]


def _logits(f: Classifier, h: torch.Tensor) -> torch.Tensor:
    return f.head(f.pool(h))


@DEFENSES.register("btidbf_u")
class BtiDbfUnlearning(Defense):
    """BTI-DBF(U) (defenses.md A2): generator-based trigger inversion on decoupled benign features,
    then unlearning the inverted trigger at true labels. Data: the clean split."""

    Config = BtiDbfConfig
    data_use = "clean_split"

    def purify(self, model: Classifier, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        self.check_context(clean, ctx)
        cfg: BtiDbfConfig = self.cfg
        started = time.perf_counter()
        gen = torch.Generator().manual_seed(self.seed(ctx))
        clean = clean.to(ctx.device)
        crop, flip = cfg.augmentation(ctx.hflip)
        drop_last, _ = epoch_steps(len(clean), cfg.batch_size)

        def epoch_batches():
            return batches(clean, cfg.batch_size, device=ctx.device, shuffle=True, generator=gen,
                           crop_padding=crop, hflip=flip, drop_last=drop_last)

        g = prepare_model(UNet(clean.x.shape[1], cfg.unet_width, cfg.unet_depth, generator=gen), ctx.device)
        g_opt = torch.optim.Adam(g.parameters(), lr=cfg.generator_lr)
        history: list[dict] = []

        def record(phase: str, epoch: int, total: int, t0: float, sums: dict, n: int, prefix: str = "") -> None:
            row = {"phase": phase, "epoch": epoch, **{k: float(v) / n for k, v in sums.items()},
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            ctx.log(f"{self.name} {prefix}{phase} epoch {epoch}/{total}: "
                    + " ".join(f"{k}={float(v) / n:.4g}" for k, v in sums.items()))

        # 1. generator pre-training on the suspicious model
        f0 = frozen_copy(model, ctx.device)
        for epoch in range(1, cfg.pretrain_epochs + 1):
            t0, sums, n = time.perf_counter(), {"loss": 0.0, "image_mse": 0.0}, 0
            g.train()
            for x, _ in epoch_batches():
                with torch.no_grad(), autocast(ctx.device):
                    h_x = _h(f0, x, cfg).float()
                    p_x = F.softmax(_logits(f0, h_x).float(), 1)
                gx = g(x)
                with autocast(ctx.device):
                    h_g = _h(f0, prepare_batch(gx, ctx.device), cfg).float()
                    logits = _logits(f0, h_g).float()
                img = _image_mse(f0, gx, x)
                weight = 100.0 if img.item() > 0.1 else 0.01
                loss = -(p_x * F.log_softmax(logits, 1)).sum(1).mean() + F.mse_loss(h_g, h_x) + weight * img
                g_opt.zero_grad(set_to_none=True)
                loss.backward()
                g_opt.step()
                sums["loss"] += loss.item()
                sums["image_mse"] += img.item()
                n += 1
            record("pretrain", epoch, cfg.pretrain_epochs, t0, sums, n)

        f = trainable_copy(model, ctx.device)
        target: int | None = None
        findings: dict[str, float] = {}
        for rnd in range(1, cfg.rounds + 1):
            prefix = f"round {rnd}/{cfg.rounds} "
            snap = frozen_copy(f, ctx.device)
            mask = self._decouple(snap, epoch_batches, cfg, ctx, gen, record, prefix)
            self._invert(snap, g, g_opt, mask, target, epoch_batches, cfg, ctx, record, prefix)
            if target is None:  # once, on the backdoored model; later rounds invert toward it
                shares = self._detect_target(snap, g, clean, cfg, ctx, gen)
                target = int(shares.argmax())
                ctx.log(f"{self.name} {prefix}detected target {target} ({float(shares[target]):.2f} of G(x) land "
                        "there; per class " + " ".join(f"{float(v):.2f}" for v in shares) + ")")
                findings = {"detected_target": float(target), "target_share": float(shares[target]),
                            "runner_up_share": float(shares.topk(min(2, len(shares))).values[-1])}
            g.eval()
            history += self._unlearn(model, f, clean, g, cfg, ctx, gen, prefix)
            findings["rounds"] = float(rnd)
        findings.update(self._trigger_norms(g, clean, cfg, ctx))
        f.eval()
        return DefenseResult(model=f, history=history, seconds=time.perf_counter() - started, findings=findings)

    def _unlearn(self, model: Classifier, f: Classifier, clean: ImageSet, g: UNet, cfg: BtiDbfConfig,
                 ctx: DefenseContext, gen: torch.Generator, prefix: str) -> list[dict]:
        """One round's unlearning of the inverted trigger (PAM replaces it; ``model`` is θ_bd)."""
        return unlearn_with_triggers(f, clean, lambda x: g(x), cfg, ctx, gen, self.name, plus_one=True,
                                     feature_weight=cfg.feature_weight, feature_map=cfg.features == "map",
                                     log_prefix=prefix)

    def _decouple(self, f: Classifier, epoch_batches, cfg: BtiDbfConfig, ctx: DefenseContext,
                  gen: torch.Generator, record, prefix: str) -> torch.Tensor:
        """The benign-feature mask M in (0, 1) over h's shape (d, h, w) of the current model."""
        probe = next(iter(epoch_batches()))[0][:1]
        with torch.no_grad():
            shape = _h(f, probe, cfg).shape[1:]
        raw = torch.randn(shape, generator=gen).to(ctx.device).requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=cfg.mask_lr)
        for epoch in range(1, cfg.mask_epochs + 1):
            t0, sums, n = time.perf_counter(), {"ce_benign": 0.0, "ce_rest": 0.0}, 0
            for x, y in epoch_batches():
                with torch.no_grad(), autocast(ctx.device):
                    h = _h(f, x, cfg).float()
                m = torch.tanh(raw) / 2 + 0.5
                ce_benign = F.cross_entropy(_logits(f, m * h).float(), y)
                ce_rest = F.cross_entropy(_logits(f, (1 - m) * h).float(), y)
                loss = ce_benign - ce_rest
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums["ce_benign"] += ce_benign.item()
                sums["ce_rest"] += ce_rest.item()
                n += 1
            record("decouple", epoch, cfg.mask_epochs, t0, sums, n, prefix)
        return (torch.tanh(raw) / 2 + 0.5).detach()

    def _invert(self, f: Classifier, g: UNet, g_opt, mask: torch.Tensor, target: int | None, epoch_batches,
                cfg: BtiDbfConfig, ctx: DefenseContext, record, prefix: str) -> None:
        for epoch in range(1, cfg.invert_epochs + 1):
            t0, sums, n = time.perf_counter(), {"loss": 0.0, "image_mse": 0.0, "benign_mse": 0.0, "bounded": 0.0}, 0
            g.train()
            for x, _ in epoch_batches():
                with torch.no_grad(), autocast(ctx.device):
                    h_x = _h(f, x, cfg).float()
                gx = g(x)
                with autocast(ctx.device):
                    h_g = _h(f, prepare_batch(gx, ctx.device), cfg).float()
                img = _image_mse(f, gx, x)
                benign = F.mse_loss(mask * h_x, mask * h_g)
                bounded = img.item() > cfg.norm_bound or benign.item() > cfg.feat_bound
                if bounded:
                    loss = img
                else:
                    loss = -F.mse_loss((1 - mask) * h_x, (1 - mask) * h_g) + 0.01 * benign
                if target is not None:  # bounded batches too, as the reference adds it after the bound's choice
                    labels = torch.full((len(x),), target, dtype=torch.long, device=x.device)
                    loss = loss + F.cross_entropy(_logits(f, h_g).float(), labels)
                g_opt.zero_grad(set_to_none=True)
                loss.backward()
                g_opt.step()
                for k, v in (("loss", loss.item()), ("image_mse", img.item()), ("benign_mse", benign.item()),
                             ("bounded", float(bounded))):
                    sums[k] += v
                n += 1
            record("invert", epoch, cfg.invert_epochs, t0, sums, n, prefix)

    @torch.no_grad()
    def _detect_target(self, f: Classifier, g: UNet, clean: ImageSet, cfg: BtiDbfConfig, ctx: DefenseContext,
                       gen: torch.Generator) -> torch.Tensor:
        """Each class's share of f(G(x + noise)) over the clean split (the target is the largest)."""
        g.eval()
        counts = torch.zeros(ctx.num_classes, device=ctx.device)
        std = f.std.to(ctx.device)  # noise in normalised units is noise·std in [0, 1] pixels
        for x, _ in batches(clean, cfg.batch_size, device=ctx.device, shuffle=False):
            noise = torch.randn(x.shape, generator=gen).to(x.device)
            noisy = (x + cfg.noise * std * noise).clamp(0, 1)
            with autocast(ctx.device):
                pred = f(prepare_batch(g(noisy), ctx.device)).argmax(1)
            counts += torch.bincount(pred, minlength=ctx.num_classes)[: ctx.num_classes]
        return (counts / counts.sum()).cpu()

    @torch.no_grad()
    def _trigger_norms(self, g: UNet, clean: ImageSet, cfg: BtiDbfConfig,
                       ctx: DefenseContext) -> dict[str, float]:
        """Size of the final inverted trigger G(x) - x on the clean split, in [0, 1] pixel units."""
        g.eval()
        l2, linf, n = 0.0, 0.0, 0
        for x, _ in batches(clean, cfg.batch_size, device=ctx.device, shuffle=False):
            diff = (g(x) - x).flatten(1).float()
            l2 += float(diff.norm(dim=1).sum())
            linf = max(linf, float(diff.abs().max()))
            n += len(x)
        return {"trigger_l2": l2 / n, "trigger_linf": linf}
