"""The evaluation interface: one context shared by every registered evaluation, run in
dependency order by :func:`evaluate`.

Evaluations reuse each other's intermediate results through ``EvalContext.cache`` (the RA
model is QRA's teacher; BEC's backdoored-model activations serve both comparisons), and the
clean reference model is built only when an evaluation first asks for it.
"""
from __future__ import annotations

import abc
import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..attacks.base import Attack
from ..data.base import Dataset, ImageSet
from ..models.base import Classifier
from ..registry import EVALUATIONS
from ..runtime import prepare_model
from ..schema import EvalConfig

if TYPE_CHECKING:  # a type name only: the tasks sit below the evaluations
    from ..tasks.base import Task


@dataclass
class EvalContext:
    """Everything an evaluation may look at.

    ``model`` is the model under test (purified), ``backdoored`` the attacked model before the
    defense, ``clean_reference`` a zero-argument callable returning a model of the same
    architecture trained without poison (called at most once, only when needed).
    ``attacker_train`` holds the training images a reactivation attacker draws benign samples
    from and triggers; ``poisoned_test`` is ``attack.poison_testset(dataset.test)``. ``task`` is
    the run's setting (``tasks.task_for``): what retunes a model of it (RA).
    """

    model: Classifier
    backdoored: Classifier
    clean_reference: Callable[[], Classifier]
    attack: Attack
    dataset: Dataset
    attacker_train: ImageSet
    poisoned_test: ImageSet
    cfg: EvalConfig
    task: Task
    device: torch.device
    log: Callable[[str], None] = print
    cache: dict[str, Any] = field(default_factory=dict)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` the first time ``key`` is asked for, the stored value afterwards."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def clean_model(self) -> Classifier:
        """The clean reference model on the device, built on first use."""
        return self.cached("clean_model", lambda: prepare_model(self.clean_reference(), self.device).eval())

    def generator(self, purpose: str) -> torch.Generator:
        """A CPU generator seeded by ``cfg.seed`` and ``purpose``: each evaluation draws its own
        stream, so running one does not change another's samples."""
        offset = sum((i + 1) * ord(c) for i, c in enumerate(purpose))  # stable across runs, unlike hash()
        g = torch.Generator()
        g.manual_seed(self.cfg.seed * 1_000_003 + offset)
        return g


@contextlib.contextmanager
def frozen(*models: nn.Module):
    """Eval mode and no parameter gradients inside the block; both restored afterwards, so
    the caller's models come back as they were handed in."""
    saved = []
    for m in models:
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()]))
        m.eval()
        m.requires_grad_(False)
    try:
        yield
    finally:
        for m, training, flags in reversed(saved):
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


class Evaluation(abc.ABC):
    """One registered evaluation; ``evaluate`` returns its metrics as a flat mapping."""

    name: str
    requires: tuple[str, ...] = ()  # evaluations whose cached results this one reuses
    outputs: tuple[str, ...] = ()  # metric names it reports (documentation and sweep objectives)

    @abc.abstractmethod
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """The metrics of ``ctx.model``."""


def run_order(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` with their requirements added, each after what it requires (otherwise in the
    order given); unknown names raise ``UnknownNameError`` listing the known ones."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ValueError(f"evaluation {name!r} requires itself through {sorted(visiting)}")
        visiting.add(name)
        for dep in EVALUATIONS.get(name).requires:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for n in names:
        EVALUATIONS.get(n)  # fail on an unknown name before any work starts
    for n in names:
        visit(n)
    return order


def evaluate(ctx: EvalContext, names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Run the named evaluations (and what they require) and merge their metrics.

    Each evaluation's wall time is reported as ``time_eval_<name>_s``.
    """
    order = run_order(names)
    ctx.model = prepare_model(ctx.model, ctx.device)
    ctx.backdoored = prepare_model(ctx.backdoored, ctx.device)
    out: dict[str, float] = {}
    for name in order:
        ctx.log(f"[eval] {name}: running")  # minutes for ra/qra/bec: say so before, not only after
        start = time.perf_counter()
        metrics = EVALUATIONS.get(name)().evaluate(ctx)
        seconds = time.perf_counter() - start
        out.update(metrics)
        out[f"time_eval_{name}_s"] = seconds
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        ctx.log(f"[eval] {name}: {shown} ({seconds:.1f}s)")
    return out
