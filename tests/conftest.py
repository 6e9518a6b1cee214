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


@pytest.fixture(autouse=True)
def _no_mlflow_environment(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI must not send the tests' runs to their server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
