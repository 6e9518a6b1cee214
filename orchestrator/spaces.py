"""Search spaces: the distribution one hyperparameter of a tuned defense is searched over
(a sweep spec's ``defenses[i].space``), checked before any work and turned into Optuna's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainables.config import Config, ConfigError, param

@dataclass
class ParamSpace(Config):
    """The distribution one hyperparameter of a tuned defense is searched over."""

    type: str = param("float", "distribution", choices=("float", "int", "categorical"))
    low: float | None = param(None, "lower bound, inclusive (float, int)")
    high: float | None = param(None, "upper bound, inclusive (float, int)")
    log: bool = param(False, "sample uniformly in log space (float, int; needs low > 0)")
    step: float | None = param(None, "grid step (float, int); None: continuous floats, steps of 1 for ints",
                               low=0.0, low_open=True)
    choices: list[Any] | None = param(None, "the values to choose from (categorical)")

    def check(self, path: str) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ConfigError(f"{path}.choices: a categorical parameter needs a non-empty list of choices")
            for key in ("low", "high", "step"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"{path}.{key}: not used by a categorical parameter (give choices only)")
            if self.log:
                raise ConfigError(f"{path}.log: not used by a categorical parameter")
            for i, c in enumerate(self.choices):
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise ConfigError(f"{path}.choices[{i}]: {c!r}; allowed: numbers, strings, booleans, null")
            return
        if self.choices is not None:
            raise ConfigError(f"{path}.choices: only for type categorical (this one is {self.type})")
        for key in ("low", "high"):
            if getattr(self, key) is None:
                raise ConfigError(f"{path}.{key}: required for a {self.type} parameter")
        if not self.low < self.high:
            raise ConfigError(f"{path}.high: {self.high} must be greater than low ({self.low})")
        if self.log and self.low <= 0:
            raise ConfigError(f"{path}.low: {self.low} must be > 0 with log: true")
        if self.log and self.step is not None:
            raise ConfigError(f"{path}.step: a log-scale parameter has no step")
        if self.type == "int":
            for key in ("low", "high", "step"):
                v = getattr(self, key)
                if v is not None and not float(v).is_integer():
                    raise ConfigError(f"{path}.{key}: {v} is not an integer (type: int)")

    def endpoints(self) -> list[Any]:
        """The values whose validity implies every sampled value's (bounds, or every choice)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high)]

    def distribution(self):
        """The Optuna distribution (Optuna is a driver-side dependency only)."""
        import optuna

        if self.type == "categorical":
            return optuna.distributions.CategoricalDistribution(list(self.choices))
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log,
                                                        step=int(self.step or 1))
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                                      step=self.step)
