"""MLflow layout of a sweep, the public face of the tracking modules (nothing in ``orchestrator``
imports this one; each imports the part it needs):

- ``tracking_read.py``   reading a sweep back: records, configs, replicates, ``open_sweep``, the UI's addresses
- ``tracking_write.py``  writing it: :class:`SweepTracker` (the experiment, parent, attack and trial runs)
- ``fronts.py``          the sweep's end: Pareto tags, fronts, figures, picks, the runs closed
- ``tracking_callback.py`` the Tune callback that logs each trial from the driver, the progress line
- ``mlflow_client.py``   the retrying MLflow client; ``console.py`` the user's terminal line

One experiment per spec; per sweep a parent run, under it a run per attack, and under each attack
run a child run per trial (see ``tracking_write.py``). Kept for the names tests and older pickled
Tune callbacks (``Tuner.restore`` of a sweep started before the split) look up here.
"""
from __future__ import annotations

from .console import echo
from .figures import baseline_label
from .fronts import finish_sweep, records_csv
from .mlflow_client import RetryingClient, transient
from .tracking_callback import TrackingCallback, progress_line, trial_files
from .tracking_read import SweepReader, open_sweep, read_state, record_from_run, ui_lines, ui_url
from .tracking_write import SweepTracker, flatten, git_commit, runnable_yaml

__all__ = ["RetryingClient", "SweepReader", "SweepTracker", "TrackingCallback", "baseline_label", "echo",
           "finish_sweep", "flatten", "git_commit", "open_sweep", "progress_line", "read_state", "record_from_run",
           "records_csv", "runnable_yaml", "transient", "trial_files", "ui_lines", "ui_url"]
