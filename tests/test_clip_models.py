"""open_clip plumbing (trainables/models/clip.py) and the clip_vit classifier: nothing downloads,
weights come from a local file that is never unpickled, bad input names its field."""
from __future__ import annotations

import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

import trainables  # noqa: F401  (fill the registries)
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import ConfigError, build
from trainables.models import ModelConfig, create_model
from trainables.models.base import check_model_files
from trainables.models.clip import (TINY_ARCHS, ClipConfig, clip_stats, clip_tokenizer, create_clip,
                                    create_clip_visual, open_clip)
from trainables.models.clip_vit import ClipViT
from trainables.schema import RunConfig

ARCH = "bibau-ViT-tiny-8"


@pytest.fixture(scope="module")
def clip_model():
    return create_clip(ClipConfig(arch=ARCH), "cpu", torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def weights_file(clip_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, str(path))
    return path


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_archs_are_registered_with_open_clip_and_encode_both_modalities(clip_model):
    assert set(TINY_ARCHS) <= set(open_clip().list_models())
    tok = clip_tokenizer(ARCH)
    ids = tok(["a photo of a cat", "a photo of a dog"])
    assert ids.dtype == torch.long and ids.shape == (2, 24) and not torch.equal(ids[0], ids[1])
    with torch.no_grad():
        img = clip_model.encode_image(torch.rand(2, 3, 32, 32))
        txt = clip_model.encode_text(ids)
    assert img.shape == txt.shape == (2, 128) and torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert clip_tokenizer("ViT-B-32")(["a photo"]).shape == (1, 77)  # the package's BPE vocabulary, no download


def test_same_generator_same_initial_weights():
    a = create_clip(ClipConfig(arch=ARCH), generator=torch.Generator().manual_seed(3))
    b = create_clip(ClipConfig(arch=ARCH), generator=torch.Generator().manual_seed(3))
    c = create_clip(ClipConfig(arch=ARCH), generator=torch.Generator().manual_seed(4))
    assert _same(a, b) and not _same(a, c)


def test_safetensors_weights_round_trip(clip_model, weights_file):
    loaded = create_clip(build(ClipConfig, {"arch": ARCH, "weights": str(weights_file)}), "cpu",
                         torch.Generator().manual_seed(9))
    assert _same(loaded, clip_model)
    visual = create_clip_visual(ClipConfig(arch=ARCH, weights=str(weights_file)))
    assert _same(visual, clip_model.visual)


def test_weights_only_torch_file_loads(clip_model, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in clip_model.state_dict().items()}}, path)
    assert _same(create_clip(build(ClipConfig, {"arch": ARCH, "weights": str(path)})), clip_model)


class _Payload:
    """What a planted pickle carries: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_file_that_needs_pickle_is_refused_naming_the_field(clip_model, tmp_path, capsys):
    path = tmp_path / "planted.pt"
    torch.save({**clip_model.state_dict(), "extra": _Payload()}, path)
    cfg = build(ModelConfig, {"name": "clip_vit", "arch": ARCH, "weights": str(path)}, "model")
    with pytest.raises(ConfigError, match=r"^model\.weights: .*would need pickle.*never unpickled"):
        check_model_files(cfg)
    with pytest.raises(ConfigError, match=r"^model\.weights: .*would need pickle"):
        create_model(cfg, num_classes=3)
    with pytest.raises(ConfigError, match=r"^clip\.weights: .*would need pickle"):
        build(ClipConfig, {"arch": ARCH, "weights": str(path)}, "clip").check_files("clip")
    with pytest.raises(ConfigError, match=r"^weights: .*would need pickle"):
        create_clip(ClipConfig(arch=ARCH, weights=str(path)))
    assert "unpickled!" not in capsys.readouterr().out
    raw = tmp_path / "weights.pkl"
    raw.write_bytes(pickle.dumps(dict(clip_model.state_dict())))
    with pytest.raises(ConfigError, match=r"^clip\.weights: .*suffix '\.pkl'.*pickle files are never loaded"):
        build(ClipConfig, {"arch": ARCH, "weights": str(raw)}, "clip").check_files("clip")


def test_bad_input_fails_before_any_work_naming_the_field(weights_file, tmp_path):
    from orchestrator.preflight import check_run

    def checked(data):  # the config build, then the preflight (files), as bibau run and --check do
        return check_run(build(RunConfig, {**data, "cache_dir": str(tmp_path / "cache")}), device=False)

    cases = [
        ({"model": {"name": "clip_vit", "arch": "ViT-Q-99"}}, r"^model\.arch: 'ViT-Q-99' is not an architecture open_clip knows"),
        ({"model": {"name": "clip_vit", "weights": str(tmp_path / "gone.safetensors")}}, r"^model\.weights: .*no such file"),
        ({"model": {"name": "clip_vit", "arch": "ViT-B-32", "weights": str(weights_file)}},
         r"^model\.weights: the file does not fit the visual tower of ViT-B-32"),
        ({"model": {"name": "clip_vit", "arch": "RN50"}}, r"^model\.arch: 'RN50' has no open_clip ViT visual tower"),
        ({"model": {"name": "clip_vit", "arch": "ViT-B-16-SigLIP"}}, r"^model\.arch: .*nothing may download"),
        ({"model": {"name": "clip_vit", "depth": 3}}, r"^model\.depth: clip_vit does not take depth"),
        ({"model": {"name": "small_resnet", "weights": str(weights_file)}}, r"^model\.weights: small_resnet does not take weights"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            checked({"data": {"name": "digits"}, **data})
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"^model\.weights: .*not a readable safetensors file"):
        checked({"data": {"name": "digits"}, "model": {"name": "clip_vit", "weights": str(broken)}})
    lines = checked({"data": {"name": "digits"}, "model": {"name": "clip_vit", "arch": ARCH, "weights": str(weights_file)}})
    assert any(line.startswith("model.weights ") and "without pickle" in line for line in lines)


@pytest.mark.parametrize("defense", ["anp", "ep", "rnp", "clp"])
def test_batchnorm_pruning_defenses_refuse_clip_vit(defense):
    with pytest.raises(ConfigError, match=rf"^model\.name: 'clip_vit' has no BatchNorm layer, and defense '{defense}'"):
        build(RunConfig, {"model": {"name": "clip_vit"}, "defense": {"name": defense}})
    build(RunConfig, {"model": {"name": "clip_vit"}, "defense": {"name": "bibau_u"}})  # BI-BAU needs no BN


def test_clip_vit_starts_from_pretrained_weights_with_their_normalisation(clip_model, weights_file, tmp_path):
    cfg = build(ModelConfig, {"name": "clip_vit", "arch": ARCH, "weights": str(weights_file)}, "model")
    model = create_model(cfg, num_classes=5, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2)).eval()
    assert _same(model.visual, clip_model.visual)
    mean, std = clip_stats(ARCH)
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(mean))
    torch.testing.assert_close(model.std.flatten(), torch.tensor(std))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = clip_model.encode_image((x - model.mean) / model.std)
        torch.testing.assert_close(model.features(x), expected)
        out = model(x)
    # a saved clip_vit reloads from its own file alone: the pretrained file may be gone
    meta = {"model": cfg.to_dict(), "num_classes": 5, "in_channels": 3, "mean": list(mean), "std": list(std)}
    path = save_checkpoint(tmp_path / "run", model, meta)
    moved = tmp_path / "moved.safetensors"
    weights_file.rename(moved)
    try:
        again, _ = load_checkpoint(path)
    finally:
        moved.rename(weights_file)
    with torch.no_grad():
        torch.testing.assert_close(again(x), out)


def test_clip_vit_takes_any_size_and_grey_images():
    model = create_model(ModelConfig(name="clip_vit"), num_classes=4, in_channels=1,
                         generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        for size in (16, 32, 64):
            assert model(torch.rand(2, 1, size, size)).shape == (2, 4)
    patch4 = create_model(ModelConfig(name="clip_vit", arch="bibau-ViT-tiny-4"), num_classes=4)
    assert patch4.visual.conv1.kernel_size == (4, 4) and patch4.head.in_features == 128


def test_bec_probes_the_residual_stream_of_clip_vit_and_a_copy_feeds_its_own_probes():
    import copy

    from trainables.evaluation.bec import conv_layers

    model = create_model(ModelConfig(name="clip_vit"), num_classes=4, generator=torch.Generator().manual_seed(0)).eval()
    layers = conv_layers(model, (3, 32, 32), 10)
    assert layers == [f"visual.transformer.resblocks.{i}.probe" for i in range(4)]
    assert conv_layers(model, (3, 32, 32), 2) == layers[-2:]
    twin = copy.deepcopy(model)
    seen = {"model": [], "twin": []}
    model.get_submodule(layers[-1]).register_forward_hook(lambda m, i, o: seen["model"].append(o.shape))
    twin.get_submodule(layers[-1]).register_forward_hook(lambda m, i, o: seen["twin"].append(o.shape))
    with torch.no_grad():
        twin(torch.rand(2, 3, 32, 32))
    assert seen == {"model": [], "twin": [torch.Size([2, 128, 17])]}  # (batch, width, 4x4 patches + class token)


def _defenses_without_batchnorm() -> list[str]:
    from trainables.defenses.bn import BatchNormDefenseConfig
    from trainables.registry import DEFENSES

    return [n for n in DEFENSES.names() if not issubclass(DEFENSES.get(n).Config, BatchNormDefenseConfig)
            and not DEFENSES.get(n).contrastive]  # CleanCLIP, BI-BAU-CLIP purify a whole CLIP (test_contrastive.py)


@pytest.mark.parametrize("name", _defenses_without_batchnorm())
def test_every_defense_that_needs_no_batchnorm_purifies_clip_vit(name):
    """The defense contract's purify check on clip_vit (features, head, PGD, per-sample Fisher
    through vmap over open_clip's attention, trigger synthesis): 16 px images, resized inside."""
    from test_defense_contract import context, random_set, small_config, snapshot

    from trainables.defenses import build_defense

    model = create_model(ModelConfig(name="clip_vit"), 4, generator=torch.Generator().manual_seed(0)).train()
    before = snapshot(model)
    result = build_defense(small_config(name)).purify(model, random_set(40, seed=1), context(name))
    after = result.model.state_dict()
    assert type(result.model) is ClipViT and after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in before), "purification changed nothing"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "the input model changed"
    with torch.no_grad():
        assert torch.isfinite(result.model(torch.rand(2, 3, 16, 16))).all()


def test_a_whole_trial_runs_clip_vit_through_attack_defense_and_every_evaluation(tmp_path):
    """digits (offline), BadNets, BI-BAU(U), then CA, ASR, RA, QRA and BEC, at smoke-test size."""
    from orchestrator.config import load_run_config
    from trainables.trial import run_trial

    cfg = load_run_config(None, [
        "data.name=digits", "model.name=clip_vit", "train.epochs=1", "attack.name=badnets",
        "defense.name=bibau_u", "evaluation.metrics=[ca,asr,ra,qra,bec]", "device=cpu", f"cache_dir={tmp_path}"])
    report = run_trial(cfg, tmp_path / "out", log=lambda line: None, smoke_test=True)
    for key in ("ca", "asr", "r_asr", "q_asr", "bec"):
        assert report.get(key) is not None and math.isfinite(report[key]), key
    assert report["model"] == "clip_vit"
    assert (tmp_path / "out" / "purified.safetensors").is_file()


def test_the_cache_key_follows_the_weights_files_content(clip_model, tmp_path):
    from trainables.models.base import weights_digest

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in clip_model.state_dict().items()}, str(path))
    cfg = ModelConfig(name="clip_vit", weights=str(path))
    first = weights_digest(cfg)
    save_file({k: (v + 1).contiguous() for k, v in clip_model.state_dict().items()}, str(path))
    assert weights_digest(cfg) != first and weights_digest(ModelConfig(name="clip_vit")) is None


@pytest.mark.slow
def test_badnets_implants_a_backdoor_in_clip_vit_on_cifar10(cifar10_archive, tmp_path):
    """The tiny ViT from scratch (no pretrained weights offline) on 2,000 CIFAR-10 images, 4 epochs
    (about 15 s of CPU): it learns little of the clean task (CA ~0.3, measured 0.32) but the
    corner patch, which lands in one 8 px patch token, fast (ASR 0.87 measured)."""
    from orchestrator.config import load_run_config
    from trainables.data import load_dataset
    from trainables.predict import predict
    from trainables.trial import attack_stage

    cfg = load_run_config(None, [
        "data.name=cifar10", f"data.root={cifar10_archive}", "data.train_size=2000", "data.test_size=500",
        "model.name=clip_vit", "train.epochs=4", "train.batch_size=64", "train.lr=0.05", "train.warmup_epochs=1",
        "train.crop_padding=0", "train.hflip=false", "train.eval_every=0", "attack.name=badnets", "device=cpu",
        f"cache_dir={tmp_path}"])
    dataset = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    stage = attack_stage(cfg, dataset, cpu, log=print)
    ca, asr = stage.metrics["backdoored_ca"], stage.metrics["backdoored_asr"]
    print(f"clip_vit badnets: CA {ca:.3f}, ASR {asr:.3f}")
    assert asr >= 0.6, f"ASR {asr:.3f} (CA {ca:.3f})"
    assert ca >= 0.2, f"CA {ca:.3f} is too close to chance (0.1)"
    # the trigger, not a bias towards the target, flips the predictions
    clean_non_target = dataset.test.subset((dataset.test.y != cfg.attack.target).nonzero().flatten())
    as_target = (predict(stage.model, clean_non_target, cpu) == cfg.attack.target).float().mean().item()
    assert as_target <= 0.25, f"{as_target:.3f} of the clean non-target images go to the target"


def test_the_table3_benchmark_swaps_clip_vit_into_the_resnet_tables_trials(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import clip_vit_cifar10 as table3

    configs = table3.trial_configs(table3.parse(["--set", "data.train_size=5000"]))
    assert set(configs) == {(a, d) for a in table3.ATTACKS for d in table3.DEFENSES}
    for (attack, defense), cfg in configs.items():
        assert (cfg.model.name, cfg.model.arch, cfg.attack.name) == ("clip_vit", ARCH, attack)
        assert cfg.data.train_size == 5000 and cfg.train.warmup_epochs == 1
        assert (cfg.defense is None) == (defense == "none")
    assert configs[("blended", "none")].attack.image.endswith("noise-32.png")  # the ResNet table's trigger
    with pytest.raises(SystemExit):
        table3.parse(["--defenses", "anp"])
    assert "unknown ['anp']" in capsys.readouterr().err
