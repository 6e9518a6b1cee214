"""From image files to uint8 tensors: decoding (Pillow), batched resizing, ImageFolder trees and
tar archives of them, and the finishing steps every loader shares."""
from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import ConfigError
from .base import Dataset, ImageSet

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

# The stored order is shuffled once with this fixed seed so that any prefix of a split mixes
# the classes (decoding yields them class by class).
_ORDER_SEED = 0


def is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return not base.startswith(".") and PurePosixPath(base).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image(p.name))


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def decode_image(source: Path | bytes) -> np.ndarray:
    """(H, W, 3) uint8; grey and palette images become RGB."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return np.asarray(im.convert("RGB"))


def resize(x: torch.Tensor, size: tuple[int, int], chunk: int = 2048) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 (N, C, H, W) images, batched, back to uint8."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    out = torch.empty((len(x), x.shape[1], *size), dtype=torch.uint8)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].float()
        part = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


class Collector:
    """Decoded images of one split with their labels, stacked to one size at the end.

    Each image carries a sort key so that the result does not depend on the order in which a
    folder listing or an archive yields the files.
    """

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.labels: list[int] = []
        self.keys: list[tuple] = []

    def __len__(self) -> int:
        return len(self.arrays)

    def add(self, source: Path | bytes, label: int, key: tuple) -> None:
        self.add_array(decode_image(source), label, key)

    def add_array(self, array: np.ndarray, label: int, key: tuple) -> None:
        self.arrays.append(array)
        self.labels.append(int(label))
        self.keys.append(key)

    def add_files(self, files: Iterable[Path], label: int) -> None:
        for f in files:
            self.add(f, label, (label, f.name))

    def image_set(self, size: int | None, what: str) -> ImageSet:
        """Stack to (N, 3, size, size); ``size=None`` needs all images to share one size."""
        if not self.arrays:
            raise ConfigError(f"data.root: no images found for {what}")
        order = sorted(range(len(self.arrays)), key=self.keys.__getitem__)
        arrays = [self.arrays[i] for i in order]
        labels = torch.tensor([self.labels[i] for i in order], dtype=torch.int64)
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, a in enumerate(arrays):
            groups[a.shape[:2]].append(i)
        if size is None:
            if len(groups) > 1:
                shapes = ", ".join(f"{h}x{w}" for h, w in sorted(groups)[:5])
                raise ConfigError(
                    f"data.image_size: the images of {what} have different sizes ({shapes}, ...); "
                    "set data.image_size to resize them to one"
                )
            target = next(iter(groups))
        else:
            target = (size, size)
        x = torch.empty((len(arrays), 3, *target), dtype=torch.uint8)
        for shape, idx in groups.items():
            part = torch.from_numpy(np.stack([arrays[i] for i in idx])).permute(0, 3, 1, 2)
            x[torch.tensor(idx)] = resize(part, target)
        return ImageSet(x, labels)


def read_tree(root: Path, splits: Iterable[str], label_of: dict[str, int] | None = None
              ) -> tuple[dict[str, Collector], list[str]]:
    """An ImageFolder tree ``root/<split>/<class>/<image>``: one Collector per split and the class
    names (sorted, unless ``label_of`` fixes the labels)."""
    splits = list(splits)
    out = {s: Collector() for s in splits}
    names = sorted({d.name for s in splits if (root / s).is_dir() for d in class_folders(root / s)})
    labels = label_of or {n: i for i, n in enumerate(names)}
    for split in splits:
        for folder in class_folders(root / split):
            out[split].add_files(list_images(folder), _label(labels, folder.name, split))
    return out, names


def read_tree_archive(path: Path, splits: Iterable[str], label_of: dict[str, int] | None = None,
                      keep: Callable[[str], bool] | None = None
                      ) -> tuple[dict[str, Collector], list[str], dict[str, bytes]]:
    """The same from a tar archive (any compression tarfile knows), read while streaming:
    nothing is written to disk, so member paths cannot escape anywhere.

    Members are matched by their last three path parts ``<split>/<class>/<image>``, so a
    leading folder (``cifar10/train/...``) is fine. Other members whose base name ``keep``
    accepts are returned raw, by base name (e.g. CIFAR-10's python batches).
    """
    splits = list(splits)
    out = {s: Collector() for s in splits}
    raw: list[tuple[str, str, str, bytes]] = []
    extras: dict[str, bytes] = {}
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise ConfigError(f"data.root: {path} is not a readable tar archive: {exc}") from None
    with tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if not member.isfile() or not parts:
                continue
            if keep is not None and keep(parts[-1]):
                fh = tar.extractfile(member)
                if fh is not None:
                    extras[parts[-1]] = fh.read()
                continue
            if len(parts) < 3 or parts[-3] not in out or not is_image(parts[-1]):
                continue
            fh = tar.extractfile(member)
            if fh is not None:
                raw.append((parts[-3], parts[-2], parts[-1], fh.read()))
    names = sorted({cls for _, cls, _, _ in raw})
    labels = label_of or {n: i for i, n in enumerate(names)}
    for split, cls, fname, data in raw:
        label = _label(labels, cls, split)
        out[split].add(data, label, (label, fname))
    return out, names, extras


def _label(labels: dict[str, int], name: str, split: str) -> int:
    try:
        return labels[name]
    except KeyError:
        raise ConfigError(
            f"data.root: class folder {split}/{name} is not one of the data set's classes "
            f"({', '.join(sorted(labels, key=labels.get)[:12])}{', ...' if len(labels) > 12 else ''})"
        ) from None


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (float64 sums, chunked)."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    square = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        square += part.square().sum(dim=(0, 2, 3))
    n = len(x) * x.shape[2] * x.shape[3]
    mean = total / n
    std = (square / n - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def assemble(name: str, train: ImageSet, test: ImageSet, classes: list[str], *, hflip: bool,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             info: dict | None = None) -> Dataset:
    """The finished data set: both splits in a fixed mixed order; ``mean``/``std`` computed
    from the training split when not given."""
    if len(train.y) and int(train.y.max()) >= len(classes) or len(test.y) and int(test.y.max()) >= len(classes):
        raise ConfigError(f"data.root: {name} has labels beyond its {len(classes)} classes")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise ConfigError(
            f"data.image_size: {name} train images are {tuple(train.x.shape[1:])} but test images "
            f"{tuple(test.x.shape[1:])}; set data.image_size to resize both"
        )
    if mean is None or std is None:
        mean, std = channel_stats(train.x)
    g = torch.Generator().manual_seed(_ORDER_SEED)
    train = train.subset(torch.randperm(len(train), generator=g))
    test = test.subset(torch.randperm(len(test), generator=g))
    return Dataset(name=name, train=train, test=test, classes=list(classes), hflip=hflip,
                   mean=tuple(mean), std=tuple(std), info=dict(info or {}))


def resized(ds: Dataset, size: int) -> Dataset:
    """A copy of ``ds`` with both splits resized to ``size`` x ``size`` (statistics kept)."""
    return Dataset(name=ds.name, train=ImageSet(resize(ds.train.x, (size, size)), ds.train.y),
                   test=ImageSet(resize(ds.test.x, (size, size)), ds.test.y), classes=ds.classes,
                   hflip=ds.hflip, mean=ds.mean, std=ds.std, info=dict(ds.info, resized_from=ds.image_shape[1]))
