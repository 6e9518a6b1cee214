"""BI-BAU's terms checked one by one (METHOD.md) on tiny synthetic models and random tensors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainables  # noqa: F401  (fill the registries)
from trainables.config import ConfigError, build
from trainables.defenses import DefenseConfig, build_defense
from trainables.defenses.bibau import PRESETS, BiBauConfig
from trainables.defenses import fisher as fisher_module
from trainables.defenses import grad_squares
from trainables.defenses.fisher import diagonal_fisher, normalize_fisher
from trainables.defenses.losses import (backdoor_direction, cosine, ewc_penalty, inverse_ewc, kd_loss,
                                        prior_terms, trigger_loss)
from trainables.defenses.pgd import EStep
from trainables.models import ModelConfig, create_model
from trainables.models.base import Classifier
from trainables.registry import DEFENSES, MODELS

CPU = torch.device("cpu")


class Tiny(Classifier):
    """conv-BN-ReLU-pool features and a linear head: enough to have BatchNorm and a W."""

    def __init__(self, num_classes=4, seed=0):
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def embed(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1).flatten(1)


def images(n=8, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def labels(n=8, k=4, seed=0):
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


# -- E-step terms ----------------------------------------------------------------------------
def test_kd_equals_weighted_ce_when_student_is_teacher():
    model = Tiny().eval()
    x, y = images(), labels()
    with torch.no_grad():
        z = model(x)
    for gamma in (0.0, 0.5, 0.9):
        got = kd_loss(z, model(x).detach(), y, temperature=2.0, gamma=gamma)
        assert torch.allclose(got, (1 - gamma) * F.cross_entropy(z, y), atol=1e-6)
    # and the KL part is positive as soon as they differ
    other = z + torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    assert kd_loss(other, z, y, 2.0, 0.5) > 0.5 * F.cross_entropy(other, y) + 1e-4


def test_kd_soft_term_scales_with_t_squared():
    z_s, z_t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    for T in (1.0, 2.0, 4.0):
        kl = F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="batchmean")
        assert torch.allclose(kd_loss(z_s, z_t, y, T, gamma=1.0), T * T * kl, atol=1e-6)


def test_trigger_loss_targeted_and_untargeted():
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    assert torch.allclose(trigger_loss(z, y, None), -F.cross_entropy(z, y))
    assert torch.allclose(trigger_loss(z, y, 2), F.cross_entropy(z, torch.full_like(y, 2)))


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 1.0])
def test_angle_term_is_zero_when_cosine_equals_theta(theta):
    d = 6
    h = torch.zeros(3, d)
    h[:, 0] = torch.tensor([1.0, 2.0, 0.5])
    dh = torch.zeros(3, d)
    dh[:, 0] = theta
    dh[:, 1] = math.sqrt(1 - theta ** 2)
    assert torch.allclose(cosine(dh, h), torch.full((3,), theta), atol=1e-6)
    angle, _ = prior_terms(h + dh, h, torch.zeros(3, d), theta)
    assert angle.item() < 1e-10
    off, _ = prior_terms(h + dh, h, torch.zeros(3, d), (theta + 0.5) % 1.0)
    assert off.item() > 0.05


def test_alignment_is_skipped_when_heads_agree_and_rewards_alignment_otherwise():
    w = torch.randn(4, 6)
    k = torch.tensor([0, 3, 1])
    u = backdoor_direction(w, w.clone(), k)
    assert u.abs().max() == 0
    h = torch.randn(3, 6)
    h_adv = (h + torch.randn(3, 6)).requires_grad_(True)
    angle, align = prior_terms(h_adv, h, u, 0.5)
    assert align.item() == 0.0 and not align.requires_grad  # a constant: no pull on δ
    assert angle.requires_grad
    w_theta = w + torch.randn(4, 6)
    u = backdoor_direction(w, w_theta, k)
    assert torch.allclose(u, (w - w_theta)[k])
    _, aligned = prior_terms(h + 2.0 * u, h, u, 0.5)  # Δh along u: cos = 1
    assert torch.allclose(aligned, torch.tensor(-1.0), atol=1e-6)


# -- M-step terms -----------------------------------------------------------------------------
def _params(model):
    return dict(model.named_parameters())


def test_ewc_is_zero_at_anchor_and_grows_away():
    model = Tiny()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.rand_like(p) for n, p in anchor.items()}
    assert ewc_penalty(_params(model), anchor, fisher).item() == 0.0
    values = []
    for scale in (0.01, 0.1, 1.0):
        moved = {n: p + scale for n, p in anchor.items()}
        values.append(ewc_penalty(moved, anchor, fisher).item())
    assert 0 < values[0] < values[1] < values[2]
    # exactly Σ F Δ²
    expected = sum((f * 0.01).sum() for f in fisher.values()).item()  # Δ = 0.1
    assert values[1] == pytest.approx(expected, rel=1e-4)


def test_inverse_ewc_is_clip_at_bd_bounded_and_decreasing():
    model = Tiny()
    theta_bd = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = normalize_fisher({n: torch.rand_like(p) for n, p in theta_bd.items()})
    C = 10.0
    params = _params(model)
    at_bd = inverse_ewc(params, theta_bd, fisher, C)
    assert at_bd.item() == pytest.approx(C)
    at_bd.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in model.parameters())
    direction = {n: torch.randn_like(p) for n, p in theta_bd.items()}
    values = [inverse_ewc({n: theta_bd[n] + t * direction[n] for n in theta_bd}, theta_bd, fisher, C).item()
              for t in (1e-4, 1e-2, 0.1, 1.0, 10.0)]
    assert all(v <= C for v in values)
    assert values[0] == pytest.approx(C)  # still clipped close to θ_bd
    assert all(a >= b for a, b in zip(values, values[1:])) and values[-1] < values[2] < C


def test_inverse_ewc_gradient_pushes_away_from_bd():
    model = Tiny()
    theta_bd = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.ones_like(p) for n, p in theta_bd.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    loss = inverse_ewc(_params(model), theta_bd, fisher, 10.0)
    assert loss.item() < 10.0
    loss.backward()
    # -grad (the descent direction) points away from θ_bd: same sign as θ - θ_bd
    for n, p in model.named_parameters():
        assert (-p.grad * (p.detach() - theta_bd[n]) >= 0).all()


# -- Fisher ---------------------------------------------------------------------------------------
def test_batch_fisher_is_mean_of_squared_batch_gradients_and_leaves_model_alone():
    model = Tiny()
    model.train()
    x, y = images(12), labels(12)
    state = copy.deepcopy(model.state_dict())
    raw = diagonal_fisher(model, x, y, CPU, batch_size=4, normalize="none")
    assert model.training  # mode restored
    for k, v in model.state_dict().items():  # BN running statistics not updated, weights untouched
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())
    ref = copy.deepcopy(model).eval()
    expected = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for i in range(0, 12, 4):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 4]), y[i:i + 4]).backward()
        for n, p in ref.named_parameters():
            expected[n] += p.grad ** 2 / 3
    for n in expected:
        assert torch.allclose(raw[n], expected[n], rtol=1e-4, atol=1e-10), n


def test_sample_fisher_matches_a_per_sample_loop_and_max_normalises():
    model = Tiny().eval()
    x, y = images(6), labels(6)
    got = diagonal_fisher(model, x, y, CPU, batch_size=4, estimator="sample", normalize="none")
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(6):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / 6
    for n in expected:
        assert torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-10), n
    norm = normalize_fisher(got, "max")
    top = max(f.max().item() for f in norm.values())
    assert top == pytest.approx(1.0) and min(f.min().item() for f in norm.values()) >= 0
    mean = normalize_fisher(got, "mean")
    assert torch.cat([f.flatten() for f in mean.values()]).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_fisher_without_labels_uses_the_models_predictions():
    model = Tiny().eval()
    x = images(8)
    with torch.no_grad():
        pred = model(x).argmax(1)
    assert all(torch.equal(a, b) for a, b in zip(
        diagonal_fisher(model, x, None, CPU, batch_size=8).values(),
        diagonal_fisher(model, x, pred, CPU, batch_size=8).values()))
    # uint8 images are read as [0, 1]
    x8 = (x * 255).round().to(torch.uint8)
    f8 = diagonal_fisher(model, x8, pred, CPU, batch_size=8, normalize="none")
    ff = diagonal_fisher(model, x8.float() / 255, pred, CPU, batch_size=8, normalize="none")
    assert all(torch.allclose(f8[n], ff[n]) for n in f8)


# -- the per-sample Fisher from layer hooks (grad_squares.py) against torch.func's vmap --------------
# every registered classifier at a size that builds and runs in well under a second on a CPU core
TINY_MODELS = {
    "small_resnet": ({"width": 4}, 16),
    "resnet18": ({"width": 4, "depth": 1}, 16),
    "preact_resnet18": ({"width": 4, "depth": 1}, 16),
    "vgg19_bn": ({"width": 4}, 32),  # five max-pools
    "clip_vit": ({"arch": "bibau-ViT-micro-8"}, 32),
}
# parameters outside any Linear, Conv2d or BatchNorm (a ViT's class and position embeddings): vmap
HOOKLESS = {"clip_vit"}


def _vmap_only(monkeypatch):
    monkeypatch.setattr(fisher_module.GradSquares, "of", classmethod(lambda cls, model: None))


def _count_vmap(monkeypatch) -> list:
    calls, real = [], fisher_module._per_sample_grads
    monkeypatch.setattr(fisher_module, "_per_sample_grads", lambda *a: calls.append(1) or real(*a))
    return calls


@torch.no_grad()
def _stir_batchnorm(model, seed=1):
    """Running statistics and affine parameters away from 0 and 1, so x̂, γ and β all matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def _assert_same_fisher(got, ref):
    assert got.keys() == ref.keys()
    top = max(f.max().item() for f in ref.values())
    assert top > 0
    for n in ref:
        assert got[n].dtype == torch.float32
        assert torch.allclose(got[n], ref[n], rtol=1e-4, atol=1e-6 * top), n


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "predicted"])
@pytest.mark.parametrize("name", MODELS.names())
def test_sample_fisher_from_hooks_equals_vmap_on_every_registered_classifier(name, labelled, monkeypatch):
    if name not in TINY_MODELS:
        pytest.fail(f"model {name!r} is registered: give it a tiny size in TINY_MODELS (and HOOKLESS if its "
                    "parameters are not all in Linear, Conv2d or BatchNorm layers)")
    options, size = TINY_MODELS[name]
    model = create_model(ModelConfig(name=name, **options), 10, generator=torch.Generator().manual_seed(0))
    _stir_batchnorm(model)
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = images(10, size)
    y = labels(10, 10) if labelled else None
    vmap_calls = _count_vmap(monkeypatch)
    got = diagonal_fisher(model, x, y, CPU, batch_size=4, estimator="sample", normalize="none")  # chunks 4, 4, 2
    assert len(vmap_calls) == (3 if name in HOOKLESS else 0)  # the hooks ran every chunk, or never
    assert model.training and all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if name in HOOKLESS:
        return
    _vmap_only(monkeypatch)
    _assert_same_fisher(got, diagonal_fisher(model, x, y, CPU, batch_size=4, estimator="sample", normalize="none"))


class Tokens(Classifier):
    """The hooks' other layer shapes: a strided, dilated convolution with a bias, a Linear on
    (N, T, d) tokens (a sample's rows add up) and a BatchNorm1d on (N, C)."""

    def __init__(self):
        super().__init__((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2)
        self.proj = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 4)

    def embed(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.bn(F.relu(self.proj(tokens)).mean(1))


@pytest.mark.parametrize("block", [None, 50], ids=["whole", "sub-chunked"])
@pytest.mark.parametrize("make,size", [(Tiny, 8), (Tokens, 8), (Tokens, 20)], ids=["tiny", "tokens", "tokens-large"])
def test_sample_fisher_from_hooks_covers_each_layer_shape(make, size, block, monkeypatch):
    model = make()
    _stir_batchnorm(model)
    x, y = images(7, size), labels(7)
    if block:  # per-sample gradients in blocks of a few samples: the memory bound's path
        monkeypatch.setattr(grad_squares, "BLOCK", block)
    vmap_calls = _count_vmap(monkeypatch)
    got = diagonal_fisher(model, x, y, CPU, batch_size=3, estimator="sample", normalize="none")
    assert not vmap_calls
    _vmap_only(monkeypatch)
    _assert_same_fisher(got, diagonal_fisher(model, x, y, CPU, batch_size=3, estimator="sample", normalize="none"))


class SharedConv(Tiny):
    """One convolution applied twice per forward: weight sharing."""

    def __init__(self):
        super().__init__()
        self.mid = nn.Conv2d(8, 8, 3, padding=1)

    def embed(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return F.adaptive_avg_pool2d(F.relu(self.mid(F.relu(self.mid(h)))), 1).flatten(1)


class HeadOutside(Tiny):
    """The head's weight also used outside the head's own forward."""

    def embed(self, x):
        h = super().embed(x)
        return h + 0.5 * (h @ self.head.weight.t()) @ self.head.weight


class GroupNormed(Tiny):
    """A layer type the hooks do not know."""

    def __init__(self):
        super().__init__()
        self.bn = nn.GroupNorm(2, 8)


@pytest.mark.parametrize("make,static", [(SharedConv, True), (HeadOutside, True), (GroupNormed, False)],
                         ids=["runs-twice", "used-outside", "unknown-layer"])
def test_sample_fisher_falls_back_to_vmap_where_hooks_cannot_be_exact(make, static, monkeypatch):
    model = make().eval()
    x, y = images(6), labels(6)
    assert (grad_squares.GradSquares.of(model) is not None) == static  # else caught at run time
    vmap_calls = _count_vmap(monkeypatch)
    got = diagonal_fisher(model, x, y, CPU, batch_size=4, estimator="sample", normalize="none")
    assert len(vmap_calls) == 2
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(6):  # METHOD's definition, one sample at a time
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad ** 2 / 6
    _assert_same_fisher(got, expected)


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "predicted"])
def test_hooked_squares_are_the_same_in_channels_last(labelled):
    """CUDA runs models and batches channels_last (trainables.runtime). Without verify: PyTorch's
    CPU channels_last weight gradient (the verify step's autograd reference) corrupted the heap in
    torch 2.14 here, as in any CPU channels_last training step."""
    model = create_model(ModelConfig(name="small_resnet", width=4), 10, generator=torch.Generator().manual_seed(0))
    _stir_batchnorm(model)
    model.eval()
    x, y = images(6, 16), (labels(6, 10) if labelled else None)

    def squares(m, xb):
        params = {n: p.detach() for n, p in m.named_parameters()}
        buffers = {n: b.detach() for n, b in m.named_buffers()}
        return grad_squares.GradSquares.of(m).chunk(params, buffers, xb, y, CPU)

    plain = squares(model, x)
    model = model.to(memory_format=torch.channels_last)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same_fisher(squares(model, x.contiguous(memory_format=torch.channels_last)), plain)


def test_hooks_refuse_a_layer_registered_twice():
    model = Tiny()
    model.again = model.conv  # (functional_call, on both paths, would leave it with plain tensors)
    assert grad_squares.GradSquares.of(model) is None
    assert grad_squares.GradSquares.of(Tiny()) is not None


# -- PGD ------------------------------------------------------------------------------------------
def _pair(seed=0):
    f_bd = Tiny(seed=seed).eval()
    f_theta = copy.deepcopy(f_bd)
    with torch.no_grad():  # W_θ != W_bd so the alignment term is live
        f_theta.head.weight.add_(0.3 * torch.randn(f_theta.head.weight.shape,
                                                   generator=torch.Generator().manual_seed(5)))
    return f_bd, f_theta


@pytest.mark.parametrize("target", [None, 1])
def test_pgd_respects_budget_and_pixel_range(target):
    f_bd, f_theta = _pair()
    x = images(16)
    x[:4] = 0.0  # corners of the pixel box
    x[4:8] = 1.0
    y = labels(16)
    eps = 25 / 255
    estep = EStep(eps=eps, step=2 / 255, steps=20, target=target)
    x_adv, stats = estep.craft(f_bd, f_theta, x, y, CPU, torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert 0 < stats["delta_linf"] <= eps + 1e-6
    for key in ("l_in", "l_trig", "l_kd", "l_angle", "l_align"):
        assert math.isfinite(stats[key]), key
    # the same generator seed gives the same examples
    again, _ = estep.craft(f_bd, f_theta, x, y, CPU, torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)


def test_pgd_leaves_models_unchanged():
    f_bd, f_theta = _pair()
    f_theta.train()
    before = [copy.deepcopy(m.state_dict()) for m in (f_bd, f_theta)]
    EStep(eps=0.1, step=0.02, steps=3).craft(f_bd, f_theta, images(), labels(), CPU, torch.Generator().manual_seed(0))
    assert f_theta.training and not f_bd.training
    assert all(p.requires_grad for p in f_theta.parameters())
    assert all(p.grad is None for m in (f_bd, f_theta) for p in m.parameters())
    for m, state in zip((f_bd, f_theta), before):
        for k, v in m.state_dict().items():  # eval mode: BN running statistics untouched
            assert torch.equal(v, state[k]), k


def test_targeted_trigger_loss_decreases_over_pgd_steps():
    f_bd, f_theta = _pair(seed=3)
    x, y = images(16, size=8, seed=2), labels(16, seed=2)
    estep = EStep(eps=0.3, step=0.02, steps=30, random_start=False, target=2, alpha=0.0, beta=0.0)
    x_adv, stats = estep.craft(f_bd, f_theta, x, y, CPU, trace=True)
    trace = stats["l_trig_trace"]
    assert len(trace) == 30 and trace[-1] < trace[0] - 0.1
    with torch.no_grad():
        ce_before = F.cross_entropy(f_bd(x), torch.full_like(y, 2))
        ce_after = F.cross_entropy(f_bd(x_adv), torch.full_like(y, 2))
    assert ce_after < ce_before - 0.1


def test_untargeted_trigger_loss_raises_ce_of_true_label():
    f_bd, f_theta = _pair(seed=4)
    x, y = images(16, seed=3), labels(16, seed=3)
    estep = EStep(eps=0.3, step=0.02, steps=20, random_start=False, alpha=0.0, beta=0.0)
    x_adv, _ = estep.craft(f_bd, f_theta, x, y, CPU)
    with torch.no_grad():
        assert F.cross_entropy(f_bd(x_adv), y) > F.cross_entropy(f_bd(x), y) + 0.1


class _Counter:
    def __init__(self, module):
        self.calls = 0
        module.register_forward_hook(self)

    def __call__(self, *args):
        self.calls += 1


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_pgd_does_no_work_twice(alpha, beta):
    f_bd, f_theta = _pair()
    bd_calls, theta_calls = _Counter(f_bd.conv), _Counter(f_theta.conv)
    steps = 5
    EStep(eps=0.1, step=0.02, steps=steps, alpha=alpha, beta=beta).craft(
        f_bd, f_theta, images(), labels(), CPU, torch.Generator().manual_seed(0))
    # f_bd: one pass on x (KD's teacher, only when α is on) + one per step on x'
    assert bd_calls.calls == steps + (1 if alpha > 0 else 0)
    # f_θ: h_θ(x) once (prior, β on) + one per step on x' when α or β is on; none for Base AT
    assert theta_calls.calls == (1 if beta > 0 else 0) + (steps if alpha > 0 or beta > 0 else 0)


# -- config and presets ---------------------------------------------------------------------------
def test_presets_switch_the_right_terms_off_and_never_the_extension():
    on = {"alpha": 2.0, "beta": 3.0, "lambda1": 4.0, "lambda2": 0.5}
    expect = {
        "full": on,
        "base_at": {"alpha": 0.0, "beta": 0.0, "lambda1": 0.0, "lambda2": 0.0},
        "base_at_a": {"alpha": 2.0, "beta": 0.0, "lambda1": 4.0, "lambda2": 0.0},  # L_KD, L_EWC
        "base_at_b": {"alpha": 0.0, "beta": 3.0, "lambda1": 0.0, "lambda2": 0.5},  # prior, invEWC
    }
    assert set(PRESETS) == set(expect)
    for preset, weights in expect.items():
        for name in ("bibau_u", "bibau_t"):
            cfg = build(DefenseConfig, {"name": name, "preset": preset, **on}, "defense", registry=DEFENSES)
            assert cfg.weights() == weights  # METHOD's four weights and nothing else
            estep = build_defense(cfg).estep(1)
            assert (estep.alpha, estep.beta, estep.keep_teacher) == (weights["alpha"], weights["beta"], False)
        # the extension keeps its own weight under every preset: it is no Table 6 term
        kd = build(DefenseConfig, {"name": "bibau_u_kd", "preset": preset, **on, "mstep_kd": 0.7}, "defense",
                   registry=DEFENSES)
        assert kd.weights() == {**weights, "mstep_kd": 0.7}


def test_config_defaults_match_method():
    cfg = build(DefenseConfig, {"name": "bibau_u"}, "defense", registry=DEFENSES)
    assert isinstance(cfg, BiBauConfig)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.schedule) == (20, 128, 0.01, "cosine")
    assert (cfg.theta, cfg.lambda1, cfg.lambda2, cfg.kd_temperature, cfg.kd_gamma, cfg.inv_ewc_clip) == (
        0.5, 1.0, 0.1, 2.0, 0.5, 10.0)
    assert (cfg.pgd_eps, cfg.pgd_step, cfg.pgd_steps, cfg.pgd_random_start) == (25 / 255, 2 / 255, 20, True)
    assert cfg.fisher_norm == "max" and cfg.preset == "full"
    assert cfg.fisher_estimator == "sample"  # METHOD's empirical (per-sample) Fisher
    assert cfg.weights() == {"alpha": 1.0, "beta": 1.0, "lambda1": 1.0, "lambda2": 0.1}  # no distillation
    assert not hasattr(cfg, "mstep_kd") and not build_defense(cfg).estep(None).keep_teacher
    targeted_cfg = build(DefenseConfig, {"name": "bibau_t"}, "defense", registry=DEFENSES)
    assert targeted_cfg.targeted_on == "all" and "mstep_kd" not in targeted_cfg.weights()
    targeted = build_defense(targeted_cfg)
    assert targeted.needs_target and targeted.estep(3).target == 3
    assert build_defense(cfg).estep(3).target is None  # untargeted ignores a known target
    for name in ("bibau_u_kd", "bibau_t_kd"):  # the extension: the same method plus the M-step distillation
        ext = build(DefenseConfig, {"name": name}, "defense", registry=DEFENSES)
        assert ext.weights() == {**cfg.weights(), "mstep_kd": 10.0} and ext.fisher_estimator == "sample"
        assert build(DefenseConfig, {"name": name, "distill": False}, "defense",
                     registry=DEFENSES).weights() == {**cfg.weights(), "mstep_kd": 0.0}


def test_bibau_config_lists_the_terms_the_fisher_and_the_presets(capsys):
    from orchestrator.cli import main

    assert main(["config", "--set", "defense.name=bibau_u"]) == 0
    out = capsys.readouterr().out
    listing = out[out.index("# defense bibau_u:"):]
    assert "L_KD" in listing and "L_prior" in listing and "L_EWC" in listing and "L_invEWC" in listing
    assert "per-sample empirical Fisher" in listing and "the paper's (METHOD.md)" in listing
    assert "mstep_kd" not in out and "extension" not in listing
    for preset in PRESETS:
        assert f"{preset} = " in listing
    assert main(["config", "--set", "defense.name=bibau_u_kd", "--set", "defense.preset=base_at"]) == 0
    listing = capsys.readouterr().out.split("# defense bibau_u_kd:")[1]
    assert "off: α·L_KD (alpha), β·L_prior (beta), λ1·L_EWC (lambda1), λ2·L_invEWC (lambda2)" in listing
    assert "mstep_kd·L_KD(clean) (mstep_kd 10)" in listing and "not the paper's method" in listing


def test_the_extension_is_named_where_a_bare_defense_is_given_its_keys():
    with pytest.raises(ConfigError, match=r"defense\.mstep_kd: unknown key \(.*bibau_u_kd"):
        build(DefenseConfig, {"name": "bibau_u", "mstep_kd": 10.0}, "defense", registry=DEFENSES)
    with pytest.raises(ConfigError, match=r"defense\.targeted_on: unknown key \(only the targeted"):
        build(DefenseConfig, {"name": "bibau_u", "targeted_on": "non_target"}, "defense", registry=DEFENSES)
    with pytest.raises(ConfigError, match=r"defense\.targeted_on: 'target'"):
        build(DefenseConfig, {"name": "bibau_t", "targeted_on": "target"}, "defense", registry=DEFENSES)
    with pytest.raises(ConfigError, match=r"defense\.mstep_kd: 0\.0 is out of range"):
        build(DefenseConfig, {"name": "bibau_u_kd", "mstep_kd": 0.0}, "defense", registry=DEFENSES)


@pytest.mark.parametrize("key,value,fragment", [
    ("theta", 1.5, "defense.theta"),
    ("preset", "base_at_c", "defense.preset"),
    ("fisher_norm", "median", "defense.fisher_norm"),
    ("kd_temperature", 0.0, "defense.kd_temperature"),
    ("pgd_steps", 0, "defense.pgd_steps"),
    ("lambda_1", 1.0, "defense.lambda_1: unknown key"),
])
def test_bad_config_names_the_field(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        build(DefenseConfig, {"name": "bibau_u", key: value}, "defense", registry=DEFENSES)


# -- the terms as the defense runs them -----------------------------------------------------------
def _purify(lines=None, seed=0, **overrides):
    from trainables.data.base import ImageSet
    from trainables.defenses import DefenseContext

    g = torch.Generator().manual_seed(seed)
    clean = ImageSet(torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(24) % 4)
    overrides = {"name": "bibau_u", **overrides}
    cfg = build(DefenseConfig, {"epochs": 3, "batch_size": 8, "pgd_steps": 2, **overrides},
                "defense", registry=DEFENSES)
    ctx = DefenseContext(device=CPU, num_classes=4, seed=seed, log=(lines.append if lines is not None else lambda s: None))
    return build_defense(cfg).purify(Tiny(), clean, ctx)


def test_full_history_logs_every_term_and_inverse_ewc_starts_in_epoch_two():
    history = _purify(lambda2=1.0).history
    for row in history:
        for key in ("l_in", "l_trig", "l_kd", "l_angle", "l_align", "l_prior", "delta_linf",
                    "ce_clean", "ce_adv", "ewc", "loss_out", "seconds", "fisher_seconds", "lr"):
            assert math.isfinite(row[key]), (row["epoch"], key)
        assert 0 < row["delta_linf"] <= 25 / 255 + 1e-6
        assert "kd_clean" not in row  # the bare defense is METHOD's: no M-step distillation
    assert "inv_ewc" not in history[0]  # F^U needs the previous epoch's x'
    assert all("inv_ewc" in row for row in history[1:])  # (whether it is past its clip: the M-step tests below)
    # L_out is the sum of its weighted terms (λ1 = 1, λ2 = 1)
    for row in history[1:]:
        total = row["ce_clean"] + row["ce_adv"] + row["ewc"] + row["inv_ewc"]
        assert row["loss_out"] == pytest.approx(total, rel=1e-4)


# -- the M-step against an independent L_out, and each weight's effect ------------------------------
def _mstep_scene(name="bibau_u", seed=0, **overrides):
    """A purification mid-epoch: θ has left both θ^t and θ_bd, both Fishers computed from data."""
    f_bd = Tiny(seed=seed).eval()
    f = copy.deepcopy(f_bd)
    g = torch.Generator().manual_seed(seed + 1)
    anchor = {n: p.detach().clone() for n, p in f.named_parameters()}
    with torch.no_grad():
        for p in f.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for v in anchor.values():  # θ^t, the epoch's start, between θ_bd and θ
            v.add_(0.1 * torch.randn(v.shape, generator=g))
    x, y = images(8, seed=seed), labels(8, seed=seed)
    cfg = build(DefenseConfig, {"name": name, "pgd_steps": 3, **overrides}, "defense", registry=DEFENSES)
    defense = build_defense(cfg)
    x_adv, inner = defense.estep(None).craft(f_bd, f, x, y, CPU, torch.Generator().manual_seed(0))
    teacher = inner.pop("teacher", None)
    fisher_c = diagonal_fisher(f, x, y, CPU, estimator="sample")
    fisher_u = diagonal_fisher(f_bd, x_adv, None, CPU, estimator="sample")
    theta_bd = {n: p.detach().clone() for n, p in f_bd.named_parameters()}
    return dict(defense=defense, f=f, f_bd=f_bd, x=x, x_adv=x_adv, y=y, anchor=anchor, fisher_c=fisher_c,
                fisher_u=fisher_u, theta_bd=theta_bd, teacher=teacher)


def _grad(loss, model):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def _defense_grad(sc, defense=None):
    d = defense or sc["defense"]
    loss, terms = d._mstep(sc["f"], sc["x"], sc["x_adv"], sc["y"], sc["anchor"], sc["fisher_c"], sc["theta_bd"],
                           sc["fisher_u"], d.cfg.weights(), CPU, sc["teacher"])
    return _grad(loss, sc["f"]), terms


def _reference_terms(sc):
    """METHOD's M-step terms written out here, independently of the defense's code."""
    f, b = sc["f"].train(), len(sc["y"])
    logits = f(torch.cat([sc["x"], sc["x_adv"]]))
    params = dict(f.named_parameters())
    ewc = sum((sc["fisher_c"][n] * (p - sc["anchor"][n]) ** 2).sum() for n, p in params.items())
    dist = sum((sc["fisher_u"][n] * (p - sc["theta_bd"][n]) ** 2).sum() for n, p in params.items())
    with torch.no_grad():
        teacher = sc["f_bd"](sc["x"])
    kd = 4.0 * F.kl_div(F.log_softmax(logits[:b] / 2, 1), F.log_softmax(teacher / 2, 1), log_target=True,
                        reduction="batchmean")
    return {"ce_clean": F.cross_entropy(logits[:b], sc["y"]), "ce_adv": F.cross_entropy(logits[b:], sc["y"]),
            "ewc": ewc, "inv_ewc": torch.clamp(1.0 / (dist + 1e-12), max=10.0), "kd_clean": kd}


@pytest.mark.parametrize("name", ["bibau_u", "bibau_t"])
def test_bare_defense_m_step_is_methods_l_out(name):
    sc = _mstep_scene(name)
    got, terms = _defense_grad(sc)
    ref = _reference_terms(sc)
    assert ref["inv_ewc"].item() < 10.0  # the set-up is past the clip: every term has a gradient
    l_out = ref["ce_clean"] + ref["ce_adv"] + 1.0 * ref["ewc"] + 0.1 * ref["inv_ewc"]  # METHOD's λ1 = 1, λ2 = 0.1
    assert terms["loss_out"].item() == pytest.approx(l_out.item(), rel=1e-5)
    assert torch.allclose(got, _grad(l_out, sc["f"]), rtol=1e-4, atol=1e-7)
    assert "kd_clean" not in terms


@pytest.mark.parametrize("key,term,name", [
    ("lambda1", "ewc", "bibau_u"), ("lambda2", "inv_ewc", "bibau_u"), ("lambda2", "inv_ewc", "bibau_t"),
    ("mstep_kd", "kd_clean", "bibau_u_kd"),
])
def test_each_m_step_weight_moves_the_gradient_by_its_term(key, term, name):
    """Doubling a weight adds exactly its term's gradient once more: a dead term (no gradient), a
    saturated one (inverse EWC at its clip), a term applied twice or under another weight all fail."""
    w = {"lambda1": 1.0, "lambda2": 0.5, "mstep_kd": 2.0}[key]
    sc = _mstep_scene(name, **{key: w})
    once, _ = _defense_grad(sc)
    twice, _ = _defense_grad(sc, build_defense(sc["defense"].cfg.replace(**{key: 2 * w})))
    expected = w * _grad(_reference_terms(sc)[term], sc["f"])
    assert expected.norm() > 1e-3 * once.norm(), f"{term} has (almost) no gradient here"
    assert torch.allclose(twice - once, expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("key", ["alpha", "beta"])
def test_each_e_step_weight_changes_the_crafted_examples(key):
    f_bd, f_theta = _pair(seed=1)
    x, y = images(16, seed=4), labels(16, seed=4)

    def craft(**weights):
        estep = EStep(eps=0.2, step=0.01, steps=10, random_start=False, **weights)
        return estep.craft(f_bd, f_theta, x, y, CPU)

    base = {"alpha": 1.0, "beta": 1.0}
    x1, s1 = craft(**base)
    x2, s2 = craft(**{**base, key: 4.0})
    x0, _ = craft(**{**base, key: 0.0})
    # the term's weight steers δ: sign-PGD ends elsewhere when it changes
    assert (x2 - x1).abs().max() > 0.05 and (x0 - x1).abs().max() > 0.05
    term = "l_kd" if key == "alpha" else "l_prior"
    value = (lambda s: s["l_kd"]) if key == "alpha" else (lambda s: s["l_angle"] + s["l_align"])
    assert value(s2) < value(s1), f"a larger weight on {term} should lower {term} at the crafted x'"


def test_targeted_on_non_target_crafts_from_the_other_classes_only():
    from trainables.data.base import ImageSet
    from trainables.defenses import DefenseContext

    g = torch.Generator().manual_seed(0)
    clean = ImageSet(torch.randint(0, 256, (24, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(24) % 4)
    runs = {}
    for on in ("all", "non_target"):
        cfg = build(DefenseConfig, {"name": "bibau_t", "epochs": 2, "batch_size": 8, "pgd_steps": 2, "targeted_on": on},
                    "defense", registry=DEFENSES)
        ctx = DefenseContext(device=CPU, num_classes=4, seed=0, target=1, log=lambda s: None)
        runs[on] = build_defense(cfg).purify(Tiny(), clean, ctx)
    assert [r["crafted"] for r in runs["all"].history] == [24, 24]
    assert [r["crafted"] for r in runs["non_target"].history] == [18, 18]  # 6 images of class 1 left out
    a, b = (torch.cat([p.flatten() for p in r.model.parameters()]) for r in runs.values())
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("preset,absent,present", [
    ("base_at", {"l_kd", "l_angle", "l_align", "l_prior", "ewc", "inv_ewc"}, set()),
    ("base_at_a", {"l_angle", "l_align", "l_prior", "inv_ewc"}, {"l_kd", "ewc"}),
    ("base_at_b", {"l_kd", "ewc"}, {"l_angle", "l_align", "l_prior", "inv_ewc"}),
])
def test_presets_leave_their_terms_out_of_the_run(preset, absent, present):
    history = _purify(preset=preset)
    rows = history.history
    keys = set(rows[-1])
    assert not (absent & keys), f"{preset} computed {absent & keys}"
    assert present <= keys
    for row in rows:  # Base AT's L_out is the two cross-entropies and nothing else
        extra = row["loss_out"] - row["ce_clean"] - row["ce_adv"]
        if preset == "base_at":
            assert abs(extra) < 1e-5
        assert row["l_in"] == pytest.approx(row["l_trig"] + row.get("l_kd", 0.0) + row.get("l_prior", 0.0), rel=1e-4)


def test_the_extension_adds_the_distillation_and_only_it():
    rows = _purify(name="bibau_u_kd", preset="base_at_a", lambda1=0.0, mstep_kd=2.0).history
    for row in rows:
        assert row["loss_out"] == pytest.approx(row["ce_clean"] + row["ce_adv"] + 2.0 * row["kd_clean"], rel=1e-4)
    # the teacher is f_bd on the clean batch: at the start f_θ = f_bd, so the term starts near 0
    assert 0 < rows[0]["kd_clean"] < 0.1 * rows[0]["ce_clean"]
    off = _purify(name="bibau_u_kd", distill=False).history
    bare = _purify().history
    assert "kd_clean" not in off[0]
    assert off[-1]["loss_out"] == pytest.approx(bare[-1]["loss_out"], rel=1e-6)  # distill off = the paper's method


def test_warns_with_numbers_when_ewc_pull_is_too_stiff():
    lines: list[str] = []
    _purify(lines, epochs=1, lr=0.02, lambda1=50.0)
    warning = [s for s in lines if s.startswith("warning")]
    assert warning and "2·0.02·50 = 2 > 1" in warning[0]
    quiet: list[str] = []
    _purify(quiet, epochs=1)
    assert not [s for s in quiet if s.startswith("warning")]


# -- BatchNorm in the M-step (METHOD is silent; bn_stats chooses) -------------------------------
@pytest.mark.parametrize("mode", ["train", "split", "frozen"])
def test_mstep_batchnorm_modes(mode):
    """train: the clean half is normalised with the statistics of clean and crafted images together;
    split: with its own batch's alone; frozen: with the suspicious model's running statistics, which
    the step leaves unchanged."""
    x, x_adv, y = images(8, seed=1), images(8, seed=2) * 0.2 + 0.7, labels(8)  # x' far off x's statistics
    defense = build_defense(build(DefenseConfig, {"name": "bibau_u", "bn_stats": mode}, "defense", registry=DEFENSES))
    model = Tiny()
    model.bn.running_mean.fill_(0.3)
    alone, joint = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    _, terms = defense._mstep(model, x, x_adv, y, None, None, None, None, defense.cfg.weights(), CPU)
    ce_alone = F.cross_entropy(alone(x), y)
    ce_joint = F.cross_entropy(joint(torch.cat([x, x_adv]))[:8], y)
    ce_frozen = F.cross_entropy(_frozen_logits(x), y)
    expected = {"train": ce_joint, "split": ce_alone, "frozen": ce_frozen}[mode]
    assert torch.allclose(terms["ce_clean"], expected, atol=1e-5), mode
    others = [v for k, v in {"train": ce_joint, "split": ce_alone}.items() if k != mode]
    assert all(not torch.allclose(terms["ce_clean"], o, atol=1e-3) for o in others)
    assert torch.equal(model.bn.running_mean == 0.3, torch.ones(8, dtype=torch.bool)) == (mode == "frozen")


def _frozen_logits(x):
    model = Tiny()
    model.bn.running_mean.fill_(0.3)
    return model.eval()(x)
