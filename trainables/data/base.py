"""What every data set gives: uint8 image tensors (N, C, H, W) with labels and class names."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field

import torch

from ..config import Config, ConfigError, param
from ..registry import DATASETS


@dataclass
class ImageSet:
    """One split: images as uint8 (N, C, H, W) in 0..255, labels as int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dim() != 1 or len(self.y) != len(self.x):
            raise ValueError(f"labels must be (N,) with N={len(self.x)}, got {tuple(self.y.shape)}")
        self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = index.to(self.x.device)
        return ImageSet(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> "ImageSet":
        return ImageSet(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True))

    def poisoned_copy(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, target: int | None,
                      generator: torch.Generator) -> "ImageSet":
        """This set with images ``x`` and labels ``y`` after an attack poisoned the rows at ``index``
        toward ``target`` (None: clean-label). Image-caption pairs (``captions.PairSet``) also pair
        those rows with a target caption; plain images need nothing more."""
        return ImageSet(x, y)

    def fingerprint(self) -> str:
        """A content hash of images and labels (identifies the exact data a model saw)."""
        h = hashlib.sha256()
        h.update(self.x.cpu().contiguous().numpy().tobytes())
        h.update(self.y.cpu().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class Dataset:
    """A loaded data set: both splits, the class names and what augmentation suits it."""

    name: str
    train: ImageSet
    test: ImageSet
    classes: list[str]
    hflip: bool = True  # horizontal flips keep the label (false for digits, traffic signs)
    mean: tuple[float, ...] | None = None  # per-channel normalisation the models use; None: CIFAR-10's
    std: tuple[float, ...] | None = None
    info: dict = field(default_factory=dict)  # where it came from (root, archive, cache file)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        return hashlib.sha256(
            (self.train.fingerprint() + self.test.fingerprint()).encode()
        ).hexdigest()[:16]


@dataclass
class DataConfig(Config):
    name: str = param("cifar10", "registered data set", registry=DATASETS)
    root: str | None = param(None, "folder or .tar.xz archive holding the data; None: the data set's default place")
    download: bool = param(False, "allow torchvision to download when the data is missing (never by default)")
    cache_dir: str | None = param(None, "where decoded uint8 arrays are cached; None: ~/.cache/bibau/data")
    image_size: int | None = param(None, "resize images to this side length in pixels; None: the data set's own", low=8)
    train_size: int | None = param(None, "images drawn from the training split, stratified; None: all", low=1)
    test_size: int | None = param(None, "images drawn from the test split, stratified; None: all", low=1)
    clean_fraction: float = param(0.05, "defender's clean split, as a fraction of the training images; disjoint from poison", low=0.0, high=0.9)
    seed: int = param(0, "seed of the subsets and of the defender's split", low=0)

    def check(self, path: str) -> None:
        # a setting the loader never reads would be silently ignored: a user who gives data.root to
        # digits believes their files are used
        loader = DATASETS.get(self.name) if self.name in DATASETS else None
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in getattr(loader, "unused_fields", ()):
            value = getattr(self, name)
            if value != defaults[name]:
                raise ConfigError(f"{path + '.' if path else ''}{name}: {value!r} is not used by data set {self.name!r} "
                                  "(it would be silently ignored); remove it")

    def image_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of the images this config loads, known without loading them: every data set
        is RGB (grey ones are replicated), the side is ``image_size`` or the data set's own
        (``native_size`` of its loader); None for an image folder kept at its files' sizes."""
        side = self.image_size or getattr(DATASETS.get(self.name), "native_size", None)
        return None if side is None else (3, side, side)

    def class_count(self) -> int | None:
        """How many classes this config's data set has, known without loading it (``class_count``
        of its loader); None when only its files can tell (an image folder)."""
        return getattr(DATASETS.get(self.name), "class_count", None) if self.name in DATASETS else None
