"""Any image-classification tree: ``train/<class>/*`` and ``test/<class>/*`` (``val/`` if there is
no ``test/``), as a folder or a tar archive. Labels follow the sorted class-folder names (as
torchvision's ImageFolder does); images are kept at their size unless ``data.image_size`` is
set (required when sizes differ). Horizontal flips are allowed (``train.hflip: false`` turns
them off); normalisation statistics are computed from the training split."""
from __future__ import annotations

import tarfile
from pathlib import Path

from ..registry import DATASETS
from .base import Dataset, DataConfig
from .cache import cached, source_signature
from .decode import assemble, read_tree, read_tree_archive
from .sources import DataNotFoundError, find_root

ACCEPTED = "a folder with train/<class>/<image> and test/<class>/<image> (or val/), or a tar archive of one"


def detect(path: Path) -> tuple[str, str] | None:
    if path.is_file():
        return ("archive", "") if tarfile.is_tarfile(path) else None
    if path.is_dir() and (path / "train").is_dir():
        for test in ("test", "val"):
            if (path / test).is_dir():
                return "tree", test
    return None


@DATASETS.register("imagefolder")
def imagefolder(cfg: DataConfig) -> Dataset:
    if cfg.root is None:
        raise DataNotFoundError(f"data.root: required for imagefolder; accepted: {ACCEPTED}")
    root, (kind, test) = find_root(cfg, "imagefolder", detect, patterns=[], accepted=ACCEPTED)
    key = {"source": source_signature(root), "image_size": cfg.image_size}
    return cached(cfg, "imagefolder", key, lambda: _decode(root, kind, test, cfg.image_size))


imagefolder.unused_fields = ("download",)  # nothing to download it from: a given download: true would be ignored


def _decode(root: Path, kind: str, test: str, size: int | None) -> Dataset:
    if kind == "tree":
        trees, classes = read_tree(root, ("train", test))
    else:
        trees, classes, _ = read_tree_archive(root, ("train", "test", "val"))
        test = "test" if len(trees["test"]) else "val"
    what = f"imagefolder {root}"
    return assemble(
        "imagefolder", trees["train"].image_set(size, f"{what} train"), trees[test].image_set(size, f"{what} {test}"),
        classes, hflip=True, info={"source": str(root), "layout": kind},
    )
