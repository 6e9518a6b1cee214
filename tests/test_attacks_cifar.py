"""Real data: each of SIG, WaNet, Refool, Adaptive-Blend and Adaptive-Patch implants a backdoor in a
tiny ResNet trained on a CIFAR-10 subset: the poisoned model's ASR is well above the clean
model's on the same triggered test images.

Sized for CI on a shared 2-core CPU (about 30 s per attack): 2,000 training and 500 test images,
a 2-stage ResNet of width 8, a few epochs without crop or flip, one clean model shared by the
five. At this size the attacks run at settings that learn in a few epochs (noted per attack);
their own defaults are measured at CPU scale in benchmarks/cifar10_small.py.
"""
from __future__ import annotations

import pytest
import torch

from trainables.attacks import build_attack
from trainables.attacks.base import AttackConfig
from trainables.config import build
from trainables.data.splits import seeded_generator
from trainables.evaluation.metrics import attack_success_rate, clean_accuracy, predict
from trainables.models import ModelConfig, create_model
from trainables.registry import ATTACKS
from trainables.schema import TrainConfig
from trainables.train import train_model

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
TRAIN = TrainConfig(epochs=6, batch_size=64, lr=0.05, crop_padding=0, hflip=False, eval_every=0)

# name -> (options, least ASR lead over the clean model)
CASES = {
    # 100% of the target class instead of 50%: clean-label needs every signal it gets in 6 epochs
    "sig": ({"target_fraction": 1.0}, 0.3),
    # a stronger warp (s 2.5 instead of 0.5), 15% per batch, no rotation: WaNet's default needs tens of epochs
    "wanet": ({"s": 2.5, "poison_rate": 0.15, "rotation": 0.0}, 0.3),
    "refool": ({}, 0.3),
    # 10% poisoned + 5% cover instead of the paper's 0.3% + 0.3% (0.6%): 6 poisoned images cannot be
    # learned here
    "adaptive_blend": ({"poison_rate": 0.1, "cover_rate": 0.05}, 0.3),
    # 20% + 5% for Adaptive-Patch: its weak training triggers (alpha 0.2-0.5) differ from the pasted
    # test triggers, and at 10% the ASR stayed at 0.2-0.36 in these 6 epochs
    "adaptive_patch": ({"poison_rate": 0.2, "cover_rate": 0.05}, 0.3),
}


def model_for(data):
    return create_model(ModelConfig(name="small_resnet", width=8, depth=2), data.num_classes, mean=data.mean,
                        std=data.std, generator=seeded_generator(0, "model_init"))


@pytest.fixture(scope="module")
def clean_model(small_cifar):
    torch.set_num_threads(1)
    model = model_for(small_cifar)
    train_model(model, small_cifar.train, TRAIN, CPU, generator=seeded_generator(0, "train"), log=lambda _: None)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_attack_implants_a_backdoor_on_cifar10(name, small_cifar, clean_model):
    options, lead = CASES[name]
    data = small_cifar
    attack = build_attack(build(AttackConfig, {"name": name, **options}, "attack", registry=ATTACKS), data)
    attack.prepare(data.train, None, CPU, seeded_generator(0, "attack_prepare"))
    poisoned, index = attack.poison_trainset(data.train, seeded_generator(0, "poison"))
    triggered = attack.poison_testset(data.test)
    model = model_for(data)
    train_model(model, poisoned, TRAIN, CPU, generator=seeded_generator(0, "train"), attack=attack,
                log=lambda _: None)
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
