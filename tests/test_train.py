"""The training loop: it learns, it is deterministic on the CPU, its schedules follow the
config, it fails loudly on divergence, and it hands every batch to the attack."""
import math

import pytest
import torch

import trainables  # noqa: F401  (fill the registries)
from trainables.attacks.base import Attack, AttackConfig
from trainables.data import DataConfig, ImageSet, load_dataset
from trainables.predict import predict
from trainables.models import ModelConfig, create_model
from trainables.schema import TrainConfig
from trainables.optim import lr_factor, make_optimizer, make_scheduler
from trainables.train import train_model

CPU = torch.device("cpu")


def tiny_set(n=48, size=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % classes)


def tiny_model(classes=4, seed=0):
    return create_model(ModelConfig(name="small_resnet", width=4, depth=2), classes,
                        generator=torch.Generator().manual_seed(seed))


def cfg(**kw):
    base = dict(epochs=2, batch_size=16, lr=0.05, crop_padding=2, hflip=True, eval_every=0)
    return TrainConfig(**{**base, **kw})


class RecordingAttack(Attack):
    """Relabels every batch to ``relabel`` (when set) and records what the loop hands it."""

    def __init__(self, relabel=None, nan_from_call=None, standard_augmentation=True):
        super().__init__(AttackConfig(name="badnets", target=0), (3, 16, 16), 4)
        self.relabel, self.nan_from_call = relabel, nan_from_call
        self.standard_augmentation = standard_augmentation
        self.calls, self.seen = 0, []

    def apply_trigger(self, x, train=False):
        return x

    def training_batch(self, x, y, model, generator, *, poisonable=None, hflip=False):
        self.calls += 1
        self.seen.append(x.detach().clone())
        assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert model.training and isinstance(generator, torch.Generator)
        if self.nan_from_call is not None and self.calls >= self.nan_from_call:
            x = x * float("nan")
        if self.relabel is not None:
            y = torch.full_like(y, self.relabel)
        return x, y


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataConfig(name="digits"))


def test_small_model_learns_digits(digits):
    model = create_model(ModelConfig(name="small_resnet", width=8, depth=3), digits.num_classes,
                         mean=digits.mean, std=digits.std, generator=torch.Generator().manual_seed(0))
    lines = []
    history = train_model(model, digits.train, cfg(epochs=5, batch_size=32, crop_padding=0, eval_every=0),
                          CPU, generator=torch.Generator().manual_seed(0), hflip_allowed=digits.hflip,
                          eval_sets={"ca": digits.test}, log=lines.append)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert "ca" in history[-1] and all("ca" not in row for row in history[:-1])  # eval_every 0: only the end
    assert history[-1]["ca"] > 0.8
    pred = predict(model, digits.test, CPU)  # the full test set agrees with the subsample's verdict
    assert (pred == digits.test.y).float().mean() > 0.8
    assert not model.training
    assert len(lines) == 5 and lines[-1].startswith("epoch 5/5 loss ") and " ca " in lines[-1]


def test_same_seed_same_weights_on_cpu():
    data = tiny_set()

    def run(seed):
        model = tiny_model(seed=0)
        train_model(model, data, cfg(), CPU, generator=torch.Generator().manual_seed(seed), log=lambda _: None)
        return model.state_dict()

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "the generator does not drive order/augmentation"


def lrs(train_cfg, steps_per_epoch, peak=1.0):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak)
    sched = make_scheduler(opt, train_cfg, steps_per_epoch)
    out = []
    for _ in range(train_cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_per_step():
    curve = lrs(cfg(epochs=4, schedule="cosine"), 10)
    assert curve[0] == 1.0 and curve[20] == pytest.approx(0.5)
    assert curve[10] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert all(a > b for a, b in zip(curve, curve[1:])) and 0 < curve[-1] < 0.01


def test_step_schedule_milestones_are_fractions_of_training():
    curve = lrs(cfg(epochs=4, schedule="step", milestones=[0.5, 0.75], gamma=0.1), 10)
    assert curve[:20] == [1.0] * 20
    assert curve[20:30] == pytest.approx([0.1] * 10)
    assert curve[30:] == pytest.approx([0.01] * 10)


def test_linear_warmup_then_schedule():
    curve = lrs(cfg(epochs=3, schedule="constant", warmup_epochs=1.0), 10)
    assert curve[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert curve[10:] == [1.0] * 20
    cosine = lrs(cfg(epochs=3, schedule="cosine", warmup_epochs=0.5), 10)
    assert cosine[4] == pytest.approx(1.0) and cosine[5] == pytest.approx(1.0)  # peak where warm-up ends
    assert all(a > b for a, b in zip(cosine[5:], cosine[6:]))
    assert lr_factor(cfg(epochs=3, schedule="constant"), 29, 10) == 1.0


def test_history_reports_the_lr_the_schedule_gives():
    history = train_model(tiny_model(), tiny_set(), cfg(epochs=4, lr=0.1, schedule="step"), CPU,
                          generator=torch.Generator().manual_seed(0), log=lambda _: None)
    assert [row["lr"] for row in history] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert all(row["seconds"] > 0 and math.isfinite(row["loss"]) for row in history)


def test_non_finite_loss_raises_naming_the_epoch():
    steps = 3  # 48 images, batch 16
    attack = RecordingAttack(nan_from_call=steps + 2)  # goes bad inside the second epoch
    with pytest.raises(FloatingPointError, match=r"epoch 2/3"):
        train_model(tiny_model(), tiny_set(), cfg(epochs=3), CPU, generator=torch.Generator().manual_seed(0),
                    attack=attack, log=lambda _: None)


def test_attack_hook_sees_every_batch_and_its_labels_are_trained_on():
    attack = RecordingAttack(relabel=3)
    model = tiny_model()
    data = tiny_set(n=40)  # 40 = 2 x 16 + 8: the short last batch is trained on too
    train_model(model, data, cfg(epochs=3, lr=0.05), CPU, generator=torch.Generator().manual_seed(0),
                attack=attack, log=lambda _: None)
    assert attack.calls == 3 * 3 and sum(len(x) for x in attack.seen) == 3 * 40
    assert (predict(model, tiny_set(n=32, seed=9), CPU) == 3).float().mean() > 0.9


def test_attack_without_standard_augmentation_gets_raw_images():
    data = tiny_set(n=32)
    originals = {bytes(img.numpy().tobytes()) for img in data.x}
    attack = RecordingAttack(standard_augmentation=False)
    train_model(tiny_model(), data, cfg(epochs=1, crop_padding=4, hflip=True), CPU,
                generator=torch.Generator().manual_seed(0), attack=attack, log=lambda _: None)
    seen = torch.cat(attack.seen)
    assert {bytes((img * 255).round().to(torch.uint8).numpy().tobytes()) for img in seen} == originals
    # and with standard augmentation the same loop really crops and flips
    augmented = RecordingAttack()
    train_model(tiny_model(), data, cfg(epochs=1, crop_padding=4, hflip=True), CPU,
                generator=torch.Generator().manual_seed(0), attack=augmented, log=lambda _: None)
    again = {bytes((img * 255).round().to(torch.uint8).numpy().tobytes()) for img in torch.cat(augmented.seen)}
    assert len(again - originals) > 16


def test_eval_sets_schedule_subsample_and_reserved_names():
    test = tiny_set(n=40, seed=3)
    history = train_model(tiny_model(), tiny_set(n=33), cfg(epochs=3, eval_every=2, eval_size=10), CPU,
                          generator=torch.Generator().manual_seed(0), eval_sets={"ca": test}, log=lambda _: None)
    assert ["ca" in row for row in history] == [False, True, True]  # every 2nd epoch and the last
    for row in history[1:]:
        assert row["ca"] * 10 == pytest.approx(round(row["ca"] * 10), abs=1e-5) and 0 <= row["ca"] <= 1  # 10 scored
    with pytest.raises(ValueError, match="'loss' is taken"):
        train_model(tiny_model(), tiny_set(), cfg(epochs=1), CPU, generator=torch.Generator(),
                    eval_sets={"loss": test}, log=lambda _: None)


def test_optimizer_helper():
    model = tiny_model()
    model.head.weight.requires_grad_(False)
    opt = make_optimizer(model, 0.1, 0.9, 5e-4, nesterov=True)
    params = opt.param_groups[0]["params"]
    assert all(p.requires_grad for p in params) and len(params) == sum(1 for p in model.parameters()) - 1
    assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["weight_decay"] == 5e-4
    with pytest.raises(ValueError, match="nesterov"):
        make_optimizer(model, 0.1, 0.0, 0.0, nesterov=True)


def test_the_attack_is_told_which_rows_it_may_poison_and_whether_flips_keep_labels():
    """The defender's clean split (``protected``) reaches ``training_batch`` as poisonable=False."""
    data = tiny_set(n=48, classes=4)
    protected = (data.y == 3).nonzero().flatten()  # class 3 stands for the clean split: it shows in y

    class Checking(RecordingAttack):
        def training_batch(self, x, y, model, generator, *, poisonable=None, hflip=False):
            assert poisonable is not None and torch.equal(poisonable, y != 3)
            self.flags = getattr(self, "flags", set()) | {hflip}
            return super().training_batch(x, y, model, generator)

    for allowed, expected in ((True, {True}), (False, {False})):
        attack = Checking(standard_augmentation=False)
        train_model(tiny_model(), data, cfg(epochs=2), CPU, generator=torch.Generator().manual_seed(0),
                    attack=attack, hflip_allowed=allowed, protected=protected, log=lambda _: None)
        assert attack.calls == 6 and attack.flags == expected
