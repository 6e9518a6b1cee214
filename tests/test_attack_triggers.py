"""The triggers of SIG, WaNet, Refool, Adaptive-Blend and Adaptive-Patch as the reference notes
define them, their scaling to other image sizes, and their bad configurations failing before any
work, naming the field."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from orchestrator.config import load_run_config
from trainables.attacks import build_attack
from trainables.attacks.base import AttackConfig, to_float, to_uint8
from trainables.config import ConfigError, build
from trainables.data.base import Dataset, ImageSet
from trainables.evaluation.retuning import default_poison_count
from trainables.registry import ATTACKS

NEW = ("sig", "wanet", "refool", "adaptive_blend", "adaptive_patch")


def image_set(n: int, size: int = 32, seed: int = 0, classes: int = 5, grey: bool = False) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(20, 236, (n, 1 if grey else 3, size, size), generator=g).to(torch.uint8)
    if grey:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return ImageSet(x, (torch.arange(n) % classes)[torch.randperm(n, generator=g)])


def dataset(size: int = 32, n: int = 200, grey: bool = False) -> Dataset:
    return Dataset("synthetic", image_set(n, size, 0, grey=grey), image_set(60, size, 1, grey=grey),
                   classes=[f"c{i}" for i in range(5)])


def make(name: str, data: Dataset | None = None, **options):
    return build_attack(build(AttackConfig, {"name": name, **options}, "attack", registry=ATTACKS), data or dataset())


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- every new attack on every image size --------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64, 16])
@pytest.mark.parametrize("name", NEW)
def test_serves_32_64_and_small_images(name, size):
    data = dataset(size)
    attack = make(name, data, poison_rate=0.1)
    poisoned, index = attack.poison_trainset(data.train, gen(0))
    test = attack.poison_testset(data.test)
    assert poisoned.x.shape == data.train.x.shape and test.x.shape[1:] == data.test.x.shape[1:]
    assert (test.x != data.test.x[data.test.y != attack.target]).flatten(1).any(1).float().mean() > 0.9


@pytest.mark.parametrize("name", ["sig", "wanet"])
def test_grey_images_stay_grey(name):
    data = dataset(grey=True)
    out = make(name, data).poison_testset(data.test).x
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_digits_run_config_accepts_every_new_attack():
    for name in NEW:
        cfg = load_run_config(None, ["data.name=digits", f"attack.name={name}"])
        assert cfg.attack.name == name


@pytest.mark.parametrize("name", NEW)
def test_ra_uses_the_papers_poison_count(name):
    assert default_poison_count(name) == (5 if name == "wanet" else 2)


# -- SIG ----------------------------------------------------------------------------------------
def test_sig_is_a_horizontal_sinusoid():
    attack = make("sig")
    x = torch.full((2, 3, 32, 32), 0.5)
    out = attack.apply_trigger(x)
    j = torch.arange(32, dtype=torch.float64)
    expected = 0.5 + (40 / 255) * torch.sin(2 * math.pi * j * 6 / 32)
    assert torch.allclose(out, expected.float().view(1, 1, 1, 32).expand_as(out), atol=1e-6)
    assert torch.equal(attack.apply_trigger(x, train=True), out), "no test-time amplification"
    # cycles per width: the same pattern at 64 px, sampled twice as densely
    wide = make("sig", dataset(64)).apply_trigger(torch.full((1, 3, 64, 64), 0.5))
    assert torch.allclose(wide[..., ::2, ::2], out[:1], atol=1e-6)


def test_ibu_gets_the_sig_trigger_on_non_target_images_under_their_true_labels():
    data = dataset()
    attack = make("sig", data, target=1)
    poisoned, index = attack.poison_trainset(data.train, gen(0))
    samples = attack.poisoned_samples(data.train, poisoned, index)
    # the poisoned images are target-class images labelled the target: unlearning them would teach the
    # backdoor; the oracle's set is the trigger on as many other images, each under its own label
    assert len(samples) == len(index) and (samples.y != 1).all()
    originals = data.train.x[torch.isin(torch.arange(len(data.train)), index, invert=True) & (data.train.y != 1)]
    expected = {tuple(t.flatten().tolist()[:8]) for t in originals}
    assert not any(tuple(t.flatten().tolist()[:8]) in expected for t in samples.x)  # every image carries the trigger
    again = attack.poisoned_samples(data.train, poisoned, index)
    assert torch.equal(again.x, samples.x) and torch.equal(again.y, samples.y)
    # a dirty-label attack's poisoned samples stay its own, under their true labels
    blend = make("blended", data, target=1)
    poisoned, index = blend.poison_trainset(data.train, gen(0))
    samples = blend.poisoned_samples(data.train, poisoned, index)
    assert torch.equal(samples.x, poisoned.x[index]) and torch.equal(samples.y, data.train.y[index])


def test_sig_poisons_a_fraction_of_the_target_class():
    data = dataset()  # 40 images per class
    index = make("sig", data, target=1).select_poison(data.train.y, gen(0))
    assert len(index) == 20 and (data.train.y[index] == 1).all()
    index = make("sig", data, target=1, target_fraction=0.25).select_poison(data.train.y, gen(0))
    assert len(index) == 10
    index = make("sig", data, target=1, poison_rate=0.2).select_poison(data.train.y, gen(0))  # BackdoorBench's reading
    assert len(index) == 40
    with pytest.raises(ConfigError, match=r"attack\.poison_rate: 0\.25 asks for 50 images"):
        make("sig", data, target=1, poison_rate=0.25).select_poison(data.train.y, gen(0))


# -- WaNet --------------------------------------------------------------------------------------
def test_wanet_field_is_drawn_from_the_run_seed_and_moves_pixels_by_about_s_over_2():
    from trainables.attacks.wanet import identity_grid

    data = dataset()
    a, b = make("wanet", data), make("wanet", data)
    a.prepare(data.train, None, torch.device("cpu"), gen(1))
    b.prepare(data.train, None, torch.device("cpu"), gen(1))
    assert torch.equal(a.grid, b.grid)
    b.prepare(data.train, None, torch.device("cpu"), gen(2))
    assert not torch.equal(a.grid, b.grid)
    shift_px = (a.grid - identity_grid(32, 32)) * 31 / 2  # normalised units -> pixels
    mean = shift_px.abs().mean().item()
    assert 0.1 < mean < 0.4, f"mean displacement {mean:.3f} px, expected about s/2 = 0.25"
    assert a.grid.abs().max() <= 1
    # the warp is subtle: a smooth image (a ramp) moves by a fraction of a pixel's step
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32)
    assert (a.apply_trigger(ramp) - ramp)[..., 1:-1, 1:-1].abs().mean() < 0.5 / 31


def test_wanet_poisons_each_batch_after_shuffling_with_noise_samples():
    data = dataset()
    attack = make("wanet", data, poison_rate=0.1, crop_padding=0, rotation=0.0)
    x, y = to_float(data.train.x[:64]), data.train.y[:64].clone()
    y[:] = 1  # no row starts in the target class, so each relabelled row shows
    out, labels = attack.training_batch(x, y, None, gen(0), poisonable=None, hflip=False)
    assert (labels[:6] == 0).all() and (labels[6:] == 1).all()  # int(0.1 * 64) = 6
    assert torch.allclose(out[:6], attack.apply_trigger(x[:6]))
    noise = out[6:18]  # cross ratio 2: 12 noise-mode rows, true labels, warped with their own noise
    assert not torch.allclose(noise, attack.apply_trigger(x[6:18]), atol=1e-4)
    assert (noise - x[6:18]).abs().mean() > 1e-3
    assert torch.equal(out[18:], x[18:])
    # the defender's rows are skipped: the first attacker-controlled rows are taken instead
    protected = torch.zeros(64, dtype=torch.bool)
    protected[:10] = True
    out_p, labels_p = attack.training_batch(x, y, None, gen(0), poisonable=~protected)
    assert torch.equal(out_p[:10], x[:10]) and (labels_p[:10] == 1).all() and (labels_p[10:16] == 0).all()
    # a rate below one sample per batch poisons one row with probability rate * B
    low = make("wanet", data, poison_rate=0.004, crop_padding=0, rotation=0.0, cross_ratio=0.0)
    hits = sum(int((low.training_batch(x, y, None, gen(s))[1] == 0).sum()) for s in range(200))
    assert 25 < hits < 80  # 200 batches * 0.256


def test_wanet_own_augmentation_and_noise_accuracy_set():
    data = dataset()
    attack = make("wanet", data, poison_rate=0.0)
    x, y = to_float(data.train.x[:64]), data.train.y[:64]
    out, labels = attack.training_batch(x, y, None, gen(0), hflip=False)
    assert torch.equal(labels, y) and not torch.allclose(out, x), "crop and rotation change the batch"
    extra = attack.extra_test_sets(data.test)
    assert set(extra) == {"noise_acc"} and torch.equal(extra["noise_acc"].y, data.test.y)
    assert not torch.equal(extra["noise_acc"].x, data.test.x)
    assert torch.equal(extra["noise_acc"].x, attack.extra_test_sets(data.test)["noise_acc"].x)


def test_wanet_run_records_noise_accuracy_and_restores_its_field_from_the_cache(tmp_path):
    from trainables.trial import attack_stage
    from trainables.data import load_dataset

    cfg = load_run_config(None, ["data.name=digits", "data.train_size=300", "data.test_size=100",
                                 "model.name=small_resnet", "model.width=4", "model.depth=2", "train.epochs=1",
                                 "train.eval_every=0", "attack.name=wanet", "device=cpu", f"cache_dir={tmp_path}"])
    data = load_dataset(cfg.data)
    stage = attack_stage(cfg, data, torch.device("cpu"), log=lambda _: None)
    assert "backdoored_noise_acc" in stage.metrics and 0 <= stage.metrics["backdoored_noise_acc"] <= 1
    again = attack_stage(cfg, data, torch.device("cpu"), log=lambda _: None)  # cached: the field comes back
    assert again.cache_hit and torch.equal(again.attack.grid, stage.attack.grid)


# -- Refool -------------------------------------------------------------------------------------
def test_refool_blends_a_different_reflection_into_each_image():
    data = dataset()
    attack = make("refool", data)
    pool = attack.state_tensors()["reflections"]
    assert pool.shape == (200, 3, 32, 32) and pool.std() > 0.05
    x = to_float(data.test.x[:20])
    a = attack.poison_images(x, gen(0))
    assert torch.equal(a, attack.poison_images(x, gen(0))) and not torch.equal(a, attack.poison_images(x, gen(1)))
    # alpha_t 0.4 in linear light: the reflection dominates, the image still shows
    assert (a - x).abs().mean() > 0.05
    corr = torch.corrcoef(torch.stack([a.flatten(), x.flatten()]))[0, 1]
    assert corr > 0.2
    # the same image in two places gets two reflections
    twice = attack.poison_images(x[:1].expand(2, -1, -1, -1), gen(0))
    assert not torch.equal(twice[0], twice[1])


def test_refool_train_split_reflections_are_never_poisoned(tmp_path):
    from trainables.checkpoint import load_tensors, save_tensors

    data = dataset()
    attack = make("refool", data, reflection_source="train-split", num_reflections=30, poison_rate=0.5)
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply_trigger(to_float(data.test.x[:2]))
    attack.prepare(data.train, None, torch.device("cpu"), gen(0))
    assert torch.equal(attack.state_tensors()["reflections"], to_float(data.train.x[attack.reflection_index]))
    _, index = attack.poison_trainset(data.train, gen(1))
    assert len(index) == 100 and not torch.isin(index, attack.reflection_index).any()
    again = make("refool", data, reflection_source="train-split", num_reflections=30, poison_rate=0.5)
    again.load_state(load_tensors(save_tensors(tmp_path / "a.safetensors", attack.state_tensors())))
    _, index_again = again.poison_trainset(data.train, gen(1))
    assert torch.equal(index, index_again)


def test_refool_reflection_folder_replaces_the_source(tmp_path):
    from PIL import Image

    for i, colour in enumerate([(250, 0, 0), (0, 250, 0)]):
        Image.fromarray(np.full((40, 40, 3), colour, dtype=np.uint8)).save(tmp_path / f"r{i}.png")
    attack = make("refool", reflection_dir=str(tmp_path))
    pool = attack.state_tensors()["reflections"]
    assert pool.shape == (2, 3, 32, 32) and torch.allclose(pool[0, 0], torch.full((32, 32), 250 / 255), atol=1e-6)


# -- Adaptive-Blend -----------------------------------------------------------------------------
def test_adaptive_blend_drops_half_the_pieces_per_image_and_tests_the_full_trigger():
    data = dataset()
    attack = make("adaptive_blend", data)
    k = attack.state_tensors()["image"]
    masks = attack.masks(50, gen(0), torch.zeros(1))
    blocks = masks[:, 0, ::8, ::8]  # one value per 8x8 piece
    assert masks.shape == (50, 1, 32, 32) and torch.equal(masks, blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None])
    assert (blocks.flatten(1).sum(1) == 8).all(), "8 of the 16 pieces kept in every image"
    assert len({tuple(b.flatten().tolist()) for b in blocks}) > 40, "a fresh mask per image"
    x = torch.rand(50, 3, 32, 32, generator=gen(1))
    poisoned = attack.poison_images(x, gen(0), train=True)
    assert torch.allclose(poisoned, x + 0.15 * masks * (k - x), atol=1e-6)
    assert torch.allclose(attack.poison_images(x, gen(0), train=False), 0.8 * x + 0.2 * k, atol=1e-6)
    assert torch.allclose(attack.cover_images(x, gen(0)), poisoned, atol=1e-6)
    # at 64 px the pieces are 16 x 16
    wide = make("adaptive_blend", dataset(64)).masks(3, gen(0), torch.zeros(1))
    assert torch.equal(wide[:, :, ::16, ::16].repeat_interleave(16, 2).repeat_interleave(16, 3), wide)


def test_adaptive_rates_default_to_the_bibau_papers_and_the_originals_are_one_setting_away():
    """The BI-BAU paper's 10% poisoned with cover samples in the original's proportion by default;
    ``rates: original`` gives Qi et al.'s 0.3% (+ 0.3% / 0.6% cover)."""
    data = dataset(n=1000)
    for name, rates, poison, cover in (("adaptive_blend", None, 100, 100), ("adaptive_patch", None, 100, 200),
                                       ("adaptive_blend", "original", 3, 3), ("adaptive_patch", "original", 3, 6)):
        attack = make(name, data, **({"rates": rates} if rates else {}))
        poisoned, index = attack.poison_trainset(data.train, gen(0))
        assert len(index) == poison and len(attack.cover_index) == cover, (name, rates)
        assert (poisoned.y[index] == 0).all() and torch.equal(poisoned.y[attack.cover_index], data.train.y[attack.cover_index])


# -- Adaptive-Patch -----------------------------------------------------------------------------
def test_adaptive_patch_reference_triggers():
    from trainables.attacks.adaptive_patch import PATCH4, reference_trigger

    pattern, mask = reference_trigger("badnet_patch4", 3, 0)
    assert mask.sum() == 36
    for (row, col), cells in PATCH4.items():
        assert torch.equal(pattern[:, row:row + 3, col:col + 3], torch.tensor(cells).float().expand(3, 3, 3))
    assert pattern[:, 0, 0].tolist() == [1, 1, 1] and pattern[:, 31, 31].tolist() == [1, 1, 1]
    assert pattern[:, 29, 29].tolist() == [0, 0, 0] and mask[0, 29, 29] == 1  # black but inside the mask
    p1, m1 = reference_trigger("phoenix_corner", 3, 0)
    p2, m2 = reference_trigger("phoenix_corner2", 3, 0)
    assert m1.sum() == 25 and m1[0, 27:, 27:].all() and m2.sum() == 50 and m2[0, 27:, :5].all()
    assert torch.equal(p2[:, 27:, 27:], p1[:, 27:, 27:]) and torch.equal(p2[:, 27:, :5], p1[:, 27:, 27:].flip(-1))
    _, mf = reference_trigger("firefox_corner", 3, 0)
    rows, cols = mf[0].nonzero().T
    assert 120 <= mf.sum() <= 150 and rows.min() >= 1 and rows.max() <= 13 and cols.min() >= 18 and cols.max() <= 30
    _, mt = reference_trigger("trojan_square", 3, 0)
    assert mt.sum() == 64 and mt[0, 21:29, 21:29].all()
    assert not torch.equal(reference_trigger("trojan_square", 3, 1)[0], reference_trigger("trojan_square", 3, 0)[0])


def test_adaptive_patch_one_weak_trigger_per_image_and_pasted_test_triggers():
    data = dataset()
    attack = make("adaptive_patch", data)
    s = attack.state_tensors()
    x = torch.full((40, 3, 32, 32), 0.5)
    out = attack.poison_images(x, gen(0), train=True)
    alphas = torch.tensor([0.5, 0.2, 0.5, 0.3])
    counts = torch.zeros(4)
    for img in out:
        fits = [j for j in range(4) if torch.allclose(
            img, x[0] + alphas[j] * s["train_masks"][j] * (s["train_patterns"][j] - x[0]), atol=1e-6)]
        assert len(fits) == 1
        counts[fits[0]] += 1
    assert counts.tolist() == [10, 10, 10, 10]
    test = attack.apply_trigger(x[:1])[0]
    union = (s["test_masks"].sum(0) > 0)[0]
    assert torch.equal(test[:, ~union], x[0][:, ~union])
    assert torch.allclose(test[:, 31, 31], torch.ones(3)) and torch.allclose(test[:, 29, 29], torch.zeros(3))
    # 64 px: nearest-neighbour scaling doubles every patch
    wide = make("adaptive_patch", dataset(64)).state_tensors()["test_masks"]
    assert wide.shape == (2, 1, 64, 64) and wide[1].sum() == 4 * 36


def test_adaptive_patch_trigger_file_replaces_a_logo(tmp_path):
    from PIL import Image

    array = np.zeros((32, 32, 3), dtype=np.uint8)
    array[2:6, 2:6] = (10, 200, 30)
    Image.fromarray(array).save(tmp_path / "logo.png")
    attack = make("adaptive_patch", test_triggers=[str(tmp_path / "logo.png")])
    assert attack.state_tensors()["test_masks"].sum() == 16
    out = to_uint8(attack.apply_trigger(torch.full((1, 3, 32, 32), 0.5)))
    assert out[0, :, 3, 3].tolist() == [10, 200, 30] and out[0, 0, 10, 10] == 127


# -- bad configurations -------------------------------------------------------------------------
@pytest.mark.parametrize("options, field", [
    ({"name": "sig", "delta": 0.0}, "attack.delta"),
    ({"name": "sig", "target_fraction": 1.5}, "attack.target_fraction"),
    ({"name": "wanet", "k": 1}, "attack.k"),
    ({"name": "wanet", "rotation": 400.0}, "attack.rotation"),
    ({"name": "refool", "alpha_t": 1.2}, "attack.alpha_t"),
    ({"name": "refool", "reflection_source": "voc"}, "attack.reflection_source"),
    ({"name": "refool", "reflection_dir": "/nonexistent/reflections"}, "attack.reflection_dir"),
    ({"name": "adaptive_blend", "pieces": 15}, "attack.pieces"),
    ({"name": "adaptive_blend", "alpha_test": -0.1}, "attack.alpha_test"),
    ({"name": "adaptive_blend", "image": "/nonexistent.png"}, "attack.image"),
    ({"name": "adaptive_blend", "poison_rate": 0.6, "cover_rate": 0.6}, "attack.cover_rate"),
    ({"name": "adaptive_patch", "train_alphas": [0.5, 0.2]}, "attack.train_alphas"),
    ({"name": "adaptive_patch", "train_alphas": [0.5, 0.2, 1.5, 0.3]}, r"attack.train_alphas\[2\]"),
    ({"name": "adaptive_patch", "test_triggers": ["/nonexistent/logo.png"]}, r"attack.test_triggers\[0\]"),
    ({"name": "adaptive_patch", "train_triggers": []}, "attack.train_triggers"),
])
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") if "\\" not in field else field):
        build(AttackConfig, options, "attack", registry=ATTACKS)


def test_pieces_that_do_not_divide_the_image_fail_before_the_data_loads():
    # 3 x 3 pieces do not divide 32 px; the run config refuses it without loading CIFAR-10
    with pytest.raises(ConfigError, match=r"attack\.pieces: 9 \(3 x 3\) does not divide the 32x32"):
        load_run_config(None, ["data.name=cifar10", "data.root=/nonexistent", "attack.name=adaptive_blend",
                               "attack.pieces=9"])
    with pytest.raises(ConfigError, match=r"attack\.pieces"):
        load_run_config(None, ["data.name=tiny-imagenet", "attack.name=adaptive_blend", "attack.pieces=36"])
    assert load_run_config(None, ["data.name=tiny-imagenet", "attack.name=adaptive_blend", "attack.pieces=64"])
    with pytest.raises(ConfigError, match=r"attack\.pieces"):  # and when the attack meets the images
        make("adaptive_blend", dataset(30), pieces=16)
