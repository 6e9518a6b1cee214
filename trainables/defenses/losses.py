"""The loss terms of BI-BAU (METHOD.md), each a plain function of tensors.

E-step (minimised over the perturbation): ``trigger_loss``, ``kd_loss``, ``prior_terms``.
M-step (minimised over the weights): ``ewc_penalty`` and ``inverse_ewc``, with the Fishers of
``fisher.py``. Everything is averaged over the batch.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

ALIGN_EPS = 1e-8  # METHOD: skip the alignment term while ||u|| is below this
COS_EPS = 1e-12  # METHOD's cosine: <a, b> / (||a|| ||b|| + 1e-12)
INV_EWC_EPS = 1e-12


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine of (B, d) rows, with METHOD's epsilon outside the product of norms."""
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + COS_EPS)


def trigger_loss(logits_bd_adv: torch.Tensor, y: torch.Tensor, target: int | None) -> torch.Tensor:
    """L_trig: the backdoored model should fire on x'.

    Targeted: CE(f_bd(x'), y_t). Untargeted (``target`` None): -CE(f_bd(x'), y).
    """
    if target is None:
        return -F.cross_entropy(logits_bd_adv.float(), y)
    return F.cross_entropy(logits_bd_adv.float(), torch.full_like(y, target))


def kd_loss(logits_theta_adv: torch.Tensor, logits_bd_clean: torch.Tensor, y: torch.Tensor,
            temperature: float, gamma: float) -> torch.Tensor:
    """L_KD = (1-γ)·CE(f_θ(x'), y) + γ·T²·KL(σ(f_bd(x)/T) || σ(f_θ(x')/T))."""
    student = logits_theta_adv.float()
    ce = F.cross_entropy(student, y)
    if gamma == 0.0:
        return ce
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(logits_bd_clean.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return (1.0 - gamma) * ce + gamma * temperature ** 2 * kl


def backdoor_direction(w_bd: torch.Tensor, w_theta: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """u = (W_bd - W_θ)[k] per sample: (B, d) rows of the head's drift, for class indices ``k``."""
    return (w_bd.float() - w_theta.float())[k]


def prior_terms(h_adv: torch.Tensor, h_clean: torch.Tensor, u: torch.Tensor,
                theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of L_prior = (cos(Δh, h_θ(x)) - θ)² - cos(Δh, u), as (angle, align).

    Δh = h_θ(x') - h_θ(x). Rows with ||u|| < 1e-8 (at the start W_θ = W_bd) add nothing to the
    alignment term; the mean still runs over the whole batch.
    """
    h_adv, h_clean, u = h_adv.float(), h_clean.float(), u.float()
    dh = h_adv - h_clean
    angle = (cosine(dh, h_clean) - theta).pow(2).mean()
    live = u.norm(dim=1) >= ALIGN_EPS
    if not bool(live.any()):
        return angle, angle.new_zeros(())
    align = -(cosine(dh, u) * live).sum() / len(u)
    return angle, align


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """L_EWC = Σ_i F_i (θ_i - θ^t_i)² over every parameter named in ``fisher``."""
    return _weighted_sq_distance(params, anchor, fisher)


def inverse_ewc(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor], clip: float) -> torch.Tensor:
    """L_invEWC = min(1 / (Σ_i F_i (θ_i - θ_bd,i)² + 1e-12), C): the clipped reciprocal.

    At θ = θ_bd it sits at C with no gradient; away from θ_bd it fades like 1/distance², so
    minimising it pushes θ off θ_bd along the Fisher's directions with a force that decays.
    """
    dist = _weighted_sq_distance(params, anchor, fisher)
    return (1.0 / (dist + INV_EWC_EPS)).clamp(max=clip)


def _weighted_sq_distance(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                          fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    terms: Iterable[torch.Tensor] = (
        (f * (params[n].float() - anchor[n].float()).pow(2)).sum() for n, f in fisher.items()
    )
    total = None
    for t in terms:
        total = t if total is None else total + t
    if total is None:
        raise ValueError("EWC over an empty Fisher: no trainable parameters were found")
    return total
