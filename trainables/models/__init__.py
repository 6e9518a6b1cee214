"""Classifiers: inputs in [0, 1], normalisation inside, ``features()`` and ``head`` exposed.
Importing the package registers every model."""
from . import clip_vit, preact_resnet, resnet, vgg  # noqa: F401  (fill MODELS)
from .base import CIFAR10_MEAN, CIFAR10_STD, Classifier, ModelConfig, create_model, init_weights  # noqa: F401
