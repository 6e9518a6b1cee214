"""Tiny-ImageNet-200: 200 classes, 64x64 RGB, 100,000 training and 10,000 validation images (the
validation set serves as the test split; the official test set has no labels).

Layout (``data.root`` or its ``tiny-imagenet-200/``): ``wnids.txt``, ``train/<wnid>/images/*.JPEG``
and ``val/images/*.JPEG`` labelled by ``val/val_annotations.txt`` (tab-separated file name and
wnid), or a ``val/<wnid>/[images/]*.JPEG`` tree. Labels follow the sorted wnids (the order
ImageFolder gives ``train/``); class names are the wnids.
"""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from ..registry import DATASETS
from .base import Dataset, DataConfig
from .cache import cached, source_signature
from .decode import Collector, assemble, class_folders, list_images, resized
from .sources import find_root

MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2302, 0.2265, 0.2262)

ACCEPTED = (
    "tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG with "
    "val/val_annotations.txt, or val/<wnid>/*.JPEG)"
)


def detect(path: Path) -> dict | None:
    if not path.is_dir():
        return None
    for base in (path, path / "tiny-imagenet-200"):
        train, val = base / "train", base / "val"
        if not (train.is_dir() and val.is_dir() and class_folders(train)):
            continue
        if (val / "val_annotations.txt").is_file() and (val / "images").is_dir():
            return {"base": base, "val": "annotations"}
        if any(d.name != "images" for d in class_folders(val)):
            return {"base": base, "val": "folders"}
    return None


def _images_of(folder: Path) -> list[Path]:
    return list_images(folder / "images" if (folder / "images").is_dir() else folder)


@DATASETS.register("tiny-imagenet")
def tiny_imagenet(cfg: DataConfig) -> Dataset:
    root, layout = find_root(cfg, "tiny-imagenet", detect, patterns=["tiny-imagenet*", "tiny_imagenet*"],
                             accepted=ACCEPTED)
    size = cfg.image_size or tiny_imagenet.native_size
    key = {"source": source_signature(layout["base"])}
    native = lambda: cached(cfg, "tiny-imagenet", {**key, "image_size": 64}, lambda: _decode(layout, 64))  # noqa: E731
    if size == 64:
        return native()
    return cached(cfg, "tiny-imagenet", {**key, "image_size": size}, lambda: resized(native(), size))


tiny_imagenet.unused_fields = ("download",)  # nothing to download it from: a given download: true would be ignored


def _decode(layout: dict, size: int) -> Dataset:
    base: Path = layout["base"]
    if (base / "wnids.txt").is_file():
        wnids = sorted({line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip()})
    else:
        wnids = [d.name for d in class_folders(base / "train")]
    label_of = {w: i for i, w in enumerate(wnids)}

    def label(wnid: str, where: Path) -> int:
        if wnid not in label_of:
            raise ConfigError(f"data.root: {where} names class {wnid!r}, which is not in wnids.txt")
        return label_of[wnid]

    train = Collector()
    for folder in class_folders(base / "train"):
        train.add_files(_images_of(folder), label(folder.name, folder))
    test = Collector()
    val = base / "val"
    if layout["val"] == "annotations":
        for line in (val / "val_annotations.txt").read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2:
                test.add(val / "images" / fields[0], label(fields[1], val / "val_annotations.txt"), (fields[0],))
    else:
        for folder in class_folders(val):
            test.add_files(_images_of(folder), label(folder.name, folder))
    return assemble(
        "tiny-imagenet", train.image_set(size, "tiny-imagenet train"), test.image_set(size, "tiny-imagenet val"),
        wnids, hflip=True, mean=MEAN, std=STD, info={"source": str(base), "layout": layout["val"]},
    )


tiny_imagenet.native_size = 64  # side in pixels when data.image_size is not set (DataConfig.image_shape)
tiny_imagenet.class_count = 200  # classes, known without loading (DataConfig.class_count: attack.target's range)
