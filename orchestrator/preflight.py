"""Checks that need no training, run by ``--check`` and at the start of every sweep and run:
folders writable (storage, model cache, data cache, ``--out``), the MLflow tracking URI
reachable, every data set present (or its download allowed), every trigger file a readable
image, a model's pretrained weights file present, loadable without pickle and fitting it. Each failure is a :class:`ConfigError` naming the field; nothing is created (a folder is
probed with a temporary file in its nearest existing ancestor) and nothing is written to MLflow.
"""
from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable

from trainables.config import ConfigError, to_dict

SQLITE_MAGIC = b"SQLite format 3\x00"


def check_writable_dir(path: str | Path, field: str) -> Path:
    """``path`` is (or could be created as) a folder this process can write in."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{field}: {str(path)!r} cannot be a folder: {probe} is a file")
    try:
        fd, name = tempfile.mkstemp(prefix=".bibau-write-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ConfigError(f"{field}: {str(path)!r} is not writable ({probe}: {exc.strerror or exc})") from None
    return p


def check_tracking(uri: str, field: str, timeout_s: float = 10.0) -> str:
    """The tracking URI can be used: a SQLite file (or its folder) writable, a server answering."""
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise ConfigError(f"{field}: {uri!r}: a SQLite URI is sqlite:///ABSOLUTE/PATH.db (three slashes)")
        db = Path(uri[len("sqlite:///"):])
        if db.exists():
            if not db.is_file():
                raise ConfigError(f"{field}: {uri!r}: {db} is not a file")
            try:
                with open(db, "r+b") as fh:
                    head = fh.read(len(SQLITE_MAGIC))
            except OSError as exc:
                raise ConfigError(f"{field}: {uri!r}: {db} is not writable ({exc.strerror or exc})") from None
            if head and head != SQLITE_MAGIC:
                raise ConfigError(f"{field}: {uri!r}: {db} is not a SQLite database")
        check_writable_dir(db.parent, field)
        return f"SQLite {db}"
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
        body = json.dumps({"max_results": 1}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:  # noqa: S310 (the user's own server)
                resp.read(1 << 16)
        except urllib.error.HTTPError as exc:
            hint = " (credentials: MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN)" if exc.code in (401, 403) else ""
            raise ConfigError(f"{field}: {uri!r} answered HTTP {exc.code} to a read of its experiments{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"{field}: MLflow server {uri!r} is not reachable ({reason}); start it, or fix the URI") from None
        return f"MLflow server {uri}"
    if uri.startswith("file:") or "://" not in uri:
        folder = uri[len("file://"):] if uri.startswith("file://") else uri[len("file:"):] if uri.startswith("file:") else uri
        check_writable_dir(folder, field)
        return f"file store {folder}"
    return f"{uri} (not checked: scheme unknown to bibau)"


def _image_fields(section: Any, path: str) -> Iterable[tuple[str, str]]:
    """(field path, value) of every string field of a config section that names an image file."""
    if section is None or not is_dataclass(section):
        return
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, str) and ("image" in f.name or "trigger" in f.name or "pattern" in f.name) \
                and not value.startswith("sklearn:") and Path(value).expanduser().is_file():
            yield f"{path}.{f.name}", value


def check_image(path: str, field: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(Path(path).expanduser()) as img:
            img.load()  # decodes the pixels: a truncated file fails here, not mid-training
            if img.width < 1 or img.height < 1:
                raise ValueError("empty image")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{field}: {path!r} is not a readable image ({type(exc).__name__}: {exc})") from None
    except Image.DecompressionBombError:
        raise ConfigError(f"{field}: {path!r} is too large an image to be a trigger") from None


def check_run(cfg, *, out: str | Path | None = None, out_field: str = "--out", device: bool = True,
              seen: dict | None = None) -> list[str]:
    """Every check of one trial config (a ``RunConfig``); returns what was found, one line each."""
    from trainables.data.load import locate_dataset
    from trainables.models.base import check_model_files
    from trainables.runtime import resolve_device
    from trainables.attack_stage import cache_root

    seen = {} if seen is None else seen
    lines: list[str] = []
    if out is not None:
        check_writable_dir(out, out_field)
    cache = cache_root(cfg)
    if ("cache", str(cache)) not in seen:
        check_writable_dir(cache, "cache_dir")
        seen[("cache", str(cache))] = True
        lines.append(f"model cache {cache}: writable")
    data_key = ("data", json.dumps(to_dict(cfg.data), sort_keys=True))
    if data_key not in seen:
        if cfg.data.cache_dir is not None:
            check_writable_dir(cfg.data.cache_dir, "data.cache_dir")
        where = locate_dataset(cfg.data)
        seen[data_key] = True
        lines.append(f"data {cfg.data.name}: {where}")
    model_key = ("model", json.dumps(to_dict(cfg.model), sort_keys=True))
    if model_key not in seen:
        found = check_model_files(cfg.model, "model")
        seen[model_key] = True
        if found:
            lines.append(found)
    external = getattr(cfg.attack, "external_model", None)
    if external is not None and ("external", external) not in seen:
        from trainables.external import check_external

        lines.append(check_external(external))
        seen[("external", external)] = True
    clip = getattr(cfg, "clip", None)
    if clip is not None and ("clip", clip.weights, clip.captions) not in seen:
        # the contrastive setting's files: CLIP weights present, pickle-free, fitting clip.arch; every captioned image
        clip.check_files("clip")
        seen[("clip", clip.weights, clip.captions)] = True
        if clip.weights is not None:
            lines.append(f"clip.weights {clip.weights}: loads without pickle and fits {clip.arch}")
        if clip.from_files():
            lines.append(f"clip.captions {clip.captions}: every image present")
    for section, name in ((cfg.attack, "attack"), (cfg.defense, "defense")):
        for field, value in _image_fields(section, name):
            if ("image", value) not in seen:
                check_image(value, field)
                seen[("image", value)] = True
                lines.append(f"{field} {value}: a readable image")
    attack_key = ("attack", json.dumps([to_dict(cfg.attack), to_dict(cfg.data)], sort_keys=True, default=str))
    if attack_key not in seen:
        check_attack(cfg)
        seen[attack_key] = True
    if device:
        try:
            resolve_device(cfg.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return lines


def check_attack(cfg) -> None:
    """The attack built as the attack stage builds it, on the image shape and class count the data
    config implies without loading (when it does): what its constructor refuses (a trigger that
    fits not the images) is refused now, not inside the attack stage."""
    from trainables.registry import ATTACKS

    shape, classes = cfg.data.image_shape(), cfg.data.class_count()
    if shape is None or classes is None:
        return
    try:
        ATTACKS.get(cfg.attack.name)(cfg.attack, shape, classes)
    except ConfigError:
        raise
    except (ValueError, OSError) as exc:
        raise ConfigError(f"attack: {cfg.attack.name} cannot be built for {cfg.data.name} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None


def local_capacity(num_cpus: int | None = None, num_gpus: float | None = None) -> dict[str, float]:
    """What a local Ray started by the sweep will have: ``--num-cpus``/``--num-gpus``, else this
    machine's cores and CUDA devices (Ray detects no more than these)."""
    import ray
    import torch

    running = {}
    if ray.is_initialized():  # the sweep joins a Ray this process started (a benchmark's logical GPUs)
        res = ray.cluster_resources()
        running = {"cpus": float(res.get("CPU", 0.0)), "gpus": float(res.get("GPU", 0.0))}
    cpus = float(num_cpus) if num_cpus is not None else running.get("cpus", float(os.cpu_count() or 1))
    gpus = float(num_gpus) if num_gpus is not None else running.get("gpus", float(torch.cuda.device_count()))
    return {"cpus": cpus, "gpus": gpus}


def check_resources(spec, capacity: dict[str, float], where: str) -> list[str]:
    """A trial or attack task asking more than the cluster's biggest node has would wait forever
    in Ray's queue ("No available node types can fulfill resource request"): refused."""
    asks = [("resources", spec.resources)]
    if spec.attack_resources is not None:
        asks.append(("attack_resources", spec.attack_resources))
    for field, res in asks:
        for key in ("cpus", "gpus"):
            want, have = float(getattr(res, key)), capacity[key]
            if want > have:
                # a cluster spec checked on a laptop lands here: say how to check it for its cluster
                raise ConfigError(f"{field}.{key}: {want:g} per trial, but {where} has {have:g}; allowed: at most "
                                  f"{have:g} (or run on a larger cluster with --address HEAD; to check a cluster's "
                                  "spec from this machine: bibau sweep SPEC --check --address HEAD, which skips "
                                  "this machine's size)")
    return [f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU per trial fit {where} "
            f"({capacity['cpus']:g} CPU, {capacity['gpus']:g} GPU)"]


def remote_cluster(address: str | None) -> bool:
    return bool(address or os.environ.get("RAY_ADDRESS"))


def check_sweep(spec, plan, *, address: str | None = None, num_cpus: int | None = None,
                num_gpus: float | None = None) -> list[str]:
    """Every check of a sweep: storage, tracking, resources (of a local Ray; a remote cluster's are
    checked when the sweep joins it), and each attack stage's and study's trial config."""
    from trainables.config import build
    from trainables.schema import RunConfig

    check_writable_dir(spec.storage_path, "storage")
    lines = [f"storage {spec.storage_path}: writable"]
    if not remote_cluster(address):
        lines += check_resources(spec, local_capacity(num_cpus, num_gpus), "the local Ray")
    else:
        lines.append(f"resources: {spec.resources.cpus:g} CPU, {spec.resources.gpus:g} GPU per trial not checked here "
                     "(a remote cluster: the sweep warns when it joins one without a node that size)")
    field = "tracking.uri" if spec.tracking.uri else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") \
        else "storage (its mlflow.db)"
    lines.append(f"tracking: {check_tracking(spec.tracking_uri, field)}: reachable")
    seen: dict = {}
    configs = [(f"attacks ({a.label})", a.config) for a in plan.attacks]
    configs += [(f"study {s.key}", s.config) for s in plan.studies]
    for where, mapping in configs:
        try:
            # the driver may have no GPU while the workers do: the device is checked where it runs
            lines += check_run(build(RunConfig, mapping), device=False, seen=seen)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return lines
