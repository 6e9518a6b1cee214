"""The six baselines on real CIFAR-10: a small BadNets model (the setting of test_bibau_cifar.py:
3,000 training images at 16x16, a 3x3 white patch, small ResNet width 16 depth 3, 4 epochs, a
300-image clean split), each defense at a CI size of about 30 s on 2 shared cores.

What each does at this scale, measured (seed 0; backdoored CA 0.406 / ASR 0.947):
* NC (8 search epochs per class, 5 unlearning epochs): flags the target, and only it (anomaly
  index 13.4), and unlearns it: ASR 0.20, CA 0.38.
* BTI-DBF(U) (2 rounds of 5 + 5 + 5 epochs, a UNet of width 16): its generator finds a universal
  perturbation that sends 58% of clean images to one class after the first round (where the target
  is detected, once, as in the reference), but not the BadNets target (class 6; class 1 with 10
  inversion epochs at width 32): ASR stays 0.95, CA 0.40. The test asserts what it does: a detected
  class, a perturbation that moves many images there, CA kept. The reference's inversion epochs
  find the target (see PAM below, which shares the inversion).
* ANP (200 iterations of batch 32 instead of 2000 of 128; fixed threshold 0.2): with the noise
  clamped to ±ε (noise_clip, before issue 30) 16 channels pruned, ASR 0.59, CA 0.37; unclamped (the
  reference, the default) 33 channels, ASR 0.38, CA 0.38.
* EP (one poisoned batch of 256, u = 3): 6 channels pruned, ASR 0.79, CA 0.40.
* RNP (its defaults): the unlearning reaches 17% clean accuracy after 4 epochs; with the fixed
  threshold 0.7 the masks prune 27% of the channels: ASR 0.00, CA 0.17 (the clean accuracy does
  not survive at this scale).
* CLP (u = 3, data-free): prunes one channel, the one whose trigger-activated change is the
  largest of its layer (2.4x the layer mean), and keeps CA, but one channel is not the backdoor
  here: ASR 0.92. The test asserts that the pruned channels are trigger-driven.
Times on 2 shared cores: NC 30 s, BTI-DBF(U) 22 s, ANP 34 s, RNP 13 s, EP and CLP under 1 s, plus
31 s to build the backdoored model.
"""
import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from trainables.config import build
from trainables.defenses import DefenseConfig, DefenseContext, build_defense
from trainables.defenses.bn import batchnorm_units
from trainables.evaluation.metrics import attack_success_rate, clean_accuracy
from trainables.registry import DEFENSES

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
TARGET = 0


@pytest.fixture(scope="module")
def bd(badnets_cifar16):
    return badnets_cifar16  # conftest.py: the model of test_bibau_cifar.py, trained once per session


def purify(bd, name, **settings):
    if "crop_padding" in DEFENSES.get(name).Config.__dataclass_fields__:
        settings = {"crop_padding": 0, "hflip": True, **settings}  # as the model was trained
    cfg = build(DefenseConfig, {"name": name, **settings}, "defense", registry=DEFENSES)
    ctx = DefenseContext(device=CPU, num_classes=10, seed=0, hflip=bd.hflip, log=lambda line: None,
                         poisoned_batch=bd.poisoned_batch if cfg.data_use == "poisoned_batch" else None)
    before = {k: v.clone() for k, v in bd.model.state_dict().items()}
    result = build_defense(cfg).purify(bd.model, bd.clean, ctx)
    assert all(torch.equal(v, before[k]) for k, v in bd.model.state_dict().items())
    ca, asr = clean_accuracy(result.model, bd.test, CPU), attack_success_rate(result.model, bd.poisoned_test, CPU)
    print(f"{name}: CA {bd.ca:.3f} -> {ca:.3f}, ASR {bd.asr:.3f} -> {asr:.3f} in {result.seconds:.1f}s; "
          f"{ {k: round(v, 3) for k, v in result.findings.items() if '.' not in k} }")
    return result, ca, asr


def test_backdoor_is_implanted(bd):
    assert bd.asr > 0.8 and bd.ca > 0.3


def test_nc_flags_the_target_and_unlearns_it(bd):
    result, ca, asr = purify(bd, "nc", search_epochs=8, patience=2, early_stop_patience=5, epochs=5,
                             batch_size=64)
    f = result.findings
    assert f["flagged"] == 1.0 and f["anomaly_index"] >= 2.0 and f.get(f"flagged.{TARGET}") == 1.0
    assert f[f"mask_l1.{TARGET}"] == min(v for k, v in f.items() if k.startswith("mask_l1."))
    assert asr < 0.3 and asr < bd.asr - 0.5, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > bd.ca - 0.08


def test_btidbf_u_inverts_a_universal_perturbation_and_keeps_clean_accuracy(bd):
    result, ca, asr = purify(bd, "btidbf_u", rounds=2, pretrain_epochs=1, mask_epochs=5, invert_epochs=5, epochs=5,
                             batch_size=64, unet_width=16)
    f = result.findings
    # G(x) is a universal perturbation: it sends clean images to one class far above its prior (0.1).
    # At this scale (a 41%-accurate model, 1 pre-training epoch) that class is not BadNets' target.
    assert 0 <= f["detected_target"] < 10 and f["target_share"] > 0.25
    assert 0 < f["trigger_linf"] <= 1.0
    assert [r["phase"] for r in result.history].count("unlearn") == 2 * 5
    assert ca > bd.ca - 0.05


def test_anp_prunes_at_the_fixed_threshold_and_lowers_asr(bd):
    result, ca, asr = purify(bd, "anp", iterations=200, batch_size=32, log_every=100)
    assert result.findings["pruned_channels"] >= 1 and result.findings["mask_min"] <= 0.2
    assert asr < bd.asr - 0.2, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > bd.ca - 0.08


def test_ep_prunes_low_entropy_channels_and_lowers_asr(bd):
    result, ca, asr = purify(bd, "ep")
    assert result.findings["pruned_channels"] >= 1 and result.findings["poisoned_batch_size"] == 256
    assert asr < bd.asr - 0.08, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > bd.ca - 0.05


def test_rnp_removes_the_backdoor_at_a_clean_accuracy_cost(bd):
    result, ca, asr = purify(bd, "rnp", batch_size=64)
    f = result.findings
    assert f["unlearn_epochs"] < 20  # stopped at the clean-accuracy threshold
    unlearn = [r for r in result.history if r["phase"] == "unlearn"]
    assert unlearn[-1]["clean_acc"] <= 0.2 < unlearn[0]["clean_acc"]
    assert asr < 0.2, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > 0.12  # above chance (0.10); it lost most of the 0.41 at this scale


def test_clp_prunes_trigger_driven_channels_without_data(bd):
    result, ca, asr = purify(bd, "clp")
    pruned = {k.split(".", 1)[1]: v for k, v in result.findings.items() if k.startswith("pruned.") and v > 0}
    assert pruned and abs(ca - bd.ca) < 0.03
    # CLP's premise: the channels with an outlying Lipschitz bound are the ones the trigger drives
    layers = {u.name: u.bn for u in batchnorm_units(bd.model)}
    acts: dict = {}
    model = bd.model.eval()
    hooks = [layers[n].register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o.relu()))
             for n in pruned]
    keep = (bd.test.y != TARGET).nonzero().flatten()[:200]
    with torch.no_grad():
        model(bd.poisoned_test.x[:200].float() / 255)
        model(bd.test.x[keep].float() / 255)
    for h in hooks:
        h.remove()
    purified_layers = dict(result.model.named_modules())
    for name in pruned:
        change = (acts[name][0] - acts[name][1]).abs().mean((0, 2, 3))  # trigger-activated change per channel
        cut = purified_layers[name].weight == 0
        assert change[cut].mean() > 1.5 * change.mean(), f"{name}: pruned {change[cut]} vs mean {change.mean()}"


# -- Baselines II (issue 30): I-BAU, SAU, PAM, FST at CI size, on the shared model (CA 0.398, ASR 0.947
# on the machine that measured these; seconds on 2 cores shared with two benchmark jobs, load ~10):
# * I-BAU, 3 rounds, batch 100, δ on 10% of each batch (the reference's 1% puts δ on 1 image of 100;
#   at smaller batches int(B·0.01) = 0 would make it plain fine-tuning): ASR 0.56, CA 0.29 (64 s).
# * SAU, 3 epochs of Adam at lr 2e-3 (the reference: 100 epochs at 1e-4), batch 64: ASR 0.13, CA 0.22
#   (102 s); lr 1e-3 left ASR 0.72.
# * PAM, one round of BTI-DBF's inversion at the reference's epochs (mask 20, generator 30, batch 32,
#   UNet width 16) and 4 path-aware epochs at ρ 0.5: the target is detected (share of G(x) there 0.83 /
#   1.00 / 1.00 at defense seeds 0 / 1 / 2) and ASR 0.947 -> 0.05 / 0.00 / 0.00 at CA 0.30 / 0.33 / 0.32,
#   23-25 s of CPU time (process time; 3-10 min wall under the benchmarks' load). The generator starts at
#   the identity, where the feature-MSE objective has no gradient, and grows slowly: with 3 generator
#   epochs of 64 (the earlier CI size) or 10-20 of 32 it settles on a universal adversarial perturbation
#   to class 6 or 1 (share 0.3-0.9, target 0 at 0.07 or less, below its prior); ASR stayed 0.70-0.95.
#   The true trigger is the better optimum the short runs miss: it moves the feature map by MSE 2.5 at an
#   image MSE of 0.19 (normalised), within norm_bound 0.3.
# * FST, 10 epochs, α 0.1 (the README's): ASR 0.02, CA 0.34 (27 s); α 0.2 at 5 epochs kept CA 0.19.


def test_ibau_unlearns_a_universal_perturbation_and_lowers_asr(bd):
    result, ca, asr = purify(bd, "ibau", epochs=3, batch_size=100, portion=0.1)
    assert result.findings["delta_moved"] > 0.5  # δ is a universal adversarial perturbation of the model
    assert asr < bd.asr - 0.2, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > 0.2


def test_sau_unlearns_shared_adversarial_examples_and_lowers_asr(bd):
    result, ca, asr = purify(bd, "sau", epochs=3, batch_size=64, lr=2e-3)
    f = result.findings
    assert 0 < f["potential_poison"] <= 1 and 1 <= f["pgd_steps"] <= 5
    assert asr < bd.asr - 0.3, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > 0.2


def test_pam_unlearns_the_inverted_trigger_along_the_path_and_lowers_asr(bd):
    # The reference's inversion epochs (mask 20, generator 30) on batches of 32; one round. With fewer
    # generator steps (3-20 epochs) G settles on a universal adversarial perturbation to another class.
    result, ca, asr = purify(bd, "pam", rounds=1, pretrain_epochs=1, mask_epochs=20, invert_epochs=30, epochs=4,
                             batch_size=32, unet_width=16, rho=0.5)
    f = result.findings
    assert f["detected_target"] == TARGET and f["target_share"] > 0.5 > f["runner_up_share"]
    assert [r["phase"] for r in result.history].count("unlearn") == 4
    assert asr < bd.asr - 0.2, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > 0.12  # above chance (0.10)


def test_fst_shifts_the_head_and_lowers_asr(bd):
    result, ca, asr = purify(bd, "fst", epochs=10, batch_size=64, alpha=0.1)
    assert result.findings["head_cosine"] < 0.5  # the new head does not return to the backdoored one
    assert asr < bd.asr - 0.5, f"ASR {bd.asr:.3f} -> {asr:.3f}"
    assert ca > 0.12
