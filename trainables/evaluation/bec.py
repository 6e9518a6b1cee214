"""BEC, the backdoor existence coefficient (Zhu et al. 2024; METHOD.md, evaluation protocol).

Layers: the last ``bec_layers`` convolutions with a kernel larger than 1x1, in the order a
forward pass runs them. The rule needs no per-model list: it skips 1x1 (shortcut, projection)
convolutions, as the reference hooks only the block convolutions, and execution order is the
depth order even where modules are declared in another order. A model that declares probes
(``models.base.Probe``: a ViT's residual stream after each block, channel-first) is probed
there instead, the same way (channels ranked by TAC, CKA over the kept channels x tokens).

Per layer: channels ranked by trigger-activated change (TAC) on the backdoored model over
clean/triggered test pairs, top ``bec_top_fraction`` kept; linear CKA between the backdoored
and the tested model's kept activations on poisoned test images; S = mean over layers.
``bec_raw = (S_D - S_C) / (1 - S_C)`` (clean reference 0, backdoored model 1), reported as
``1 / (1 + exp(-k (bec_raw - c)))``.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..attacks.base import to_float, to_uint8
from ..models.base import Probe
from ..registry import EVALUATIONS
from ..runtime import autocast, prepare_batch
from .base import EvalContext, Evaluation, frozen


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n samples ((n, d1), (n, d2); more dims are
    flattened), in float64 on their device: ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F) on centred
    features, evaluated through the n x n Gram matrices when that is cheaper. NaN when one side
    is constant."""
    x = x.flatten(1).double()
    y = y.flatten(1).double().to(x.device)
    if len(x) != len(y):
        raise ValueError(f"linear_cka: {len(x)} and {len(y)} samples; both sides need the same samples")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    n, dx, dy = len(x), x.shape[1], y.shape[1]
    if dx * dy <= n * (dx + dy):
        num = (y.T @ x).square().sum()
        den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    else:  # tr(Kx Ky) = ||Yᵀ X||², ||Kx||_F = ||Xᵀ X||_F
        kx, ky = x @ x.T, y @ y.T
        num = (kx * ky).sum()
        den = torch.linalg.matrix_norm(kx) * torch.linalg.matrix_norm(ky)
    return (num / den).item() if den > 0 else float("nan")


def _device_of(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def conv_layers(model: nn.Module, image_shape: tuple[int, int, int], count: int) -> list[str]:
    """Names of the last ``count`` ``nn.Conv2d`` modules with a kernel larger than 1x1 (or, in
    a model that has them, ``Probe`` modules), in forward execution order (all of them when the
    model has fewer)."""
    ran: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    probes = [m for m in names if isinstance(m, Probe)]
    watched = probes or [m for m in names if isinstance(m, nn.Conv2d) and math.prod(m.kernel_size) > 1]
    hooks = [m.register_forward_hook(lambda mod, inp, out: ran.append(names[mod]) if names[mod] not in ran else None)
             for m in watched]
    try:
        with frozen(model):
            model(torch.zeros(2, *image_shape, device=_device_of(model)))
    finally:
        for h in hooks:
            h.remove()
    if not ran:
        raise ValueError(f"BEC: {type(model).__name__} runs no convolution with a kernel larger than 1x1")
    return ran[-count:]


class _Recorder:
    """Forward hooks keeping the outputs of the named modules (only the ``channels`` given per
    layer, if any) from the latest forward pass."""

    def __init__(self, model: nn.Module, layers: list[str], channels: list[torch.Tensor] | None = None):
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ValueError(f"BEC: {type(model).__name__} has no module {missing[0]!r}")
        self.outputs: dict[str, torch.Tensor] = {}
        self.hooks = [modules[n].register_forward_hook(self._keep(n, None if channels is None else channels[i]))
                      for i, n in enumerate(layers)]

    def _keep(self, name: str, keep: torch.Tensor | None):
        def hook(mod, inp, out):
            out = out.detach()
            if keep is not None:
                out = out.index_select(1, keep.to(out.device))
            # a copy: residual blocks often add the shortcut into the conv output in place
            self.outputs[name] = out.to(torch.float32, copy=True)
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@contextlib.contextmanager
def _recording(model: nn.Module, layers: list[str], device: torch.device,
               channels: list[torch.Tensor] | None = None):
    """A function mapping a uint8 batch to ``{layer: output}``, run in eval mode without
    gradients; the hooks and the model's mode are restored on exit."""
    rec = _Recorder(model, layers, channels)

    def run(images: torch.Tensor) -> dict[str, torch.Tensor]:
        rec.outputs = {}
        x = to_float(images.to(device))
        with autocast(device):
            model(prepare_batch(x, device))
        return rec.outputs

    try:
        with frozen(model), torch.no_grad():
            yield run
    finally:
        rec.close()


def trigger_activated_change(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor,
                             layers: list[str], device: torch.device, batch_size: int = 250) -> dict[str, torch.Tensor]:
    """Per layer, per channel: mean over pairs of the L2 norm (over positions) of the change the
    trigger causes in the channel's activation map. ``clean`` and ``triggered`` are uint8 pairs.

    (The reference divides by the layer's mean activation norm, a per-layer constant that
    cannot change the ranking within a layer; it is left out.)"""
    if clean.shape != triggered.shape:
        raise ValueError(f"TAC: clean {tuple(clean.shape)} and triggered {tuple(triggered.shape)} images must pair up")
    total = {n: torch.zeros((), device=device) for n in layers}
    with _recording(model, layers, device) as run:
        for s in range(0, len(clean), batch_size):
            a, b = run(clean[s:s + batch_size]), run(triggered[s:s + batch_size])
            for n in layers:
                total[n] = total[n] + (b[n] - a[n]).flatten(2).norm(dim=2).sum(0)
    return {n: (v / max(1, len(clean))).cpu() for n, v in total.items()}


def top_channels(tac: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (sorted) of the ``fraction`` of channels with the largest TAC (at least one)."""
    k = max(1, round(fraction * len(tac)))
    return torch.topk(tac, k).indices.sort().values


def selected_activations(model: nn.Module, images: torch.Tensor, layers: list[str],
                         channels: list[torch.Tensor], device: torch.device,
                         batch_size: int = 250) -> list[torch.Tensor]:
    """Per layer, the kept channels' activations flattened per sample: (n, k·H·W) float32."""
    parts: list[list[torch.Tensor]] = [[] for _ in layers]
    with _recording(model, layers, device, channels) as run:
        for s in range(0, len(images), batch_size):
            outs = run(images[s:s + batch_size])
            for i, n in enumerate(layers):
                parts[i].append(outs[n].flatten(1))
    return [torch.cat(p) for p in parts]


def _layers(model: nn.Module, ctx: EvalContext, reference: list[str]) -> list[str]:
    """The rule's layers in ``model``, checked to correspond one to one to ``reference``'s."""
    mine = conv_layers(model, ctx.dataset.image_shape, ctx.cfg.bec_layers)
    ours, theirs = dict(model.named_modules()), dict(ctx.backdoored.named_modules())
    shapes = [ours[n].out_channels for n in mine]
    expected = [theirs[n].out_channels for n in reference]
    if shapes != expected:
        raise ValueError(f"BEC: the tested model's layers have {shapes} channels, the backdoored model's "
                         f"{expected}; BEC compares models of one architecture")
    return mine


def _similarity(ctx: EvalContext, model: nn.Module) -> float:
    base = _backdoored_state(ctx)
    layers = _layers(model, ctx, base["layers"])
    feats = selected_activations(model, base["images"], layers, base["channels"], ctx.device)
    scores = [linear_cka(a, b) for a, b in zip(base["features"], feats)]
    return float(torch.tensor(scores).nanmean())


def _backdoored_state(ctx: EvalContext) -> dict:
    def compute() -> dict:
        c, test, attack = ctx.cfg, ctx.dataset.test, ctx.attack
        model = ctx.backdoored
        layers = conv_layers(model, ctx.dataset.image_shape, c.bec_layers)
        # TAC pairs: non-target test images and their (test-time) triggered versions
        pool = (test.y.cpu() != attack.target).nonzero().flatten()
        pick = pool[torch.randperm(len(pool), generator=ctx.generator("bec-tac"))[:c.bec_samples]]
        clean = test.x[pick.to(test.x.device)]
        triggered = to_uint8(attack.apply_trigger(to_float(clean), train=False))
        tac = trigger_activated_change(model, clean, triggered, layers, ctx.device)
        channels = [top_channels(tac[n], c.bec_top_fraction) for n in layers]
        n = min(c.bec_samples, len(ctx.poisoned_test))
        if n < c.bec_samples:
            ctx.log(f"[bec] only {n} poisoned test images (evaluation.bec_samples={c.bec_samples})")
        pick = torch.randperm(len(ctx.poisoned_test), generator=ctx.generator("bec-cka"))[:n]
        images = ctx.poisoned_test.x[pick.to(ctx.poisoned_test.x.device)]
        features = selected_activations(model, images, layers, channels, ctx.device)
        return {"layers": layers, "channels": channels, "images": images, "features": features}
    return ctx.cached("bec_backdoored", compute)


@EVALUATIONS.register("bec")
class BackdoorExistenceCoefficient(Evaluation):
    outputs = ("bec", "bec_raw", "bec_similarity", "bec_clean_similarity")

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        s_d = _similarity(ctx, ctx.model)
        s_c = ctx.cached("bec_clean_similarity", lambda: _similarity(ctx, ctx.clean_model()))
        raw = (s_d - s_c) / (1.0 - s_c) if 1.0 - s_c > 1e-12 else float("nan")
        k, centre = ctx.cfg.bec_k, ctx.cfg.bec_c
        return {"bec": 1.0 / (1.0 + math.exp(-k * (raw - centre))) if math.isfinite(raw) else float("nan"),
                "bec_raw": raw, "bec_similarity": s_d, "bec_clean_similarity": s_c}
