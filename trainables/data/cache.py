"""On-disk cache of decoded data sets.

Decoding tens of thousands of JPEGs takes seconds to minutes, and every trial of a sweep needs
the same arrays, so each data set is decoded once and its uint8 tensors are stored as a
safetensors file (no pickle), keyed by a hash of the source (path, sizes, modification times)
and the image size. Writes go to a temporary file that is renamed into place, and decoding
happens under a file lock, so concurrent Ray trials neither read half-written files nor all
decode at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .base import Dataset, DataConfig, ImageSet

# Bump when the decoded content for the same source changes (decoding, ordering, resizing).
CACHE_VERSION = 1

_TENSORS = ("train_x", "train_y", "test_x", "test_y")


def cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else Path.home() / ".cache" / "bibau" / "data"


def source_signature(path: Path) -> dict:
    """What identifies a source's content cheaply: its path plus sizes and mtimes of its files.

    A folder is walked (one stat per file): editing, adding or removing an image changes it.
    """
    path = Path(path).resolve()
    if path.is_file():
        st = path.stat()
        return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            count += 1
    return {"path": str(path), "files": count, "digest": h.hexdigest()[:16]}


def cache_path(cfg: DataConfig, name: str, key: dict) -> Path:
    blob = json.dumps({"version": CACHE_VERSION, "name": name, **key}, sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return cache_dir(cfg) / f"{name}-{digest}.safetensors"


def cached(cfg: DataConfig, name: str, key: dict, build: Callable[[], Dataset]) -> Dataset:
    """The data set stored under ``key``, built by ``build()`` and stored on a miss.

    ``dataset.info`` gets ``cache`` (the file) and ``cache_hit``.
    """
    path = cache_path(cfg, name, key)
    found = read_cache(path)
    if found is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_name(path.name + ".lock")):
            found = read_cache(path)  # another process may have written it while we waited
            if found is None:
                start = time.perf_counter()
                built = build()
                built.info["decode_seconds"] = round(time.perf_counter() - start, 3)
                write_cache(path, built)
                built.info.update(cache=str(path), cache_hit=False)
                return built
    found.info.update(cache=str(path), cache_hit=True)
    return found


def write_cache(path: Path, ds: Dataset) -> None:
    tensors = {
        "train_x": ds.train.x.contiguous(), "train_y": ds.train.y.contiguous(),
        "test_x": ds.test.x.contiguous(), "test_y": ds.test.y.contiguous(),
    }
    meta = {
        "name": ds.name,
        "classes": json.dumps(ds.classes),
        "hflip": json.dumps(ds.hflip),
        "mean": json.dumps(ds.mean),
        "std": json.dumps(ds.std),
        "info": json.dumps(ds.info, default=str),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def read_cache(path: Path) -> Dataset | None:
    """The cached data set, or None if absent or unreadable (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            t = {k: fh.get_tensor(k) for k in _TENSORS}
        mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
        return Dataset(
            name=meta["name"],
            train=ImageSet(t["train_x"], t["train_y"]),
            test=ImageSet(t["test_x"], t["test_y"]),
            classes=json.loads(meta["classes"]),
            hflip=json.loads(meta["hflip"]),
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
            info=json.loads(meta["info"]),
        )
    except Exception as exc:  # a damaged or foreign file: decode again rather than fail
        warnings.warn(f"ignoring unreadable data cache {path}: {exc}", stacklevel=2)
        return None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic writes still keep readers safe
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released by the kernel if the holder dies
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
