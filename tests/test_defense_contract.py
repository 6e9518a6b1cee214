"""Contract test over every registered defense: purified copy of the same architecture, input
model untouched, reproducible under a seed, history and findings, declared data use honoured
(needs_target, uses_poisoned_data, poisoned_batch, none). Tiny random data and a tiny model:
seconds per defense."""
import math

import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from trainables.config import ConfigError, build
from trainables.data.base import ImageSet
from trainables.defenses import DefenseConfig, DefenseContext, build_defense
from trainables.models import ModelConfig, create_model
from trainables.registry import DEFENSES

NAMES = DEFENSES.names()
CLASSES = 4
CPU = torch.device("cpu")
# small enough for seconds on a shared CPU; every defense's own keys are set where it has them.
# The pruning and detection thresholds are loosened so that, on a tiny random model, each
# defense really changes something (on real backdoors their defaults are tested elsewhere).
SMALL = {"epochs": 2, "batch_size": 16, "pgd_steps": 2, "fisher_samples": 16,
         "search_epochs": 2, "anomaly_threshold": 0.0,  # nc
         "rounds": 2, "pretrain_epochs": 1, "mask_epochs": 1, "invert_epochs": 1, "unet_width": 4,  # btidbf_u
         "iterations": 4, "log_every": 2, "prune_threshold": 0.999,  # anp, rnp
         "unlearn_epochs": 2, "recover_epochs": 2,  # rnp
         "u": 0.0}  # ep, clp: prune everything beyond the layer's mean
SEEDLESS = [n for n in NAMES if "seed" not in DEFENSES.get(n).Config.__dataclass_fields__]  # deterministic ones
SEEDED = [n for n in NAMES if n not in SEEDLESS]


def small_config(name: str, **extra) -> DefenseConfig:
    impl = DEFENSES.get(name)
    fields = impl.Config.__dataclass_fields__
    data = {"name": name, **{k: v for k, v in SMALL.items() if k in fields}, **extra}
    return build(DefenseConfig, data, "defense", registry=DEFENSES)


def contrastive(name) -> bool:
    return bool(name) and DEFENSES.get(name).contrastive


def tiny_model(seed=0, name=None):
    """A tiny classifier, or for a defense of the contrastive setting a micro CLIP (random weights)."""
    if contrastive(name):
        from trainables.contrastive.config import ContrastiveConfig
        from trainables.contrastive.model import build_model

        return build_model(ContrastiveConfig(arch="bibau-ViT-micro-8"), [f"c{i}" for i in range(CLASSES)],
                           (0.5,) * 3, (0.25,) * 3, CPU, generator=torch.Generator().manual_seed(seed))
    return create_model(ModelConfig(name="small_resnet", width=4, depth=2), CLASSES,
                        generator=torch.Generator().manual_seed(seed))


def random_set(n, seed, name=None):
    """Random images; image-caption pairs (captions from class-name templates) for a contrastive defense."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    images = ImageSet(x, torch.arange(n) % CLASSES)
    if contrastive(name):
        from trainables.data.captions import templated_pairs

        return templated_pairs(images, [f"c{i}" for i in range(CLASSES)], ["a photo of a {class}.", "a {class}."], g)
    return images


def poisoned_set():
    images = random_set(12, seed=7)
    images.x[:, :, -3:, -3:] = 255  # a white corner patch; labels stay the true ones
    return images


def context(name, seed=0, log=None, **kw):
    impl = DEFENSES.get(name)
    base = dict(device=CPU, num_classes=CLASSES, seed=seed, log=log or (lambda line: None))
    if impl.needs_target:
        base["target"] = 0
    if impl.uses_poisoned_data:
        base["poisoned"] = poisoned_set()
    if impl.declared_data_use() == "poisoned_batch":
        base["poisoned_batch"] = random_set(24, seed=11)
    base.update(kw)
    return DefenseContext(**base)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_registered_defenses():
    assert {"bibau_t", "bibau_u", "bibau_t_kd", "bibau_u_kd", "ft", "ibu", "nc", "btidbf_u", "anp", "ep", "rnp",
            "clp", "ibau", "sau", "pam", "fst"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declared_data_use_lands_in_the_config(name):
    impl = DEFENSES.get(name)
    cfg = small_config(name)
    assert cfg.data_use == impl.declared_data_use() in ("clean_split", "none", "poisoned_batch",
                                                        "clean_split+poisoned_samples")
    assert cfg.to_dict()["data_use"] == cfg.data_use
    other = "none" if cfg.data_use != "none" else "clean_split"
    with pytest.raises(ConfigError, match=r"defense\.data_use: 'none'|defense\.data_use: 'clean_split'"):
        small_config(name, data_use=other)


@pytest.mark.parametrize("name", NAMES)
def test_purify_returns_a_purified_copy_and_leaves_the_input_alone(name):
    model = tiny_model(name=name)
    model.train()
    before = snapshot(model)
    lines: list[str] = []
    defense = build_defense(small_config(name))
    result = defense.purify(model, random_set(40, seed=1, name=name), context(name, log=lines.append))

    purified = result.model
    assert purified is not model and type(purified) is type(model)
    after = purified.state_dict()
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape for k in before)
    assert any(not torch.equal(after[k], before[k]) for k in before), "purification changed nothing"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"input model changed: {k}"
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert not purified.training
    with torch.no_grad():
        assert torch.isfinite(purified(torch.rand(2, 3, 16, 16))).all()
    if contrastive(name) and name.startswith("bibau"):  # METHOD's CLIP extension: the text encoder stays frozen
        visual = {k for k in before if k.startswith("clip.visual.")}
        assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("clip.") and k not in visual)
        assert any(not torch.equal(after[k], before[k]) for k in visual)

    assert result.history and all(row["seconds"] >= 0 for row in result.history)
    assert result.seconds >= sum(row["seconds"] for row in result.history) * 0.99
    assert all(isinstance(v, float) and not math.isnan(v) for v in result.findings.values())
    if name in ("bibau_t", "bibau_u", "bibau_t_kd", "bibau_u_kd", "ft", "ibu") or contrastive(name):  # a row per epoch
        assert [row["epoch"] for row in result.history] == [1, 2]
        assert all(row["lr"] > 0 for row in result.history)
        assert any("epoch 2/2" in line for line in lines)
    else:  # the baselines report what they found
        assert result.findings, f"{name} reported no findings"
        assert lines and all(line.startswith(name) for line in lines)


@pytest.mark.parametrize("name", SEEDED)
def test_same_seed_same_weights(name):
    clean = random_set(32, seed=2, name=name)

    def run(seed):
        defense = build_defense(small_config(name))
        return defense.purify(tiny_model(name=name), clean, context(name, seed=seed)).model.state_dict()

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", SEEDLESS)
def test_seedless_defenses_are_deterministic(name):
    clean = random_set(32, seed=2)
    run = lambda seed: build_defense(small_config(name)).purify(  # noqa: E731
        tiny_model(), clean, context(name, seed=seed)).model.state_dict()
    a, b = run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", SEEDED)
def test_config_seed_overrides_the_trials(name):
    clean = random_set(32, seed=2, name=name)
    run = lambda ctx_seed: build_defense(small_config(name, seed=5)).purify(  # noqa: E731
        tiny_model(name=name), clean, context(name, seed=ctx_seed)).model.state_dict()
    a, b = run(0), run(1)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", [n for n in NAMES if DEFENSES.get(n).needs_target])
def test_targeted_defense_without_target_raises(name):
    defense = build_defense(small_config(name))
    with pytest.raises(ValueError, match="target"):
        defense.purify(tiny_model(name=name), random_set(16, seed=1, name=name), context(name, target=None))
    with pytest.raises(ValueError, match="0..3"):
        defense.purify(tiny_model(name=name), random_set(16, seed=1, name=name), context(name, target=CLASSES))


@pytest.mark.parametrize("name", [n for n in NAMES if DEFENSES.get(n).uses_poisoned_data])
def test_reference_without_poisoned_data_raises(name):
    defense = build_defense(small_config(name))
    with pytest.raises(ValueError, match="poisoned"):
        defense.purify(tiny_model(), random_set(16, seed=1), context(name, poisoned=None))


@pytest.mark.parametrize("name", [n for n in NAMES if not DEFENSES.get(n).uses_poisoned_data])
def test_real_defenses_ignore_poisoned_data(name):
    clean = random_set(32, seed=3, name=name)
    run = lambda **kw: build_defense(small_config(name)).purify(  # noqa: E731
        tiny_model(name=name), clean, context(name, **kw)).model.state_dict()
    a, b = run(), run(poisoned=poisoned_set())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ibu_uses_the_poisoned_samples():
    clean = random_set(32, seed=3)
    run = lambda poisoned: build_defense(small_config("ibu")).purify(  # noqa: E731
        tiny_model(), clean, context("ibu", poisoned=poisoned)).model.state_dict()
    a, b = run(poisoned_set()), run(random_set(12, seed=9))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_build_defense_accepts_a_base_config_and_rejects_unknown_names():
    defense = build_defense(DefenseConfig(name="ft"))
    assert defense.cfg.epochs == 10 and defense.cfg.lr == 0.01  # FT defaults of METHOD's table
    with pytest.raises(KeyError, match="unknown defense 'nope'"):
        build_defense(DefenseConfig(name="nope"))  # dataclasses do not validate; the registry does


@pytest.mark.parametrize("name", [n for n in NAMES if "bn_stats" in DEFENSES.get(n).Config.__dataclass_fields__
                                  and not contrastive(n)])  # a CLIP's ViT has no BatchNorm
def test_frozen_batchnorm_keeps_the_running_statistics(name):
    model = tiny_model()
    stats = {k: v for k, v in snapshot(model).items() if "running_" in k}
    assert stats, "the tiny model has no BatchNorm running statistics to check"
    frozen = build_defense(small_config(name, bn_stats="frozen")).purify(model, random_set(40, seed=1), context(name))
    trained = build_defense(small_config(name, bn_stats="train")).purify(model, random_set(40, seed=1), context(name))
    for k, v in stats.items():
        assert torch.equal(frozen.model.state_dict()[k], v), f"{name}: bn_stats=frozen changed {k}"
    assert any(not torch.equal(trained.model.state_dict()[k], v) for k, v in stats.items())
    params = dict(frozen.model.named_parameters())
    assert any(not torch.equal(params[k], v) for k, v in model.named_parameters() if k.endswith("weight"))
