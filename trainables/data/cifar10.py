"""CIFAR-10: 50,000 training and 10,000 test images, 32x32 RGB, 10 classes.

Read from any of: a torchvision root (``cifar-10-batches-py/``, read with an unpickler that only
admits numpy arrays, or the pickle-free ``cifar-10-batches-bin/``), an ImageFolder tree
(``train/<class>/*.jpg``, ``test/<class>/*.jpg``), or a tar archive of either (such as
``../shared/data/cifar10-jpg.tar.xz``, decoded while streaming).
"""
from __future__ import annotations

import io
import pickle
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError
from ..registry import DATASETS
from .base import Dataset, DataConfig, ImageSet
from .cache import cached, source_signature
from .decode import Collector, assemble, read_tree, read_tree_archive, resized
from .sources import find_root, repo_shared_data

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)

_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
_BATCHES = _TRAIN_BATCHES + ["test_batch"]
_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
# Class folders may be named by class or by label number.
_LABEL_OF = {**{n: i for i, n in enumerate(CLASSES)}, **{str(i): i for i in range(10)}}

ACCEPTED = (
    "a torchvision root (cifar-10-batches-py/ or cifar-10-batches-bin/, or that folder itself), "
    "an ImageFolder tree (train/<class>/*.jpg and test/<class>/*.jpg, classes airplane ... truck), "
    "or a .tar/.tar.gz/.tar.xz archive of either"
)


def detect(path: Path) -> tuple[str, Path] | None:
    """(layout, where) for a CIFAR-10 source, or None."""
    if path.name.lower().startswith(("cifar100", "cifar-100")):  # the default glob cifar10* matches it
        return None
    if path.is_file():
        if path.name.lower().endswith(_ARCHIVE_SUFFIXES) and tarfile.is_tarfile(path):
            return "archive", path
        return None
    if not path.is_dir():
        return None
    for sub in (path, path / "cifar-10-batches-py"):
        if all((sub / b).is_file() for b in _BATCHES):
            return "python", sub
    for sub in (path, path / "cifar-10-batches-bin"):
        if all((sub / f"{b}.bin").is_file() for b in _BATCHES):
            return "binary", sub
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "tree", path
    return None


def _download(dest: Path) -> None:
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(CIFAR10.url, str(dest), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)


@DATASETS.register("cifar10")
def cifar10(cfg: DataConfig) -> Dataset:
    root, (layout, where) = find_root(
        cfg, "cifar10", detect, patterns=["cifar10*", "cifar-10*"], accepted=ACCEPTED,
        extra=[repo_shared_data() / "cifar10-jpg.tar.xz"], download=_download,
    )
    size = cfg.image_size or cifar10.native_size
    key = {"source": source_signature(where), "layout": layout}
    native = lambda: cached(cfg, "cifar10", {**key, "image_size": 32}, lambda: _decode(layout, where))  # noqa: E731
    if size == 32:
        return native()
    # Other sizes come from the native cache: resizing is much faster than decoding again.
    return cached(cfg, "cifar10", {**key, "image_size": size}, lambda: resized(native(), size))


def _decode(layout: str, where: Path) -> Dataset:
    if layout == "python":
        splits = _from_batches({b: (where / b).read_bytes() for b in _BATCHES}, binary=False)
    elif layout == "binary":
        splits = _from_batches({b: (where / f"{b}.bin").read_bytes() for b in _BATCHES}, binary=True)
    elif layout == "tree":
        trees, _ = read_tree(where, ("train", "test"), _LABEL_OF)
        splits = _from_collectors(trees)
    else:
        trees, _, extras = read_tree_archive(where, ("train", "test"), _LABEL_OF, keep=_is_batch_file)
        if extras and not len(trees["train"]):
            binary = any(name.endswith(".bin") for name in extras)
            batches = {name.removesuffix(".bin"): data for name, data in extras.items()}
            missing = [b for b in _BATCHES if b not in batches]
            if missing:
                raise ConfigError(f"data.root: archive {where} lacks the CIFAR-10 batches {missing}")
            splits = _from_batches(batches, binary=binary)
        else:
            splits = _from_collectors(trees)
    train, test = splits
    for name, part, expected in (("train", train, 50000), ("test", test, 10000)):
        if len(part) != expected:  # a partial copy is allowed, but say so
            warnings.warn(f"cifar10 at {where}: {name} split has {len(part)} images, not {expected}", stacklevel=3)
    return assemble("cifar10", train, test, CLASSES, hflip=True, mean=MEAN, std=STD,
                    info={"source": str(where), "layout": layout})


def _is_batch_file(name: str) -> bool:
    return name.removesuffix(".bin") in _BATCHES


def _from_collectors(trees: dict[str, Collector]) -> tuple[ImageSet, ImageSet]:
    return trees["train"].image_set(32, "cifar10 train"), trees["test"].image_set(32, "cifar10 test")


def _from_batches(batches: dict[str, bytes], binary: bool) -> tuple[ImageSet, ImageSet]:
    parts = {name: (_read_binary(data) if binary else _read_python(data, name)) for name, data in batches.items()}

    def join(names: list[str]) -> ImageSet:
        x = np.concatenate([parts[n][0] for n in names])
        y = np.concatenate([parts[n][1] for n in names])
        return ImageSet(torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y.astype(np.int64)))

    return join(_TRAIN_BATCHES), join(["test_batch"])


def _read_binary(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One ``*.bin`` batch: records of 1 label byte and 3072 pixel bytes (R, G, B planes)."""
    rec = np.frombuffer(data, dtype=np.uint8)
    if rec.size % 3073:
        raise ConfigError("data.root: a CIFAR-10 .bin batch is not a whole number of 3073-byte records")
    rec = rec.reshape(-1, 3073)
    return rec[:, 1:], rec[:, 0]


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch holds (dicts, lists, bytes and numpy arrays): a file that
    names any other global is refused instead of running it."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch may only contain numpy arrays"
            )
        if module.startswith("numpy.core.") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 moved it
        return super().find_class(module, name)


def _read_python(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One python batch (a pickled dict with ``data`` (N, 3072) uint8 and ``labels``)."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ConfigError(f"data.root: CIFAR-10 batch {name} cannot be read safely: {exc}") from None
    if not isinstance(batch, dict):
        raise ConfigError(f"data.root: CIFAR-10 batch {name} is not a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    x = np.asarray(batch.get("data"), dtype=np.uint8)
    y = np.asarray(batch.get("labels"), dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise ConfigError(f"data.root: CIFAR-10 batch {name} has unexpected shapes {x.shape}, {y.shape}")
    return x, y


cifar10.native_size = 32  # side in pixels when data.image_size is not set (DataConfig.image_shape)
cifar10.class_count = len(CLASSES)  # known without loading (DataConfig.class_count: attack.target's range)
