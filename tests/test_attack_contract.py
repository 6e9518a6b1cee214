"""The contract every registered attack keeps, and the exact triggers of BadNets and Blended."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import trainables  # noqa: F401  (fill the registries)
from trainables.attacks import build_attack
from trainables.attacks.base import Attack, AttackConfig, to_float, to_uint8
from trainables.checkpoint import load_tensors, save_tensors
from trainables.config import ConfigError, build
from trainables.data.base import Dataset, ImageSet
from trainables.registry import ATTACKS

NUM_CLASSES = 5


def image_set(n: int, size: int = 32, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    # values kept away from 0 and 255 so that any trigger pixel shows up as a change
    x = torch.randint(20, 236, (n, 3, size, size), generator=g).to(torch.uint8)
    y = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=g)]
    return ImageSet(x, y)


def dataset(size: int = 32) -> Dataset:
    return Dataset("synthetic", image_set(200, size, 0), image_set(60, size, 1),
                   classes=[f"c{i}" for i in range(NUM_CLASSES)])


# options every contract test gives an attack: a POOD data set that is on every machine, and
# learned parts small enough to train in a second
CONTRACT_OPTIONS = {
    "iad": {"width": 4, "mask_epochs": 1, "batch_size": 64},
    "issba": {"width": 4, "bits": 8, "encoder_epochs": 1},
    "narcissus": {"pood": "digits", "pood_size": 60, "surrogate_epochs": 1, "surrogate_batch": 64,
                  "warmup_epochs": 1, "trigger_epochs": 2},
}


def make_attack(name: str, data: Dataset, **options):
    options = {**CONTRACT_OPTIONS.get(name, {}), **options}
    return build_attack(build(AttackConfig, {"name": name, **options}, "attack", registry=ATTACKS), data)


def tiny_model(data: Dataset):
    from trainables.models import ModelConfig, create_model

    return create_model(ModelConfig(name="small_resnet", width=4, depth=2), data.num_classes, mean=data.mean,
                        std=data.std, generator=gen(12))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=ATTACKS.names())
def name(request) -> str:
    return request.param


def test_trigger_keeps_shape_dtype_and_range(name):
    data = dataset()
    attack = make_attack(name, data)
    x = torch.rand(6, 3, 32, 32, generator=gen(0))
    before = x.clone()
    for train in (True, False):
        for dtype in (torch.float32, torch.float64):
            out = attack.apply_trigger(x.to(dtype), train=train)
            assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
            assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(x, before), "apply_trigger must not modify its input"
    if name != "clean":
        assert not torch.allclose(attack.apply_trigger(x, train=False), x), "the trigger changes nothing"


def fixed_trigger(attack) -> bool:
    """Whether poisoned training images are ``apply_trigger(train=True)`` of the clean ones (no
    per-image draw from the generator)."""
    return type(attack).poison_images is Attack.poison_images


def test_same_seed_same_poison_and_declared_indices(name):
    data = dataset()
    has_cover = "cover_rate" in {f.name for f in dataclasses.fields(ATTACKS.get(name).Config)}
    attack = make_attack(name, data, poison_rate=0.1, **({"cover_rate": 0.1} if has_cover else {}))
    exclude = torch.randperm(len(data.train), generator=gen(9))[:40]
    a, index_a = attack.poison_trainset(data.train, gen(3), exclude=exclude)
    cover_a = attack.cover_index
    b, index_b = attack.poison_trainset(data.train, gen(3), exclude=exclude)
    assert torch.equal(index_a, index_b) and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(cover_a, attack.cover_index)
    assert a.x.shape == data.train.x.shape and a.x.dtype == torch.uint8 and len(a.y) == len(data.train)

    drawn = attack.select_poison(data.train.y, gen(3))
    if not attack.build_time:  # clean, or poisons on the fly
        assert len(index_a) == 0 and torch.equal(a.x, data.train.x) and torch.equal(a.y, data.train.y)
        return
    assert len(drawn) == round(0.1 * len(data.train))
    expected = drawn[~torch.isin(drawn, exclude)]
    assert torch.equal(index_a, expected) and len(index_a) > 0, "poison count = round(rate*N) minus the excluded"
    assert not torch.isin(index_a, exclude).any()
    c, index_c = attack.poison_trainset(data.train, gen(4), exclude=exclude)
    assert not torch.equal(index_a, index_c), "another seed should draw other samples"

    # cover samples (adaptive attacks): disjoint from the poison and the clean split, true labels
    cover = cover_a
    assert len(cover) <= round(0.1 * len(data.train)) and (len(cover) > 0) == has_cover
    assert not torch.isin(cover, index_a).any() and not torch.isin(cover, exclude).any()
    assert torch.equal(a.y[cover], data.train.y[cover])
    assert (a.x[cover] != data.train.x[cover]).flatten(1).any(1).all(), "every cover image carries a trigger"

    untouched = torch.ones(len(data.train), dtype=torch.bool)
    untouched[index_a] = False
    untouched[cover] = False
    assert torch.equal(a.x[untouched], data.train.x[untouched]) and torch.equal(a.y[untouched], data.train.y[untouched])
    if attack.clean_label:
        assert (data.train.y[index_a] == attack.target).all() and torch.equal(a.y[index_a], data.train.y[index_a])
    else:
        assert (a.y[index_a] == attack.target).all()
    changed = (a.x[index_a] != data.train.x[index_a]).flatten(1).any(1)
    assert changed.all(), "every poisoned image carries the trigger"
    if fixed_trigger(attack):
        expected_x = to_uint8(attack.apply_trigger(to_float(data.train.x[index_a]), train=True))
        assert torch.equal(a.x[index_a], expected_x)
    else:  # drawn per image from the generator: replay poison_trainset's draws and compare
        replay = gen(3)
        first = attack.select_poison(data.train.y, replay)
        attack.select_cover(data.train.y, replay, first)
        expected_x = to_uint8(attack.poison_images(to_float(data.train.x[index_a]), replay, train=True))
        assert torch.equal(a.x[index_a], expected_x), "the poisoned training images are not the attack's poison_images"
        if len(cover):
            expected_cover = to_uint8(attack.cover_images(to_float(data.train.x[cover]), replay))
            assert torch.equal(a.x[cover], expected_cover), "the cover images are not the attack's cover_images"
    # the trigger, not any change: the poisoned images move towards the triggered test-time image
    # (the train-time trigger may be weaker or partial, never unrelated)
    clean = to_float(data.train.x[index_a]).double()
    test_time = attack.apply_trigger(to_float(data.train.x[index_a]), train=False).double()
    moved = (to_float(a.x[index_a]).double() - clean).flatten(1)
    toward = (test_time - clean).flatten(1)
    along = (moved * toward).sum(1)
    # (Adaptive-Patch: a training trigger may share no pixel with the test triggers)
    assert (along >= 0).all() and along.mean() > 0, "poisoned images move away from the trigger"

    real = attack.poisoned_samples(data.train, a, index_a)
    if attack.clean_label:  # the trigger on as many non-target images, true labels (what IBU unlearns)
        assert len(real) == len(index_a) and (real.y != attack.target).all()
    else:
        assert torch.equal(real.x, a.x[index_a]) and torch.equal(real.y, data.train.y[index_a])


def test_on_the_fly_poisoning_keeps_the_protected_rows(name):
    """``training_batch``: same generator, same batch; rows outside ``poisonable`` keep their
    labels; build-time attacks hand the batch back unchanged."""
    data = dataset()
    attack = make_attack(name, data, poison_rate=0.25)
    x = to_float(data.train.x[:32])
    y = data.train.y[:32]
    model = torch.nn.Linear(1, 1)
    everyone = torch.ones(32, dtype=torch.bool)
    out_a = attack.training_batch(x.clone(), y.clone(), model, gen(5), poisonable=everyone, hflip=True)
    out_b = attack.training_batch(x.clone(), y.clone(), model, gen(5), poisonable=everyone, hflip=True)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    assert out_a[0].shape == x.shape and out_a[0].dtype == x.dtype and out_a[1].dtype == y.dtype
    assert out_a[0].min() >= 0 and out_a[0].max() <= 1
    if attack.build_time or name == "clean":
        assert torch.equal(out_a[0], x) and torch.equal(out_a[1], y)
        return
    relabelled = (out_a[1] != y)
    assert relabelled.any() and (out_a[1][relabelled] == attack.target).all()
    protected = torch.arange(32) % 2 == 0
    _, y_p = attack.training_batch(x.clone(), y.clone(), model, gen(5), poisonable=~protected)
    assert torch.equal(y_p[protected], y[protected]) and (y_p[~protected] != y[~protected]).any()
    _, y_none = attack.training_batch(x.clone(), y.clone(), model, gen(5), poisonable=torch.zeros(32, dtype=torch.bool))
    assert torch.equal(y_none, y)


def test_poison_testset_is_non_target_images_labelled_target(name):
    data = dataset()
    attack = make_attack(name, data, target=2)
    poisoned = attack.poison_testset(data.test)
    keep = data.test.y != 2
    assert len(poisoned) == int(keep.sum()) and (poisoned.y == 2).all()
    expected = to_uint8(attack.apply_trigger(to_float(data.test.x[keep]), train=False))
    assert torch.equal(poisoned.x, expected)
    if name == "clean":
        assert torch.equal(poisoned.x, data.test.x[keep])
    else:
        assert (poisoned.x != data.test.x[keep]).flatten(1).any(1).all()


def test_state_tensors_survive_a_file_and_are_checked(name, tmp_path):
    data = dataset()
    attack = make_attack(name, data)
    state = attack.state_tensors()
    again = make_attack(name, data)
    again.load_state(load_tensors(save_tensors(tmp_path / "attack.safetensors", state)) if state else {})
    x = torch.rand(4, 3, 32, 32, generator=gen(1))
    assert torch.equal(again.apply_trigger(x), attack.apply_trigger(x))
    floats = [k for k, v in state.items() if v.is_floating_point() and v.dim() and len(v) > 1]  # [:1] reshapes
    # a learned network (IAD's G and M) has hundreds of tensors: its first, middle and last stand for them
    checked = floats if len(floats) <= 8 else [floats[0], floats[len(floats) // 2], floats[-1]]
    for key in checked:
        value = state[key]
        if attack.adopts_state:  # drawn from the run (seed, data): a saved state is taken over
            again.load_state({**state, key: value + 0.01})
            assert not torch.equal(again.apply_trigger(x), attack.apply_trigger(x)), f"{key} was not adopted"
            with pytest.raises(ValueError, match=key):
                again.load_state({**state, key: value[:1]})
            again.load_state(state)
        else:  # computed from the config: a different saved one is caught
            with pytest.raises(ValueError, match=key):
                again.load_state({**state, key: value + 0.5})


def test_learned_state_round_trip(name, tmp_path):
    """After ``prepare`` (the trained parts: IAD's G and M, ISSBA's encoder, Narcissus' delta, a
    drawn warp field), the state saved as safetensors rebuilds the same triggers in a fresh attack,
    and for attacks that adopt their state the trained trigger is not the placeholder's."""
    if ATTACKS.get(name).contrastive_only:
        pytest.skip("prepared with a CLIP (tests/test_contrastive.py)")
    data = dataset()
    attack = make_attack(name, data, poison_rate=0.1)
    placeholder = make_attack(name, data, poison_rate=0.1)
    attack.prepare(data.train, tiny_model(data), torch.device("cpu"), gen(11))
    state = attack.state_tensors()
    fresh = make_attack(name, data, poison_rate=0.1)
    fresh.load_state(load_tensors(save_tensors(tmp_path / "attack.safetensors", state)) if state else {})
    x = torch.rand(6, 3, 32, 32, generator=gen(13))
    for train in (True, False):
        assert torch.equal(fresh.apply_trigger(x, train=train), attack.apply_trigger(x, train=train))
        assert torch.equal(fresh.poison_images(x, gen(14), train=train), attack.poison_images(x, gen(14), train=train))
    if attack.adopts_state:
        assert not torch.equal(attack.apply_trigger(x), placeholder.apply_trigger(x)), "prepare learned nothing"
    cache = tmp_path / "parts"
    cached = make_attack(name, data, poison_rate=0.1)
    cached.state_cache = cache
    cached.prepare(data.train, tiny_model(data), torch.device("cpu"), gen(11))
    again = make_attack(name, data, poison_rate=0.1)
    again.state_cache = cache
    again.prepare(data.train, tiny_model(data), torch.device("cpu"), gen(11))  # from the cache where one was written
    assert torch.equal(again.apply_trigger(x), cached.apply_trigger(x))
    assert torch.equal(cached.apply_trigger(x), attack.apply_trigger(x)), "caching changed what prepare makes"


def test_target_must_be_a_class(name):
    with pytest.raises(ConfigError, match="attack.target"):
        make_attack(name, dataset(), target=NUM_CLASSES)


# -- BadNets ------------------------------------------------------------------------------------


def changed_region(attack, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = image_set(4, size, 5).x
    out = to_uint8(attack.apply_trigger(to_float(x)))
    return out, (out != x).any(0).any(0)  # (H, W): pixels the trigger touched in any image


def test_badnets_default_is_a_white_3x3_square_bottom_right():
    attack = make_attack("badnets", dataset())
    out, touched = changed_region(attack, 32)
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[29:, 29:] = True
    assert torch.equal(touched, expected)
    assert (out[:, :, 29:, 29:] == 255).all()


def test_badnets_position_size_and_pattern_are_configurable():
    data = dataset()
    out, touched = changed_region(make_attack("badnets", data, position=[5, 7], size=4), 32)
    assert touched[5:9, 7:11].all() and touched.sum() == 16 and (out[:, :, 5:9, 7:11] == 255).all()

    out, touched = changed_region(make_attack("badnets", data, position="top-left"), 32)
    assert touched[:3, :3].all() and touched.sum() == 9

    attack = make_attack("badnets", data, pattern="checkerboard", position="top-right")
    out = to_uint8(attack.apply_trigger(torch.full((1, 3, 32, 32), 0.5)))
    patch = out[0, 0, :3, 29:].float() / 255
    assert torch.equal(patch, torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))
    assert (out[0, :, 3:, :] == 127).all() and (out[0, :, :, :29] == 127).all()


def test_badnets_scales_with_resolution():
    data64 = dataset(64)
    # bilinear (BackdoorBench resizes its 32x32 trigger image): a 5x5 core of 255 in a 7x7 region
    out, touched = changed_region(make_attack("badnets", data64), 64)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[57:, 57:] = True
    assert torch.equal(touched, expected)
    assert (out[:, :, 59:, 59:] == 255).all()
    rim = out[:, :, 57, 57:].float()
    assert (rim > 0).all() and (rim < 255).all()
    # nearest: a crisp 6x6 square
    out, touched = changed_region(make_attack("badnets", data64, resize="nearest"), 64)
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[58:, 58:] = True
    assert torch.equal(touched, expected) and (out[:, :, 58:, 58:] == 255).all()


def test_badnets_trigger_image_file(tmp_path):
    from PIL import Image

    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[10:12, 20:23] = (200, 30, 90)
    Image.fromarray(array).save(tmp_path / "trigger.png")
    attack = make_attack("badnets", dataset(), image=str(tmp_path / "trigger.png"))
    out, touched = changed_region(attack, 32)
    assert touched.sum() == 6 and touched[10:12, 20:23].all()
    assert (out[:, :, 10:12, 20:23] == torch.tensor([200, 30, 90], dtype=torch.uint8).view(1, 3, 1, 1)).all()


@pytest.mark.parametrize("options, field", [
    ({"position": "middle"}, "attack.position"),
    ({"position": [30, 0]}, "attack.position"),
    ({"size": 0}, "attack.size"),
    ({"pattern": "stripes"}, "attack.pattern"),
    ({"image": "/nonexistent/trigger.png"}, "attack.image"),
])
def test_badnets_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(AttackConfig, {"name": "badnets", **options}, "attack", registry=ATTACKS)


# -- Blended ------------------------------------------------------------------------------------


def test_blended_is_0_8_x_plus_0_2_k():
    from sklearn.datasets import load_sample_image

    attack = make_attack("blended", dataset())
    k = attack.state_tensors()["image"]
    photo = torch.from_numpy(np.array(load_sample_image("china.jpg"))).permute(2, 0, 1).float()[None] / 255
    reference = F.interpolate(photo, size=(32, 32), mode="bilinear", antialias=True)[0]
    assert k.shape == (3, 32, 32) and (k - reference).abs().max() <= 0.5 / 255 + 1e-6
    assert k.std() > 0.05, "the trigger should be a photo, not a flat colour"

    x = torch.rand(8, 3, 32, 32, generator=gen(2))
    for train in (True, False):
        assert torch.allclose(attack.apply_trigger(x, train=train), 0.8 * x + 0.2 * k, atol=1e-6)
    data = dataset()
    poisoned, index = attack.poison_trainset(data.train, gen(0))
    exact = (0.8 * data.train.x[index].double() + 0.2 * (k.double() * 255)).floor()
    assert (poisoned.x[index].double() - exact).abs().max() <= 1  # truncated like astype(uint8)


def test_blended_alphas_and_image_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), (250, 10, 130), dtype=np.uint8)).save(tmp_path / "k.png")
    attack = make_attack("blended", dataset(), alpha_train=0.3, alpha_test=0.1, image=str(tmp_path / "k.png"))
    k = torch.tensor([250, 10, 130]).view(3, 1, 1) / 255
    assert torch.allclose(attack.state_tensors()["image"], k.expand(3, 32, 32), atol=1e-6)
    x = torch.rand(2, 3, 32, 32, generator=gen(3))
    assert torch.allclose(attack.apply_trigger(x, train=True), 0.7 * x + 0.3 * k, atol=1e-6)
    assert torch.allclose(attack.apply_trigger(x, train=False), 0.9 * x + 0.1 * k, atol=1e-6)
    flower = make_attack("blended", dataset(), image="sklearn:flower.jpg").state_tensors()["image"]
    assert not torch.allclose(flower, make_attack("blended", dataset()).state_tensors()["image"])


@pytest.mark.parametrize("options, field", [
    ({"alpha_train": 1.5}, "attack.alpha_train"),
    ({"image": "sklearn:astronaut.png"}, "attack.image"),
    ({"image": "/nonexistent.png"}, "attack.image"),
    ({"alpha": 0.2}, "attack.alpha"),
])
def test_blended_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(AttackConfig, {"name": "blended", **options}, "attack", registry=ATTACKS)


# -- Attacks II: bad input names the field --------------------------------------------------------


@pytest.mark.parametrize("options, field", [
    ({"name": "narcissus", "pood": "digits", "pood_root": "/nonexistent/pood"}, "attack.pood_root"),
    ({"name": "narcissus", "pood": "no-such-set"}, "attack.pood"),
    ({"name": "issba", "bits": 0}, "attack.bits"),
    ({"name": "adaptive_blend", "coupling_weight": -0.1}, "attack.coupling_weight"),
    ({"name": "adaptive_patch_fc", "rates": "half"}, "attack.rates"),
    ({"name": "iad", "poison_rate": 0.6, "cross_rate": 0.6}, "attack.cross_rate"),
])
def test_attacks_ii_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build(AttackConfig, options, "attack", registry=ATTACKS)


def test_feature_coupling_is_refused_where_it_cannot_work():
    from trainables.schema import RunConfig

    with pytest.raises(ConfigError, match=r"attack\.coupling_weight"):
        build(RunConfig, {"data": {"name": "digits"}, "attack": {"name": "wanet", "coupling_weight": 0.1}})
    with pytest.raises(ConfigError, match=r"attack\.coupling_weight"):
        make_attack("iad", dataset(), coupling_weight=0.1)


@pytest.mark.parametrize("name, side", [("iad", 36), ("issba", 40)])
def test_learned_attacks_refuse_sizes_their_networks_cannot_take(name, side):
    with pytest.raises(ConfigError, match=r"attack\.name"):
        make_attack(name, dataset(side))


def test_adaptive_rates_preset():
    data = dataset()
    assert (make_attack("adaptive_blend", data).cfg.poison_rate, make_attack("adaptive_blend", data).cfg.cover_rate) \
        == (0.1, 0.1)
    patch = make_attack("adaptive_patch", data, rates="original")
    assert (patch.cfg.poison_rate, patch.cfg.cover_rate) == (0.003, 0.006)
    assert make_attack("adaptive_patch", data, rates="original", cover_rate=0.01).cfg.cover_rate == 0.01
