"""``load_dataset``: the registered loader's full data set, cut to the configured subsets."""
from __future__ import annotations

from typing import Mapping

from ..config import build
from ..registry import DATASETS
from .base import Dataset, DataConfig
from .splits import take_subsets


def load_dataset(cfg: DataConfig | Mapping) -> Dataset:
    """The data set ``cfg.name`` as CPU uint8 tensors at ``cfg.image_size``, with seeded,
    stratified ``train_size``/``test_size`` subsets.

    Registered loaders (``@DATASETS.register``) return the whole data set (cached on disk after
    the first decode); subsets are drawn here, so every size shares one cache file.
    """
    if not isinstance(cfg, DataConfig):
        cfg = build(DataConfig, cfg, "data")
    full = DATASETS.get(cfg.name)(cfg)
    return take_subsets(full, cfg)


def locate_dataset(cfg: DataConfig | Mapping) -> str:
    """Where ``cfg``'s data would be read from, without decoding it; a ConfigError naming
    ``data.root`` when nothing usable is there. A loader that reads no files (digits) just runs."""
    from .sources import Located, locate_only

    if not isinstance(cfg, DataConfig):
        cfg = build(DataConfig, cfg, "data")
    with locate_only():
        try:
            DATASETS.get(cfg.name)(cfg)
        except Located as found:
            return str(found.path) if found.path is not None else "(to be downloaded)"
    return "(built in)"
