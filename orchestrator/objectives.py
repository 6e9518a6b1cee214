"""The objectives of a sweep: what every study optimises (a metric of the trial report, max or
min), with the reference point of the hypervolume and the ideal the export rule measures
distances to. A new objective is a metric an evaluation reports (``trainables/evaluation/``);
its words for tables and figures go in ``figures.py`` and ``report_tables.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainables.config import Config, param

@dataclass
class Objective(Config):
    metric: str = param(help="a metric of the trial report (ca, asr, r_asr, q_asr, bec, ...)")
    mode: str = param(help="max or min", choices=("max", "min"))
    ref: float | None = param(None, "worst value that still counts, the hypervolume's reference point; "
                              "None: 0 for max, 1 for min (rates in [0, 1])")
    ideal: float | None = param(None, "best possible value, for 'nearest to the ideal'; None: 1 for max, 0 for min")

    @property
    def reference(self) -> float:
        return self.ref if self.ref is not None else (0.0 if self.mode == "max" else 1.0)

    @property
    def best(self) -> float:
        return self.ideal if self.ideal is not None else (1.0 if self.mode == "max" else 0.0)


DEFAULT_OBJECTIVES = [
    {"metric": "ca", "mode": "max"},
    {"metric": "r_asr", "mode": "min"},
    {"metric": "q_asr", "mode": "min"},
]
