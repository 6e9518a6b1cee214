"""Contract test over every registered model (timm style), plus the model options."""
import io

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save
from torch import nn

import trainables  # noqa: F401  (fill the registries)
from trainables.config import ConfigError, build
from trainables.models import CIFAR10_MEAN, CIFAR10_STD, ModelConfig, create_model
from trainables.registry import MODELS

NAMES = MODELS.names()
CLASSES = 7
# models without block convolutions (a ViT's only convolution is its patch embedding)
TRANSFORMERS = {"clip_vit"}
CONV_NETS = [n for n in NAMES if n not in TRANSFORMERS]


def make(name, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return MODELS.get(name)(num_classes=CLASSES, generator=g, **kw)


def batch(seed=0, size=32, channels=3, n=2):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registered_models():
    assert {"small_resnet", "resnet18", "preact_resnet18", "vgg19_bn", "clip_vit"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_shapes_features_and_head(name):
    model = make(name).eval()
    assert isinstance(model.head, nn.Linear) and model.head.out_features == CLASSES
    for size in (32, 64):  # CIFAR/GTSRB and Tiny-ImageNet sizes
        x = batch(size=size)
        with torch.no_grad():
            out, h = model(x), model.features(x)
        assert out.shape == (2, CLASSES) and torch.isfinite(out).all()
        assert h.dim() == 2 and h.shape == (2, model.head.in_features)
        torch.testing.assert_close(out, model.head(h), rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_feature_map_pools_to_the_features(name):
    """BTI-DBF masks the map before the pool; the pool of that map must be what the head sees."""
    model = make(name).eval()
    x = batch(size=32)
    with torch.no_grad():
        fmap = model.feature_map(x)
        torch.testing.assert_close(model.pool(fmap), model.features(x), rtol=0, atol=0)
    assert fmap.dim() == 4 and fmap.shape[:2] == (2, model.head.in_features)
    if name in ("small_resnet", "resnet18", "preact_resnet18"):  # the ResNets keep a spatial map at 32 px
        assert fmap.shape[2] * fmap.shape[3] > 1


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = make(name).train()
    loss = nn.functional.cross_entropy(model(batch()), torch.tensor([1, 2]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} gets no gradient"
        assert torch.isfinite(p.grad).all(), pname
    assert model.conv_layers()[0][1].weight.grad.abs().sum() > 0
    assert model.head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_initial_weights(name):
    a, b, c = make(name, seed=3), make(name, seed=3), make(name, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # without a generator the global RNG decides, so torch.manual_seed fixes it too
    torch.manual_seed(11)
    d = MODELS.get(name)(num_classes=CLASSES)
    torch.manual_seed(11)
    e = MODELS.get(name)(num_classes=CLASSES)
    assert all(torch.equal(v, e.state_dict()[k]) for k, v in d.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_normalisation_lives_inside_the_model(name):
    default = make(name).eval()
    raw = make(name, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)).eval()
    raw.load_state_dict(default.state_dict())
    x = batch()
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out_default, out_raw = default(x), raw(x)
        out_pre = raw((x - mean) / std)
    assert not torch.allclose(out_default, out_raw, atol=1e-4), "mean/std have no effect"
    torch.testing.assert_close(out_default, out_pre, rtol=1e-4, atol=1e-4)
    # the statistics are configuration, not weights: they stay out of the state_dict
    assert "mean" not in default.state_dict() and "std" not in default.state_dict()


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_is_deterministic_and_state_dict_round_trips(name):
    model = make(name, seed=1)
    model.train()
    with torch.no_grad():
        model(batch(seed=5, n=4))  # move the BatchNorm running statistics off their initial values
    model.eval()
    x = batch(seed=6)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    blob = st_save({k: v.contiguous() for k, v in model.state_dict().items()})
    other = make(name, seed=2).eval()
    other.load_state_dict(st_load(blob))
    with torch.no_grad():
        assert torch.equal(other(x), first)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    again = make(name, seed=2).eval()
    again.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x), first)


@pytest.mark.parametrize("name", CONV_NETS)
def test_conv_layers_are_the_block_convolutions_in_forward_order(name):
    model = make(name).eval()
    convs = model.conv_layers()
    assert len(convs) >= 9 and all(isinstance(m, nn.Conv2d) for _, m in convs)
    assert all(m.kernel_size == (3, 3) for _, m in convs), "a 1x1 shortcut slipped in"
    order = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n)) for n, m in convs]
    with torch.no_grad():
        model(batch())
    for h in hooks:
        h.remove()
    assert order == [n for n, _ in convs]


def test_conv_layer_counts():
    assert len(make("small_resnet").conv_layers()) == 9  # stem + 4 blocks x 2
    assert len(make("resnet18").conv_layers()) == 17
    assert len(make("preact_resnet18").conv_layers()) == 17
    assert len(make("vgg19_bn").conv_layers()) == 16
    assert [n for n, _ in make("clip_vit").conv_layers()] == ["visual.conv1"]  # the patch embedding


def test_small_resnet_width_and_depth():
    model = create_model(build(ModelConfig, {"name": "small_resnet", "width": 8, "depth": 3}), num_classes=5)
    assert model.head.in_features == 32  # 8 -> 16 -> 32
    assert len(model.conv_layers()) == 1 + 2 * 3
    default = create_model(ModelConfig(), num_classes=5)
    assert default.head.in_features == 128 and len(default.layers) == 4


def test_grey_images_and_class_count():
    model = create_model(ModelConfig(name="small_resnet"), num_classes=3, in_channels=1).eval()
    assert model(batch(channels=1)).shape == (2, 3)
    with pytest.raises(ValueError, match="need 1 values"):
        create_model(ModelConfig(name="small_resnet"), num_classes=3, in_channels=1, mean=(0.5, 0.5, 0.5))


def test_model_options_a_model_does_not_take_are_refused():
    with pytest.raises(ConfigError, match=r"model\.depth: vgg19_bn does not take depth"):
        build(ModelConfig, {"name": "vgg19_bn", "depth": 3})
    with pytest.raises(ConfigError, match=r"model\.depth"):
        create_model(ModelConfig(name="vgg19_bn", depth=3), num_classes=10)
    with pytest.raises(ConfigError, match=r"width: 0 is out of range"):
        build(ModelConfig, {"name": "small_resnet", "width": 0})
    assert create_model(ModelConfig(name="vgg19_bn", width=8), num_classes=10).head.in_features == 64
