"""Backdoor attacks: the base class and one module per attack. Importing the package
registers every attack."""
from __future__ import annotations

from ..config import build
from ..registry import ATTACKS
from . import adaptive_blend, adaptive_patch, badclip, badnets, blended, clean, iad, issba, narcissus, refool, sig, wanet  # noqa: F401  (fill ATTACKS)
from .base import Attack, AttackConfig, to_float, to_uint8  # noqa: F401


def build_attack(cfg: AttackConfig, dataset) -> Attack:
    """The attack ``cfg`` names, configured for ``dataset``'s image shape and class count."""
    cls = ATTACKS.get(cfg.name)
    if not isinstance(cfg, cls.Config):  # a base AttackConfig: rebuild with the attack's own fields
        cfg = build(AttackConfig, cfg.to_dict(), "attack", registry=ATTACKS)
    return cls(cfg, dataset.image_shape, dataset.num_classes)
