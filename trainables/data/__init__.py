"""Data sets as uint8 (N, C, H, W) tensors, seeded stratified splits, and the on-device batch
iterator. Importing the package registers cifar10, gtsrb, tiny-imagenet, imagefolder and digits."""
from . import cifar10, digits, folder, gtsrb, tiny_imagenet  # noqa: F401  (fill DATASETS)
from .base import Dataset, DataConfig, ImageSet
from .batches import batches, random_crop, random_flip
from .load import load_dataset
from .sources import DataNotFoundError
from .splits import defender_split, seeded_generator, stratified_subset

__all__ = [
    "DataConfig", "DataNotFoundError", "Dataset", "ImageSet", "batches", "defender_split", "load_dataset",
    "random_crop", "random_flip", "seeded_generator", "stratified_subset",
]
