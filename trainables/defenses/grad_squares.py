"""Sums over samples of squared per-sample gradients from layer hooks: METHOD's per-sample
Fisher (``fisher.py``, ``estimator="sample"``) without torch.func's vmap, the same numbers.

The BackPACK "SumGradSquared" / Opacus idea. One forward and one backward per chunk, with the
loss summed over the chunk: in eval mode the samples are independent, so row i of a layer's
output gradient δ is sample i's own. Each supported layer keeps its input a (forward hook) and
δ (a hook on its output tensor, which sees the gradient of the layer's own output even when a
later op such as ReLU(inplace=True) overwrites it), and its per-sample parameter gradients
follow in closed form:

- Linear on (N, in): Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ(a²), one matmul, no per-sample tensor;
  on (N, ..., in) the per-sample gradients by einsum, then squared;
- Conv2d (groups 1, zero padding; any stride and dilation): per-sample weight gradients (a
  convolution grouped by sample, or bmm of δ_i and the unfolded a_i), then squared and summed;
- BatchNorm in eval mode (running statistics): γ: Σ_hw δ·x̂, β: Σ_hw δ per sample and channel.

The backward differentiates the input only (no weight gradient, except on ``verify`` below), and
the squares are taken in float32 whatever autocast ran the layers in. Anything else gives None (the caller then
uses vmap, so a result never changes silently): a parameterised module of another type or a
subclass, a parameter registered twice, a layer that runs more than once per forward (weight
sharing) or whose output does not reach the loss through the input; and a parameter used
outside its own layer's forward is caught by comparing Σ_i g_i with autograd's gradient of the
summed loss (``verify``, done on a call's first chunk).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..runtime import autocast

# elements of one per-sample gradient block (or unfolded input) at a time: bounds a layer's peak memory
BLOCK = 1 << 27
CACHE_BLOCK = 1 << 19  # on the CPU, where squaring a block that fits in cache beats one large block
GROUPED_MIN_POSITIONS = 64  # output positions from which the grouped form beat bmm (CPU, 1 thread)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _supported(module: nn.Module) -> bool:
    names = {n for n, _ in module.named_parameters(recurse=False)}
    if not names <= {"weight", "bias"}:
        return False
    if type(module) is nn.Linear:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if type(module) in BATCHNORMS:
        return module.affine and module.track_running_stats
    return False


class GradSquares:
    """The hooked layers of one model (see the module docstring); :meth:`of` gives None when a
    parameter's layer is unsupported."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module]):
        self.model = model
        self.layers = layers  # parameter name prefix ('' for the root) -> layer

    @classmethod
    def of(cls, model: nn.Module) -> GradSquares | None:
        layers: dict[str, nn.Module] = {}
        owners: set[int] = set()
        for name, module in model.named_modules(remove_duplicate=False):
            direct = list(module.parameters(recurse=False))
            if not direct:
                continue
            if not _supported(module) or any(id(p) in owners for p in direct):
                return None  # another type, or a layer or parameter registered twice (tied weights)
            owners.update(id(p) for p in direct)
            layers[name] = module
        if len(owners) != len(list(model.parameters())):
            return None
        return cls(model, layers)

    def chunk(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor | None, device: torch.device, verify: bool = False) -> dict[str, torch.Tensor] | None:
        """Σ over the chunk's samples of each parameter's squared per-sample gradient of
        CE(model(x_i), y_i) (float32), or None where the hooks cannot give it exactly.
        ``y`` None: the model's own predictions from the same forward."""
        if any(m.training for m in self.layers.values() if type(m) in BATCHNORMS):
            return None  # BatchNorm in train mode mixes the samples
        seen: dict[nn.Module, dict] = {m: {"calls": 0} for m in self.layers.values()}

        def forward_hook(module, inputs, output):
            rec = seen[module]
            rec["calls"] += 1
            rec["a"] = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: rec.__setitem__("d", g.detach()))

        handles = [m.register_forward_hook(forward_hook) for m in self.layers.values()]
        try:
            x = x.detach().requires_grad_(True)
            live = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                with autocast(device):
                    logits = functional_call(self.model, (live, buffers), (x,))
                if any(rec["calls"] > 1 for rec in seen.values()):
                    return None  # weight sharing: a layer's hooks would see only part of its gradient
                logits = logits.float()
                labels = logits.detach().argmax(1) if y is None else y
                loss = F.cross_entropy(logits, labels, reduction="sum")
                wanted = [x] + (list(live.values()) if verify else [])
                grads = torch.autograd.grad(loss, wanted, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        out: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        for prefix, module in self.layers.items():
            rec = seen[module]
            if rec["calls"] == 0:
                # never ran: no per-sample gradient (verify catches a parameter used elsewhere)
                parts = {n: (torch.zeros_like(p, dtype=torch.float32),) * 2
                         for n, p in module.named_parameters(recurse=False)}
            elif "d" not in rec:
                return None  # its output does not reach the loss through x
            else:
                parts = _layer(module, rec["a"], rec["d"], verify)
            for n, (sq, total) in parts.items():
                key = f"{prefix}.{n}" if prefix else n
                out[key] = sq
                sums[key] = total
        if verify and not _agrees(sums, dict(zip(live, grads[1:])), device):
            return None
        return out


def _layer(module: nn.Module, a: torch.Tensor, d: torch.Tensor, sums: bool
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per parameter of ``module``: (Σ_i g_i², Σ_i g_i or None without ``sums``), float32."""
    a, d = a.float(), d.float()
    if type(module) is nn.Linear:
        return _linear(module, a, d, sums)
    if type(module) is nn.Conv2d:
        return _conv2d(module, a, d, sums)
    return _batchnorm(module, a, d, sums)


def _from_samples(g: torch.Tensor, sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σ_i g_i², Σ_i g_i) of per-sample gradients (N, ...)."""
    return g.pow(2).sum(0), g.sum(0) if sums else None


def _linear(module: nn.Linear, a: torch.Tensor, d: torch.Tensor, sums: bool):
    if a.dim() == 2:
        parts = {"weight": (d.pow(2).t() @ a.pow(2), d.t() @ a if sums else None)}
        g_b = d
    else:
        a, d = a.flatten(1, -2), d.flatten(1, -2)  # (N, T, in), (N, T, out): a sample's rows add up
        sq = torch.zeros_like(module.weight, dtype=torch.float32)
        total = torch.zeros_like(sq) if sums else None
        rows = max(1, BLOCK // module.weight.numel())
        for i in range(0, len(a), rows):
            g = torch.einsum("nto,nti->noi", d[i:i + rows], a[i:i + rows])
            if sums:
                total += g.sum(0)
            sq += g.square_().sum(0)
        parts = {"weight": (sq, total)}
        g_b = d.sum(1)
    if module.bias is not None:
        parts["bias"] = _from_samples(g_b, sums)
    return parts


def _conv2d(module: nn.Conv2d, a: torch.Tensor, d: torch.Tensor, sums: bool):
    """Per-sample weight gradients, by the form that was fastest on each shape (1 CPU thread,
    small_resnet): where the output map is large (L >= 64 positions), PyTorch's own convolution
    weight gradient with the chunk as one convolution grouped by sample; where it is small, δ_i
    times the unfolded input by bmm (the grouped form's many tiny groups are slow there), on the
    CPU a few samples at a time so that their gradients stay in cache while they are squared."""
    n, c_out = d.shape[:2]
    shape = tuple(module.weight.shape)
    size = module.weight.numel()
    sq = torch.zeros(shape, device=d.device, dtype=torch.float32)
    total = torch.zeros_like(sq) if sums else None
    positions = d.shape[2] * d.shape[3]
    a, d = a.contiguous(), d.contiguous()
    if positions >= GROUPED_MIN_POSITIONS:
        rows = max(1, BLOCK // size)
        for i in range(0, n, rows):
            ai, di = a[i:i + rows], d[i:i + rows]
            k = len(ai)
            g = torch.nn.grad.conv2d_weight(ai.reshape(1, -1, *ai.shape[2:]), (k * c_out,) + shape[1:],
                                            di.reshape(1, -1, *di.shape[2:]), groups=k, stride=module.stride,
                                            padding=module.padding, dilation=module.dilation).view(k, *shape)
            if sums:
                total += g.sum(0)
            sq += g.square_().sum(0)
    else:
        d = d.view(n, c_out, positions)
        rows = max(1, (CACHE_BLOCK if d.device.type == "cpu" else BLOCK) // max(size, shape[1] * shape[2] * shape[3]
                                                                              * positions))
        for i in range(0, n, rows):
            cols = F.unfold(a[i:i + rows], module.kernel_size, dilation=module.dilation, padding=module.padding,
                            stride=module.stride)  # (rows, C_in·kh·kw, L)
            g = torch.bmm(d[i:i + rows], cols.transpose(1, 2)).view(-1, *shape)
            if sums:
                total += g.sum(0)
            sq += g.square_().sum(0)
    parts = {"weight": (sq, total)}
    if module.bias is not None:
        parts["bias"] = _from_samples(d.flatten(2).sum(2), sums)
    return parts


def _batchnorm(module: nn.modules.batchnorm._BatchNorm, a: torch.Tensor, d: torch.Tensor, sums: bool):
    shape = (1, -1) + (1,) * (a.dim() - 2)
    xhat = (a - module.running_mean.float().view(shape)) * torch.rsqrt(module.running_var.float().view(shape)
                                                                        + module.eps)
    g_w = (d * xhat).flatten(2).sum(2) if a.dim() > 2 else d * xhat  # (N, C)
    g_b = d.flatten(2).sum(2) if a.dim() > 2 else d
    return {"weight": _from_samples(g_w, sums), "bias": _from_samples(g_b, sums)}


def _agrees(sums: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None], device: torch.device) -> bool:
    """Σ_i g_i from the hooks equals autograd's gradient of the summed loss, per parameter
    (float32 on CPU; bf16 autocast on CUDA rounds the reference, hence the looser bound)."""
    tol = 1e-3 if device.type == "cpu" else 5e-2
    for name, ref in grads.items():
        ours = sums[name]
        ref = torch.zeros_like(ours) if ref is None else ref.float()
        scale = torch.maximum(ref.abs().max(), ours.abs().max())
        if bool((ours - ref).abs().max() > tol * scale + 1e-30):
            return False
    return True
