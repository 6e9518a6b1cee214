"""Evaluation: CA and ASR (metrics.py), RA (retuning.py), QRA (reactivation.py), BEC (bec.py),
run through :func:`evaluate` on an :class:`EvalContext`."""
from . import bec, metrics, reactivation, retuning  # noqa: F401  (fill EVALUATIONS)
from .base import EvalContext, Evaluation, evaluate, run_order  # noqa: F401
