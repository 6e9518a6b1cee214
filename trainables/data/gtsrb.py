"""GTSRB, the German traffic-sign benchmark: 43 classes, images of varying size resized to 32x32.

Layouts read (under ``data.root``, or its ``GTSRB/``, ``gtsrb/`` or ``gtsrb/GTSRB/`` folder):
- the official release: ``Final_Training/Images/<00000..00042>/*.ppm`` (torchvision's download:
  ``Training/<class>/*.ppm``) and ``Final_Test/Images/*.ppm`` labelled by ``GT-final_test.csv``
  (semicolon-separated, ``Filename`` and ``ClassId``; looked for in the test folder, the base,
  or beside it);
- ImageFolder variants: ``train/<class id>/*`` and ``test/<class id>/*`` (or ``Train``/``Test``;
  a flat ``Test/`` folder labelled by a ``Test.csv`` with ``Path`` and ``ClassId`` columns).
Whole images are used (the ROI columns are ignored, as BackdoorBench does). Signs are not
mirror-symmetric (left/right turn), so horizontal flips are off. BackdoorBench does not
normalise GTSRB; here the per-channel mean/std of the training split are used, so the models'
inputs are standardised like those of the other data sets.
"""
from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from ..config import ConfigError
from ..registry import DATASETS
from .base import Dataset, DataConfig
from .cache import cached, source_signature
from .decode import Collector, assemble, class_folders, list_images
from .sources import find_root

CLASSES = [
    "speed limit 20", "speed limit 30", "speed limit 50", "speed limit 60", "speed limit 70",
    "speed limit 80", "end of speed limit 80", "speed limit 100", "speed limit 120", "no passing",
    "no passing for vehicles over 3.5 t", "right-of-way at the next intersection", "priority road",
    "yield", "stop", "no vehicles", "vehicles over 3.5 t prohibited", "no entry", "general caution",
    "dangerous curve to the left", "dangerous curve to the right", "double curve", "bumpy road",
    "slippery road", "road narrows on the right", "road work", "traffic signals", "pedestrians",
    "children crossing", "bicycles crossing", "beware of ice/snow", "wild animals crossing",
    "end of all speed and passing limits", "turn right ahead", "turn left ahead", "ahead only",
    "go straight or right", "go straight or left", "keep right", "keep left", "roundabout mandatory",
    "end of no passing", "end of no passing by vehicles over 3.5 t",
]

ACCEPTED = (
    "the official layout (Final_Training/Images/<00000..00042>/*.ppm, Final_Test/Images/*.ppm "
    "with GT-final_test.csv), torchvision's (GTSRB/Training/..., GTSRB/Final_Test/Images), or "
    "train/<class id>/* with test/<class id>/* (or a flat Test/ with Test.csv)"
)

_TRAIN_DIRS = ("Final_Training/Images", "Training", "train", "Train")
_TEST_DIRS = ("Final_Test/Images", "test", "Test")


def _numbered(folder: Path) -> list[Path]:
    return [d for d in class_folders(folder) if d.name.isdigit()]


def detect(path: Path) -> dict | None:
    if not path.is_dir():
        return None
    for base in (path, path / "GTSRB", path / "gtsrb", path / "gtsrb" / "GTSRB"):
        train = next((base / d for d in _TRAIN_DIRS if (base / d).is_dir() and _numbered(base / d)), None)
        test = next((base / d for d in _TEST_DIRS if (base / d).is_dir()), None)
        if train is None or test is None:
            continue
        if _numbered(test):
            return {"train": train, "test": test, "test_csv": None}
        for csv_path in (test / "GT-final_test.csv", base / "GT-final_test.csv", base.parent / "GT-final_test.csv",
                         base / "Final_Test" / "GT-final_test.csv", base / "Test.csv", path / "GT-final_test.csv"):
            if csv_path.is_file():
                return {"train": train, "test": test, "test_csv": csv_path}
    return None


def _download(dest: Path) -> None:
    from torchvision.datasets import GTSRB

    for split in ("train", "test"):
        GTSRB(str(dest), split=split, download=True)


@DATASETS.register("gtsrb")
def gtsrb(cfg: DataConfig) -> Dataset:
    root, layout = find_root(cfg, "gtsrb", detect, patterns=["gtsrb*", "GTSRB*"], accepted=ACCEPTED,
                             download=_download)
    size = cfg.image_size or gtsrb.native_size
    key = {"source": source_signature(root), "image_size": size}
    return cached(cfg, "gtsrb", key, lambda: _decode(root, layout, size))


def _class_id(name: str, where: Path) -> int:
    label = int(name)
    if label >= len(CLASSES):
        raise ConfigError(f"data.root: {where} has class {label}; GTSRB has classes 0..{len(CLASSES) - 1}")
    return label


def _decode(root: Path, layout: dict, size: int) -> Dataset:
    train = Collector()
    for folder in _numbered(layout["train"]):
        train.add_files(list_images(folder), _class_id(folder.name, folder))
    test = Collector()
    if layout["test_csv"] is None:
        for folder in _numbered(layout["test"]):
            test.add_files(list_images(folder), _class_id(folder.name, folder))
    else:
        for fname, label in _test_labels(layout["test_csv"]):
            image = layout["test"] / PurePosixPath(fname).name
            if not image.is_file():
                raise ConfigError(f"data.root: {layout['test_csv']} lists {fname}, missing from {layout['test']}")
            test.add(image, _class_id(label, layout["test_csv"]), (image.name,))
    return assemble(
        "gtsrb", train.image_set(size, "gtsrb train"), test.image_set(size, "gtsrb test"), CLASSES,
        hflip=False, info={"source": str(root), "layout": {k: str(v) for k, v in layout.items()}},
    )


def _test_labels(path: Path) -> list[tuple[str, str]]:
    """(file name, class id) rows of GT-final_test.csv (';') or Kaggle's Test.csv (',')."""
    with open(path, newline="") as fh:
        header = fh.readline()
        fh.seek(0)
        rows = list(csv.DictReader(fh, delimiter=";" if ";" in header else ","))
    name_key = "Filename" if rows and "Filename" in rows[0] else "Path"
    if not rows or name_key not in rows[0] or "ClassId" not in rows[0]:
        raise ConfigError(f"data.root: {path} needs Filename (or Path) and ClassId columns")
    return [(r[name_key], r["ClassId"].strip()) for r in rows]


gtsrb.native_size = 32  # side in pixels when data.image_size is not set (DataConfig.image_shape)
gtsrb.class_count = len(CLASSES)  # known without loading (DataConfig.class_count: attack.target's range)
