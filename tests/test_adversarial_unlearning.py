"""The parts of I-BAU, SAU, PAM, FST and ANP's noise that decide their numbers: I-BAU's implicit
hypergradient against finite differences, SAU's losses (L_sar is zero or flat where the two models
disagree), the one PGD loop's variants, PAM's path-aware step, FST's penalty and projection, ANP's
unclamped noise; bad configurations fail naming the field."""
import pytest
import torch
import torch.nn.functional as F

import trainables  # noqa: F401  (fill the registries)
from trainables.config import ConfigError, build
from trainables.defenses import DefenseConfig
from trainables.defenses.ibau import fixed_point_hypergradient, inner_loss
from trainables.defenses.pgd import PGD
from trainables.defenses.sau import sar_loss, shared_pgd_loss
from trainables.defenses.triggers import _toward
from trainables.registry import DEFENSES


# -- I-BAU --------------------------------------------------------------------------------------------


def _tiny_problem(reg=1.0):
    """A linear softmax classifier on 6 points in 5 dimensions; I-BAU's inner loss with a weight on ||δ||²
    large enough that the inner problem is strongly convex (a unique δ*), its outer loss with δ on every x."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.randn(5, 3, generator=g, dtype=torch.float64).mul_(0.3).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=torch.float64).mul_(0.1).requires_grad_(True)
    model = lambda inputs: inputs @ w + b  # noqa: E731

    def fp_map(d, step=0.1):
        (grad,) = torch.autograd.grad(inner_loss(model, x, y, d, reg), d, create_graph=True)
        return d - step * grad

    def outer(d):
        return F.cross_entropy(model(x + d), y)

    def solve():
        d = torch.zeros(1, 5, dtype=torch.float64)
        for _ in range(300):  # a contraction (factor about 0.8): converged to float64 precision
            d = fp_map(d.requires_grad_(True)).detach()
        return d

    return w, b, fp_map, outer, solve


def test_ibau_hypergradient_matches_finite_differences():
    w, b, fp_map, outer, solve = _tiny_problem()
    delta = solve()
    hyper = fixed_point_hypergradient(delta, [w, b], fp_map, outer, steps=300)
    partial = torch.autograd.grad(outer(delta), [w, b])  # without the implicit term through δ*(θ)

    def total(param, index, h):
        with torch.no_grad():
            param.view(-1)[index] += h
        value = float(outer(solve()).detach())
        with torch.no_grad():
            param.view(-1)[index] -= h
        return value

    h = 1e-5
    for param, grad, naive, coords in ((w, hyper[0], partial[0], (0, 4, 8, 13)), (b, hyper[1], partial[1], (0, 1, 2))):
        fd = torch.tensor([(total(param, i, h) - total(param, i, -h)) / (2 * h) for i in coords], dtype=torch.float64)
        got, plain = grad.flatten()[list(coords)], naive.flatten()[list(coords)]
        assert torch.allclose(got, fd, atol=1e-7, rtol=1e-5), (got, fd)
        assert (plain - fd).abs().max() > 1e-3, "the implicit term should matter on this problem"


def test_ibau_hypergradient_truncated_at_k_steps_approaches_it():
    w, b, fp_map, outer, solve = _tiny_problem()
    delta = solve()
    exact = fixed_point_hypergradient(delta, [w, b], fp_map, outer, steps=300)
    errors = [max(float((g - e).abs().max()) for g, e in zip(
        fixed_point_hypergradient(delta, [w, b], fp_map, outer, steps=k), exact)) for k in (0, 1, 5, 20)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 5


# -- SAU ----------------------------------------------------------------------------------------------


def test_sar_loss_is_zero_without_potential_poison_and_flat_where_the_models_disagree():
    y = torch.tensor([0, 1, 2, 3])
    logits = torch.randn(4, 5, requires_grad=True)
    # f_ref keeps every label (or moves it back to y): no potential poison sample, no loss
    loss, poison = sar_loss(logits, pred_ref_adv=y.clone(), pred_ref_clean=y.clone(), y=y)
    assert not poison.any() and loss.item() == 0.0
    # f_ref is fooled to class 4 on every sample, f_θ gives class 4 almost nothing: no shared adversarial
    # example, so the loss is at its floor (the reference's clamps) and pushes nothing
    disagree = torch.full((4, 5), -20.0)
    disagree[torch.arange(4), y] = 20.0
    disagree.requires_grad_(True)
    fooled = torch.full_like(y, 4)
    loss, poison = sar_loss(disagree, fooled, y.clone(), y)
    assert poison.all()
    floor = -(torch.log(torch.tensor(1e-6 + 0.999)) + torch.log(torch.tensor(1 + 1e-6 - 0.001))) / 2
    assert loss.item() == pytest.approx(floor.item(), rel=1e-4) and loss.item() < 1.1e-3
    (grad,) = torch.autograd.grad(loss, disagree)
    assert torch.count_nonzero(grad) == 0
    # f_θ agrees with f_ref's adversarial label (a shared adversarial example): a real loss and a push
    agree = torch.zeros(4, 5)
    agree[:, 4] = 3.0
    agree.requires_grad_(True)
    loss, _ = sar_loss(agree, fooled, y.clone(), y)
    (grad,) = torch.autograd.grad(loss, agree)
    assert loss.item() > 1.0 and (grad[:, 4] > 0).all()  # descending lowers f_θ's probability of class 4


def test_shared_pgd_loss_counts_only_unshared_samples():
    y = torch.tensor([0, 1])
    clean = torch.tensor([0, 1])
    same = torch.tensor([[0.0, 5.0, 0.0], [5.0, 0.0, 0.0]])  # both models moved, to the same labels
    loss, parts = shared_pgd_loss(same, same.clone(), clean, clean, y, beta1=0.01, beta2=1.0)
    assert parts["shared"].all() and parts["l_share"].item() == 0.0 and parts["l_adv"].item() == 0.0
    other = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 5.0]])
    loss, parts = shared_pgd_loss(same, other, clean, clean, y, beta1=0.01, beta2=1.0)
    assert not parts["shared"].any() and parts["l_share"].item() > 0.1


# -- the one PGD loop -----------------------------------------------------------------------------------


def test_pgd_variants_bound_start_sign_and_early_exit():
    x = torch.full((2, 3, 4, 4), 0.95)
    # SAU: start at +ε, no image box (x + δ may leave [0, 1]), signed steps inside the ε-ball
    sau = PGD(step=0.2, steps=5, eps=0.2, start="max", image_box=False)
    d0 = sau.initial(x.shape, torch.device("cpu"), x)
    assert torch.all(d0 == 0.2) and (x + d0).max() > 1.0
    calls = []

    def objective(d):
        calls.append(1)
        return (d * d).sum(), {"done": len(calls) >= 2}

    d, stats = sau.run(d0, objective, x, stop=lambda s: s["done"])
    assert len(calls) == 2 and d.abs().max() <= 0.2 + 1e-7
    # BI-BAU: the image box keeps x + δ in [0, 1]
    bibau = PGD(step=0.1, steps=3, eps=0.2, start="max")
    assert (x + bibau.initial(x.shape, torch.device("cpu"), x)).max() <= 1.0
    # I-BAU: plain gradient steps, no bound: δ ← δ - lr·∇ exactly
    ibau = PGD(step=10.0, steps=1, eps=None, signed=False, image_box=False)
    target = torch.full((1, 3, 4, 4), 7.0)
    d, _ = ibau.run(torch.zeros(1, 3, 4, 4), lambda d: (0.01 * ((d - target) ** 2).sum(), {}))
    assert torch.allclose(d, torch.full_like(d, 10.0 * 0.02 * 7.0))
    with pytest.raises(ValueError, match="start"):
        PGD(step=0.1, steps=1, eps=0.1, start="middle")


# -- PAM, FST, ANP ----------------------------------------------------------------------------------------


def test_pam_step_moves_a_fixed_distance_toward_the_backdoored_model_and_back():
    f = torch.nn.Linear(3, 2)
    anchor = {n: p.detach() + 1.0 for n, p in f.named_parameters()}
    before = {n: p.detach().clone() for n, p in f.named_parameters()}
    restore = _toward(f, anchor, rho=0.5)
    moved = torch.cat([(p.detach() - before[n]).flatten() for n, p in f.named_parameters()])
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-5) and (moved > 0).all()
    restore()
    assert all(torch.equal(p, before[n]) for n, p in f.named_parameters())
    same = {n: p.detach().clone() for n, p in f.named_parameters()}  # d = 0: no move (the first step)
    _toward(f, same, rho=0.5)
    assert all(torch.equal(p, before[n]) for n, p in f.named_parameters())


def test_fst_turns_the_head_away_and_keeps_its_norm():
    from test_defense_contract import context, random_set, small_config, tiny_model  # noqa: F401
    from trainables.defenses import build_defense

    model = tiny_model()
    result = build_defense(small_config("fst", alpha=5.0, epochs=3)).purify(model, random_set(40, 1), context("fst"))
    w, w_bd = result.model.head.weight.detach(), model.head.weight.detach()
    assert w.norm().item() == pytest.approx(w_bd.norm().item(), rel=1e-4)
    assert result.findings["head_cosine"] < 0  # pushed past orthogonal by the inner-product penalty


def test_anp_noise_reaches_two_eps_unless_clipped():
    from test_defense_contract import context, random_set, small_config, tiny_model
    from trainables.defenses import bn, build_defense

    seen = {}
    real = bn.insert_masks

    def spy(model):
        masks = real(model)
        seen["masks"] = masks
        return masks

    import trainables.defenses.anp as anp

    for clip in (False, True):
        anp.insert_masks = spy
        try:
            build_defense(small_config("anp", iterations=1, noise_clip=clip)).purify(
                tiny_model(), random_set(40, 1), context("anp"))
        finally:
            anp.insert_masks = real
        noise = torch.cat([m.noise.detach().flatten() for m in seen["masks"].values()])
        eps = small_config("anp").eps
        if clip:
            assert noise.abs().max() <= eps + 1e-6
        else:
            assert noise.abs().max() > eps * 1.2


@pytest.mark.parametrize("name, key, value", [
    ("sau", "pgd_eps", 0.0), ("sau", "pgd_start", "middle"), ("sau", "beta1", -1.0), ("sau", "optimizer", "rmsprop"),
    ("ibau", "portion", 1.5), ("ibau", "fixed_point_steps", -1), ("ibau", "inner_lr", 0.0),
    ("pam", "rho", -0.1), ("pam", "feature_weight", 2.0), ("fst", "alpha", -1.0), ("anp", "noise_clip", "maybe"),
])
def test_bad_config_names_the_field(name, key, value):
    with pytest.raises(ConfigError, match=rf"defense\.{key}"):
        build(DefenseConfig, {"name": name, key: value}, "defense", registry=DEFENSES)
