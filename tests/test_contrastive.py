"""The contrastive (CLIP) setting without real data: image-caption pairs and their sources, bad
input failing before any work, the contrastive loss, the zero-shot head, checkpoints, BadCLIP's
trigger optimisation, the setting checks of the run config."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import trainables  # noqa: F401  (fill the registries)
from trainables.attacks import build_attack
from trainables.attacks.base import AttackConfig
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.config import ConfigError, build
from trainables.contrastive.config import ContrastiveConfig
from trainables.contrastive.losses import clip_loss
from trainables.contrastive.model import CaptionHead, build_model, encode_texts, tokenize
from trainables.data.base import Dataset, ImageSet
from trainables.data.captions import PairSet, file_pairs, list_pairs, templated_pairs
from trainables.registry import ATTACKS
from trainables.schema import RunConfig


def check_trial(cfg):
    from orchestrator.preflight import check_run

    return check_run(cfg, device=False)

CPU = torch.device("cpu")
CLASSES = ["cat", "dog", "ship"]
ARCH = "bibau-ViT-micro-8"


def images(n=30, side=32, seed=0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, side, side), generator=g, dtype=torch.uint8), torch.arange(n) % 3)


def pairs(n=30, seed=0) -> PairSet:
    return templated_pairs(images(n, seed=seed), CLASSES, ["a photo of a {class}.", "a {class} here."],
                           torch.Generator().manual_seed(seed))


class Picklable:
    """An object only the full unpickler rebuilds."""


def micro_clip(seed=0):
    return build_model(ContrastiveConfig(arch=ARCH), CLASSES, (0.5,) * 3, (0.25,) * 3, CPU,
                       generator=torch.Generator().manual_seed(seed))


# -- pairs ----------------------------------------------------------------------------------------


def test_templated_pairs_caption_each_image_with_its_class_and_several_templates():
    p = pairs(60)
    texts = [p.texts[int(c)] for c in p.caption]
    assert all(CLASSES[int(y)] in t for y, t in zip(p.y, texts))
    assert len(set(texts)) == 6  # 3 classes x 2 templates, all used
    assert p.class_captions.shape == (3, 2)
    sub = p.subset(torch.tensor([3, 5]))
    assert isinstance(sub, PairSet) and torch.equal(sub.caption, p.caption[[3, 5]]) and sub.texts == p.texts


def test_poisoned_pairs_get_target_captions():
    p = pairs(60)
    attack = build_attack(build(AttackConfig, {"name": "badnets", "target": 1, "poison_rate": 0.2}, "attack",
                                registry=ATTACKS), Dataset("s", p, images(9), CLASSES))
    poisoned, index = attack.poison_trainset(p, torch.Generator().manual_seed(0))
    assert isinstance(poisoned, PairSet) and len(index) == 12
    assert all("dog" in poisoned.texts[int(c)] for c in poisoned.caption[index])
    rest = torch.ones(60, dtype=torch.bool)
    rest[index] = False
    assert torch.equal(poisoned.caption[rest], p.caption[rest])
    assert (poisoned.x[index] != p.x[index]).any()


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 30), (10 * i, 100, 200)).save(folder / name)


def test_tsv_and_folder_pairs_decode_to_uint8(tmp_path):
    write_images(tmp_path / "img", ["a.png", "b.jpg"])
    (tmp_path / "pairs.tsv").write_text("filepath\ttitle\nimg/a.png\ta red kite\nimg/b.jpg\ttwo dogs on grass\n")
    p = file_pairs(str(tmp_path / "pairs.tsv"), 32, CLASSES, ["a photo of a {class}."])
    assert p.x.shape == (2, 3, 32, 32) and p.x.dtype == torch.uint8 and (p.y == -1).all()
    assert [p.texts[int(c)] for c in p.caption] == ["a red kite", "two dogs on grass"]
    assert "a photo of a ship." in [p.texts[int(c)] for c in p.class_captions[2]]
    (tmp_path / "img" / "a.txt").write_text("a red kite")
    (tmp_path / "img" / "b.txt").write_text("two dogs")
    assert len(list_pairs(str(tmp_path / "img"), "clip.captions")) == 2


def test_caption_file_with_missing_images_fails_naming_the_field(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "pairs.csv").write_text("image,caption\na.png,a kite\nmissing.png,a dog\n")
    def run(captions):  # the preflight (bibau run, bibau sweep and --check) checks the files before any work
        return check_trial(build(RunConfig, {"data": {"name": "digits"}, "cache_dir": str(tmp_path / "cache"),
                                             "clip": {"arch": ARCH, "captions": captions}}))

    with pytest.raises(ConfigError, match=r"clip\.captions: 1 of 2 images .* missing.*missing\.png"):
        run(str(tmp_path / "pairs.csv"))
    (tmp_path / "bad.tsv").write_text("path_to\tcap\nx\ty\n")
    with pytest.raises(ConfigError, match=r"clip\.captions: .* columns"):
        run(str(tmp_path / "bad.tsv"))
    folder = tmp_path / "folder"
    write_images(folder, ["a.png", "b.png"])
    (folder / "a.txt").write_text("a kite")
    with pytest.raises(ConfigError, match=r"clip\.captions: 1 images .* no caption file"):
        run(str(folder))
    (folder / "b.txt").write_text("a ship")
    assert any("every image present" in line for line in run(str(folder)))


def test_unknown_arch_and_pickle_weights_fail_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"clip\.arch: 'ViT-Nope'"):
        build(RunConfig, {"clip": {"arch": "ViT-Nope"}})
    weights = tmp_path / "w.pt"
    torch.save({"visual.proj": torch.zeros(1), "extra": Picklable()}, weights)  # loading it needs pickle
    cfg = build(RunConfig, {"data": {"name": "digits"}, "cache_dir": str(tmp_path / "cache"),
                            "clip": {"arch": ARCH, "weights": str(weights), "pretrain_epochs": 0}})
    with pytest.raises(ConfigError, match=r"clip\.weights: .*pickle"):  # the preflight's check, before any work
        check_trial(cfg)
    with pytest.raises(ConfigError, match=r"clip\.weights: .*no such file"):
        check_trial(cfg.replace(clip={"weights": str(tmp_path / "nope.safetensors")}))
    with pytest.raises(ConfigError, match=r"clip\.pretrain_epochs"):
        build(RunConfig, {"clip": {"arch": ARCH, "pretrain_epochs": 0}})
    with pytest.raises(ConfigError, match=r"clip\.prompts: 'a photo'"):
        build(RunConfig, {"clip": {"arch": ARCH, "prompts": ["a photo"]}})


@pytest.mark.parametrize("run, field", [
    ({"clip": {"arch": ARCH}, "defense": {"name": "bibau_u"}}, r"defense\.name: 'bibau_u' does not serve the contrastive"),
    ({"defense": {"name": "bibau_clip_u"}}, r"defense\.name: 'bibau_clip_u' does not serve the classifier"),
    ({"attack": {"name": "badclip"}}, r"attack\.name: 'badclip' does not serve the classifier"),
    ({"clip": {"arch": ARCH}, "attack": {"name": "wanet"}}, r"attack\.name: 'wanet' does not serve the contrastive"),
    ({"clip": {"arch": ARCH}, "model": {"name": "vgg19_bn"}}, r"model: .* not used in the contrastive"),
    ({"clip": {"arch": ARCH}, "train": {"lr": 0.1}}, r"train\.lr: 0\.1 is not used in the contrastive"),
    ({"clip": {"arch": ARCH}, "evaluation": {"metrics": ["ca", "bec"]}}, r"evaluation\.metrics: 'bec'"),
])
def test_setting_mismatches_fail_naming_the_field(run, field):
    with pytest.raises(ConfigError, match=field):
        build(RunConfig, run)


def test_contrastive_runs_default_to_zero_shot_ca_asr_and_ra():
    cfg = build(RunConfig, {"clip": {"arch": ARCH}, "attack": {"name": "badclip"}, "defense": {"name": "cleanclip"}})
    assert cfg.evaluation.metrics == ["ca", "asr", "ra"]


# -- losses and the model -------------------------------------------------------------------------


def test_clip_loss_is_clips_symmetric_infonce_with_distinct_captions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 6, generator=g)
    labels = torch.arange(6)
    expected = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert torch.allclose(clip_loss(logits, labels), expected)
    # images sharing a caption are that text's positives: a perfect match of two images per text
    shared = torch.tensor([0, 0, 1, 1])
    perfect = torch.full((4, 2), -50.0)
    perfect[shared == 0, 0] = 50.0
    perfect[shared == 1, 1] = 50.0
    assert clip_loss(perfect, shared).item() == pytest.approx(0.5 * math.log(2), abs=1e-4)


def test_zero_shot_head_is_scaled_cosine_to_the_class_prompts():
    model = micro_clip()
    x = torch.rand(4, 3, 16, 16)  # resized to the CLIP's input side inside
    with torch.no_grad():
        texts = encode_texts(model, model.prompt_tokens, CPU)
        expected = model.scale() * model.features(x) @ F.normalize(texts, dim=-1).t()
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert not list(model.head.parameters())  # the head is a function of the text tower, never trained


def test_caption_head_shares_the_visual_tower_and_has_only_its_parameters():
    model = micro_clip()
    texts = encode_texts(model, tokenize(ARCH, ["a", "b c"]), CPU)
    view = CaptionHead(model, texts)
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.clip.visual.parameters()}
    with torch.no_grad():
        assert view(torch.rand(2, 3, 32, 32)).shape == (2, 2)


def test_clip_checkpoint_round_trip(tmp_path):
    model = micro_clip(seed=3)
    meta = {"clip": ContrastiveConfig(arch=ARCH).to_dict(), "model": {"name": "clip"}, "num_classes": 3,
            "in_channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": CLASSES}
    save_checkpoint(tmp_path, model, meta, "m")
    again, _ = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again(x), model.eval()(x), atol=1e-6)


# -- BadCLIP --------------------------------------------------------------------------------------


def test_badclip_optimises_its_patch_toward_the_target_text():
    model = micro_clip(seed=1)
    data = pairs(48, seed=2)
    attack = build_attack(build(AttackConfig, {"name": "badclip", "target": 2, "steps": 40, "lr": 0.2,
                                               "size": 12}, "attack", registry=ATTACKS),
                          Dataset("s", data, images(9), CLASSES))
    x = data.x[data.y != 2].float() / 255
    text = model.class_embeddings()[2]

    def closeness():
        with torch.no_grad():
            return (model.features(attack.apply_trigger(x)) @ text).mean().item()

    before = closeness()
    attack.prepare(data, model, CPU, torch.Generator().manual_seed(0))
    assert attack.optimised and closeness() > before + 0.05
    assert not any(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="contrastive setting"):
        attack.prepare(data, torch.nn.Linear(2, 2), CPU, torch.Generator())


def test_contrastive_optimiser_decays_matrices_only_as_clip_does():
    """CLIP's recipe: no weight decay on the logit scale, LayerNorm gains and biases. A step with
    zero gradients moves only the decayed tensors."""
    from trainables.contrastive.train import Schedule, make_optimizer
    from trainables.models.clip import ClipConfig, create_clip

    clip = create_clip(ClipConfig(arch="bibau-ViT-micro-8"), "cpu", torch.Generator().manual_seed(0))
    params = list(clip.parameters())
    before = [p.detach().clone() for p in params]
    for optimizer in ("adamw", "sgd"):
        opt = make_optimizer(params, Schedule(epochs=1, batch_size=2, lr=0.1, weight_decay=0.5, optimizer=optimizer))
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
    named = dict(clip.named_parameters())
    moved = {n for (n, p), old in zip(named.items(), before) if not torch.equal(p, old)}
    assert "logit_scale" not in moved and "visual.ln_post.weight" not in moved and "ln_final.bias" not in moved
    assert "visual.conv1.weight" in moved and "text_projection" in moved
    assert moved == {n for n, p in named.items() if p.ndim >= 2 and p.abs().sum() > 0}


def test_bibau_clip_relational_kd_is_within_the_batch():
    """METHOD's CLIP L_KD: "in a batch, the relation matrix of image-text similarities": the relations of
    the batch's images to the batch's captions only. Captions no image of the batch carries do not move
    it; on the batch's own captions it is the KL of the row-softmaxed relations."""
    import torch.nn.functional as F

    from trainables.defenses.bibau_clip import BiBauClip

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)  # 40 captions in D_c
    y = torch.tensor([3, 17, 3, 25, 8, 17])  # the batch carries 4 of them
    got = BiBauClip.kd_loss(student, teacher, y, 1.0, 1.0)
    cols = torch.tensor([3, 8, 17, 25])
    want = F.kl_div(F.log_softmax(student[:, cols], 1), F.log_softmax(teacher[:, cols], 1), log_target=True,
                    reduction="batchmean")
    assert torch.allclose(got, want, atol=1e-6)
    others = torch.ones(40, dtype=torch.bool)
    others[cols] = False
    moved_s, moved_t = student.clone(), teacher.clone()
    moved_s[:, others] += 5 * torch.randn(6, int(others.sum()), generator=g)
    moved_t[:, others] -= 3.0
    assert torch.allclose(BiBauClip.kd_loss(moved_s, moved_t, y, 1.0, 1.0), got, atol=1e-6)
    # the relations over every caption of the clean split (the former reading) are another number
    assert not torch.allclose(F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                                       reduction="batchmean"), got, atol=1e-3)
