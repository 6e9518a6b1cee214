"""RA, the retuning attack (Min et al. 2024; METHOD.md, evaluation protocol): fine-tune the
purified model on a small benign set with a few poisoned samples mixed in; R-ASR is the ASR
of the result. The same retuning of the clean reference model shows what RA alone achieves.
The fine-tuning itself is the run's task's (``EvalContext.task.retune``: ``retune.py`` for a
classifier, ``contrastive.train.retune_clip`` for a CLIP).
"""
from __future__ import annotations

import torch

from ..attacks.base import Attack, to_float, to_uint8
from ..data.base import ImageSet
from ..models.base import Classifier
from ..registry import EVALUATIONS
from .base import EvalContext, Evaluation
from .metrics import attack_success_rate, clean_accuracy

# Poisoned samples per attack (the paper's Appendix D.2): 5 unless listed. The low-orthogonality
# attacks get 2 on CIFAR-10 and Tiny-ImageNet but 5 on GTSRB.
RA_POISON_COUNTS: dict[str, int] = {"blended": 1, "refool": 2, "sig": 2, "narcissus": 2}
RA_DEFAULT_POISON_COUNT = 5


def default_poison_count(attack: str, dataset: str = "cifar10") -> int:
    """RA's poisoned-sample count for an attack (registered name) on a data set."""
    low_orthogonality = attack in ("refool", "sig", "narcissus") or attack.startswith("adaptive")
    if low_orthogonality and dataset == "gtsrb":
        return RA_DEFAULT_POISON_COUNT
    if attack.startswith("adaptive"):
        return 2
    return RA_POISON_COUNTS.get(attack, RA_DEFAULT_POISON_COUNT)


def retuning_set(train: ImageSet, attack: Attack, size: int, poison_count: int,
                 generator: torch.Generator) -> tuple[ImageSet, torch.Tensor]:
    """``size`` training images of which ``poison_count`` carry the (training-time) trigger
    and the target label, and a bool mask of the poisoned ones.

    Dirty-label attacks trigger images of other classes; clean-label attacks (SIG, Narcissus)
    trigger target-class images, as their poisoned training samples are.
    """
    if size > len(train):
        raise ValueError(f"evaluation.ra_size: {size} is more than the attacker's {len(train)} training images")
    if poison_count > size:
        raise ValueError(f"evaluation.ra_poison_count: {poison_count} is more than evaluation.ra_size={size}")
    perm = torch.randperm(len(train), generator=generator)
    benign = perm[: size - poison_count]
    rest = perm[size - poison_count:]
    labels = train.y.cpu()[rest]
    eligible = labels == attack.target if attack.clean_label else labels != attack.target
    chosen = rest[eligible][:poison_count]
    if len(chosen) < poison_count:
        raise ValueError(f"evaluation.ra_poison_count: only {len(chosen)} training images can carry the trigger, "
                         f"{poison_count} asked for")
    index = torch.cat([benign, chosen]).to(train.x.device)
    picked = train.subset(index)
    x, y = picked.x.clone(), picked.y.clone()
    mask = torch.zeros(size, dtype=torch.bool)
    mask[size - poison_count:] = True
    if poison_count:
        x[-poison_count:] = to_uint8(attack.poison_images(to_float(x[-poison_count:]), generator, train=True))
        y[-poison_count:] = attack.target
    # image-caption pairs (a CLIP's RA): the poisoned images are paired with target captions
    target = None if attack.clean_label else attack.target
    return picked.poisoned_copy(x, y, mask.nonzero().flatten(), target, generator), mask


def poison_count(ctx: EvalContext) -> int:
    if ctx.cfg.ra_poison_count is not None:
        return ctx.cfg.ra_poison_count
    return default_poison_count(ctx.attack.cfg.name, ctx.dataset.name)


def retuning_data(ctx: EvalContext) -> tuple[ImageSet, torch.Tensor]:
    """RA's training set (shared by the purified and the clean reference model)."""
    return ctx.cached("ra_data", lambda: retuning_set(
        ctx.attacker_train, ctx.attack, ctx.cfg.ra_size, poison_count(ctx), ctx.generator("ra-data")))


def retuned(ctx: EvalContext, which: str = "model") -> Classifier:
    """The RA-retuned copy of ``ctx.model`` (``which='model'``) or of the clean reference model
    (``'clean'``), computed once per context."""
    def compute() -> Classifier:
        source = ctx.model if which == "model" else ctx.clean_model()
        data, mask = retuning_data(ctx)
        c = ctx.cfg
        # the task's fine-tuning: SGD with cross-entropy, or a CLIP's with its contrastive loss
        return ctx.task.retune(source, data, mask, ctx.device, epochs=c.ra_epochs, lr=c.ra_lr,
                               batch_size=c.ra_batch_size, generator=ctx.generator(f"ra-train-{which}"),
                               hflip=ctx.dataset.hflip)
    if which not in ("model", "clean"):
        raise ValueError(f"which: {which!r}; allowed: 'model', 'clean'")
    return ctx.cached(f"ra_{which}", compute)


@EVALUATIONS.register("ra")
class RetuningAttack(Evaluation):
    outputs = ("r_asr", "ra_ca", "ra_clean_asr", "ra_clean_ca", "ra_poison_count")

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        tuned = retuned(ctx, "model")
        out = {"r_asr": attack_success_rate(tuned, ctx.poisoned_test, ctx.device),
               "ra_ca": clean_accuracy(tuned, ctx.dataset.test, ctx.device),
               "ra_poison_count": float(poison_count(ctx))}
        if ctx.cfg.ra_on_clean:
            ctx.log("[eval] ra: retuning the clean reference model too (evaluation.ra_on_clean): it is trained "
                    "first, the attack stage's schedule without the attack, unless the model cache holds it")
            clean = retuned(ctx, "clean")
            out["ra_clean_asr"] = attack_success_rate(clean, ctx.poisoned_test, ctx.device)
            out["ra_clean_ca"] = clean_accuracy(clean, ctx.dataset.test, ctx.device)
        return out
