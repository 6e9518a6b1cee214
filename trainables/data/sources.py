"""Where a data set's files are: ``data.root`` or the default places, with a clear error when
nothing usable is found. Nothing is downloaded unless ``data.download`` is true."""
from __future__ import annotations

import contextlib
import contextvars
import os
from pathlib import Path
from typing import Callable, TypeVar

from ..config import ConfigError
from .base import DataConfig

L = TypeVar("L")


def download_dir() -> Path:
    """Where downloads go when data.root is not set (the decoded cache is beside it, in data/)."""
    return Path.home() / ".cache" / "bibau" / "datasets"


class DataNotFoundError(ConfigError):
    """No usable data at ``data.root`` or the default places."""


class Located(Exception):
    """Raised by :func:`find_root` under :func:`locate_only`: the data is there (or may be downloaded)."""

    def __init__(self, path: Path | None):
        super().__init__(str(path))
        self.path = path


_LOCATE_ONLY = contextvars.ContextVar("bibau_locate_only", default=False)


@contextlib.contextmanager
def locate_only():
    """Within this block :func:`find_root` stops with :class:`Located` instead of returning, so a
    loader can be asked whether its data is present without decoding it."""
    token = _LOCATE_ONLY.set(True)
    try:
        yield
    finally:
        _LOCATE_ONLY.reset(token)


def repo_shared_data() -> Path:
    """``../shared/data`` beside the repository (where the offline CIFAR-10 archive is kept)."""
    import trainables

    return Path(trainables.__file__).resolve().parents[1].parent / "shared" / "data"


def default_candidates(patterns: list[str], extra: list[Path] = ()) -> list[Path]:
    """``$BIBAU_DATA`` itself and its entries matching ``patterns``, then the same in
    ``~/.cache/bibau/datasets``, then ``extra``."""
    out: list[Path] = []
    bases = [Path(os.environ["BIBAU_DATA"]).expanduser()] if os.environ.get("BIBAU_DATA") else []
    bases.append(download_dir())
    for base in bases:
        out.append(base)
        if base.is_dir():
            for pattern in patterns:
                out += sorted(base.glob(pattern))
    return out + list(extra)


def find_root(cfg: DataConfig, name: str, detect: Callable[[Path], L | None], *, patterns: list[str],
              accepted: str, extra: list[Path] = (),
              download: Callable[[Path], None] | None = None) -> tuple[Path, L]:
    """The source to read and its layout (what ``detect`` found there).

    ``detect(path)`` returns a layout description or None. With ``data.root`` only that path is
    tried; otherwise the default candidates in order. ``download(dest)`` runs only when
    ``data.download`` is true and nothing was found.
    """
    if cfg.root is not None:
        tried = [Path(cfg.root).expanduser()]
    else:
        tried = default_candidates(patterns, extra)
    seen: list[Path] = []
    for path in tried:
        if path in seen:
            continue
        seen.append(path)
        layout = detect(path) if path.exists() else None
        if layout is not None:
            if _LOCATE_ONLY.get():
                raise Located(path)
            return path, layout
    if cfg.download and download is not None:
        if _LOCATE_ONLY.get():
            raise Located(None)  # nothing here yet, and the download is allowed
        dest = tried[0] if cfg.root is not None else download_dir() / name
        download(dest)
        layout = detect(dest)
        if layout is not None:
            return dest, layout
        raise DataNotFoundError(f"data.root: downloaded {name} to {dest}, but found no usable layout there")
    where = "; ".join(f"{p}{'' if p.exists() else ' (missing)'}" for p in seen)
    hint = ("set data.root to where the data is" +
            (", or data.download: true to let torchvision download it" if download else ""))
    raise DataNotFoundError(
        f"data.root: no {name} data found; looked at: {where}. Accepted: {accepted}. {hint}"
    )
