"""Which sweep ``bibau sweep --resume`` continues: a named one, or the newest unfinished sweep of
the spec (by its fingerprint), refused unless its saved state names this spec.
"""
from __future__ import annotations

from pathlib import Path

from trainables.config import ConfigError

from .tracking_read import read_state

def find_resumable(folder: Path, name: str, which: str | bool, fingerprint: str | None = None) -> Path:
    """The folder of the sweep to resume: ``which`` is a sweep id, or True for the newest unfinished
    one started from the spec with ``fingerprint`` (specs sharing a name share the folder)."""
    if isinstance(which, str):
        d = folder / which
        if "/" in which or which in ("", ".", "..") or not (d / "state.json").is_file():
            raise ConfigError(f"--resume {which}: no sweep {which!r} under {folder}")
        return d
    candidates = []
    for state_file in folder.glob("*/state.json"):
        try:
            state = read_state(state_file)
        except ConfigError:
            continue
        if state.get("status") != "finished" and (fingerprint is None or state.get("spec_fingerprint") == fingerprint):
            candidates.append((state_file.stat().st_mtime, state_file.parent))
    if not candidates:
        raise ConfigError(f"--resume: no unfinished sweep of this spec (name {name!r}, fingerprint {fingerprint}) "
                          f"under {folder}; start one without --resume, or name one: --resume SWEEP_ID")
    return max(candidates)[1]


def check_resumable(sweep_dir: Path, fingerprint: str) -> dict:
    """The saved state of a sweep to resume, refused unless it names this spec's fingerprint."""
    saved = read_state(sweep_dir / "state.json")
    if saved.get("spec_fingerprint") != fingerprint:
        if saved.get("spec_fingerprint") is None:
            raise ConfigError(f"--resume: {sweep_dir / 'state.json'} names no spec fingerprint, so it cannot be "
                              "checked to belong to this spec; start a new sweep instead")
        raise ConfigError(f"--resume: sweep {sweep_dir.name} was started from a different spec (its studies, "
                          "budgets or configs changed); start a new sweep instead")
    return saved
