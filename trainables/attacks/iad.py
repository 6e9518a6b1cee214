"""IAD, the Input-Aware Dynamic backdoor (Nguyen & Tran 2020): a pattern generator G and a mask
generator M make a different trigger for every image, ``x' = x + (G(x) - x) * M(x)``; dirty-label,
poisoned on the fly, with *cross* samples that carry another image's trigger and keep their labels.

Networks (reference notes §5; BackdoorBench's ``InputAwareGenerator`` and the original agree):
an encoder-decoder of Conv3x3-BN(momentum 0.05)-ReLU blocks, ``width`` channels doubling over
three max-pool steps, a middle block, three bilinear-upsampling steps, and a last Conv-BN without
ReLU; G has the image's channels, M one. Outputs are squashed, ``tanh(z) / (2 + 1e-7) + 0.5``,
and M's goes through the steep threshold ``tanh(20 o - 10) / (2 + 1e-7) + 0.5``. The reference
mixes in normalised space with G's output normalised; the mix is affine per channel, so mixing
in [0, 1] (the models normalise inside) is the same.

Stages:

1. **Mask pre-training** (``prepare``, ``mask_epochs`` 25): M alone, Adam(``lr_m`` 0.01, betas
   0.5/0.9), MultiStep at ``m_milestones`` [10, 20] (gamma 0.1), batches of ``batch_size`` 128
   paired with an independently shuffled second order; loss ``lambda_norm * mean(relu(M(x1) -
   mask_density)) + lambda_div * mean(d(x1, x2) / (d(M(x1), M(x2)) + 1e-7))``, ``d`` the per-sample
   root mean square difference. M is then frozen (eval mode). Its result is cached by content hash
   (``Attack.cached_state``).
2. **Joint stage** (``training_batch`` / ``after_step`` / ``end_epoch``, inside the classifier's
   own training): of each batch's rows the attacker controls, the first ``int(poison_rate * B)``
   become backdoor samples (target label), the next ``int(cross_rate * B)`` cross samples (the
   trigger of the image at the same place in a second shuffled order of the batch, true label).
   G's loss is the classifier's cross-entropy (its gradient flows back through the poisoned
   images) plus ``lambda_div * mean(d(x1, x2) / (d(G(x1), G(x2)) + 1e-7))`` over the backdoor rows
   and their partners; G steps with Adam(``lr_g`` 0.01, betas 0.5/0.9) after each classifier step,
   MultiStep at ``g_milestones`` [200, 300, 400, 500] epochs. The classifier keeps the run's
   ``train`` section (the reference's SGD 0.01, milestones [100, 200, 300, 400] are the original's
   600-epoch schedule; BI-BAU trains every attack with its own).

Decisions (recorded in docs/attacks.md):

* **The second loader.** The reference pairs each batch with a batch of an independently shuffled
  loader; here the partner of a row is the row at the same place in a random permutation of the
  same batch along a random cycle (drawn from the run's generator), so no row is its own partner
  (the diversity loss divides by the pair's distance): nearly the reference's pairs, no second pass.
* **Which data M learns on.** ``prepare`` gets the training split; M sees every image of it (the
  defender's clean split included: a mask density regulariser learns nothing about labels).
* **Cross samples** come from the rows the attacker controls after the backdoor rows, as in
  BackdoorBench's ``num_cross`` at the reference's equal rates.
* **Augmentation.** The trainer's crop and flip come before poisoning (the original's order).
* **IBU's poisoned samples**: ``round(poison_rate * N)`` training images drawn with a fixed seed
  through G and M (on-the-fly poisoning touches other images each epoch), as for WaNet.
* **Sizes.** Three poolings need sides divisible by 8 (32 and 64 px are served); grey images get a
  one-channel G (the models see three channels: G has the data's channels).
* **Test sets after training.** G changes while the classifier trains, so the attack stage
  triggers the test set again after training (``learns_while_training``); the per-epoch ASR in the
  training history is measured on the set made before training and means little for IAD.
* ``extra_test_sets``: ``cross_acc``, every test image with the trigger of another test image,
  true labels (the original's cross accuracy).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, param
from ..data.base import ImageSet
from ..registry import ATTACKS
from .base import Attack, AttackConfig, TEST_TRIGGER_SEED, attacker_rows, to_float, to_uint8

EPSILON = 1e-7
_PLACEHOLDER_SEED = 0
BETAS = (0.5, 0.9)


@dataclass
class IADConfig(AttackConfig):
    cross_rate: float = param(0.1, "share of each batch given another image's trigger with its true label (cross samples)",
                              low=0.0, high=1.0)
    width: int = param(32, "channels of the generators' first stage (the reference's channel_init 32)", low=1)
    lr_g: float = param(0.01, "Adam learning rate of the pattern generator G", low=0.0, low_open=True)
    lr_m: float = param(0.01, "Adam learning rate of the mask generator M", low=0.0, low_open=True)
    g_milestones: list[int] = param([200, 300, 400, 500], "epochs after which G's lr is multiplied by 0.1", low=1)
    m_milestones: list[int] = param([10, 20], "mask pre-training epochs after which M's lr is multiplied by 0.1", low=1)
    mask_epochs: int = param(25, "epochs of mask pre-training (before the classifier trains)", low=0)
    batch_size: int = param(128, "batch size of mask pre-training", low=2)
    lambda_div: float = param(1.0, "weight of the diversity loss", low=0.0)
    lambda_norm: float = param(100.0, "weight of the mask density loss", low=0.0)
    mask_density: float = param(0.032, "mask values above this are penalised", low=0.0, high=1.0)

    def check(self, path: str) -> None:
        where = f"{path}." if path else "attack."
        if self.poison_rate + self.cross_rate > 1.0:
            raise ConfigError(f"{where}cross_rate: poison_rate + cross_rate = {self.poison_rate + self.cross_rate:.4g} "
                              "exceeds a batch; allowed: a sum of at most 1")

    def check_image(self, image_shape: tuple[int, ...], path: str) -> None:
        _, height, width = image_shape
        if height % 8 or width % 8:
            raise ConfigError(f"{path}.name: iad's generators pool three times and need image sides divisible by 8, "
                              f"got {height}x{width}; allowed: data.image_size a multiple of 8")


def _block(cin: int, cout: int, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout, momentum=0.05)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class Generator(nn.Module):
    """IAD's encoder-decoder (pattern: ``out`` = image channels; mask: ``out`` = 1)."""

    def __init__(self, channels: int, out: int, width: int, mask: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for step in range(3):
            w = width * 2 ** step
            layers += _block(c, w) + _block(w, w) + [nn.MaxPool2d(2)]
            c = w
        layers += _block(c, c)
        for step in reversed(range(3)):
            w = width * 2 ** step
            layers += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)] + _block(c, c)
            c_next = w // 2 if step else out
            layers += _block(c, c_next, relu=step > 0) if step else _block(c, out, relu=False)
            c = c_next
        self.net = nn.Sequential(*layers)
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = torch.tanh(self.net(x)) / (2 + EPSILON) + 0.5
        if self.mask:
            o = torch.tanh(20 * o - 10) / (2 + EPSILON) + 0.5
        return o


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean squared difference (its gradient kept finite where a pair coincides)."""
    return (a - b).flatten(1).pow(2).mean(1).clamp_min(1e-12).sqrt()


@ATTACKS.register("iad")
class IAD(Attack):
    Config = IADConfig
    cfg: IADConfig
    build_time = False
    adopts_state = True
    learns_while_training = True

    def __init__(self, cfg: IADConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels = image_shape[0]
        with torch.random.fork_rng(devices=[]):  # placeholder weights: leave the global stream alone
            torch.manual_seed(_PLACEHOLDER_SEED)
            self.pattern = Generator(channels, channels, cfg.width, mask=False)
            self.masker = Generator(channels, 1, cfg.width, mask=True)
        self.pattern.eval()
        self.masker.eval().requires_grad_(False)
        self._opt_g: torch.optim.Optimizer | None = None
        self._sched_g = None
        self._stepped = False

    # -- the trigger ---------------------------------------------------------------------------
    def _on(self, like: torch.Tensor) -> None:
        for net in (self.pattern, self.masker):
            if next(net.parameters()).device != like.device:
                net.to(like.device)

    def _mix(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """``x`` with the trigger G and M make from ``source`` (float32 compute, ``x``'s dtype out)."""
        self._on(x)
        xf, sf = x.float(), source.float()
        out = xf + (self.pattern(sf) - xf) * self.masker(sf)
        return out.clamp(0, 1).to(x.dtype)

    @torch.no_grad()
    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        was = self.pattern.training
        self.pattern.eval()
        try:
            return self._mix(x, x)
        finally:
            self.pattern.train(was)

    # -- stage 1: the mask ---------------------------------------------------------------------
    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        init = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=init)))
            channels = self.image_shape[0]
            self.pattern = Generator(channels, channels, self.cfg.width, mask=False)
            masker = Generator(channels, 1, self.cfg.width, mask=True)
        fields = ("width", "lr_m", "m_milestones", "mask_epochs", "batch_size", "lambda_div", "lambda_norm",
                  "mask_density")
        state = self.cached_state("iad-mask", fields, train, generator,
                                  lambda: self._train_mask(masker, train, device, generator))
        masker.load_state_dict(state)
        self.masker = masker.eval().requires_grad_(False)
        self.pattern.to(device).train()
        self._opt_g = torch.optim.Adam(self.pattern.parameters(), lr=self.cfg.lr_g, betas=BETAS)
        self._sched_g = torch.optim.lr_scheduler.MultiStepLR(self._opt_g, self.cfg.g_milestones, 0.1)
        self._device_copies.clear()

    def _train_mask(self, masker: Generator, train: ImageSet, device: torch.device,
                    generator: torch.Generator) -> dict[str, torch.Tensor]:
        masker.to(device).train()
        opt = torch.optim.Adam(masker.parameters(), lr=self.cfg.lr_m, betas=BETAS)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.cfg.m_milestones, 0.1)
        images = train.x.to(device)
        n, bs = len(images), self.cfg.batch_size
        for _ in range(self.cfg.mask_epochs):
            first, second = torch.randperm(n, generator=generator), torch.randperm(n, generator=generator)
            for start in range(0, n - 1, bs):
                i, j = first[start:start + bs].to(device), second[start:start + bs].to(device)
                if len(i) < 2:
                    continue
                x1, x2 = to_float(images[i]), to_float(images[j])
                m1, m2 = masker(x1), masker(x2)
                density = torch.relu(m1 - self.cfg.mask_density).mean()
                diversity = (rms_distance(x1, x2) / (rms_distance(m1, m2) + EPSILON)).mean()
                loss = self.cfg.lambda_norm * density + self.cfg.lambda_div * diversity
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        return {k: v.detach().cpu() for k, v in masker.state_dict().items()}

    # -- stage 2: joint training -----------------------------------------------------------------
    def training_batch(self, x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module,
                       generator: torch.Generator, *, poisonable: torch.Tensor | None = None,
                       hflip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        b = len(x)
        rows = attacker_rows(poisonable, b, x.device)
        n_bd = min(int(self.cfg.poison_rate * b), len(rows))
        n_cross = min(int(self.cfg.cross_rate * b), len(rows) - n_bd)
        bd, cross = rows[:n_bd], rows[n_bd:n_bd + n_cross]
        # every row's partner is another row (a random cycle): a row paired with itself has no diversity
        order = torch.randperm(b, generator=generator)
        partner = torch.empty_like(order)
        partner[order] = order.roll(1)
        partner = partner.to(x.device)
        training = self._opt_g is not None and torch.is_grad_enabled()
        self._on(x)
        self.pattern.train(training)
        x, y = x.clone(), y.clone()
        if training:
            self._opt_g.zero_grad(set_to_none=True)
        if len(bd):
            x_bd = self._mix(x[bd], x[bd])
            if training and self.cfg.lambda_div:
                # the diversity term on G alone; the classifier's loss adds its gradient at backward
                others = x[partner[bd]].float()
                g1, g2 = self.pattern(x[bd].float()), self.pattern(others)
                div = (rms_distance(x[bd].float(), others) / (rms_distance(g1, g2) + EPSILON)).mean()
                (self.cfg.lambda_div * div).backward()
            x = x.index_put((bd,), x_bd) if training else x.index_copy(0, bd, x_bd)
            y[bd] = self.target
        if len(cross):
            x_c = self._mix(x[cross].detach(), x[partner[cross]].detach())
            x = x.index_put((cross,), x_c)
        self._stepped = training
        return x, y

    def after_step(self) -> None:
        if self._stepped and self._opt_g is not None:
            self._opt_g.step()
            self._stepped = False

    def end_epoch(self, epoch: int) -> None:
        if self._sched_g is not None:
            self._sched_g.step()

    # -- test sets -------------------------------------------------------------------------------
    def extra_test_sets(self, test: ImageSet) -> dict[str, ImageSet]:
        """``cross_acc``: every test image with the trigger of another test image, true labels."""
        generator = torch.Generator().manual_seed(TEST_TRIGGER_SEED)
        partner = torch.randperm(len(test), generator=generator).to(test.x.device)
        out = torch.empty_like(test.x)
        self.pattern.eval()
        with torch.no_grad():
            for start in range(0, len(test), 1024):
                sl = slice(start, start + 1024)
                out[sl] = to_uint8(self._mix(to_float(test.x[sl]), to_float(test.x[partner[sl]])))
        return {"cross_acc": ImageSet(out, test.y.clone())}

    # -- state ----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"G.{k}": v.detach().cpu() for k, v in self.pattern.state_dict().items()}
        out.update({f"M.{k}": v.detach().cpu() for k, v in self.masker.state_dict().items()})
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors()
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"iad: saved state does not fit the generators (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape) or (value.is_floating_point() and not torch.isfinite(value).all()):
                raise ValueError(f"iad: saved tensor {key!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(own[key].shape)} (or is not finite)")
        pattern, masker = copy.deepcopy(self.pattern).cpu(), copy.deepcopy(self.masker).cpu()
        pattern.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("G.")})
        masker.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("M.")})
        self.pattern, self.masker = pattern.eval(), masker.eval().requires_grad_(False)
        self._device_copies.clear()
