"""The contrastive setting on real CIFAR-10 at CI size: a micro CLIP (bibau-ViT-micro-8) pre-trained
contrastively on templated captions of 2,000 training images classifies the test images zero-shot
well above chance; fine-tuning it on pairs of which 30% are BadNets-patched images paired with
target captions implants the backdoor; BI-BAU-CLIP(T) (METHOD's CLIP extension, shortened PGD)
lowers the ASR while the text tower stays as it was.

Why 30% and no flips: at 2,000 pairs a 10% BadNets does not implant in any model here within CI's
steps (the micro CLIP, its visual tower trained supervised, even the small ResNet: ASR 0.1-0.6 epoch
to epoch); the CPU-scale spec (10,000 pairs, 40 attack epochs) implants 10% (docs/benchmarks.md,
"CLIP, Figure 3 at CPU scale"). A flip moves the corner patch to the other corner.

Measured numbers are in the module's last run (``-s`` prints them) and in docs/benchmarks.md.
"""
import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from trainables.config import build
from trainables.data import load_dataset
from trainables.defenses import DefenseConfig, DefenseContext, build_defense
from trainables.evaluation.metrics import attack_success_rate, clean_accuracy
from trainables.registry import DEFENSES
from trainables.schema import RunConfig

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stage(cifar10_archive, tmp_path_factory):
    from trainables.tasks.contrastive import clean_clip, pair_dataset
    from trainables.trial import attack_stage

    cfg = build(RunConfig, {
        "seed": 0, "device": "cpu", "threads": 1, "cache_dir": str(tmp_path_factory.mktemp("clip-cache")),
        "data": {"name": "cifar10", "root": str(cifar10_archive), "train_size": 2000, "test_size": 500,
                 "clean_fraction": 0.1},
        "train": {"epochs": 6, "batch_size": 128, "eval_every": 0, "crop_padding": 2, "warmup_epochs": 0.5,
                  "hflip": False},
        "attack": {"name": "badnets", "target": 0, "poison_rate": 0.3},
        "clip": {"arch": "bibau-ViT-micro-8", "pretrain_epochs": 6, "pretrain_lr": 2e-3, "lr": 2e-3},
    })
    dataset = pair_dataset(cfg, load_dataset(cfg.data))
    clean = clean_clip(cfg, dataset, CPU, log=lambda line: None)  # cached: the attack stage loads it again
    out = attack_stage(cfg, dataset, CPU, log=lambda line: None)
    out.clean_ca = clean_accuracy(clean, dataset.test, CPU)
    out.clean_asr = attack_success_rate(clean, out.poisoned_test, CPU)
    return out


def test_tiny_clip_classifies_zero_shot_above_chance(stage):
    print(f"clean CLIP: zero-shot CA {stage.clean_ca:.3f}, ASR {stage.clean_asr:.3f}")
    assert stage.clean_ca > 0.2  # chance is 0.1
    assert stage.clean_asr < 0.5


def test_badnets_on_pairs_implants_the_backdoor(stage):
    m = stage.metrics
    print(f"BadNets CLIP: CA {m['backdoored_ca']:.3f}, ASR {m['backdoored_asr']:.3f}")
    assert m["backdoored_asr"] > 0.8 and m["backdoored_asr"] > stage.clean_asr + 0.4
    assert m["backdoored_ca"] > 0.15


def test_bibau_clip_lowers_the_asr_with_the_text_tower_frozen(stage):
    # the targeted variant: BI-BAU-CLIP(U) needs the CPU scale's CLIP (10,000 pairs, CA 0.52; there it
    # takes BadNets' ASR 0.84 to 0.13); on this CI-size one (CA 0.15) it raised the ASR (0.88 -> 0.93) as CA fell
    cfg = build(DefenseConfig, {"name": "bibau_clip_t", "epochs": 3, "batch_size": 64, "pgd_steps": 3, "lr": 0.005,
                                "pgd_step": 8 / 255, "crop_padding": 2, "hflip": False, "fisher_samples": 64},
                "defense", registry=DEFENSES)
    ctx = DefenseContext(device=CPU, num_classes=10, seed=0, hflip=False, log=lambda line: None, target=0)
    result = build_defense(cfg).purify(stage.model, stage.clean_split, ctx)
    ca = clean_accuracy(result.model, stage.dataset.test, CPU)
    asr = attack_success_rate(result.model, stage.poisoned_test, CPU)
    before = stage.metrics["backdoored_asr"]
    print(f"bibau_clip_t: CA {ca:.3f}, ASR {asr:.3f} (from {before:.3f}) in {result.seconds:.1f}s")
    assert asr < before - 0.3, f"ASR {before:.3f} -> {asr:.3f}"
    assert ca > 0.1
    text = {k for k in stage.model.state_dict() if k.startswith("clip.") and not k.startswith("clip.visual.")}
    old, new = stage.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in text)
