"""Display names: how an attack, a defense or a metric is written where a person reads it (the
report's tables, the figures, the terminal). Identifiers (``bibau_u``, ``badnets``) stay in files
a program reads (CSV, YAML, MLflow tags).

One table for every registered implementation; a plugin gives its own with a ``display_name``
class attribute, and anything else is shown as its identifier. A spec label built from a name
(``badnets+digits+small_resnet``) keeps its suffix after the name's display form.
"""
from __future__ import annotations

DISPLAY = {
    # defenses: the paper's and the baselines' own spellings
    "bibau_u": "BI-BAU (U)",
    "bibau_t": "BI-BAU (T)",
    "bibau_u_kd": "BI-BAU (U) + KD",
    "bibau_t_kd": "BI-BAU (T) + KD",
    "bibau_clip_u": "BI-BAU-CLIP (U)",
    "bibau_clip_t": "BI-BAU-CLIP (T)",
    "ft": "FT",
    "anp": "ANP",
    "clp": "CLP",
    "ep": "EP",
    "ibu": "IBU",
    "nc": "NC",
    "rnp": "RNP",
    "btidbf_u": "BTI-DBF (U)",
    "cleanclip": "CleanCLIP",
    # attacks
    "badnets": "BadNets",
    "blended": "Blended",
    "sig": "SIG",
    "refool": "Refool",
    "wanet": "WaNet",
    "adaptive_blend": "Adaptive-Blend",
    "adaptive_patch": "Adaptive-Patch",
    "badclip": "BadCLIP",
    "clean": "Clean (no attack)",
    # metrics
    "ca": "CA",
    "asr": "ASR",
    "r_asr": "R-ASR",
    "q_asr": "Q-ASR",
    "bec": "BEC",
}


def _plugin_name(name: str) -> str | None:
    from trainables.registry import ATTACKS, DEFENSES

    for registry in (DEFENSES, ATTACKS):
        try:
            if name in registry:
                shown = getattr(registry.get(name), "display_name", None)
                return shown if isinstance(shown, str) and shown else None
        except Exception:  # a broken plugin must not break a table
            return None
    return None


def display(name: str | None) -> str:
    """The display form of an attack, defense or metric identifier, or of a spec label made from one."""
    if not name:
        return ""
    if name in DISPLAY:
        return DISPLAY[name]
    head, sep, rest = name.partition("+")
    if sep and head in DISPLAY:
        return f"{DISPLAY[head]}+{rest}"
    return _plugin_name(name) or name
