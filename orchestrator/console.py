"""The user's terminal while a sweep runs: :func:`echo` writes a line there. The sweep points
``CONSOLE`` at its own writer while Tune's and Optuna's output goes to its log file
(``progress.quiet_frameworks``); the tracking and the trial logging echo through it. A leaf.
"""
from __future__ import annotations

from typing import Any

CONSOLE: "Any" = None  # set by the sweep while it sends Tune's and Optuna's chatter to its log file


def echo(message: str) -> None:
    """A line for the user's terminal (the sweep's progress, MLflow trouble)."""
    (CONSOLE or print)(message)
