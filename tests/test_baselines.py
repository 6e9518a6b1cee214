"""The baselines' shared parts and their validation: BN layers and their convolutions on every
registered model, the pruning rules (MAD outliers, entropy, channel Lipschitz), thresholds and
models without BatchNorm refused before any work, the declared data use enforced."""
from pathlib import Path

import pytest
import torch
from torch import nn

import trainables  # noqa: F401  (fill the registries)
from trainables.config import ConfigError, build
from trainables.data.base import ImageSet
from trainables.defenses import DefenseConfig, DefenseContext, build_defense
from trainables.defenses.bn import batchnorm_units, insert_masks, prune_channels, remove_masks
from trainables.defenses.clp import channel_lipschitz
from trainables.defenses.ep import channel_entropy
from trainables.defenses.nc import mad_outliers
from trainables.models import ModelConfig, create_model
from trainables.models.base import Classifier
from trainables.registry import DEFENSES, MODELS
from trainables.schema import RunConfig

CPU = torch.device("cpu")
BN_PRUNING = ("anp", "ep", "rnp", "clp")


def small(name):
    return create_model(ModelConfig(name=name, width=4), 3, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_name", MODELS.names())
def test_every_registered_model_has_its_batchnorm_layers_paired_with_a_convolution(model_name):
    if model_name not in ("small_resnet", "resnet18", "preact_resnet18", "vgg19_bn"):
        pytest.skip("not an image classifier of this test")
    model = small(model_name)
    units = batchnorm_units(model)
    all_bn = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert [u.name for u in units] == all_bn and units
    for u in units:
        assert u.conv is not None and u.conv.out_channels == u.bn.num_features, (u.name, u.conv_name)
    if model_name == "preact_resnet18":  # BackdoorBench's pairing: a block's bn1 gets the previous conv
        first = next(u for u in units if u.name.endswith("bn1"))
        assert first.conv_name == "conv1"


def test_masks_at_one_leave_the_output_and_pruning_zeroes_the_channel():
    model = small("small_resnet").eval()
    x = torch.rand(4, 3, 16, 16)
    before = model(x)
    masks = insert_masks(model)
    assert len(masks) == len(batchnorm_units(small("small_resnet")))
    assert torch.allclose(model(x), before, atol=1e-5)
    remove_masks(model)
    assert not any(type(m).__name__ == "MaskedBatchNorm" for m in model.modules())
    name = batchnorm_units(model)[0].name
    pick = torch.zeros(4, dtype=torch.bool)
    pick[1] = True
    prune_channels(model, {name: pick})
    bn = dict(model.named_modules())[name]
    assert bn.weight[1] == 0 and bn.bias[1] == 0 and bn.weight[0] != 0


def test_mad_outlier_test_flags_the_small_mask_only():
    norms = torch.tensor([100.0, 95, 105, 98, 102, 99, 101, 97, 103, 10])
    index, flagged = mad_outliers(norms, 2.0)
    assert flagged == [9] and index > 2
    index, flagged = mad_outliers(torch.tensor([100.0, 95, 105, 98, 102, 99, 101, 97, 103, 96]), 2.0)
    assert flagged == [] and index < 2


def test_entropy_is_low_for_a_channel_with_an_outlying_cluster():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(256, 1, generator=g)
    bimodal = torch.cat([torch.zeros(230, 1), torch.full((26, 1), 10.0)])  # a backdoor neuron: fires on 10%
    e = channel_entropy(torch.cat([normal, bimodal], 1), 0.1)
    assert e[1] < 0.5 * e[0]


def test_clp_bound_grows_with_the_kernel_and_prunes_the_outlier():
    model = small("small_resnet").eval()
    unit = batchnorm_units(model)[0]
    base = channel_lipschitz(unit)
    with torch.no_grad():
        unit.conv.weight[2] *= 50
    assert torch.isclose(channel_lipschitz(unit)[2], base[2] * 50, rtol=1e-4)
    result = build_defense(build(DefenseConfig, {"name": "clp", "u": 1.0}, "defense", registry=DEFENSES)).purify(
        model, ImageSet(torch.zeros(0, 3, 16, 16, dtype=torch.uint8), torch.zeros(0)),
        DefenseContext(device=CPU, num_classes=3, log=lambda line: None))
    pruned = dict(result.model.named_modules())[unit.name]
    assert pruned.weight[2] == 0 and result.findings[f"pruned.{unit.name}"] >= 1


@pytest.mark.parametrize("name,key", [("anp", "prune_threshold"), ("rnp", "prune_threshold"),
                                      ("rnp", "clean_threshold")])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_threshold_outside_the_unit_interval_fails_naming_the_field(name, key, value):
    with pytest.raises(ConfigError, match=rf"defense\.{key}: {value} is out of range; allowed: in \[0, 1\]"):
        build(RunConfig, {"defense": {"name": name, key: value}})


class Plain(Classifier):
    """A classifier without BatchNorm."""

    def __init__(self, num_classes=3, in_channels=3, **_):
        super().__init__((0.5,) * in_channels, (0.25,) * in_channels)
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.head = nn.Linear(4, num_classes)

    def embed(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


@pytest.fixture
def no_bn_model(monkeypatch):
    monkeypatch.setitem(MODELS._entries, "plain_cnn", lambda num_classes, in_channels=3, **kw: Plain(num_classes,
                                                                                                      in_channels))
    return "plain_cnn"


@pytest.mark.parametrize("name", BN_PRUNING)
def test_model_without_batchnorm_fails_in_the_run_config(name, no_bn_model):
    with pytest.raises(ConfigError, match=rf"model\.name: 'plain_cnn' has no BatchNorm layer, and defense '{name}'"):
        build(RunConfig, {"model": {"name": no_bn_model}, "defense": {"name": name}})
    build(RunConfig, {"model": {"name": no_bn_model}, "defense": {"name": "nc"}})  # NC does not prune BN


@pytest.mark.parametrize("name", BN_PRUNING)
def test_model_without_batchnorm_fails_before_any_work(name):
    lines = []
    ctx = DefenseContext(device=CPU, num_classes=3, log=lines.append,
                         poisoned_batch=ImageSet(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4)))
    clean = ImageSet(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 3)
    with pytest.raises(ValueError, match=rf"defense '{name}' prunes BatchNorm channels"):
        build_defense(build(DefenseConfig, {"name": name}, "defense", registry=DEFENSES)).purify(Plain(), clean, ctx)
    assert lines == []


def test_ep_without_a_poisoned_batch_fails_saying_so():
    defense = build_defense(build(DefenseConfig, {"name": "ep"}, "defense", registry=DEFENSES))
    clean = ImageSet(torch.zeros(8, 3, 8, 8, dtype=torch.uint8), torch.arange(8) % 3)
    with pytest.raises(ValueError, match="poisoned training set"):
        defense.purify(small("small_resnet"), clean, DefenseContext(device=CPU, num_classes=3))


def test_defaults_are_the_references():
    cfg = {n: build(DefenseConfig, {"name": n}, "defense", registry=DEFENSES) for n in
           ("nc", "btidbf_u", "anp", "ep", "rnp", "clp")}
    assert (cfg["nc"].init_cost, cfg["nc"].search_epochs, cfg["nc"].anomaly_threshold) == (1e-3, 80, 2.0)
    assert (cfg["anp"].eps, cfg["anp"].alpha, cfg["anp"].iterations, cfg["anp"].prune_threshold) == (0.4, 0.2, 2000, 0.2)
    assert (cfg["ep"].u, cfg["clp"].u) == (3.0, 3.0)
    assert (cfg["rnp"].clean_threshold, cfg["rnp"].prune_threshold) == (0.2, 0.7)
    assert (cfg["btidbf_u"].norm_bound, cfg["btidbf_u"].trigger_fraction, cfg["btidbf_u"].optimizer) == (0.3, 0.2, "adam")
    assert [c.data_use for c in cfg.values()] == ["clean_split"] * 3 + ["poisoned_batch", "clean_split", "none"]


@pytest.mark.parametrize("name", DEFENSES.names())
def test_smoke_test_shrinks_every_defense(name):
    from trainables.trial import smoke_config

    clip = {"clip": {"arch": "bibau-ViT-micro-8"}} if DEFENSES.get(name).contrastive else {}  # the CLIP setting's
    cfg = smoke_config(build(RunConfig, {"defense": {"name": name}, **clip}))
    assert cfg.defense.name == name and cfg.defense.data_use == DEFENSES.get(name).declared_data_use()
    for key in ("epochs", "search_epochs", "rounds", "pretrain_epochs", "invert_epochs", "unlearn_epochs",
                "recover_epochs"):
        if hasattr(cfg.defense, key):
            assert getattr(cfg.defense, key) == 1, key
    if name == "anp":
        assert cfg.defense.iterations <= 10


def test_a_trial_hands_ep_a_poisoned_batch_and_reports_its_findings(tmp_path):
    from orchestrator.config import load_run_config
    from trainables.trial import run_trial

    spec = Path(__file__).resolve().parents[1] / "search_spaces" / "run_digits_smoke.yaml"
    cfg = load_run_config(str(spec),
                          ["defense={name: ep, batch_size: 64}", f"cache_dir={tmp_path}", "device=cpu"])
    lines = []
    report = run_trial(cfg, log=lines.append, smoke_test=True)
    assert report["defense_data_use"] == "poisoned_batch" and report["defense_poisoned_batch_size"] == 64.0
    assert report["defense_pruned_channels"] >= 0 and "defense_pruned_fraction" in report
    assert any("ep (data: poisoned_batch)" in line for line in lines)


def test_pareto_plots_label_a_baseline_with_the_data_it_saw_beyond_the_clean_split():
    from orchestrator.tracking import baseline_label

    assert baseline_label("nc") == "NC (baseline)"
    assert baseline_label("ep") == "EP (baseline; data: poisoned_batch)"
    assert baseline_label("clp") == "CLP (baseline; data: none)"
