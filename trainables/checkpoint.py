"""Model files: safetensors weights plus a JSON sidecar that says how to rebuild the model.

Loading never unpickles. A ``.pt``/``.pth`` file is read with ``torch.load(weights_only=True)``
(a plain state dict of tensors loads); anything that would need the full pickle machinery is
refused, with the reason and how to convert it, and is never retried without the guard.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, build
from .models.base import Classifier, ModelConfig, create_model
from .runtime import prepare_model

REQUIRED_META = ("model", "num_classes", "in_channels", "mean", "std")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pkl", ".pickle")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# safetensors and mkstemp create owner-only files; cached models are shared between users
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


class CheckpointError(ValueError):
    """A model file that cannot (or must not) be loaded; the message says why and what to do."""


def json_safe(obj: Any) -> Any:
    """Strict-JSON form: NaN/inf become null, tuples lists, keys strings, other objects their str."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: concurrent readers see the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(json_safe(data), fh, indent=2, allow_nan=False, default=str)
        fh.write("\n")
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Save named tensors (an attack's trigger, indices) as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))
    os.chmod(path, FILE_MODE)
    return path


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def save_checkpoint(directory: Path, model: torch.nn.Module, meta: dict, name: str = "model") -> Path:
    """Write ``<name>.safetensors`` (the state dict, on the CPU) and ``<name>.json`` (``meta``,
    which must say how to rebuild the model: model config, classes, channels, normalisation)."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_checkpoint: meta lacks {', '.join(missing)} (needed to rebuild the model)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.safetensors"
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    os.chmod(path, FILE_MODE)
    write_json(directory / f"{name}.json", meta)
    return path


def _sidecar(path: Path) -> dict:
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path}: the sidecar {meta_path.name} is missing; it must hold {', '.join(REQUIRED_META)} "
            "(written by save_checkpoint) to rebuild the model")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: lacks {', '.join(missing)}; cannot rebuild the model")
    return meta


def _torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch warns about a file's pickle protocol before refusing it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the restricted unpickler rejects
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain state dict of tensors and would need pickle, "
            f"which can run arbitrary code ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Untrusted model files are never unpickled. If you trust the file, convert it yourself in a "
            "separate process: load it, take model.state_dict(), save that with "
            "safetensors.torch.save_file(state, 'model.safetensors') and write model.json beside it "
            f"({', '.join(REQUIRED_META)})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), got {type(obj).__name__}")
    return obj


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[Classifier, dict]:
    """Rebuild the model saved at ``path`` (``.safetensors``, its ``.json``, or a weights-only
    ``.pt``/``.pth`` with a JSON sidecar) on ``device``, in eval mode; returns it with its meta."""
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"refusing to load {path}: pickle files are never loaded (they can run arbitrary "
                              "code); save the weights as safetensors instead")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if suffix == ".safetensors":
        state = load_tensors(path)
    elif suffix in TORCH_SUFFIXES:
        state = _torch_state_dict(path)
    else:
        raise CheckpointError(f"{path}: unknown model file type {suffix!r}; allowed: .safetensors, "
                              f"{', '.join(TORCH_SUFFIXES)} (weights only)")
    meta = _sidecar(path)
    if meta.get("clip") is not None:  # a CLIP of the contrastive setting (trainables/contrastive)
        from .contrastive.model import rebuild

        try:
            model = rebuild(meta)
        except ConfigError as exc:
            raise CheckpointError(f"{path.with_suffix('.json')}: {exc}") from None
        return _load_into(model, state, path, f"clip {meta['clip'].get('arch')}", device), meta
    try:
        # the file holds every weight: pretrained weights the model once started from are not read
        model_cfg = build(ModelConfig, {**meta["model"], "weights": None}, "model")
    except ConfigError as exc:
        raise CheckpointError(f"{path.with_suffix('.json')}: {exc}") from None
    model = create_model(model_cfg, int(meta["num_classes"]), int(meta["in_channels"]),
                         tuple(meta["mean"]) if meta["mean"] is not None else None,
                         tuple(meta["std"]) if meta["std"] is not None else None,
                         generator=torch.Generator())  # the weights are overwritten: leave the global RNG alone
    return _load_into(model, state, path, model_cfg.name, device), meta


def _load_into(model: torch.nn.Module, state: dict, path: Path, what: str, device) -> Classifier:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the weights do not fit {what} as the sidecar describes it: {exc}") from None
    device = torch.device(device) if isinstance(device, str) else device
    return prepare_model(model, device).eval()
