"""ISSBA (Li et al. 2021): a sample-specific invisible trigger, the image re-encoded by a
StegaStamp-style encoder to carry one fixed fingerprint; dirty-label, poisoned at build time.

BackdoorBench ships no encoder: it loads pre-encoded CIFAR-10 arrays made with a PyTorch
StegaStamp (its ``resource/ssba`` code, reference notes §6). Here that encoder and its decoder are
trained in code, on the training split, in ``prepare``, and cached by content hash
(``Attack.cached_state``), so nothing is downloaded:

* **Encoder.** The fingerprint (``bits`` 100) goes through Linear(bits -> 3*16*16) + ReLU, is
  reshaped to 3 x 16 x 16 and nearest-upsampled to the image size, and concatenated with the
  image; a U-Net: conv ``w`` (stride 1) then four stride-2 convs (``w, 2w, 4w, 8w``), three
  up-steps (upsample x2, pad, 2x2 conv, concatenation with the skip, 3x3 conv), a last up-step
  whose output is concatenated with the first conv's features and the input, two 3x3 convs and a
  1x1 conv to the image's channels, sigmoid. ``w`` is ``width`` (the reference's 32).
* **Decoder.** Seven 3x3 convs (five of stride 2) of ``w, w, 2w, 2w, 2w, 4w, 4w`` channels, then
  Linear(-> 512) + ReLU + Linear(512 -> bits).
* **Training.** ``encoder_epochs`` 20 over the training split, batches of 64, Adam(1e-4), a random
  fingerprint per image; loss ``BCE(decoder(enc), bits) + w_l2 * MSE(enc, x)``, where ``w_l2`` is
  0 until the batch bit accuracy first exceeds 0.9, then, after ``l2_delay`` 1000 more steps, rises
  linearly to ``l2_weight`` 10 over ``l2_ramp`` 3000 steps (the reference's schedule).
* **Embedding.** One fingerprint for every image: ``bits`` seeded random bits (``secret_seed``;
  the reference's BCH code of a secret is also one fixed string: the backdoor needs only that).
  Poisoned training images and triggered test images are ``encoder(x, fingerprint)``, quantised to
  8 bits like the reference's PNG round trip.

Recorded with every run (``attack_stage``): ``attack_bit_accuracy`` (the decoder on the
fingerprint-encoded held-out images: the first 512 test-set images are not seen here, so the
training images' last 512 are used) and ``attack_psnr`` (dB, encoded vs clean), and
the trial's ``time_attack_prepare_s``.

Decisions: reduced ``encoder_epochs`` at the CPU scale are a config value (a deviation recorded
in the run's config); images whose sides are not multiples of 16 are refused (the fingerprint's
16 x 16 map and four stride-2 steps); grey images get a one-channel encoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, param
from ..data.base import ImageSet
from ..registry import ATTACKS
from .base import Attack, AttackConfig, to_float
from .images import quantize

_PLACEHOLDER_SEED = 0
HELD_OUT = 512


@dataclass
class ISSBAConfig(AttackConfig):
    bits: int = param(100, "fingerprint length in bits", low=1)
    secret_seed: int = param(0, "seed of the fixed fingerprint every poisoned image carries", low=0)
    width: int = param(32, "channels of the encoder's and decoder's first convolution (the reference's 32)", low=1)
    encoder_epochs: int = param(20, "epochs of encoder/decoder training on the training split", low=0)
    encoder_batch: int = param(64, "batch size of encoder training", low=2)
    encoder_lr: float = param(1e-4, "Adam learning rate of encoder training", low=0.0, low_open=True)
    l2_weight: float = param(10.0, "final weight of the image MSE in the encoder's loss", low=0.0)
    l2_delay: int = param(1000, "steps after the bit accuracy first exceeds 0.9 before the MSE weight rises", low=0)
    l2_ramp: int = param(3000, "steps over which the MSE weight rises linearly to l2_weight", low=1)

    def check_image(self, image_shape: tuple[int, ...], path: str) -> None:
        _, height, width = image_shape
        if height % 16 or width % 16:
            raise ConfigError(f"{path}.name: issba's encoder needs image sides divisible by 16, got {height}x{width}; "
                              "allowed: data.image_size a multiple of 16")


def _conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2 if k == 3 else 0)


class Encoder(nn.Module):
    def __init__(self, channels: int, bits: int, w: int):
        super().__init__()
        self.dense = nn.Linear(bits, 3 * 16 * 16)
        self.down = nn.ModuleList([_conv(channels + 3, w), _conv(w, w, 2), _conv(w, 2 * w, 2), _conv(2 * w, 4 * w, 2),
                                   _conv(4 * w, 8 * w, 2)])
        widths = [8 * w, 4 * w, 2 * w, w, w]  # up-step inputs -> outputs
        self.up = nn.ModuleList([nn.Conv2d(widths[i], widths[i + 1], 2) for i in range(4)])
        self.merge = nn.ModuleList([_conv(8 * w, 4 * w), _conv(4 * w, 2 * w), _conv(2 * w, w),
                                    _conv(2 * w + channels + 3, w)])
        self.head = nn.Sequential(_conv(w, w), nn.ReLU(inplace=True), nn.Conv2d(w, channels, 1))

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        code = F.relu(self.dense(bits)).view(-1, 3, 16, 16)
        code = F.interpolate(code, size=(h, w), mode="nearest").expand(len(x), -1, -1, -1)
        inputs = torch.cat([code, x], 1)
        skips, z = [], inputs
        for conv in self.down:
            z = F.relu(conv(z))
            skips.append(z)
        for i, (up, merge) in enumerate(zip(self.up, self.merge)):
            z = F.relu(up(F.pad(F.interpolate(z, scale_factor=2.0), (0, 1, 0, 1))))
            parts = [skips[3 - i], z] + ([inputs] if i == 3 else [])
            z = F.relu(merge(torch.cat(parts, 1)))
        return torch.sigmoid(self.head(z))


class Decoder(nn.Module):
    def __init__(self, channels: int, bits: int, w: int, size: tuple[int, int]):
        super().__init__()
        spec = [(channels, w, 2), (w, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 2 * w, 2), (2 * w, 4 * w, 2),
                (4 * w, 4 * w, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in spec:
            layers += [_conv(cin, cout, stride), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        flat = 4 * w * -(-size[0] // 32) * -(-size[1] // 32)
        self.dense = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(inplace=True), nn.Linear(512, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.convs(x).flatten(1))


def l2_weight(step: int, first_above: int | None, cfg: ISSBAConfig) -> float:
    """The MSE weight at ``step``: 0 until ``l2_delay`` steps after the bit accuracy first passed
    0.9 (at ``first_above``), then a linear ramp to ``l2_weight`` over ``l2_ramp`` steps."""
    if first_above is None:
        return 0.0
    since = step - first_above - cfg.l2_delay
    return 0.0 if since < 0 else cfg.l2_weight * min(1.0, since / cfg.l2_ramp)


@ATTACKS.register("issba")
class ISSBA(Attack):
    Config = ISSBAConfig
    cfg: ISSBAConfig
    adopts_state = True

    def __init__(self, cfg: ISSBAConfig, image_shape: tuple[int, int, int], num_classes: int):
        super().__init__(cfg, image_shape, num_classes)
        channels, height, width = image_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_PLACEHOLDER_SEED)
            self.encoder = Encoder(channels, cfg.bits, cfg.width).eval()
        self.fingerprint = torch.randint(0, 2, (1, cfg.bits), generator=torch.Generator().manual_seed(cfg.secret_seed)
                                         ).float()
        self.scores = {"bit_accuracy": torch.tensor(float("nan")), "psnr": torch.tensor(float("nan"))}

    @torch.no_grad()
    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        if next(self.encoder.parameters()).device != x.device:
            self.encoder.to(x.device)
        out = []
        for start in range(0, len(x), 512):
            chunk = x[start:start + 512].float()
            out.append(quantize(self.encoder(chunk, self.fingerprint.to(x.device))))
        return torch.cat(out).to(x.dtype) if out else x.clone()

    def prepare(self, train: ImageSet, model: torch.nn.Module, device: torch.device,
                generator: torch.Generator) -> None:
        fields = ("bits", "secret_seed", "width", "encoder_epochs", "encoder_batch", "encoder_lr", "l2_weight",
                  "l2_delay", "l2_ramp")
        state = self.cached_state("issba-encoder", fields, train, generator,
                                  lambda: self._train(train, device, generator))
        # the scores come back with a cached encoder; a cached attack model keeps them in its metrics
        self.scores = {k: state.pop(k).float().reshape(()) for k in ("bit_accuracy", "psnr")}
        self.load_state(state)

    def _train(self, train: ImageSet, device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
        channels, height, width = self.image_shape
        seed = int(torch.randint(2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            encoder = Encoder(channels, self.cfg.bits, self.cfg.width).to(device)
            decoder = Decoder(channels, self.cfg.bits, self.cfg.width, (height, width)).to(device)
        held = min(HELD_OUT, len(train) // 5)
        fit, check = train.x[:len(train) - held].to(device), train.x[len(train) - held:].to(device)
        opt = torch.optim.Adam(list(encoder.parameters()) + list(decoder.parameters()), lr=self.cfg.encoder_lr)
        step, first_above, bs = 0, None, self.cfg.encoder_batch
        for _ in range(self.cfg.encoder_epochs):
            order = torch.randperm(len(fit), generator=generator).to(device)
            for start in range(0, len(fit) - 1, bs):
                x = to_float(fit[order[start:start + bs]])
                bits = torch.randint(0, 2, (len(x), self.cfg.bits), generator=generator).float().to(device)
                encoded = encoder(x, bits)
                logits = decoder(encoded)
                bce = F.binary_cross_entropy_with_logits(logits, bits)
                loss = bce + l2_weight(step, first_above, self.cfg) * F.mse_loss(encoded, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if first_above is None and ((logits > 0).float() == bits).float().mean().item() > 0.9:
                    first_above = step
                step += 1
        encoder.eval(), decoder.eval()
        with torch.no_grad():
            x = to_float(check)
            encoded = quantize(encoder(x, self.fingerprint.to(device)))
            bit_acc = ((decoder(encoded) > 0).float() == self.fingerprint.to(device)).float().mean()
            mse = F.mse_loss(encoded, x).clamp_min(1e-12)
            psnr = 10 * torch.log10(1.0 / mse)
        state = {f"encoder.{k}": v.detach().cpu() for k, v in encoder.state_dict().items()}
        state.update(bit_accuracy=bit_acc.cpu(), psnr=psnr.cpu())
        return state

    def findings(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.scores.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {f"encoder.{k}": v.detach().cpu() for k, v in self.encoder.state_dict().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.state_tensors()
        if set(own) != set(tensors):
            missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
            raise ValueError(f"issba: saved state does not fit the encoder (missing {missing[:3]}, unexpected {extra[:3]})")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape) or (value.is_floating_point() and not torch.isfinite(value).all()):
                raise ValueError(f"issba: saved tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        encoder = Encoder(self.image_shape[0], self.cfg.bits, self.cfg.width)
        encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
        self.encoder = encoder.eval()
        self._device_copies.clear()
