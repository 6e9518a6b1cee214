"""QRA, the query-based reactivation attack (Min et al. 2024; METHOD.md, evaluation protocol).

An MLP maps an image to a bounded perturbation that makes the purified model behave like the
RA-retuned one (which has the backdoor back) while a clean reference model keeps the true
label, so the perturbation reactivates the residual backdoor instead of being a generic
adversarial example. Q-ASR is the purified model's ASR on perturbed poisoned test images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..attacks.base import Attack, to_float, to_uint8
from ..data.base import ImageSet
from ..predict import predict
from ..registry import EVALUATIONS
from ..runtime import autocast, prepare_batch
from .base import EvalContext, Evaluation, frozen
from .metrics import attack_success_rate
from .retuning import retuned


class PerturbationGenerator(nn.Module):
    """Flattened image -> perturbation: (C·H·W) -> hidden x3 (ReLU) -> (C·H·W), tanh scaled by
    ``budget`` and clamped to ±budget; :meth:`forward` returns the perturbed image in [0, 1]."""

    def __init__(self, image_shape: tuple[int, int, int], hidden: int = 1024, budget: float = 16 / 255):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.budget = budget
        d = math.prod(self.image_shape)
        self.net = nn.Sequential(
            nn.Linear(d, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, d),
        )

    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.net(x.flatten(1))).view(-1, *self.image_shape) * self.budget
        return t.clamp(-self.budget, self.budget)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.perturbation(x).to(x.dtype)).clamp(0.0, 1.0)


def qra_set(train: ImageSet, attack: Attack, clean_size: int, poison_size: int,
            generator: torch.Generator) -> tuple[ImageSet, ImageSet]:
    """(clean, poisoned) generator training images with their true labels; the poisoned ones are
    triggered (training-time trigger) images of classes other than the target, disjoint from the
    clean ones."""
    if clean_size + poison_size > len(train):
        raise ValueError(f"evaluation.qra_clean_size + evaluation.qra_poison_size: {clean_size + poison_size} "
                         f"is more than the attacker's {len(train)} training images")
    perm = torch.randperm(len(train), generator=generator)
    clean = perm[:clean_size]
    rest = perm[clean_size:]
    rest = rest[train.y.cpu()[rest] != attack.target][:poison_size]
    if len(rest) < poison_size:
        raise ValueError(f"evaluation.qra_poison_size: only {len(rest)} non-target training images left, "
                         f"{poison_size} asked for")
    clean_set = train.subset(clean)
    src = train.subset(rest)
    poisoned = ImageSet(to_uint8(attack.poison_images(to_float(src.x), generator, train=True)), src.y)
    return clean_set, poisoned


def train_generator(purified: nn.Module, teacher: nn.Module, clean_model: nn.Module, data: ImageSet,
                    device: torch.device, *, epochs: int, lr: float, batch_size: int, budget: float,
                    hidden: int, kl_weight: float, seed: int, momentum: float = 0.9,
                    log=None) -> PerturbationGenerator:
    """Fit the generator on ``data`` (images with true labels) with
    ``kl_weight · KL(σ(teacher(x)) ‖ σ(purified(x̃))) + CE(clean_model(x̃), y)``,
    x̃ = clamp(x + g(x), 0, 1); the three classifiers stay frozen in eval mode."""
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        gen = PerturbationGenerator(tuple(data.x.shape[1:]), hidden, budget)
    gen = gen.to(device)
    shuffle = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(gen.parameters(), lr=lr, momentum=momentum)
    x_all, y_all = data.x.to(device), data.y.to(device)
    with frozen(purified, teacher, clean_model):
        # The teacher sees the unperturbed images, so its targets are fixed: compute them once.
        with torch.no_grad():
            teacher_prob = torch.cat([
                _logits(teacher, to_float(x_all[i:i + 512]), device).float().softmax(1)
                for i in range(0, len(x_all), 512)])
        for epoch in range(epochs):
            order = torch.randperm(len(data), generator=shuffle).to(device)
            total = torch.zeros((), device=device)  # summed on the device: one sync per logged epoch
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                x = to_float(x_all[idx])
                with autocast(device):
                    x_adv = gen(x)
                    student = _logits(purified, x_adv, device).float()
                    ref = _logits(clean_model, x_adv, device).float()
                kl = F.kl_div(F.log_softmax(student, 1), teacher_prob[idx], reduction="batchmean")
                loss = kl_weight * kl + F.cross_entropy(ref, y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.detach() * len(idx)
            if log is not None and (epoch + 1 == epochs or (epoch + 1) % 10 == 0):
                log(f"[qra] epoch {epoch + 1}/{epochs} loss {total.item() / len(data):.4f}")
    return gen.eval()


def _logits(model: nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return model(prepare_batch(x, device))


@EVALUATIONS.register("qra")
class QueryReactivationAttack(Evaluation):
    requires = ("ra",)
    outputs = ("q_asr", "q_asr_clean_model", "qra_clean_target_rate")

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        c = ctx.cfg
        clean_model = ctx.clean_model()
        clean_set, poisoned = qra_set(ctx.attacker_train, ctx.attack, c.qra_clean_size, c.qra_poison_size,
                                      ctx.generator("qra-data"))
        data = ImageSet(torch.cat([clean_set.x, poisoned.x]), torch.cat([clean_set.y, poisoned.y]))
        gen = train_generator(ctx.model, retuned(ctx, "model"), clean_model, data, ctx.device,
                              epochs=c.qra_epochs, lr=c.qra_lr, batch_size=c.qra_batch_size, budget=c.qra_budget,
                              hidden=c.qra_hidden, kl_weight=c.qra_kl_weight,
                              seed=int(ctx.generator("qra-init").initial_seed()), log=ctx.log)
        ctx.cache["qra_generator"] = gen
        perturb = gen  # predict() runs it under no_grad
        test = ctx.dataset.test
        non_target = test.subset((test.y != ctx.attack.target).nonzero().flatten())
        pred = predict(ctx.model, non_target, ctx.device, perturb=perturb)
        return {
            "q_asr": attack_success_rate(ctx.model, ctx.poisoned_test, ctx.device, perturb=perturb),
            "q_asr_clean_model": attack_success_rate(clean_model, ctx.poisoned_test, ctx.device, perturb=perturb),
            # the perturbation alone on clean images: high means a universal adversarial, not a reactivation
            "qra_clean_target_rate": (pred == ctx.attack.target).float().mean().item() if len(pred) else float("nan"),
        }

