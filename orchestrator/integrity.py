"""Authenticated resume state: Ray Tune's own state files are pickles, so a resumed sweep
loads them only after checking an HMAC made with a key that never lives on the storage.

The key is ``$BIBAU_STATE_KEY`` (any string; a cluster gives every driver the same secret), else
``~/.config/bibau/state.key`` (``$XDG_CONFIG_HOME`` honoured), created with 32 random bytes and
mode 0600 on first use. Whoever can write the shared storage cannot forge a signature, so a
planted ``tuner.pkl`` or experiment state is refused before anything is unpickled.

The signature file (``<sweep>/tune-state.sig.json``) lists, per state file of the Tune folder,
the SHA-256 of the last few versions the driver wrote (Tune copies its snapshot to the storage
in the background, so the storage may hold the one before the newest), and binds them to the
sweep id and the spec fingerprint.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Iterable

from ray import tune

from trainables.config import ConfigError

KEY_ENV = "BIBAU_STATE_KEY"
SIGNATURE_FILE = "tune-state.sig.json"
_KEEP = 8  # versions of one file that stay valid (the storage copy may lag behind the driver's)
_IGNORED = {".validate_storage_marker"}  # empty files Tune writes to test the storage; never loaded


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bibau" / "state.key"


def state_key(create: bool = True) -> bytes:
    """The signing key: ``$BIBAU_STATE_KEY``, else the user's key file (made on first use)."""
    env = os.environ.get(KEY_ENV)
    if env:
        return hashlib.sha256(env.encode()).digest()
    path = key_file()
    if path.is_file():
        data = path.read_bytes()
        if len(data) < 16:
            raise ConfigError(f"{path}: the resume-state key is too short ({len(data)} bytes); delete it to make a new one")
        return data
    if not create:
        raise ConfigError(f"no resume-state key: set ${KEY_ENV} or keep the key file {path} of the driver that "
                          "started the sweep")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
    finally:
        os.close(fd)
    return key


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mac(key: bytes, body: dict) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def state_files(tune_dir: Path) -> list[Path]:
    """The files of a Tune folder that Tune may unpickle on restore: every top-level file (tuner.pkl,
    experiment_state-*, search_gen_state-*, searcher-state-*, callback states) and any ``*.pkl``
    in a trial folder."""
    if not tune_dir.is_dir():
        return []
    # names starting with "." are Tune's half-written temporaries: it loads files by patterns
    # (tuner.pkl, experiment_state-*, ...) that never match them
    out = [p for p in tune_dir.iterdir() if p.is_file() and p.name not in _IGNORED and not p.name.startswith(".")]
    out += [p for p in tune_dir.glob("*/*.pkl") if p.is_file() and p.name != "params.pkl"]
    return sorted(out)


class StateSigner:
    """Signs the Tune folder of one sweep and checks it before a resume."""

    def __init__(self, sweep_dir: Path, sweep_id: str, fingerprint: str, key: bytes | None = None):
        self.sweep_dir = Path(sweep_dir)
        self.sweep_id = sweep_id
        self.fingerprint = fingerprint
        self.key = key if key is not None else state_key()
        self.files: dict[str, list[str]] = {}

    @property
    def path(self) -> Path:
        return self.sweep_dir / SIGNATURE_FILE

    def load(self) -> dict[str, list[str]]:
        """The verified list of signed versions; a ConfigError when missing, altered or foreign."""
        p = self.path
        if not p.is_file():
            raise ConfigError(f"--resume: {p} is missing: this sweep's Tune state was never signed (started by an "
                              "older bibau?) or the file was removed; refusing to load it. Start a new sweep")
        try:
            doc = json.loads(p.read_text())
            body, mac = doc["body"], doc["hmac"]
            if not isinstance(body, dict) or not isinstance(mac, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"--resume: {p} is not a signature file; refusing to load the Tune state") from None
        if not hmac.compare_digest(_mac(self.key, body), mac):
            raise ConfigError(f"--resume: the signature in {p} does not match this driver's key ({key_source()}): "
                              "the Tune state was altered, or signed with another key; nothing was loaded")
        if body.get("sweep_id") != self.sweep_id or body.get("spec_fingerprint") != self.fingerprint:
            raise ConfigError(f"--resume: {p} belongs to sweep {body.get('sweep_id')!r} of spec "
                              f"{body.get('spec_fingerprint')!r}, not {self.sweep_id!r} of {self.fingerprint!r}")
        files = body.get("files")
        if not isinstance(files, dict):
            raise ConfigError(f"--resume: {p}: no file list; refusing to load the Tune state")
        return {str(k): [str(h) for h in v] for k, v in files.items() if isinstance(v, list)}

    def sign(self, paths: Iterable[Path], root: Path) -> None:
        """Add the current content of ``paths`` (named relative to ``root``) and rewrite the signature."""
        changed = False
        for p in paths:
            try:
                digest = _sha256(p)
            except OSError:
                continue  # replaced while we looked; the next call signs the new one
            name = p.relative_to(root).as_posix()
            versions = self.files.setdefault(name, [])
            if digest not in versions:
                versions.append(digest)
                del versions[:-_KEEP]
                changed = True
        if changed or not self.path.exists():
            body = {"version": 1, "sweep_id": self.sweep_id, "spec_fingerprint": self.fingerprint, "files": self.files}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"body": body, "hmac": _mac(self.key, body)}, indent=1))
            tmp.replace(self.path)

    def verify(self, tune_dir: Path) -> int:
        """Check every file Tune could unpickle from ``tune_dir``; returns how many were checked."""
        self.files = self.load()
        checked = 0
        for p in state_files(tune_dir):
            name = p.relative_to(tune_dir).as_posix()
            if _sha256(p) not in self.files.get(name, []):
                raise ConfigError(f"--resume: {p} is not a file this sweep's driver wrote (no valid signature); "
                                  "someone with write access to the storage changed or planted it. Nothing was "
                                  "loaded; remove it or start a new sweep")
            checked += 1
        return checked


def key_source() -> str:
    return f"${KEY_ENV}" if os.environ.get(KEY_ENV) else str(key_file())


# -- signing while Tune runs -------------------------------------------------------------------------

_SIGNERS: dict[str, StateSigner] = {}  # sweep id -> signer; the key stays in this process, never in a pickle


def register(signer: StateSigner) -> None:
    _SIGNERS[signer.sweep_id] = signer


class SigningCallback(tune.Callback):
    """Signs each experiment snapshot right after Tune writes it, and keeps a trial's error out of
    pickles (Tune would otherwise unpickle ``error.pkl`` from the storage when it builds results)."""

    def __init__(self, sweep_id: str):
        self.sweep_id = sweep_id
        self._seen: dict[str, tuple[int, int]] = {}

    def __getstate__(self) -> dict:  # Tune pickles its callbacks with the experiment; no key inside
        return {"sweep_id": self.sweep_id, "_seen": {}}

    def _sign(self, trials) -> None:
        signer = _SIGNERS.get(self.sweep_id)
        if signer is None or not trials:
            return
        staging = Path(trials[0].storage.experiment_driver_staging_path)
        if not staging.is_dir():
            return
        fresh = []
        for p in staging.iterdir():
            if p.name.startswith(".") or not p.is_file():
                continue
            try:
                st = p.stat()
            except OSError:
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            if self._seen.get(p.name) != stamp:
                self._seen[p.name] = stamp
                fresh.append(p)
        if fresh:
            signer.sign(fresh, staging)

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._sign(trials)  # runs after the controller's checkpoint() of the same step

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        try:
            pickled = trial.pickled_error_file
            trial.run_metadata.pickled_error_filename = None  # results fall back to the text error file
            if pickled and Path(pickled).is_file():
                Path(pickled).unlink()
        except Exception:  # the text error stays; this is hardening only
            pass

    def on_experiment_end(self, trials: list, **info) -> None:
        self._sign(trials)
