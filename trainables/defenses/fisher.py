"""Diagonal empirical Fisher information of a classifier, for BI-BAU's EWC terms.

Two estimators (``estimator``):
- ``batch`` (default, cheap): the squared gradient of each mini-batch's mean loss, averaged
  over mini-batches. It is the standard approximation of EWC code; it underestimates the
  per-sample Fisher by about the batch size, which the normalisation below absorbs.
- ``sample``: the mean over samples of squared per-sample gradients, the textbook definition
  (METHOD's). Computed from layer hooks in closed form (``grad_squares.py``: one forward and one
  backward per chunk) where every parameter's layer allows it, else by torch.func's vmap of
  per-sample gradients (memory grows with parameters x chunk); both give the same numbers.
Both run the model in eval mode (BatchNorm uses its running statistics and they are not
updated) and leave the model's parameters, gradients and mode untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..runtime import autocast, prepare_batch
from .grad_squares import GradSquares

ESTIMATORS = ("batch", "sample")
NORMALISATIONS = ("max", "mean", "none")


def _as_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def diagonal_fisher(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
                    device: torch.device, *, batch_size: int = 64, estimator: str = "batch",
                    normalize: str = "max") -> dict[str, torch.Tensor]:
    """Fisher diagonal of ``model`` on images ``x`` (uint8 or float [0, 1], (N, C, H, W)).

    ``labels`` None uses the model's own predicted labels (BI-BAU's F^U on crafted examples).
    Returns one float32 tensor per named parameter, normalised by ``normalize`` over all
    entries together (``max``: entries in [0, 1]; ``mean``: mean 1; ``none``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"fisher estimator {estimator!r}; allowed: {', '.join(ESTIMATORS)}")
    if normalize not in NORMALISATIONS:
        raise ValueError(f"fisher normalisation {normalize!r}; allowed: {', '.join(NORMALISATIONS)}")
    if len(x) == 0:
        raise ValueError("Fisher on an empty set of images")
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    hooks = GradSquares.of(model) if estimator == "sample" else None
    try:
        for start in range(0, len(x), batch_size):
            xb = prepare_batch(_as_float(x[start:start + batch_size], device), device)
            yb = None if labels is None else labels[start:start + batch_size].to(device)
            if estimator == "sample":
                # the hooks check their sums against autograd on the first chunk; once they
                # cannot give the exact numbers, vmap does the rest of the call
                squares = hooks.chunk(params, buffers, xb, yb, device, verify=count == 0) if hooks else None
                if squares is None:
                    hooks = None
                    yb = _predicted(model, params, buffers, xb, device) if yb is None else yb
                    squares = {n: g.float().pow(2).sum(0)
                               for n, g in _per_sample_grads(model, params, buffers, xb, yb, device).items()}
                count += len(xb)
            else:
                yb = _predicted(model, params, buffers, xb, device) if yb is None else yb
                live = {n: p.clone().requires_grad_(True) for n, p in params.items()}
                with autocast(device):
                    logits = functional_call(model, (live, buffers), (xb,))
                grads = torch.autograd.grad(F.cross_entropy(logits.float(), yb), list(live.values()))
                squares = {n: g.float().pow(2) for n, g in zip(live, grads)}
                count += 1
            for n, sq in squares.items():
                total[n] += sq
    finally:
        model.train(was_training)
    fisher = {n: t / count for n, t in total.items()}
    return normalize_fisher(fisher, normalize)


def _predicted(model, params, buffers, xb, device) -> torch.Tensor:
    with torch.no_grad(), autocast(device):
        return functional_call(model, (params, buffers), (xb,)).argmax(1)


def _per_sample_grads(model, params, buffers, xb, yb, device) -> dict[str, torch.Tensor]:
    def loss_one(p, x1, y1):
        with autocast(device):
            logits = functional_call(model, (p, buffers), (x1.unsqueeze(0),))
        return F.cross_entropy(logits.float(), y1.unsqueeze(0))

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, xb, yb)


def normalize_fisher(fisher: dict[str, torch.Tensor], how: str = "max") -> dict[str, torch.Tensor]:
    """Divide every entry by the maximum (or mean) over all parameters together.

    METHOD: with the max, entries lie in [0, 1] and EWC's curvature is at most 2·λ1, which keeps
    SGD stable for 2·lr·λ1 <= 1; the mean made SGD diverge at λ1 = 1. An all-zero Fisher stays zero.
    """
    if how == "none":
        return fisher
    flat = torch.cat([f.flatten() for f in fisher.values()])
    scale = flat.max() if how == "max" else flat.mean()
    if not bool(scale > 0):
        return fisher
    return {n: f / scale for n, f in fisher.items()}
