"""Shared fixtures. The real-data ones use the CIFAR-10 archive kept beside the repository
(``../shared/data/cifar10-jpg.tar.xz``) and skip, saying why, where it is absent. Decoded data
is cached in ``~/.cache/bibau/data``, so only the first run anywhere pays for decoding."""
from __future__ import annotations

from pathlib import Path

import pytest

CIFAR10_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.xz"


@pytest.fixture(scope="session")
def cifar10_archive() -> Path:
    """Path of the offline CIFAR-10 archive (all 60,000 images as JPEGs)."""
    if not CIFAR10_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE} (clone the repository with shared/ beside it)")
    return CIFAR10_ARCHIVE


@pytest.fixture(scope="session")
def small_cifar(cifar10_archive):
    """CIFAR-10 cut to 2,000 training and 500 test images (stratified, seed 0)."""
    from trainables.data import DataConfig, load_dataset

    return load_dataset(DataConfig(name="cifar10", root=str(cifar10_archive), train_size=2000, test_size=500))


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits at 32x32 RGB: 1,438 training and 359 test images, offline."""
    from trainables.data import DataConfig, load_dataset

    return load_dataset(DataConfig(name="digits"))


@pytest.fixture(scope="session")
def badnets_cifar16(cifar10_archive):
    """A small BadNets model on real CIFAR-10, shared by the defenses' real-data tests: 3,000
    training images at 16x16 (a 3x3 white patch: size 6 on the 32x32 grid, resized by nearest
    neighbour; 10% poisoned, target 0), small ResNet width 16 depth 3, 4 epochs, no crop, flips;
    a 300-image clean split. Also a batch of 256 of the poisoned training set (for EP). Defenses
    must leave ``model`` untouched (their tests check it)."""
    from types import SimpleNamespace

    import torch

    from trainables.attacks import build_attack
    from trainables.attacks.base import AttackConfig
    from trainables.config import build
    from trainables.data import DataConfig, defender_split, load_dataset
    from trainables.evaluation.metrics import attack_success_rate, clean_accuracy
    from trainables.models import ModelConfig, create_model
    from trainables.registry import ATTACKS
    from trainables.schema import TrainConfig
    from trainables.train import train_model

    cpu = torch.device("cpu")
    ds = load_dataset(DataConfig(name="cifar10", root=str(cifar10_archive), image_size=16,
                                 train_size=3000, test_size=500))
    rest, clean_index = defender_split(ds.train, 0.1, seed=0)
    attack = build_attack(build(AttackConfig, {"name": "badnets", "poison_rate": 0.1, "size": 6, "resize": "nearest",
                                               "target": 0}, "attack", registry=ATTACKS), ds)
    gen = torch.Generator().manual_seed(0)
    poisoned, _ = attack.poison_trainset(ds.train, gen, exclude=clean_index)
    model = create_model(ModelConfig(name="small_resnet", width=16, depth=3), ds.num_classes, mean=ds.mean,
                         std=ds.std, generator=torch.Generator().manual_seed(0))
    train_model(model, poisoned, TrainConfig(epochs=4, batch_size=64, lr=0.05, crop_padding=0, eval_every=0),
                cpu, generator=gen, hflip_allowed=ds.hflip, log=lambda line: None)
    poisoned_test = attack.poison_testset(ds.test)
    batch = poisoned.subset(rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(1))[:256]])
    return SimpleNamespace(model=model, clean=ds.train.subset(clean_index), test=ds.test, poisoned_test=poisoned_test,
                           poisoned_batch=batch, hflip=ds.hflip, target=0, ca=clean_accuracy(model, ds.test, cpu),
                           asr=attack_success_rate(model, poisoned_test, cpu))


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI must not send the tests' runs to their server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)


@pytest.fixture(scope="module")
def local_ray(request):
    """A local Ray (2 CPUs) for a test module's sweeps, shut down after the module if it started it.
    Ray's workers cannot import tests/, so the module and ``test_sweep`` (whose stand-in backend the
    sweep tests share) travel to them by value."""
    import ray
    from ray import cloudpickle

    import test_sweep

    for module in {request.module, test_sweep}:
        cloudpickle.register_pickle_by_value(module)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
