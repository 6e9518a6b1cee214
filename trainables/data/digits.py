"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), upsampled to 32x32 RGB.

It needs no file and no network, so a fresh machine can run every stage offline. Digits are
not mirror-symmetric, so horizontal flips are off. The 80/20 train/test split is stratified
with a fixed seed (independent of ``data.seed``, which only draws subsets). Normalisation
statistics are computed from the training split. It decodes in milliseconds and is not cached.
"""
from __future__ import annotations

import numpy as np
import torch

from ..registry import DATASETS
from .base import Dataset, DataConfig, ImageSet
from .decode import assemble, resize
from .splits import seeded_generator, stratified_subset

TEST_FRACTION = 0.2
_SPLIT_SEED = 0


@DATASETS.register("digits")
def digits(cfg: DataConfig) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values are 0..16
    x = torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()
    size = cfg.image_size or digits.native_size
    x = resize(x, (size, size))
    y = torch.from_numpy(bunch.target).long()
    test = stratified_subset(y, round(TEST_FRACTION * len(y)), seeded_generator(_SPLIT_SEED, "digits_test"))
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[test] = True
    train = torch.nonzero(~is_test).flatten()
    return assemble(
        "digits", ImageSet(x[train], y[train]), ImageSet(x[test], y[test]), [str(i) for i in range(10)],
        hflip=False, info={"source": "sklearn.datasets.load_digits", "cache_hit": None},
    )


digits.unused_fields = ("root", "download", "cache_dir")  # bundled with scikit-learn, decoded in ms, not cached
digits.native_size = 32  # side in pixels when data.image_size is not set (DataConfig.image_shape)
digits.class_count = 10  # classes, known without loading (DataConfig.class_count: attack.target's range)
