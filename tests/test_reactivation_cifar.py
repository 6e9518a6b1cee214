"""Superficial safety on real data (Min et al. 2024, the paper's motivation): a BadNets model on
CIFAR-10, fine-tuned on the defender's clean split until its ASR drops, gets the backdoor back
from RA (5 poisoned images among 500) and from QRA's perturbations, while the same RA leaves a
clean model clean; BEC sits between the clean model (0) and the backdoored one (1).

The same FT scene against BI-BAU(U) as the paper defines it: R-ASR and Q-ASR stay far below FT's
(measured 2026-11-30: FT R-ASR 0.80, Q-ASR 0.74; BI-BAU(U) R-ASR 0.25, Q-ASR 0.10, ASR 0.10).

Small on purpose (about 3 minutes on 2 busy cores, plus 2 for BI-BAU and its evaluation): 3,000 training images at 16x16, a narrow
ResNet trained 15 epochs at 20% poison (ASR above 99%, CA about 35%), FT for 10 epochs at lr
0.05 (ASR down to 20-50%: at lr 0.01 FT barely moves it, from lr 0.08 on it starts to really
remove it at this scale), QRA for 20 epochs.

A second scene under SIG (clean-label) guards the claim at METHOD's learning rate on another attack.
"""
from __future__ import annotations

import pytest
import torch

from trainables.attacks import build_attack
from trainables.attacks.base import AttackConfig
from trainables.config import build
from trainables.data import defender_split, load_dataset
from trainables.data.base import DataConfig
from trainables.defenses import build_defense
from trainables.defenses.base import DefenseConfig, DefenseContext
from trainables.evaluation import EvalContext, evaluate
from trainables.evaluation.metrics import attack_success_rate, clean_accuracy
from trainables.models.base import ModelConfig, create_model
from trainables.registry import ATTACKS, DEFENSES
from trainables.schema import EvalConfig, RunConfig, TrainConfig
from trainables.tasks import ClassifierTask
from trainables.train import train_model

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions: intra-op threads only contend on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(data, seed: int):
    return create_model(ModelConfig(name="small_resnet", width=8, depth=3), data.num_classes, 3, data.mean, data.std,
                        generator=torch.Generator().manual_seed(seed))


def _scene(archive, attack_settings: dict, ft_lr: float = 0.05) -> dict:
    """The backdoored and clean models, FT's purified model and its evaluation, for one attack."""
    if "ft" not in DEFENSES:
        pytest.skip("the ft defense is not registered")
    data = load_dataset(DataConfig(name="cifar10", root=str(archive), train_size=3000, test_size=1000,
                                   image_size=16, seed=0))
    rest, clean_index = defender_split(data.train, 0.1, 0)
    attack = build_attack(build(AttackConfig, {"target": 0, "poison_rate": 0.2, **attack_settings},
                                "attack", registry=ATTACKS), data)
    poisoned_train, _ = attack.poison_trainset(data.train, torch.Generator().manual_seed(1), exclude=clean_index)
    poisoned_test = attack.poison_testset(data.test)
    train_cfg = build(TrainConfig, {"epochs": 15, "batch_size": 128, "lr": 0.1, "eval_every": 0, "eval_size": 200})

    backdoored = _model(data, 0)
    train_model(backdoored, poisoned_train, train_cfg, CPU, generator=torch.Generator().manual_seed(2),
                attack=attack, hflip_allowed=data.hflip, log=lambda s: None)
    clean = _model(data, 1)
    train_model(clean, data.train, train_cfg, CPU, generator=torch.Generator().manual_seed(3),
                hflip_allowed=data.hflip, log=lambda s: None)

    # augmenting as the model was trained, which a run config resolves and a bare DefenseConfig cannot
    ft_cfg = {"name": "ft", "epochs": 10, "lr": ft_lr, "crop_padding": train_cfg.crop_padding, "hflip": train_cfg.hflip}
    ft = build_defense(build(DefenseConfig, ft_cfg, "defense", registry=DEFENSES))
    purified = ft.purify(backdoored, data.train.subset(clean_index),
                         DefenseContext(device=CPU, num_classes=data.num_classes, seed=0, hflip=data.hflip,
                                        log=lambda s: None)).model
    cfg = build(EvalConfig, {"ra_size": 500, "qra_epochs": 20, "qra_clean_size": 250, "qra_poison_size": 250,
                             "qra_hidden": 512, "bec_samples": 250, "bec_layers": 6}, "evaluation")
    ctx = EvalContext(model=purified, backdoored=backdoored, clean_reference=lambda: clean, attack=attack,
                      dataset=data, attacker_train=data.train.subset(rest), poisoned_test=poisoned_test, cfg=cfg,
                      task=ClassifierTask(build(RunConfig, {})), device=CPU, log=print)
    return {"ctx": ctx, "backdoored": backdoored, "clean": clean, "purified": purified,
            "metrics": evaluate(ctx, ["ca", "asr", "ra", "qra", "bec"]), "train_cfg": train_cfg,
            "clean_index": clean_index, "backdoored_asr": attack_success_rate(backdoored, poisoned_test, CPU)}


@pytest.fixture(scope="module")
def scene(cifar10_archive, one_thread):
    return _scene(cifar10_archive, {"name": "badnets", "size": 6})  # a 3x3 patch at 16x16


def _bibau(scene: dict, **settings) -> dict:
    """BI-BAU(U) as the paper defines it (the registered defaults: no M-step distillation, the per-sample
    Fisher) with ``settings`` changed, on FT's backdoored model, clean split and evaluation."""
    ctx, train_cfg = scene["ctx"], scene["train_cfg"]
    cfg = build(DefenseConfig, {"name": "bibau_u", "crop_padding": train_cfg.crop_padding, "hflip": train_cfg.hflip,
                                **settings}, "defense", registry=DEFENSES)
    assert "mstep_kd" not in cfg.weights()
    result = build_defense(cfg).purify(scene["backdoored"], ctx.dataset.train.subset(scene["clean_index"]),
                                       DefenseContext(device=CPU, num_classes=ctx.dataset.num_classes, seed=0,
                                                      hflip=ctx.dataset.hflip, log=lambda s: None))
    shared = {k: v for k, v in ctx.cache.items() if k in ("clean_model", "bec_backdoored", "bec_clean_similarity")}
    own = EvalContext(model=result.model, backdoored=ctx.backdoored, clean_reference=ctx.clean_reference,
                      attack=ctx.attack, dataset=ctx.dataset, attacker_train=ctx.attacker_train,
                      poisoned_test=ctx.poisoned_test, cfg=ctx.cfg, task=ctx.task, device=CPU, log=print, cache=shared)
    return {"history": result.history, "metrics": evaluate(own, ["ca", "asr", "ra", "qra", "bec"])}


@pytest.fixture(scope="module")
def bibau(scene):
    """Shortened to 4 epochs of 3 PGD steps of 8/255, batch 32, lr 0.02."""
    return _bibau(scene, epochs=4, batch_size=32, lr=0.02, pgd_steps=3, pgd_step=8 / 255)


def test_setting_is_a_working_backdoor_that_ft_hides(scene):
    ctx = scene["ctx"]
    bd_asr = attack_success_rate(scene["backdoored"], ctx.poisoned_test, CPU)
    clean_asr = attack_success_rate(scene["clean"], ctx.poisoned_test, CPU)
    m = scene["metrics"]
    print(f"backdoored CA {clean_accuracy(scene['backdoored'], ctx.dataset.test, CPU):.3f} ASR {bd_asr:.3f}; "
          f"clean ASR {clean_asr:.3f}; FT CA {m['ca']:.3f} ASR {m['asr']:.3f}")
    assert bd_asr > 0.9 and clean_asr < 0.2
    assert m["asr"] < bd_asr - 0.2, "FT should lower the ASR for this test to mean anything"


def test_ra_brings_the_backdoor_back_but_not_into_a_clean_model(scene):
    m = scene["metrics"]
    print({k: round(m[k], 3) for k in ("asr", "r_asr", "ra_ca", "ra_clean_asr", "ra_clean_ca")})
    assert m["ra_poison_count"] == 5
    assert m["r_asr"] > m["asr"] + 0.25
    assert m["ra_clean_asr"] < 0.3 and m["r_asr"] > m["ra_clean_asr"] + 0.3


def test_qra_reactivates_through_queries_only(scene):
    m = scene["metrics"]
    print({k: round(m[k], 3) for k in ("asr", "q_asr", "q_asr_clean_model", "qra_clean_target_rate")})
    assert m["q_asr"] > m["asr"] + 0.1
    # the perturbation is no generic adversarial example: the clean model and clean images resist it
    assert m["q_asr_clean_model"] < 0.2 and m["qra_clean_target_rate"] < 0.3


def test_bec_places_ft_between_clean_and_backdoored(scene):
    m = scene["metrics"]
    print({k: round(m[k], 3) for k in ("bec", "bec_raw", "bec_similarity", "bec_clean_similarity")})
    assert m["bec_similarity"] > m["bec_clean_similarity"]
    assert 0.2 < m["bec_raw"] < 1.0


def test_bibau_keeps_the_backdoor_out_where_ft_lets_it_back(scene, bibau):
    """The paper's claim (Table 2, Figure 1): after BI-BAU, RA and QRA do not bring the backdoor
    back, while after FT on the same model and clean split they do."""
    ft, bb = scene["metrics"], bibau["metrics"]
    print({"ft": {k: round(ft[k], 3) for k in ("ca", "asr", "r_asr", "q_asr", "bec_raw")},
           "bibau_u": {k: round(bb[k], 3) for k in ("ca", "asr", "r_asr", "q_asr", "bec_raw")},
           "inv_ewc": [round(r.get("inv_ewc", float("nan")), 3) for r in bibau["history"]]})
    assert bb["r_asr"] < ft["r_asr"] - 0.3, "R-ASR after BI-BAU should stay far below FT's"
    assert bb["q_asr"] < ft["q_asr"] - 0.2, "Q-ASR after BI-BAU should stay far below FT's"
    assert bb["asr"] < 0.2
    assert bb["ca"] > 0.2  # chance is 0.1
    # the backdoor's features too: BEC well below FT's (the paper's Table 7 ordering)
    assert bb["bec_raw"] < ft["bec_raw"] - 0.2
    # METHOD's inverse EWC acts on real data: past its clip C = 10 from the second epoch on
    assert all(row["inv_ewc"] < 10.0 for row in bibau["history"][1:])


@pytest.fixture(scope="module")
def sig_scene(cifar10_archive, one_thread):
    """The same scene under SIG (clean-label: the sinusoid on half the target class, the registered
    amplitude 40/255 and frequency 6), FT at the specs' lr 0.01, RA with METHOD's 2 poisoned images for SIG
    among 500. Blended does not serve here: at 16x16 pixels FT removes it outright (ASR 12-16%, R-ASR
    15-29% after FT with one or five poisoned RA images, measured 2026-12-07), so there is no hidden
    backdoor to tell apart from a removed one."""
    return _scene(cifar10_archive, {"name": "sig", "poison_rate": None, "target_fraction": 0.5}, ft_lr=0.01)


def test_bibau_at_methods_lr_keeps_sig_down_where_ft_leaves_it(sig_scene):
    """The central claim on a second attack, at METHOD's learning rate (0.01; the BadNets test above runs
    0.02) and ε: RA and QRA bring back much less after BI-BAU(U) than after FT on the same model and clean
    split (measured 2026-12-07: FT ASR 99.7, R-ASR 98.9, Q-ASR 98.9; BI-BAU(U) in 5 epochs of 3 PGD steps
    ASR 41, R-ASR 40, Q-ASR 36: a low-orthogonality attack, the paper's hardest case for it, R-ASR 33.8)."""
    ft = sig_scene["metrics"]
    assert sig_scene["backdoored_asr"] > 0.8 and ft["r_asr"] > 0.8, "FT should leave the backdoor in"
    assert ft["ra_poison_count"] == 2  # METHOD's RA for SIG
    bb = _bibau(sig_scene, epochs=5, batch_size=32, pgd_steps=3, pgd_step=8 / 255)["metrics"]
    print({"backdoored_asr": round(sig_scene["backdoored_asr"], 3),
           "ft": {k: round(ft[k], 3) for k in ("ca", "asr", "r_asr", "q_asr")},
           "bibau_u": {k: round(bb[k], 3) for k in ("ca", "asr", "r_asr", "q_asr")}})
    assert bb["asr"] < ft["asr"] - 0.3
    assert bb["r_asr"] < ft["r_asr"] - 0.3, "R-ASR after BI-BAU should stay far below FT's"
    assert bb["q_asr"] < ft["q_asr"] - 0.3, "Q-ASR after BI-BAU should stay far below FT's"
    assert bb["ca"] > 0.2  # chance is 0.1
