"""The MLflow client the driver reads and writes with: retried with backoff on transient errors
(a server restarting, SQLite locked by another sweep), so they cost time, not runs.
"""
from __future__ import annotations

import time

from .console import echo

_TRANSIENT = ("database is locked", "connection", "temporarily unavailable", "timed out", "timeout",
              "max retries exceeded", "502", "503", "504", "bad gateway", "service unavailable", "reset by peer")


def transient(exc: BaseException) -> bool:
    """An MLflow failure that waiting can cure: the server restarting, SQLite locked by another sweep."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = str(getattr(exc, "error_code", ""))
    if code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(t in text for t in _TRANSIENT)


class RetryingClient:
    """An ``MlflowClient`` whose calls are retried with exponential backoff on transient errors
    (on top of MLflow's own HTTP retries), so a server restart or a busy SQLite file costs time,
    not runs. ``MLFLOW_RETRY_S`` bounds the total wait (default 300 s)."""

    def __init__(self, client, budget_s: float | None = None, first_s: float = 0.5):
        import os

        self._client = client
        self._budget_s = float(os.environ.get("BIBAU_MLFLOW_RETRY_S", 300)) if budget_s is None else budget_s
        self._first_s = first_s

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            deadline = time.monotonic() + self._budget_s
            delay = self._first_s
            while True:
                try:
                    return attr(*args, **kwargs)
                except Exception as exc:
                    if not transient(exc) or time.monotonic() + delay > deadline:
                        raise
                    echo(f"MLflow: {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                         f"retrying in {delay:.1f}s")
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)

        return call
