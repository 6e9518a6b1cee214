"""Everything that runs inside a trial: data, models, attacks, defenses, evaluation, and the
thin Ray adapters. Importing the package fills the registries."""
from . import attacks, data, defenses, evaluation, models  # noqa: F401  (fill the registries)
from .registry import ATTACKS, DATASETS, DEFENSES, EVALUATIONS, MODELS  # noqa: F401
