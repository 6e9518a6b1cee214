"""Content hashes: cache keys of trained models and the version of the code that trains them."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

PACKAGE = "bibau-sweep"
DEFAULT_CACHE = Path("~/.cache/bibau/models")
_ROOT = Path(__file__).resolve().parent
# the sources whose change changes what a trained attack-stage model is (attack_stage.py: how the
# attack stage seeds, splits and poisons; tasks/: each setting's model and training)
TRAINING_SOURCES = ("data", "models", "attacks", "contrastive", "tasks", "train.py", "optim.py", "runtime.py",
                    "attack_stage.py")
# what only the contrastive (CLIP) setting runs (folders or files): a change there keeps every
# classifier's cached model
CONTRASTIVE_SOURCES = ("contrastive", "tasks/contrastive.py")


def _canonical(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"content_hash: {obj} has no canonical JSON form")
        return obj
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"content_hash: cannot hash a {type(obj).__name__} ({obj!r})")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, ASCII: the same content always gives the same text."""
    return json.dumps(_canonical(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def content_hash(obj: Any, length: int = 16) -> str:
    """sha256 of the canonical JSON of ``obj`` (dicts, lists, numbers, strings, config dataclasses)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:  # a source checkout that was never installed
        import tomllib

        pyproject = _ROOT.parent / "pyproject.toml"
        if pyproject.is_file():
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        return "0+unknown"


# entry point groups whose plugins change what an attack-stage model is (registry.py)
PLUGIN_GROUPS = ("bibau.datasets", "bibau.models", "bibau.attacks")


def plugin_sources() -> list[tuple[str, bytes]]:
    """(entry point, source) of every installed plugin that can change a trained attack-stage model:
    the entry point's own module file, found without importing it."""
    import importlib.util
    from importlib.metadata import entry_points

    out = []
    for group in PLUGIN_GROUPS:
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            label = f"{group}:{ep.name}={ep.value} ({dist.name} {dist.version})" if dist else f"{group}:{ep.name}={ep.value}"
            try:
                spec = importlib.util.find_spec(ep.module)
                source = Path(spec.origin).read_bytes() if spec and spec.origin and Path(spec.origin).is_file() else b""
            except (ImportError, ValueError, OSError):
                source = b""
            out.append((label, source))
    return out


def _contrastive_only(relative: str) -> bool:
    return any(relative == s or relative.startswith(s + "/") for s in CONTRASTIVE_SOURCES)


@functools.cache
def code_version(contrastive: bool = True) -> str:
    """``<package version>+<hash of the training sources>``: a cache entry is reused only by
    the code that would have produced it. ``contrastive=False`` (a classifier's attack stage)
    leaves out the sources only CLIP runs use. Installed data set, model and attack plugins add
    ``+plugins<hash>`` (their entry points, versions and module sources)."""
    h = hashlib.sha256()
    for entry in TRAINING_SOURCES:
        path = _ROOT / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path] if path.is_file() else []
        for f in files:
            if not contrastive and _contrastive_only(f.relative_to(_ROOT).as_posix()):
                continue
            h.update(f.relative_to(_ROOT).as_posix().encode() + b"\0")
            h.update(f.read_bytes() + b"\0")
    version = f"{package_version()}+{h.hexdigest()[:12]}"
    plugins = plugin_sources()
    if plugins:  # none installed: the same key as before plugins existed
        p = hashlib.sha256()
        for label, source in plugins:
            p.update(label.encode() + b"\0" + source + b"\0")
        version += f"+plugins{p.hexdigest()[:8]}"
    return version


def cache_root(cfg) -> Path:
    """The folder of a run's cached attack-stage models (``RunConfig.cache_dir``, else the default)."""
    return Path(cfg.cache_dir or DEFAULT_CACHE).expanduser()


def write_entry(entry: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Fill a cache entry through ``write(folder)`` in a private folder, then rename it into
    place: a concurrent reader sees either no entry or a complete one. An entry another process
    renamed into place first (it has ``model.json``) wins over a failed rename."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        write(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        if entry.exists():  # a stale entry, or one a concurrent trial just wrote
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "model.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
