"""Real data: each of SIG, WaNet, Refool, ISSBA, IAD, Narcissus, Adaptive-Blend and Adaptive-Patch implants a backdoor in a
small ResNet trained on a CIFAR-10 subset: the poisoned model's ASR is well above the clean model's
on the same triggered test images, and well above the share of the same images *without* the
trigger that it sends to the target (so a bias towards the target class does not pass for a
backdoor).

Sized for CI on a shared 2-core CPU, in two tiers, each with one clean model shared by its attacks:

* SIG and Refool (strong triggers), and ISSBA, IAD and Narcissus at CI settings of their learned
  parts, learn on 2,000 training images, a 2-stage ResNet of width 8, 6 epochs without crop or
  flip: about 20 s of CPU each (the learned attacks 15-30 s), plus 10 s for the tier's clean model.
* WaNet and the adaptive attacks (subtle or weak triggers) need the BadNets test's size: 4,000
  images, a 3-stage ResNet of width 16, 10 epochs (about a minute each). On the smaller tier they
  sent untriggered images to the target as often as triggered ones (measured: WaNet ASR 0.53 with
  0.52 of untriggered images to the target; Adaptive-Patch 0.34 / 0.34; Adaptive-Blend 0.50 / 0.34).

The attacks run at settings that learn in that time (noted per attack); their own defaults are
measured at CPU scale by benchmarks/cifar10_small.py.

The larger tier does not fit CI's budget (about 5 minutes for its clean model and the first attack
on an idle 2-core machine, against the guide's 30 s per attack), and Adaptive-Blend failed it once
(2026-11-30): it runs only with ``BIBAU_LONG_TESTS=1``, and is an open point of issue 12.
Cheaper tiers tried for the three (2026-12-01, lead = ASR minus the share of untriggered images sent
to the target; the test asks for 0.3), none reliable enough for CI:

* 2,000 images, width 8, 2 stages, 10 epochs (26 s each): WaNet (s 2, no rotation; also without
  crop, without noise mode) leads by 0.02-0.06, Adaptive-Blend 0.16, Adaptive-Patch -0.04.
* 16x16 images, 4,000, width 16, 3 stages, 12 epochs (45-51 s each): WaNet 0.02-0.05, Adaptive-Blend
  0.32, Adaptive-Patch 0.23.
* fine-tuning a shared clean model (16x16 for 6 epochs, or 32x32 and 2,000 images for 4) with the
  poisoned data: WaNet 0.08-0.29 (0.29 only without noise mode and crop), Adaptive-* 0.00-0.29.
"""
from __future__ import annotations

import os

import pytest
import torch

from trainables.attacks import build_attack
from trainables.attacks.base import AttackConfig
from trainables.attacks.coupling import FC_WEIGHT, feature_distance
from trainables.config import build
from trainables.data import DataConfig, load_dataset
from trainables.data.splits import seeded_generator
from trainables.evaluation.metrics import attack_success_rate, clean_accuracy
from trainables.predict import predict
from trainables.models import ModelConfig, create_model
from trainables.registry import ATTACKS
from trainables.schema import TrainConfig
from trainables.train import train_model

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
# tier -> (training images, model width, model depth, training)
TIERS = {
    "small": (2000, 8, 2, TrainConfig(epochs=6, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)),
    "badnets": (4000, 16, 3, TrainConfig(epochs=10, batch_size=64, lr=0.05, crop_padding=0, hflip=False,
                                         eval_every=0)),
}
# name -> (tier, options, least ASR lead over the clean model and over untriggered images)
CASES = {
    # 100% of the target class instead of 50%: clean-label needs every signal it gets in 6 epochs
    "sig": ("small", {"target_fraction": 1.0}, 0.3),
    "refool": ("small", {}, 0.3),
    # a stronger warp (s 2 instead of 0.5) without rotation: WaNet's default needs tens of epochs
    "wanet": ("badnets", {"s": 2.0, "rotation": 0.0}, 0.3),
    # 10% poisoned + 5% cover instead of the paper's 0.3% + 0.3% (0.6%): 12 poisoned images
    # cannot be learned here
    "adaptive_blend": ("badnets", {"poison_rate": 0.1, "cover_rate": 0.05}, 0.3),
    "adaptive_patch": ("badnets", {"poison_rate": 0.1, "cover_rate": 0.05}, 0.3),
    # learned triggers at CI size (their reference sizes are the spec's): an encoder of width 8 and
    # 16 bits trained for 2 epochs. It is no steganographic fingerprint yet (bit accuracy 0.38,
    # PSNR 12 dB): what implants is the encoder's one fixed re-rendering of every image (measured
    # 2026-12-07: ASR 1.00, untriggered to the target 0.04, clean model 0.00; about 25 s of CPU)
    "issba": ("small", {"width": 8, "bits": 16, "encoder_epochs": 2}, 0.3),
    # generators of width 8 and 1 mask epoch instead of 32 and 25: M is still dense after one epoch
    # (about 70% of the pixels carry G's pattern, not the reference's 3.2%), a trigger 6 epochs can learn
    # (measured 2026-12-07: ASR 0.95, untriggered to the target 0.06, clean model 0.00; about 30 s of CPU)
    "iad": ("small", {"width": 8, "mask_epochs": 1}, 0.3),
    # the scikit-learn digits as POOD (Tiny-ImageNet is not on a CI machine), every target-class
    # image poisoned, a surrogate of 3 epochs and 40 trigger passes instead of 200 and 1000. Five
    # passes (10 RAdam steps, whose first ones are not yet adaptive) left delta far inside its bound
    # and implanted nothing (ASR 0.04, clean model 0.06); after 40, 70% of delta's pixels sit at
    # +-16/255 (measured 2026-12-07: ASR 1.00, untriggered to the target 0.00, clean model 0.23: the
    # 3x test trigger also moves a clean model a little, as Narcissus' trigger is made to)
    "narcissus": ("small", {"pood": "digits", "poison_rate": 0.1, "surrogate_epochs": 3, "surrogate_batch": 128,
                            "warmup_epochs": 1, "trigger_epochs": 40}, 0.3),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: on a loaded 2-core machine, intra-op threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tier_world(cifar10_archive):
    """Per tier, built on first use: (data, clean model); ``clean=False``: (data, None), without
    training the clean model."""
    data_of, model_of = {}, {}

    def get(tier: str, clean: bool = True):
        size, width, depth, train = TIERS[tier]
        if tier not in data_of:
            data_of[tier] = load_dataset(DataConfig(name="cifar10", root=str(cifar10_archive), train_size=size,
                                                    test_size=500))
        data = data_of[tier]
        if clean and tier not in model_of:
            model = model_for(data, tier)
            train_model(model, data.train, train, CPU, generator=seeded_generator(0, "train"), log=lambda _: None)
            model_of[tier] = model
        return data, model_of.get(tier) if clean else None
    return get


def model_for(data, tier: str):
    _, width, depth, _ = TIERS[tier]
    return create_model(ModelConfig(name="small_resnet", width=width, depth=depth), data.num_classes, mean=data.mean,
                        std=data.std, generator=seeded_generator(0, "model_init"))


LONG = os.environ.get("BIBAU_LONG_TESTS") == "1"


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_implants_a_backdoor_on_cifar10(name, tier_world):
    tier, options, lead = CASES[name]
    if tier != "small" and not LONG:
        pytest.skip(f"{name} implants only at the larger tier, minutes beyond CI's budget; BIBAU_LONG_TESTS=1 runs it")
    data, clean_model = tier_world(tier)
    attack = build_attack(build(AttackConfig, {"name": name, **options}, "attack", registry=ATTACKS), data)
    model = model_for(data, tier)
    attack.prepare(data.train, model, CPU, seeded_generator(0, "attack_prepare"))  # Narcissus copies the model
    poisoned, index = attack.poison_trainset(data.train, seeded_generator(0, "poison"))
    train_model(model, poisoned, TIERS[tier][3], CPU, generator=seeded_generator(0, "train"), attack=attack,
                log=lambda _: None)
    triggered = attack.poison_testset(data.test)  # after training: IAD's generator trained with the model
    ca, asr = clean_accuracy(model, data.test, CPU), attack_success_rate(model, triggered, CPU)
    clean_ca, clean_asr = clean_accuracy(clean_model, data.test, CPU), attack_success_rate(clean_model, triggered, CPU)
    # the trigger, not a bias towards the target, flips the predictions: the same images without
    # it rarely go to the target
    untriggered = data.test.subset((data.test.y != attack.target).nonzero().flatten())
    as_target = (predict(model, untriggered, CPU) == attack.target).float().mean().item()
    print(f"{name}: {len(index)} poisoned, {len(attack.cover_index)} cover; CA {ca:.3f} ASR {asr:.3f} "
          f"(untriggered to target {as_target:.3f}); clean model CA {clean_ca:.3f} ASR {clean_asr:.3f}")
    assert asr >= clean_asr + lead, f"ASR {asr:.3f} vs the clean model's {clean_asr:.3f} (CA {ca:.3f})"
    assert asr >= as_target + lead, f"ASR {asr:.3f}, but {as_target:.3f} of untriggered images go to the target"
    assert ca >= 0.15, f"CA {ca:.3f} is too close to chance (0.1)"


def test_feature_coupling_pulls_poisoned_samples_to_the_target_class(tier_world):
    """Feature coupling (an option of every build-time attack, ``coupling.py``) at the registered
    ``*_fc`` variants' weight (0.05), against the same attack without it on the same data, seed and
    trigger: the poisoned training samples' feature distance to the target class's centroid
    (relative to the class's own spread) falls several-fold, while the model keeps its clean
    accuracy and the backdoor.

    The attack is ISSBA at its CI settings, whose trigger this tier learns (ASR 1.00): its poisoned
    samples form a cluster of their own (distance about 5.6), and coupling moves that cluster into
    the target class (measured 2026-12-07: 5.61 -> 0.33, CA 0.318 -> 0.314; at w 0.15: 0.08, CA
    0.25). Adaptive-Blend, whose trigger this tier barely learns (ASR 0.50), was the first choice and
    is no test of the term: coupling moved its distance only by moving the whole model towards the
    target (w 0.15: 1.55 -> 1.19 with CA 0.26 -> 0.19; w 0.3: 1.01 with CA 0.12 and ASR 1.0, the
    model sending most images to the target; 10 epochs and alpha_train 0.3 gave the same picture)."""
    data, _ = tier_world("small", clean=False)
    options = {"width": 8, "bits": 16, "encoder_epochs": 2}
    runs = {}
    trigger = None
    for weight in (0.0, FC_WEIGHT):
        attack = build_attack(build(AttackConfig, {"name": "issba", **options, "coupling_weight": weight}, "attack",
                                    registry=ATTACKS), data)
        if trigger is None:  # one encoder for both runs: only the coupling term differs
            attack.prepare(data.train, model_for(data, "small"), CPU, seeded_generator(0, "attack_prepare"))
            trigger = attack.state_tensors()
        else:
            attack.load_state(trigger)
        model = model_for(data, "small")
        poisoned, index = attack.poison_trainset(data.train, seeded_generator(0, "poison"))
        train_model(model, poisoned, TIERS["small"][3], CPU, generator=seeded_generator(0, "train"), attack=attack,
                    log=lambda _: None)
        rows = data.train.y == attack.target
        rows[index] = False
        distance = feature_distance(model, poisoned.subset(index), data.train.subset(rows.nonzero().flatten()), CPU)
        runs[weight] = (distance, clean_accuracy(model, data.test, CPU),
                        attack_success_rate(model, attack.poison_testset(data.test), CPU))
    print(f"(feature distance, CA, ASR) by coupling weight: {runs}")
    (plain, plain_ca, plain_asr), (coupled, coupled_ca, coupled_asr) = runs[0.0], runs[FC_WEIGHT]
    assert plain > 2.0, f"without coupling the poisoned samples should sit apart from the target class: {runs}"
    assert coupled < 0.25 * plain, f"coupling did not pull the poisoned samples to the target class: {runs}"
    assert coupled_ca >= plain_ca - 0.05 and coupled_ca >= 0.25, f"coupling cost the model its accuracy: {runs}"
    assert coupled_asr >= 0.8 and plain_asr >= 0.8, f"the backdoor is gone: {runs}"
