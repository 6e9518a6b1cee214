"""What the user sees while work runs: ``bibau run``'s progress bars and the sweep's quiet console.

``bibau run`` hands its trial a log function; :class:`RunProgress` is that function. On a
terminal it turns the trial's log lines into a tqdm bar per stage (the attack's training, the
defense, each evaluation), the bar advanced by the ``epoch k/N`` lines every training loop
writes; elsewhere (a file, a pipe, CI) it prints the lines as they come. The trial code stays
plain: it only logs.

:func:`quiet_frameworks` sends what Ray Tune, Ray Train and Optuna print (Tune's experiment
table, its TensorBoard hint, "Checkpoint successfully created" per trial, Optuna's per-trial
INFO lines, the workers' forwarded output) to the sweep's log file instead of the terminal,
while the sweep's own lines go to both.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from . import console

_EPOCH = re.compile(r"^(?P<head>.*?)\bepoch (?P<k>\d+)/(?P<n>\d+)\b:?\s*(?P<rest>.*)$")
_EVAL_START = re.compile(r"^\[eval\] (?P<name>[\w.-]+): running")
_EVAL_END = re.compile(r"^\[eval\] (?P<name>[\w.-]+): (?!running)")
# lines that end the stage a bar shows
_ENDS = ("[attack] trained", "[attack] cache hit", "[defense] done", "[trial] ")
FRAMEWORK_LOGGERS = ("ray.tune", "ray.train", "ray.air", "optuna")
# until a bar has timed one step of its own, it shows no rate or time left: a bar opens on the
# first "epoch k/N" line, so a rate then would divide the k epochs already done by no time at all
NO_RATE_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class RunProgress:
    """A log function: bars on a terminal, plain lines otherwise (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None, bars: bool | None = None):
        self.stream = stream or sys.stdout
        if bars is None:
            bars = _isatty(self.stream) and _isatty(sys.stderr)
        self.bars = bars
        self.stage = ""
        self.bar = None
        self.bar_key: str | None = None

    def __call__(self, line: str) -> None:
        if not self.bars:
            print(line, file=self.stream, flush=True)
            return
        from tqdm import tqdm

        self._stage_of(line)
        m = _EPOCH.match(line)
        if m:
            k, n = int(m["k"]), int(m["n"])
            key = " ".join(x for x in (self.stage, m["head"].strip().strip("[]")) if x)
            if self.bar is None or self.bar_key != key or k <= self.bar.n or self.bar.total != n:
                self._close()
                self.bar = tqdm(total=n, initial=k, desc=key or "epochs", unit="epoch", leave=False,
                                dynamic_ncols=True, bar_format=NO_RATE_FORMAT)
                self.bar_key = key
            elif k > self.bar.n:  # a step timed by this bar: its rate means something now
                self.bar.bar_format = None
                self.bar.update(k - self.bar.n)
                self.bar.refresh()
            self.bar.set_postfix_str(m["rest"][:60])
            return
        start = _EVAL_START.match(line)
        if start:  # no epochs to count: a bar that shows the evaluation runs, and for how long
            self._close()
            self.bar = tqdm(total=None, desc=f"eval {start['name']}", leave=False, dynamic_ncols=True,
                            bar_format="{desc}: running {elapsed}")
            self.bar_key = f"eval {start['name']}"
            return
        if _EVAL_END.match(line) or line.startswith(_ENDS):
            self._close()
        tqdm.write(line, file=self.stream)

    def _stage_of(self, line: str) -> None:
        if line.startswith("[attack] cache miss"):
            self.stage = "training" if self.stage != "clean reference" else "clean reference training"
        elif line.startswith("[defense]") and not line.startswith("[defense] done"):
            self.stage = "defense"
        elif line.startswith("[eval] clean reference"):
            self.stage = "clean reference"
        elif line.startswith(("[eval]", "[qra]", "[bec]")):
            self.stage = "eval"

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_key = None, None

    def close(self) -> None:
        self._close()


def plain_output(stream: TextIO | None = None) -> bool:
    """Off a terminal (a file, a pipe, CI), ask the libraries that colour their output (Ray's
    worker prefixes, anything honouring NO_COLOR) for plain text, so logs hold no ANSI codes.
    Returns whether the output is plain. Set before Ray or a library reads it (``cli.main``)."""
    import os

    if _isatty(stream or sys.stdout):
        return False
    os.environ.setdefault("NO_COLOR", "1")
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    return True


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def quiet_frameworks(logfile: Path, log: Callable[[str], None] = print) -> Iterator[Callable[[str], None]]:
    """Inside: stdout, stderr and the loggers of Ray Tune/Train and Optuna go to ``logfile``
    (appended); yields ``say``, which writes a line to the user's terminal (through ``log``) and
    to the file. Everything is restored on exit."""
    logfile = Path(logfile)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    terminal = sys.stdout
    with open(logfile, "a", buffering=1) as fh:
        def say(message: str) -> None:
            # stdout is redirected to the file in here: the user's line goes to the real console,
            # whatever ``log`` prints with
            with contextlib.redirect_stdout(terminal):
                log(message)
            fh.write(message + "\n")

        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        saved = []
        for name in FRAMEWORK_LOGGERS:
            lg = logging.getLogger(name)
            saved.append((lg, lg.handlers[:], lg.propagate))
            lg.handlers = [handler]
            lg.propagate = False
        previous = console.CONSOLE
        console.CONSOLE = say
        try:
            with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                yield say
        finally:
            console.CONSOLE = previous
            for lg, handlers, propagate in saved:
                lg.handlers, lg.propagate = handlers, propagate
