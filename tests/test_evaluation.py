"""The evaluation suite on tiny synthetic data: linear CKA, BEC's layer rule and TAC, RA, QRA,
and the ordering of evaluate()."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainables  # noqa: F401  (fills the registries)
from trainables.attacks.base import Attack, AttackConfig, to_float, to_uint8
from trainables.config import ConfigError, build
from trainables.data.base import Dataset, ImageSet
from trainables.evaluation import EvalContext, evaluate, run_order
from trainables.evaluation.bec import conv_layers, linear_cka, selected_activations, top_channels, trigger_activated_change
from trainables.evaluation.metrics import attack_success_rate
from trainables.predict import predict
from trainables.evaluation.reactivation import PerturbationGenerator, train_generator
from trainables.data.batches import augment
from trainables.evaluation.retuning import default_poison_count, retuning_set
from trainables.models.base import Classifier, ModelConfig, Probe, create_model
from trainables.registry import MODELS, UnknownNameError
from trainables.retune import retune
from trainables.schema import EvalConfig, RunConfig
from trainables.tasks import ClassifierTask

CPU = torch.device("cpu")
SHAPE = (3, 8, 8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: on a loaded 2-core machine, intra-op threads only contend."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- small fakes -------------------------------------------------------------------------------
class Patch(Attack):
    """A 2x2 white/black checker in the bottom-right corner (not registered: a test fake)."""

    def apply_trigger(self, x: torch.Tensor, train: bool = False) -> torch.Tensor:
        x = x.clone()
        x[..., -2:, -2:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        return x


class TinyNet(Classifier):
    """conv1 -> residual block (conv2 + 1x1 shortcut, added in place) -> conv3; conv3 is declared
    before conv2 so declaration order differs from execution order."""

    def __init__(self, num_classes: int = 4, width: int = 8):
        super().__init__(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.shortcut = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(2 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        out = self.conv2(h)
        out += self.shortcut(h)
        return F.relu(self.conv3(F.relu(out))).mean((2, 3))


def synthetic(n: int, seed: int) -> ImageSet:
    """4 classes; class k brightens quadrant k. Uint8 (n, 3, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, *SHAPE, generator=g) * 0.4
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 0.5
    return ImageSet(to_uint8(x), y)


def tiny_net(seed: int) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


@pytest.fixture(scope="module")
def world():
    train, test = synthetic(400, 0), synthetic(200, 1)
    data = Dataset("synthetic", train, test, ["a", "b", "c", "d"], hflip=False)
    attack = Patch(AttackConfig(name="badnets", target=0), SHAPE, 4)
    clean = retune(tiny_net(0), train, torch.zeros(len(train), dtype=torch.bool), CPU, epochs=5, lr=0.05,
                   batch_size=32, generator=torch.Generator().manual_seed(0), crop_padding=0, hflip=False)
    return data, attack, clean


def context(world, model, backdoored, clean_reference, **cfg) -> EvalContext:
    data, attack, _ = world
    defaults = dict(ra_size=64, ra_epochs=1, qra_epochs=1, qra_clean_size=32, qra_poison_size=32, qra_hidden=16,
                    bec_layers=2, bec_samples=32)
    return EvalContext(model=model, backdoored=backdoored, clean_reference=clean_reference, attack=attack,
                       dataset=data, attacker_train=data.train, poisoned_test=attack.poison_testset(data.test),
                       cfg=build(EvalConfig, {**defaults, **cfg}, "evaluation"), task=ClassifierTask(build(RunConfig, {})),
                       device=CPU, log=lambda s: None)


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- linear CKA ---------------------------------------------------------------------------------
def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook form, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with H K H, for comparison."""
    x, y = x.double(), y.double()
    n = len(x)
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return ((k * l_).sum() / ((k * k).sum() * (l_ * l_).sum()).sqrt()).item()


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)  # float64: exact invariances
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    y = torch.randn(200, 12, generator=g, dtype=torch.float64) + x[:, :12]
    assert linear_cka(x @ q, y) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert linear_cka(x * 7.5, y * 0.01) == pytest.approx(linear_cka(x, y), abs=1e-10)
    assert linear_cka(x + 3.0, y) == pytest.approx(linear_cka(x, y), abs=1e-10)  # centring
    assert 0.2 < linear_cka(x, y) < 0.9
    # not invariant to anisotropic scaling: the value really depends on the representation
    assert linear_cka(x, x * torch.logspace(0, 3, 30, dtype=torch.float64)) < 0.9
    big = torch.randn(4000, 5, generator=g), torch.randn(4000, 5, generator=g)
    assert linear_cka(*big) < 0.01


def test_linear_cka_both_forms_match_hsic():
    g = torch.Generator().manual_seed(1)
    narrow = torch.randn(50, 4, generator=g), torch.randn(50, 6, generator=g)
    wide = torch.randn(20, 300, generator=g), torch.randn(20, 200, generator=g)
    wide = wide[0], wide[1] + 0.5 * wide[0][:, :200]
    for a, b in (narrow, wide):
        assert linear_cka(a, b) == pytest.approx(hsic_cka(a, b), abs=1e-10)
    assert math.isnan(linear_cka(torch.ones(10, 3), torch.randn(10, 3, generator=g)))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(torch.randn(10, 3), torch.randn(11, 3))


# -- BEC's layer rule, TAC and the coefficient ---------------------------------------------------
def test_layer_rule_follows_execution_and_skips_1x1():
    model = TinyNet()
    assert conv_layers(model, SHAPE, 10) == ["conv1", "conv2", "conv3"]
    assert conv_layers(model, SHAPE, 2) == ["conv2", "conv3"]
    assert model.training  # the probe pass left the mode alone


@pytest.mark.parametrize("name", MODELS.names() or ["(none registered yet)"])
def test_layer_rule_on_every_registered_model(name):
    if name not in MODELS:
        pytest.skip("no model registered yet")
    model = create_model(ModelConfig(name=name), num_classes=10)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    wide = [n for n, m in convs.items() if math.prod(m.kernel_size) > 1]
    probes = [n for n, m in model.named_modules() if isinstance(m, Probe)]
    if probes:  # a model that declares probes (a ViT's residual stream) is probed there only
        convs, wide = {n: model.get_submodule(n) for n in probes}, probes
    picked = conv_layers(model, (3, 32, 32), 10)
    assert len(picked) == min(10, len(wide)) and len(set(picked)) == len(picked)
    assert all(n in convs and (n in probes or math.prod(convs[n].kernel_size) > 1) for n in picked)
    # the picked ones are the deepest: the last one run is the last wide conv run
    order = conv_layers(model, (3, 32, 32), 10_000)
    assert picked == order[-len(picked):] and sorted(order) == sorted(wide)


def test_recorded_activation_is_the_conv_output_not_the_in_place_sum():
    model = tiny_net(3).eval()
    x = to_uint8(torch.rand(5, *SHAPE))
    every = [torch.arange(8)]
    got = selected_activations(model, x, ["conv2"], every, CPU)[0]
    with torch.no_grad():
        h = F.relu(model.bn1(model.conv1(model.normalize(to_float(x)))))
        expected = model.conv2(h).flatten(1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_tac_ranks_the_channel_the_trigger_moves_first():
    conv = nn.Conv2d(3, 2, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0] = 1 / 9  # red mean: the trigger changes it
        conv.weight[1, 1] = 1 / 9  # green mean: the trigger below leaves it alone
    model = nn.Sequential(conv)
    clean = to_uint8(torch.rand(16, *SHAPE) * 0.5)
    trig = clean.clone()
    trig[:, 0, -3:, -3:] = 255
    tac = trigger_activated_change(model, clean, trig, ["0"], CPU, batch_size=5)["0"]
    assert tac[0] > 0.1 and tac[1] == 0
    assert top_channels(tac, 0.5).tolist() == [0]
    assert top_channels(torch.tensor([0.1, 3.0, 2.0, 0.0]), 0.01).tolist() == [1]  # at least one
    assert top_channels(torch.tensor([0.1, 3.0, 2.0, 0.0]), 0.5).tolist() == [1, 2]


def test_bec_reads_the_trigger_channels_of_the_last_layer_and_normalises_by_the_clean_model(world):
    """BEC looks only at the top-TAC channels of the chosen layers: changing the other channels of
    the last layer leaves it at 1, changing the chosen ones lowers it; its value is (S_D - S_C) /
    (1 - S_C) of the textbook CKA, through the logistic with k = 10, c = 0.5."""
    import copy

    backdoored, clean = tiny_net(1).eval(), world[2]
    ctx = context(world, backdoored, backdoored, lambda: clean, bec_layers=1, bec_top_fraction=0.25)
    evaluate(ctx, ["bec"])
    state = ctx.cache["bec_backdoored"]
    assert state["layers"] == ["conv3"]  # the last wide conv run, not the last declared
    chosen = state["channels"][0]
    assert len(chosen) == 4  # 25% of conv3's 16 channels
    others = torch.tensor([c for c in range(16) if c not in set(chosen.tolist())])
    shared = {k: ctx.cache[k] for k in ("bec_backdoored", "bec_clean_similarity")}

    def bec_of(model):
        c = context(world, model, backdoored, lambda: clean, bec_layers=1, bec_top_fraction=0.25)
        c.cache.update(shared)
        return evaluate(c, ["bec"])

    def rewired(channels):
        twin = copy.deepcopy(backdoored)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            twin.conv3.weight[channels] = torch.randn(twin.conv3.weight[channels].shape, generator=g)
        return twin

    assert bec_of(rewired(others))["bec_raw"] == pytest.approx(1.0, abs=1e-6)  # not among the chosen: unseen
    hit = bec_of(rewired(chosen))
    assert hit["bec_similarity"] < 0.98 and hit["bec_raw"] < 0.98  # moved off 1 (the others: exactly 1)
    # the value, recomputed here with the textbook HSIC form of CKA
    images, (bd_feats,) = state["images"], state["features"]
    s_d = hsic_cka(bd_feats, selected_activations(rewired(chosen), images, ["conv3"], [chosen], CPU)[0])
    s_c = hsic_cka(bd_feats, selected_activations(clean, images, ["conv3"], [chosen], CPU)[0])
    assert hit["bec_similarity"] == pytest.approx(s_d, abs=1e-5)
    assert hit["bec_clean_similarity"] == pytest.approx(s_c, abs=1e-5)
    raw = (s_d - s_c) / (1 - s_c)
    assert hit["bec_raw"] == pytest.approx(raw, abs=1e-4)
    assert hit["bec"] == pytest.approx(1 / (1 + math.exp(-10 * (raw - 0.5))), abs=1e-4)


def test_bec_rejects_another_architecture(world):
    other = TinyNet(width=4)
    with pytest.raises(ValueError, match="one architecture"):
        evaluate(context(world, other, tiny_net(1), lambda: world[2]), ["bec"])


# -- RA ---------------------------------------------------------------------------------------------
def test_default_poison_counts():
    assert default_poison_count("badnets") == 5 and default_poison_count("wanet") == 5
    assert default_poison_count("blended") == 1
    for name in ("refool", "sig", "narcissus", "adaptive_blend", "adaptive_patch"):
        assert default_poison_count(name) == 2 and default_poison_count(name, "gtsrb") == 5


def test_retuning_set_mixes_the_asked_poison_in(world):
    data, attack, _ = world
    s, mask = retuning_set(data.train, attack, 50, 5, torch.Generator().manual_seed(0))
    assert len(s) == 50 and mask.sum() == 5 and mask[-5:].all()
    assert (s.y[mask] == attack.target).all()
    assert torch.equal(s.x[mask], to_uint8(attack.apply_trigger(to_float(s.x[mask]))))
    benign = s.x[~mask]
    assert not torch.equal(benign[:, :, -2:, -2:], to_uint8(attack.apply_trigger(to_float(benign)))[:, :, -2:, -2:])
    again, _ = retuning_set(data.train, attack, 50, 5, torch.Generator().manual_seed(0))
    assert torch.equal(again.x, s.x)
    with pytest.raises(ValueError, match="evaluation.ra_size"):
        retuning_set(data.train, attack, 401, 5, torch.Generator())


def test_augment_leaves_masked_rows_alone():
    x = torch.rand(6, *SHAPE)
    where = torch.tensor([True, False, True, False, True, False])
    out = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True, where=where)
    assert out.shape == x.shape and torch.equal(out[~where], x[~where])
    assert not torch.equal(out[where], x[where])
    again = augment(x, torch.Generator().manual_seed(0), crop_padding=2, hflip=True, where=where)
    assert torch.equal(out, again)


def test_retune_leaves_its_input_alone_and_really_learns_the_trigger(world):
    data, attack, clean = world
    before = params(clean)
    poisoned_test = attack.poison_testset(data.test)
    asr_before = attack_success_rate(clean, poisoned_test, CPU)
    s, mask = retuning_set(data.train, attack, 200, 50, torch.Generator().manual_seed(0))
    tuned = retune(clean, s, mask, CPU, epochs=10, lr=0.05, batch_size=32,
                   generator=torch.Generator().manual_seed(0), crop_padding=1, hflip=False)
    after = params(clean)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before[k], v) for k, v in params(tuned).items())
    assert not tuned.training
    asr_after = attack_success_rate(tuned, poisoned_test, CPU)
    assert asr_before < 0.5 and asr_after > asr_before + 0.3, (asr_before, asr_after)


# -- QRA ---------------------------------------------------------------------------------------------
def test_generator_shapes_and_budget():
    gen = PerturbationGenerator((3, 5, 7), hidden=24, budget=16 / 255)
    linears = [m for m in gen.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(105, 24), (24, 24), (24, 24), (24, 105)]
    with torch.no_grad():
        for m in linears:
            m.weight.mul_(50)  # saturate tanh
        x = torch.rand(8, 3, 5, 7)
        t = gen.perturbation(x)
        out = gen(x)
    assert t.shape == x.shape and t.abs().max() <= 16 / 255 + 1e-7 and t.abs().max() > 15 / 255
    assert (out - x).abs().max() <= 16 / 255 + 1e-6 and out.min() >= 0 and out.max() <= 1


class MeanBrightness(nn.Module):
    """Class 1 when the mean pixel exceeds ``threshold`` (steep): brightening by the budget flips it."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold
        self.scale = nn.Parameter(torch.tensor(200.0))

    def forward(self, x):
        z = self.scale * (x.mean((1, 2, 3)) - self.threshold)
        return torch.stack([torch.zeros_like(z), z], 1)


class Constant(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


def test_generator_learns_to_reactivate_and_leaves_the_models_as_they_were():
    g = torch.Generator().manual_seed(0)
    x = to_uint8(0.3 + 0.2 * torch.rand(256, *SHAPE, generator=g))  # mean about 0.4
    data = ImageSet(x, torch.zeros(256, dtype=torch.long))
    purified = MeanBrightness(0.43)  # +16/255 (0.063) crosses the threshold
    teacher, clean = Constant([0.0, 8.0]), Constant([0.0, 0.0])
    purified.train()
    ones = torch.ones(256, dtype=torch.long)
    assert (predict(purified, data, CPU) == ones).float().mean() < 0.05
    gen = train_generator(purified, teacher, clean, data, CPU, epochs=8, lr=0.1, batch_size=64,
                          budget=16 / 255, hidden=32, kl_weight=0.2, seed=0)
    assert (predict(purified, data, CPU, perturb=gen) == ones).float().mean() > 0.9
    assert purified.training and purified.scale.requires_grad and purified.scale.grad is None
    assert purified.scale.item() == 200.0


# -- evaluate() ---------------------------------------------------------------------------------------
def test_run_order_and_unknown_names():
    assert run_order(["qra", "ca"]) == ["ra", "qra", "ca"]
    assert run_order(["ca", "ra", "qra", "bec"]) == ["ca", "ra", "qra", "bec"]
    with pytest.raises(UnknownNameError, match="known: .*asr.*bec.*ca.*qra.*ra"):
        run_order(["ca", "nope"])
    with pytest.raises(ConfigError, match=r"evaluation.metrics\[1\]: unknown evaluation 'nope'"):
        build(EvalConfig, {"metrics": ["ca", "nope"]}, "evaluation")


def test_evaluate_runs_requirements_first_once_and_reproducibly(world):
    _, _, clean = world
    purified = tiny_net(2).eval()
    built = []

    def clean_reference():
        built.append(1)
        return clean

    lines: list[str] = []
    ctx = context(world, purified, purified, clean_reference)
    ctx.log = lines.append
    before = params(purified)
    out = evaluate(ctx, ["qra", "ca"])
    done = [line for line in lines if line.startswith("[eval]") and not line.endswith(": running")
            and "retuning the clean reference" not in line]  # RA's note before it trains the clean model
    assert [line.split(":")[0] for line in done] == ["[eval] ra", "[eval] qra", "[eval] ca"]
    assert any("retuning the clean reference" in line for line in lines)
    started = [line for line in lines if line.endswith(": running")]  # each announced before it runs
    assert started == ["[eval] ra: running", "[eval] qra: running", "[eval] ca: running"]
    assert len(built) == 1  # RA on the clean model and QRA's reference share one build
    expected = {"r_asr", "ra_ca", "ra_clean_asr", "ra_clean_ca", "q_asr", "q_asr_clean_model",
                "qra_clean_target_rate", "ca"}
    assert expected <= set(out)
    assert all(0.0 <= out[k] <= 1.0 for k in expected)
    assert all(torch.equal(before[k], v) for k, v in params(purified).items())
    again = evaluate(context(world, purified, purified, lambda: clean), ["qra", "ca"])
    assert {k: again[k] for k in expected} == {k: out[k] for k in expected}
    no_clean = evaluate(context(world, purified, purified, clean_reference, ra_on_clean=False), ["ra", "asr"])
    assert "ra_clean_asr" not in no_clean and len(built) == 1  # nothing needed the clean model
