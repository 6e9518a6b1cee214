"""Defenses: a Defense subclass per method, registered in DEFENSES (BI-BAU, FT, the IBU reference, the
baselines NC, BTI-DBF(U), ANP, EP, RNP, CLP, I-BAU, SAU, PAM, FST; for a CLIP: CleanCLIP and BI-BAU-CLIP)."""
from ..config import build
from ..registry import DEFENSES
from . import (anp, bibau, bibau_clip, btidbf, cleanclip, clp, ep, finetune, fst, ibau, nc, pam, rnp,  # noqa: F401
               sau)  # (fill the registry)
from .base import Defense, DefenseConfig, DefenseContext, DefenseResult


def build_defense(cfg: DefenseConfig) -> Defense:
    """The registered defense named by ``cfg.name``, configured by its own Config class."""
    impl = DEFENSES.get(cfg.name)
    if not isinstance(cfg, impl.Config):
        cfg = build(DefenseConfig, cfg, "defense", registry=DEFENSES)
    return impl(cfg)


__all__ = ["Defense", "DefenseConfig", "DefenseContext", "DefenseResult", "build_defense"]
