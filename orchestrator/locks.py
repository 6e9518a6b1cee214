"""Locks on the storage folder, which may be shared between nodes (NFS):

* :class:`DriverLease`: one driver per sweep. A JSON file (host, pid, token, heartbeat) created
  with ``O_EXCL``; a heartbeat thread refreshes it. A second driver, or a ``--resume`` while the
  first driver lives, is refused; a lease whose holder is dead (same host and the pid gone, or no
  heartbeat for ``stale_s``) is taken over.
* :func:`file_lock`: an ``flock`` around short critical sections that several sweeps sharing a
  storage folder run at once (creating the MLflow SQLite database and experiment).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from trainables.config import ConfigError

LEASE_FILE = "driver.lease"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class SweepBusy(ConfigError):
    """Another live driver holds the sweep: no input was wrong, so the CLI does not call it one."""

    label = "sweep busy"


class DriverLease:
    """The lease of one sweep's driver; see the module docstring."""

    def __init__(self, folder: Path, *, heartbeat_s: float = 5.0, stale_s: float = 60.0):
        self.path = Path(folder) / LEASE_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _doc(self) -> dict:
        return {"host": self.host, "pid": self.pid, "token": self.token, "started": getattr(self, "_started", time.time()),
                "heartbeat": time.time()}

    def read(self) -> dict | None:
        try:
            doc = json.loads(self.path.read_text())
            return doc if isinstance(doc, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: judged by its age below

    def holder_dead(self, doc: dict) -> bool:
        try:
            age = time.time() - float(doc.get("heartbeat", 0))
        except (TypeError, ValueError):
            age = float("inf")
        if not doc:
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else float("inf")
        if doc.get("host") == self.host and isinstance(doc.get("pid"), int) and not _pid_alive(doc["pid"]):
            return True
        return age > self.stale_s

    def acquire(self) -> "DriverLease":
        self._started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                doc = self.read()
                if doc is None:
                    continue  # released meanwhile
                if not self.holder_dead(doc):
                    beat = doc.get("heartbeat")
                    ago = f"{time.time() - float(beat):.0f}s ago" if isinstance(beat, (int, float)) else "unknown"
                    raise SweepBusy(
                        f"sweep {self.path.parent.name} is being run by another driver (host {doc.get('host')!r}, "
                        f"pid {doc.get('pid')}, last heartbeat {ago}); wait for it to end, or stop it and then "
                        f"--resume (a dead driver's lease is taken over; a silent one after {self.stale_s:.0f}s)")
                # take over: only one contender wins the rename of the stale lease
                try:
                    os.rename(self.path, self.path.with_name(f"{LEASE_FILE}.stale-{self.token}"))
                    os.unlink(self.path.with_name(f"{LEASE_FILE}.stale-{self.token}"))
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._doc(), fh)
            self._thread = threading.Thread(target=self._beat, name="bibau-lease", daemon=True)
            self._thread.start()
            return self
        raise SweepBusy(f"{self.path}: could not take the sweep's lease (another driver is starting); try again")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            doc = self.read()
            if not doc or doc.get("token") != self.token:
                self.lost = True
                print(f"warning: the lease {self.path} was taken over by another driver "
                      f"({(doc or {}).get('host')}, pid {(doc or {}).get('pid')})", flush=True)
                return
            tmp = self.path.with_name(f".{LEASE_FILE}.{self.token}.tmp")
            try:
                tmp.write_text(json.dumps(self._doc()))
                tmp.replace(self.path)
            except OSError:
                pass  # a full or flaky disk: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        doc = self.read()
        if doc and doc.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> "DriverLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created); waits up to ``timeout_s``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
